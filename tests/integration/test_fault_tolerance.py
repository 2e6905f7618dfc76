"""No request lost (docs/fault_tolerance.md): the real processes, the default model.

1. One `serve` with a short heartbeat timeout. 32 concurrent greedy streams run once
   without faults (the reference); then again while the worker is killed with SIGKILL
   three times: the supervisor restarts it, the scheduler recomputes every sequence, and
   all 32 complete with the reference's tokens, none streamed twice.
2. On the same server, streams (greedy and seeded) while the worker is stopped with
   SIGSTOP past the heartbeat timeout: the scheduler declares it hung and says so, health
   reads "degraded"; SIGCONT: the worker is asked to rejoin, forgets its state, joins
   again in place (no restart), and the streams finish with the fault-free tokens.
3. The scheduler killed three times, a dead frontend, a paused frontend (below).
Backpressure (many clients on a tiny cache): tests/integration/test_backpressure.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from server_process import ServerProcess
from test_operations import check_events_against_docs

from shared.client import AsyncClient, Client
from shared.protocol import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time", "The three primary colors are", "def fibonacci(n):", "The capital of Japan is",
           "In 1969, humans first", "The quick brown fox", "A recipe for pancakes begins with",
           "Photosynthesis is the process by which", "Write a haiku about the sea.", "The largest planet is",
           "Q: What is 12 times 12?\nA:", "My favourite programming language is", "Explain why the sky is blue.",
           "Here is a short poem about autumn:\n", "List three uses of a paperclip:", "Translate 'good morning':"]
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
# A step longer than the heartbeat timeout counts as a hang: steps of at most 256 tokens take
# well under it even on two busy CPU cores (a recompute after a failure prefills every sequence).
HEARTBEAT_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = ServerProcess(str(tmp_path_factory.mktemp("run")), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S),
                           "--max-num-batched-tokens", "256")
    yield server
    server.stop()


async def _streams(address: str, jobs: list[tuple[str, SamplingParams]], progress: list[int] | None = None):
    """Every job as a concurrent stream; (completion, streamed token ids) each. `progress[0]`
    counts streamed tokens as they arrive."""
    async with AsyncClient(address, timeout=300) as client:
        async def one(prompt, params):
            stream = client.stream(prompt, params)
            ids = []
            async for delta in stream:
                ids += delta.token_ids
                if progress is not None:
                    progress[0] += len(delta.token_ids)
            return stream.completion, ids

        return await asyncio.gather(*(one(pr, pa) for pr, pa in jobs))


def _tokens(results) -> list[list[int]]:
    for completion, streamed in results:
        assert streamed == completion.token_ids, "a token streamed twice, or lost"
    return [completion.token_ids for completion, _ in results]


async def _wait_tokens(progress: list[int], count: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while progress[0] < count:
        assert time.monotonic() < deadline, f"only {progress[0]} of {count} tokens streamed"
        await asyncio.sleep(0.02)


JOBS_32 = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), GREEDY) for i in range(32)]


@pytest.fixture(scope="module")
def reference_32(srv):
    """The 32 streams' tokens without faults."""
    return _tokens(asyncio.run(_streams(srv.address, JOBS_32)))


def _kill_three_times(srv, child: str, recovered: str) -> list:
    """The 32 streams while `child` is killed three times, each time once it recovered (the
    `recovered` event logged once more) and streamed some tokens again."""
    async def with_faults():
        progress = [0]
        recoveries = len(srv.named(recovered))
        run = asyncio.create_task(_streams(srv.address, JOBS_32, progress))
        for kill in range(3):
            await _wait_tokens(progress, progress[0] + 48)
            os.kill(srv.child_pid(child), signal.SIGKILL)
            await asyncio.to_thread(srv.wait_for, "supervisor.child_restarted", kill + 1, child=child)
            await asyncio.to_thread(srv.wait_for, recovered, recoveries + kill + 1)
        return await run

    return asyncio.run(with_faults())


def test_kill_the_worker_three_times_during_32_streams(srv, reference_32):
    results = _kill_three_times(srv, "worker0", "scheduler.worker_group_rejoined")
    assert _tokens(results) == reference_32
    assert all(c.finish_reason == "length" for c, _ in results)
    assert sum(c.num_preemptions for c, _ in results) >= 32, "every stream was running at the first kill"
    failures = srv.named("scheduler.worker_group_failed")
    assert len(failures) == 3, failures
    assert {f["cause"] for f in failures} <= {"rank_restarted", "heartbeat_timeout", "unreachable"}
    assert [e["exit_code"] for e in srv.named("supervisor.child_exited")] == [-9, -9, -9]
    with Client(srv.address) as c:
        stats = c.stats()
        assert c.health()["status"] == "ok"
    assert stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] == 0
    check_events_against_docs(srv.events)


def test_a_stopped_worker_is_declared_hung_and_rejoins_when_it_continues(srv):
    seeded = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, seed=17, ignore_eos=True)
    jobs = [(pr, GREEDY if i % 2 else seeded) for i, pr in enumerate(PROMPTS[:8])]
    reference = _tokens(asyncio.run(_streams(srv.address, jobs)))
    failures_before = len(srv.named("scheduler.worker_group_failed"))
    restarts_before = len(srv.named("supervisor.child_restarted"))

    async def with_a_hang():
        progress = [0]
        run = asyncio.create_task(_streams(srv.address, jobs, progress))
        await _wait_tokens(progress, 40)
        pid = srv.child_pid("worker0")
        os.kill(pid, signal.SIGSTOP)
        try:
            failed = await asyncio.to_thread(srv.wait_for, "scheduler.worker_group_failed", failures_before + 1,
                                             60.0)
            async with AsyncClient(srv.address) as c:
                for _ in range(50):  # the frontend learns of it from its next ping's answer
                    health = await c.health()
                    if health["status"] == "degraded":
                        break
                    await asyncio.sleep(0.1)
            streamed_while_stopped = progress[0]
            await asyncio.sleep(1.0)
            assert progress[0] == streamed_while_stopped, "nothing streams while the worker is hung"
        finally:
            os.kill(pid, signal.SIGCONT)
        return failed, health, await run

    failed, health, results = asyncio.run(with_a_hang())
    assert failed["cause"] == "heartbeat_timeout" and failed["silent_s"] > HEARTBEAT_TIMEOUT_S
    assert failed["requests_kept"] == 8
    assert health["status"] == "degraded" and health["workers_ready"] == 0
    assert _tokens(results) == reference
    assert [e["action"] for e in srv.named("worker.rejoin")] == ["hello"]
    assert len(srv.named("supervisor.child_restarted")) == restarts_before, "it recovered in place"
    check_events_against_docs(srv.events)


def test_kill_the_scheduler_three_times_during_32_streams(srv, reference_32):
    restarted_before = len(srv.named("frontend.scheduler_restarted"))
    results = _kill_three_times(srv, "scheduler", "frontend.resubmitted")
    assert _tokens(results) == reference_32, "the same tokens, none twice, after three scheduler restarts"
    assert all(c.finish_reason == "length" for c, _ in results)
    assert len(srv.named("frontend.scheduler_restarted")) - restarted_before == 3
    assert all(e["action"] == "hello" for e in srv.named("worker.rejoin")), "the worker rejoined in place"
    with Client(srv.address) as c:
        stats = c.stats()
        assert c.health()["status"] == "ok"
    assert stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] == 0
    check_events_against_docs(srv.events)


def test_a_dead_frontend_fails_requests_in_flight_and_the_next_is_served(srv):
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    restarts = len([e for e in srv.named("supervisor.child_restarted") if e["child"] == "frontend"])
    gone_before = len(srv.named("scheduler.frontend_gone"))

    async def scenario():
        async with AsyncClient(srv.address, liveness_timeout=3.0) as client:
            progress = [0]

            async def one(prompt):
                async for delta in client.stream(prompt, params):
                    progress[0] += len(delta.token_ids)

            tasks = [asyncio.create_task(one(pr)) for pr in PROMPTS[:4]]
            await _wait_tokens(progress, 8)
            os.kill(srv.child_pid("frontend"), signal.SIGKILL)
            started = time.monotonic()
            errors = await asyncio.gather(*tasks, return_exceptions=True)
            failed_after_s = time.monotonic() - started
            await asyncio.to_thread(srv.wait_for, "supervisor.child_restarted", restarts + 1, child="frontend")
            await asyncio.to_thread(srv.wait_for, "server.ready", 2)
            after = await client.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0))
            return errors, failed_after_s, after

    errors, failed_after_s, after = asyncio.run(scenario())
    assert [getattr(e, "code", e) for e in errors] == ["unavailable"] * 4
    assert failed_after_s < 30
    assert after.finish_reason == "length" and len(after.token_ids) == 4
    gone = srv.wait_for("scheduler.frontend_gone", gone_before + 1)
    assert len(gone["request_ids"]) == 4
    with Client(srv.address) as c:
        deadline = time.monotonic() + 30
        while c.stats()["kv_blocks_used"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.stats()["kv_blocks_used"] == 0
    check_events_against_docs(srv.events)


def test_a_paused_frontend_resubmits_what_the_scheduler_dropped(srv, reference_32):
    """SIGSTOP the frontend past the scheduler's patience (30 s without a ping): the scheduler
    aborts its requests; on SIGCONT the frontend learns it (EngineInfo.frontend_drops) and
    resubmits them, and the streams end with the fault-free tokens."""
    gone_before = len(srv.named("scheduler.frontend_gone"))

    async def scenario():
        progress = [0]
        async with AsyncClient(srv.address, timeout=300, liveness_timeout=120) as client:
            async def one(prompt, params):
                stream = client.stream(prompt, params)
                ids = []
                async for delta in stream:
                    ids += delta.token_ids
                    progress[0] += len(delta.token_ids)
                return stream.completion, ids

            tasks = [asyncio.create_task(one(pr, pa)) for pr, pa in JOBS_32[:4]]
            await _wait_tokens(progress, 8)
            frontend = srv.child_pid("frontend")
            os.kill(frontend, signal.SIGSTOP)
            try:
                await asyncio.to_thread(srv.wait_for, "scheduler.frontend_gone", gone_before + 1, 90.0)
            finally:
                os.kill(frontend, signal.SIGCONT)
            return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert _tokens(results) == reference_32[:4]
    assert srv.named("scheduler.frontend_gone")[-1]["cause"] == "silent"
    assert srv.named("frontend.dropped_by_scheduler")
    with Client(srv.address) as c:
        assert c.stats()["kv_blocks_used"] == 0
    check_events_against_docs(srv.events)
