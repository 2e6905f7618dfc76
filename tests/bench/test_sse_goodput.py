"""bench/sse.py (SSE events of a streamed completion), bench/goodput.py, and how bench/metrics.py
summarizes failed requests: pure functions, no server."""

from __future__ import annotations

import argparse

import pytest

from bench.arrivals import RequestFailed
from bench.goodput import goodput, meets, slo_item, slos_ms
from bench.metrics import RequestRecord, summarize
from bench.sse import CompletionStream, SSEDecoder, error_message

STREAM = (b'data: {"choices":[{"index":0,"text":" a","finish_reason":null}],"usage":null}\n\n'
          b'data: {"choices":[{"index":0,"text":" b c","finish_reason":"length"}],"usage":null}\n\n'
          b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}\n\n'
          b"data: [DONE]\n\n")


def _events(chunks: list[bytes]) -> list[tuple[str, str]]:
    decoder = SSEDecoder()
    return [e for chunk in chunks for e in decoder.feed(chunk)] + decoder.close()


def test_events_do_not_depend_on_where_reads_split_the_bytes():
    whole = _events([STREAM])
    assert len(whole) == 4 and whole[-1] == ("message", "[DONE]")
    assert _events([STREAM[i:i + 1] for i in range(len(STREAM))]) == whole
    assert _events([STREAM.replace(b"\n", b"\r\n")]) == whole
    # A comment, an id, two data lines of one event, a last event with no blank line after it.
    assert _events([b": ping\nid: 7\ndata: {\"a\":\ndata: 1}\n\ndata: [DONE]"]) == [
        ("message", '{"a":\n1}'), ("message", "[DONE]")]
    assert _events([b'event: error\ndata: {"message": "x"}\n\n', b'error: {"code": 500}\n\n']) == [
        ("error", '{"message": "x"}'), ("error", '{"code": 500}')]


def test_a_completion_stream_counts_tokens_and_reads_usage():
    stream = CompletionStream()
    tokens = [stream.event(kind, data) for kind, data in _events([STREAM])]
    assert tokens == [1, 1, 0, 0]  # a chunk with text is one token unless it says how many
    assert stream.completion_tokens == 3 and stream.finish_reason == "length" and stream.done and stream.complete
    # Token ids or logprobs, when a server sends them, give a chunk's true count.
    assert stream.event("message", '{"choices":[{"text":"xy","token_ids":[4,5]}]}') == 2
    assert stream.event("message", '{"choices":[{"text":"","logprobs":{"tokens":["x","y","z"]}}]}') == 3
    assert not CompletionStream().complete


@pytest.mark.parametrize("kind, data, expected", [
    ("message", '{"error": {"message": "too long", "type": "BadRequestError", "code": 400}}', "too long (400)"),
    ("message", '{"object": "error", "message": "old vLLM", "code": 400}', "old vLLM (400)"),
    ("error", '{"code": 500, "message": "llama.cpp"}', "llama.cpp"),
    ("message", "not json", "not JSON"),
])
def test_errors_in_the_stream_fail_the_request(kind, data, expected):
    with pytest.raises(RequestFailed, match=expected.replace("(", r"\(").replace(")", r"\)")):
        CompletionStream().event(kind, data)


def test_error_message_of_error_objects():
    assert error_message({"error": {"message": "m", "type": "invalid_request_error"}}) == "m (invalid_request_error)"
    assert error_message({"error": "plain"}) == "plain"
    assert error_message({"choices": []}) is None and error_message([1]) is None


def test_slo_flag_items():
    assert slos_ms([slo_item("ttft:500"), slo_item("tpot:100"), slo_item("ttft:250")]) == {"ttft": 250, "tpot": 100}
    for bad in ("ttft", "ttfb:1", "tpot:x", "e2el:-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            slo_item(bad)
    assert slos_ms(None) == {}


def test_goodput_counts_requests_meeting_every_slo():
    fast = RequestRecord(prompt_len=4, sent_s=0.0, token_times_s=[0.1, 0.2, 0.3])  # TTFT 100, TPOT 100 ms
    slow = RequestRecord(prompt_len=4, sent_s=0.0, token_times_s=[0.6, 0.7])  # TTFT 600, TPOT 100 ms
    one = RequestRecord(prompt_len=4, sent_s=0.0, token_times_s=[0.2])  # no TPOT: meets any TPOT SLO
    failed = RequestRecord(prompt_len=4, sent_s=0.0, token_times_s=[0.1], error="HTTP 500")
    assert meets(fast, {"ttft": 100, "tpot": 100}) and not meets(fast, {"tpot": 99})
    assert not meets(slow, {"ttft": 500}) and meets(slow, {"e2el": 700})
    assert meets(one, {"tpot": 0}) and not meets(failed, {"ttft": 1000})
    assert goodput([fast, slow, one, failed], 2.0, {"ttft": 500}) == {
        "slo_ms": {"ttft": 500}, "good_requests": 2, "requests_per_s": 1.0}


def test_summary_leaves_failed_requests_out_of_the_figures():
    ok = RequestRecord(prompt_len=10, sent_s=0.0, token_times_s=[0.5, 1.0])
    failed = [RequestRecord(prompt_len=20, sent_s=0.0, token_times_s=[9.0], error="HTTP 400: x"),
              RequestRecord(prompt_len=20, sent_s=0.0, error="HTTP 400: x"),
              RequestRecord(prompt_len=30, sent_s=0.0, error="cut short")]
    s = summarize([ok, *failed], duration_s=2.0, slos_ms={"ttft": 1000})
    assert s["num_requests"] == 4 and s["completed"] == 1 and s["failed"] == 3
    assert s["errors"] == [{"error": "HTTP 400: x", "count": 2}, {"error": "cut short", "count": 1}]
    assert s["output_tokens"] == 2 and s["prompt_tokens"] == 10 and s["requests_per_s"] == 0.5
    assert s["e2e_ms"]["p99"] == pytest.approx(1000) and s["goodput"]["good_requests"] == 1
    assert "goodput" not in summarize([ok], 1.0)
