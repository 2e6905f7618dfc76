"""Sampling through the real server on the default model: penalties and min_tokens against
transformers, logprobs against transformers' log-softmax, seeded reproducibility (alone, in a
batch of 32, under forced preemption), abort and disconnect freeing blocks, stop strings."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
import zmq
from server_process import ServerProcess

from shared import protocol as p
from shared.client import AsyncClient, Client, RequestError
from shared.protocol import SamplingParams

pytestmark = pytest.mark.slow

# Our logits match transformers' to ~6e-5 (tests/worker/test_model_vs_transformers.py); a
# log-softmax adds the same order again.
LOGPROB_ATOL = 1e-3
SEEDED_PROMPTS = ["Tell me a story about a dragon", "The best way to learn", "Roses are red,", "Once upon a time",
                  "My favourite food is", "def add(a, b):", "The weather today", "A list of fruits:"]


def _hf_generate(hf_model, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    tok, model = hf_model
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id,
                             eos_token_id=model.generation_config.eos_token_id, **kwargs)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_with_repetition_penalty_and_min_tokens_equals_transformers(server, hf_model):
    with Client(server.address) as c:
        for prompt in ("List the days of the week:", "Write a poem about the sea, the sea, the sea."):
            out = c.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.3))
            assert out.token_ids == _hf_generate(hf_model, out.prompt_token_ids, 16, repetition_penalty=1.3)
        # This answer ends with EOS after ~8 tokens; min_tokens holds EOS back.
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        short = c.chat(chat, SamplingParams(max_tokens=30, temperature=0.0))
        longer = c.chat(chat, SamplingParams(max_tokens=30, temperature=0.0, min_tokens=len(short.token_ids) + 4))
    assert short.finish_reason == "stop" and len(longer.token_ids) > len(short.token_ids) + 4
    assert longer.token_ids == _hf_generate(hf_model, longer.prompt_token_ids, 30,
                                            min_new_tokens=len(short.token_ids) + 4)


def test_logprobs_equal_transformers_log_softmax(server, hf_model):
    _, model = hf_model
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=5, logprobs=5, prompt_logprobs=3)
    prompt = "Logprobs check: the quick brown fox jumps over the lazy dog, then it jumps over the fence again"
    with Client(server.address) as c:
        # Cache the prompt's full blocks first: a request that asks for prompt logprobs must
        # still compute every prompt position rather than take the prefix-cache hit.
        c.generate(prompt, SamplingParams(max_tokens=1))
        hits_before = c.stats()["prefix_cache_hit_tokens"]
        out = c.generate(prompt, params)
        streamed = [lp for d in c.stream(prompt, params) for lp in d.logprobs]
        assert c.stats()["prefix_cache_hit_tokens"] == hits_before
        c.generate(prompt, SamplingParams(max_tokens=1))  # without prompt logprobs the cache does hit
        assert c.stats()["prefix_cache_hit_tokens"] > hits_before
    ids = out.prompt_token_ids + out.token_ids
    with torch.inference_mode():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    prompt_len = len(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == prompt_len > 16
    assert all(item is not None for item in out.prompt_logprobs[1:])
    generated = out.outputs[0].logprobs
    assert len(generated) == len(out.token_ids) and streamed == generated  # seeded: the same again
    positions = [(prompt_len + i, item, 5) for i, item in enumerate(generated)]
    positions += [(i, item, 3) for i, item in enumerate(out.prompt_logprobs) if i > 0]
    for position, item, k in positions:
        row = reference[position - 1]  # logits at p - 1 predict token p
        assert item.token_id == ids[position]
        assert abs(item.logprob - float(row[item.token_id])) < LOGPROB_ATOL
        assert len(item.top_ids) == k and item.top_logprobs == sorted(item.top_logprobs, reverse=True)
        torch.testing.assert_close(torch.tensor(item.top_logprobs), row.topk(k).values, rtol=0, atol=LOGPROB_ATOL)
        torch.testing.assert_close(row[item.top_ids], torch.tensor(item.top_logprobs), rtol=0, atol=LOGPROB_ATOL)
        chosen = row[item.token_id]
        assert int((row > chosen + LOGPROB_ATOL).sum()) < item.rank <= int((row > chosen - LOGPROB_ATOL).sum()) + 1


def _seeded_batch() -> list[tuple[str, SamplingParams]]:
    """32 requests: 24 seeded ones with different filters and penalties, 8 unseeded."""
    batch = []
    for i in range(32):
        extra = [{}, {"top_p": 0.9}, {"top_k": 20}, {"min_p": 0.05}, {"repetition_penalty": 1.2},
                 {"presence_penalty": 0.5, "frequency_penalty": 0.3}][i % 6]
        seed = 1000 + i if i % 4 != 3 else None
        batch.append((SEEDED_PROMPTS[i % len(SEEDED_PROMPTS)],
                      SamplingParams(max_tokens=16, temperature=0.9, seed=seed, ignore_eos=True, **extra)))
    return batch


async def _generate_all(address: str, batch: list[tuple[str, SamplingParams]]) -> list[p.Completion]:
    async with AsyncClient(address) as client:
        return await asyncio.gather(*(client.generate(prompt, params) for prompt, params in batch))


def test_seeded_requests_reproduce_alone_in_a_batch_and_under_preemption(server, tmp_path):
    batch = _seeded_batch()
    target_prompt, target_params = batch[4]  # seeded, with repetition_penalty
    with Client(server.address) as c:
        alone = c.generate(target_prompt, target_params)
        two_outputs = c.generate(target_prompt, SamplingParams(**{**_fields(target_params), "n": 2}))
    in_batch = asyncio.run(_generate_all(server.address, batch))
    assert in_batch[4].token_ids == alone.token_ids
    assert two_outputs.outputs[0].token_ids == alone.token_ids  # output 0 of n draws like n = 1
    assert two_outputs.outputs[1].token_ids != alone.token_ids

    # 16 blocks of 16 tokens hold ~8 of these ~25-token sequences: 32 at once must preempt.
    small = ServerProcess(str(tmp_path / "run"), "--num-kv-blocks", "16", "--block-size", "16")
    try:
        preempted_batch = asyncio.run(_generate_all(small.address, batch))
    finally:
        assert small.stop() == 0
    seeded = [i for i, (_, params) in enumerate(batch) if params.seed is not None]
    assert sum(preempted_batch[i].num_preemptions for i in seeded) > 0, "the small cache should preempt"
    for i in seeded:
        assert preempted_batch[i].token_ids == in_batch[i].token_ids, batch[i]


def _fields(params: SamplingParams) -> dict:
    return {f: getattr(params, f) for f in params.__struct_fields__}


def test_abort_leaving_a_stream_and_disconnect_free_the_blocks(server):
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    with Client(server.address) as c:
        # Leaving a stream early: the SDK aborts it.
        for i, _ in enumerate(c.stream("Count to a thousand:", long)):
            if i == 2:
                break
        stats = c.stats()  # the abort was sent before this query, on the same socket
        assert stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] == 0

    async def abort_while_generating():
        async with AsyncClient(server.address) as client:
            task = asyncio.create_task(client.generate("Count to a thousand:", long, request_id="to-abort"))
            async for _ in client.stream("Say hi", SamplingParams(max_tokens=3, temperature=0.0)):
                pass  # the first request is running by now
            await client.abort("to-abort")
            done = await task
            return done, await client.stats()

    done, stats = asyncio.run(abort_while_generating())
    assert done.finish_reason == "abort" and 0 < len(done.token_ids) < 400
    assert stats["kv_blocks_used"] == 0  # freed before the abort's completion was sent

    # A non-streaming client that goes away: the frontend's keepalive send fails and aborts it.
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(server.address)
    raw.send(p.encode(p.Generate(request_id="vanishing", prompt="Count to a thousand:", params=long)))
    with Client(server.address) as c:
        deadline = time.monotonic() + 60
        while c.stats()["kv_blocks_used"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.stats()["kv_blocks_used"] > 0, "the request never started"
        raw.close(linger=0)
        ctx.term()
        deadline = time.monotonic() + 60
        while c.stats()["requests_in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = c.stats()
    assert stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] == 0
    assert any("vanishing" in e.get("request_ids", []) for e in server.named("frontend.client_gone"))


def _token_pieces(tok, ids: list[int]) -> list[str]:
    texts = [tok.decode(ids[:i], skip_special_tokens=True) for i in range(len(ids) + 1)]
    return [texts[i + 1][len(texts[i]):] for i in range(len(ids))]


def test_stop_strings_spanning_tokens(server, hf_model):
    tok, _ = hf_model
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with Client(server.address) as c:
        full = c.generate("The history of the Roman Empire", greedy)
        pieces = _token_pieces(tok, full.token_ids)
        # A stop string made of the end of one token and the start of the next.
        offset = 0
        for i in range(len(pieces) - 1):
            stop = pieces[i][-2:] + pieces[i + 1][:2]
            if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2 and full.text.find(stop) == offset + len(pieces[i]) - 2:
                break
            offset += len(pieces[i])
        else:
            pytest.fail("no token boundary to test")
        start = offset + len(pieces[i]) - 2
        cut = c.generate("The history of the Roman Empire", SamplingParams(**{**_fields(greedy), "stop": [stop]}))
        kept = c.generate("The history of the Roman Empire",
                          SamplingParams(**{**_fields(greedy), "stop": [stop], "include_stop_str_in_output": True}))
        streamed = "".join(d.text for d in c.stream("The history of the Roman Empire",
                                                     SamplingParams(**{**_fields(greedy), "stop": [stop]})))
        stats = c.stats()
    assert cut.finish_reason == "stop" and cut.text == full.text[:start]
    assert kept.finish_reason == "stop" and kept.text == full.text[:start + len(stop)]
    assert streamed == cut.text
    assert cut.token_ids == full.token_ids[:i + 2]  # ends on the token that completed the stop string
    assert stats["kv_blocks_used"] == 0


def test_one_of_n_outputs_stopped_by_a_string_leaves_the_others_alone(server):
    params = SamplingParams(n=2, max_tokens=20, temperature=1.0, seed=77, ignore_eos=True)
    with Client(server.address) as c:
        free = c.generate("Write a short story:", params)
        words = [w for w in free.outputs[0].text.split()[2:] if len(w) > 3 and w not in free.outputs[1].text]
        assert words, free.outputs
        stopped = c.generate("Write a short story:", SamplingParams(**{**_fields(params), "stop": [words[0]]}))
        stats = c.stats()
    first, second = stopped.outputs
    assert first.finish_reason == "stop" and first.text == free.outputs[0].text[:free.outputs[0].text.index(words[0])]
    assert second.finish_reason == "length" and second.token_ids == free.outputs[1].token_ids
    assert stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] == 0


def test_bad_sampling_params_name_the_field(server):
    with Client(server.address) as c:
        for kwargs, field in (({"logprobs": 21}, "logprobs"), ({"min_p": 2.0}, "min_p"),
                              ({"repetition_penalty": 0.0}, "repetition_penalty"),
                              ({"min_tokens": 9, "max_tokens": 4}, "min_tokens")):
            with pytest.raises(RequestError) as e:
                c.generate("hi", SamplingParams(**kwargs))
            assert e.value.code == "invalid_request" and field in e.value.message


def test_beam_search_through_both_clients_equals_transformers(server, hf_model):
    """Both SDKs' beam_search: the n best hypotheses of transformers' beam search, best first, with
    scores; the KV figures on request.finished; incompatible parameters named."""
    _, model = hf_model
    with Client(server.address) as c:
        # Longer than a block: the beams share its full blocks (each copies the partial last one).
        out = c.beam_search("PagedAttention keeps the key-value cache in fixed-size blocks, and a block table "
                            "maps each sequence's logical blocks to physical ones. In short,", 4, n=2, max_tokens=8)
        with pytest.raises(RequestError) as e:
            c.generate("hi", SamplingParams(use_beam_search=True, best_of=2, temperature=0.0, stop=["."]))
        assert e.value.code == "invalid_request" and "stop" in e.value.message

    async def run_async():
        async with AsyncClient(server.address) as ac:
            return await ac.beam_search("Once upon a time", 2, n=2, max_tokens=8, length_penalty=0.5)

    out_async = asyncio.run(run_async())
    for completion, width, length_penalty in ((out, 4, 1.0), (out_async, 2, 0.5)):
        prompt = completion.prompt_token_ids
        eos = model.generation_config.eos_token_id
        with torch.inference_mode():
            ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 num_beams=width, num_return_sequences=2, length_penalty=length_penalty,
                                 do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=eos,
                                 output_scores=True, return_dict_in_generate=True)
        eos_ids = {eos} if isinstance(eos, int) else set(eos)
        for o, seq, score in zip(completion.outputs, ref.sequences.tolist(), ref.sequences_scores.tolist()):
            generated = seq[len(prompt):]
            ends = [i for i, t in enumerate(generated) if t in eos_ids]
            assert o.token_ids == (generated[:ends[0] + 1] if ends else generated)
            assert o.beam_score == pytest.approx(score, abs=LOGPROB_ATOL)
            assert o.cumulative_logprob <= 0.0
    finished = server.wait_for("request.finished", request_id=out.request_id)
    assert 0 < finished["beam_kv_blocks_shared"] < finished["beam_kv_blocks_unshared"]
