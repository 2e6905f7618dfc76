import msgspec
import pytest

from shared import protocol as p


def _roundtrip(msg, union):
    return p.decoder_for(union).decode(p.encode(msg))


def test_every_internal_message_roundtrips():
    params = p.SamplingParams(max_tokens=5, temperature=0.5, stop=["x"], seed=3)
    msgs = [
        (p.AddRequest("r1", [1, 2, 3], params, 1.5, 2), p.FrontendMessage),
        (p.AbortRequests(["a", "b"]), p.FrontendMessage),
        (p.EngineOutputs([p.TokenDelta("r1", 0, [7], "stop", 2)]), p.SchedulerMessage),
        (p.RequestRejected("r1", "too_long", "too long"), p.SchedulerMessage),
        (p.StepPlan(step_id=3, scheduled=[p.ScheduledSeq(1, 4, 0, [5])],
                    new_seqs=[p.NewSeq(1, [1, 2, 3, 4], 4, [5], params)], finished_seq_ids=[9],
                    copy=[(1, 2)]), p.PlanMessage),
        (p.StepResult(3, [11, -1], 0.01), p.WorkerMessage),
        (p.WorkerHello(0, 1, 100, 0, 16, 8192, 49152, [2], "m", "float32", "cpu", {"weights_bytes": 5}),
         p.WorkerMessage),
    ]
    for msg, union in msgs:
        assert _roundtrip(msg, union) == msg


def test_client_messages_roundtrip_and_name_bad_fields():
    gen = p.Generate(request_id="x", prompt="hi", params=p.SamplingParams(max_tokens=3), stream=True)
    assert _roundtrip(gen, p.ClientMessage) == gen
    bad = msgspec.msgpack.encode({"kind": "generate", "request_id": "x", "params": {"max_tokens": "ten"}})
    with pytest.raises(msgspec.ValidationError, match=r"params\.max_tokens"):
        p.decoder_for(p.ClientMessage).decode(bad)
    unknown = msgspec.msgpack.encode({"kind": "generate", "request_id": "x", "bogus": 1})
    with pytest.raises(msgspec.ValidationError, match="bogus"):
        p.decoder_for(p.ClientMessage).decode(unknown)
    with pytest.raises(msgspec.ValidationError):
        p.decoder_for(p.ClientMessage).decode(msgspec.msgpack.encode({"kind": "nope", "request_id": "x"}))


def test_completion_shortcuts():
    c = p.Completion(request_id="r", outputs=[p.CompletionOutput(index=0, text="a", token_ids=[1],
                                                                 finish_reason="stop")],
                     prompt_tokens=2, completion_tokens=1)
    assert (c.text, c.token_ids, c.finish_reason) == ("a", [1], "stop")


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"), ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"stop": [""]}, "stop"), ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_sampling_params_validation_names_the_field(kwargs, field):
    params = p.SamplingParams(**kwargs)  # construction never raises
    with pytest.raises(ValueError, match=field):
        params.validate(vocab_size=1000)


def test_shared_never_imports_torch():
    import subprocess
    import sys
    code = ("import sys, shared.protocol, shared.client, shared.config, launcher.cli, launcher.supervisor; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_frames_of_protocol_version_1_still_decode():
    """Version 2 moved stop-string finishes out of AbortRequests (into FinishOutputs) and added
    protocol_version to the hellos (3 added structured output): a version-1 peer's frames decode,
    and say version 1, so the scheduler can refuse that peer by name instead of misreading it."""
    import msgspec

    old_abort = msgspec.msgpack.encode(["abort", ["a"], [["b", 1]]])  # request_ids, stop_outputs
    assert p.decoder_for(p.FrontendMessage).decode(old_abort) == p.AbortRequests(["a"])
    old_hello = msgspec.msgpack.encode(["fe_hello", "fe-1"])
    assert p.decoder_for(p.FrontendMessage).decode(old_hello).protocol_version == 1
    new_hello = p.FrontendHello("fe-1", protocol_version=p.PROTOCOL_VERSION)
    assert p.decoder_for(p.FrontendMessage).decode(p.encode(new_hello)).protocol_version == p.PROTOCOL_VERSION == 7
