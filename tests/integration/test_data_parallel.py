"""Data parallelism (docs/data_parallel.md): `serve --data-parallel-size 2`, the default model.

1. A ShareGPT multi-turn workload (each turn extends the previous prompt) through the serve's
   frontend (prefix-aware routing) and, on the same two replicas, through a second frontend
   routing round-robin (the same conversations under another header, so the runs share no
   cached block): the prefix-cache hit rate of prefix-aware routing is above round-robin's,
   and its greedy tokens equal those of a third frontend that sends everything to one replica.
2. 32 greedy streams while one replica's scheduler, and separately its worker, is killed with
   SIGKILL: all finish with the fault-free tokens, none streamed twice.
3. SIGTERM to one replica's scheduler during streams (a rolling restart): zero failed requests,
   and the replica takes work again once the supervisor restarted it.
4. SIGHUP to a frontend whose config file now lists another replica: one joins, one leaves.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from server_process import ServerProcess, free_port
from test_operations import check_events_against_docs

from bench.multiturn import hit_rate, run_conversations, sharegpt_conversations
from shared.async_client import AsyncClient
from shared.client import Client
from shared.protocol import SamplingParams

pytestmark = pytest.mark.slow

# Per replica: about its share of the conversations' blocks, far from room for a copy of all of them,
# which is what round-robin asks of each replica (docs/data_parallel.md, "Measured").
KV_BLOCKS = 80
CONVERSATIONS, TURNS, USER_TOKENS, ANSWER_TOKENS = 24, 3, 40, 12
THINK_S = 0.5  # a random pause before each turn: conversations interleave, as users' do
GREEDY = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
PROMPTS = [f"Question {i}: tell me about the history of {topic}" for i, topic in
           enumerate(["Rome", "tea", "jazz", "maps", "glass", "paper", "bridges", "clocks"] * 4)]


class Frontend:
    """One more `pagedserve frontend` on the same replicas, with its own flags."""

    def __init__(self, run_dir: str, engines: list[str], *flags: str) -> None:
        """`engines` empty: they come from a `--config` file among `flags`."""
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.events: list[dict] = []
        self._ready = threading.Event()
        listed = ["--engines", ",".join(engines)] if engines else []
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher", "frontend", "--model", "default",
                                      "--listen", self.address, "--run-dir", run_dir, *listed, *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        assert self._ready.wait(120), f"the frontend did not become ready: {self.events[-3:]}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
            if self.events[-1].get("event") == "server.ready":
                self._ready.set()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def dp(tmp_path_factory):
    # A short drain: the SIGTERM test's replica aborts what it has not finished by then, and the
    # frontend moves those requests to the other replica (frontend/failover.py, drained_away).
    server = ServerProcess(str(tmp_path_factory.mktemp("run")), "--data-parallel-size", "2",
                           "--num-kv-blocks", str(KV_BLOCKS), "--heartbeat-timeout", "30", "--drain-timeout", "1")
    yield server
    server.stop()


def engines(srv) -> list[str]:
    return [f"ipc://{srv.run_dir}/replica{k}/scheduler-frontend.sock" for k in range(2)]


def test_prefix_aware_routing_beats_round_robin_with_a_single_replicas_tokens(dp):
    from frontend.tokenizer import Tokenizer
    from shared.models import resolve_model

    tok = Tokenizer(resolve_model("default"))
    convs = sharegpt_conversations(CONVERSATIONS, TURNS, USER_TOKENS, seed=0, tokenizer=tok)

    async def run(address: str, tag: str):
        async with AsyncClient(address, timeout=300) as client:
            before = await client.stats()
            answers = await run_conversations(client, convs, ANSWER_TOKENS, think_s=THINK_S, seed=1,
                                              header=lambda i: tok.encode(f"Chat {tag}-{i}."))
            return answers, hit_rate(before, await client.stats()), await client.stats()

    prefix_answers, prefix_rate, stats = asyncio.run(run(dp.address, "a"))
    round_robin = Frontend(dp.run_dir, engines(dp), "--routing-policy", "round_robin")
    single = Frontend(dp.run_dir, engines(dp)[:1])
    try:
        _, rr_rate, _ = asyncio.run(run(round_robin.address, "b"))
        single_answers, _, _ = asyncio.run(run(single.address, "a"))
    finally:
        round_robin.stop()
        single.stop()
    assert prefix_answers == single_answers, "greedy tokens as from one replica"
    # Two replicas: round-robin lands a turn on the replica of the conversation's previous turn about
    # half the time, so even with no eviction at all its hit rate is about half of prefix-aware's
    # plus what older turns left; cache pressure takes those older hits away first, and the ratio
    # approaches 2 from below (docs/data_parallel.md, "Measured": 1.90x to 2.61x in three runs
    # at 80 blocks).
    # Timing moves both rates (the pauses interleave turns, and a loaded machine overlaps more of
    # them, so more is evicted): one full-suite run gave 0.382 against 0.257 (1.49x). 1.3x still
    # tells routing by prefix from routing blind, which lands on the right replica half the time.
    assert prefix_rate >= 1.3 * rr_rate, (prefix_rate, rr_rate)
    assert stats["routed"].get("prefix", 0) > 0 and len(stats["replicas"]) == 2
    assert all(r["routable"] and r["prefix_cache_hit_rate"] > 0 for r in stats["replicas"])
    check_events_against_docs(dp.events)


async def _streams(address: str, progress: list[int]):
    async with AsyncClient(address, timeout=300) as client:
        async def one(prompt):
            stream, ids = client.stream(prompt, GREEDY), []
            async for delta in stream:
                ids += delta.token_ids
                progress[0] += len(delta.token_ids)
            assert ids == stream.completion.token_ids, "a token streamed twice, or lost"
            return stream.completion.token_ids

        return await asyncio.gather(*(one(p) for p in PROMPTS))


def _with_signal(srv, child: str, sig: int) -> list[list[int]]:
    async def scenario():
        progress = [0]
        run = asyncio.create_task(_streams(srv.address, progress))
        while progress[0] < 64:
            await asyncio.sleep(0.02)
        os.kill(srv.child_pid(child), sig)
        return await run

    return asyncio.run(scenario())


@pytest.fixture(scope="module")
def reference(dp):
    return asyncio.run(_streams(dp.address, [0]))


@pytest.mark.parametrize("child", ["scheduler-1", "worker0-1"])
def test_killing_one_replicas_process_loses_no_stream(dp, reference, child):
    restarts = len([e for e in dp.named("supervisor.child_restarted") if e["child"] == child])
    resubmitted = len(dp.named("frontend.resubmitted"))
    assert _with_signal(dp, child, signal.SIGKILL) == reference
    dp.wait_for("supervisor.child_restarted", restarts + 1, child=child)
    if child.startswith("scheduler"):  # its requests moved to the other replica, tokens kept
        assert len(dp.named("frontend.resubmitted")) > resubmitted
        with Client(dp.address) as c:
            assert c.stats()["routed"].get("failover", 0) > 0
    check_events_against_docs(dp.events)


def test_sigterm_to_one_replica_fails_no_request_and_it_comes_back(dp, reference):
    exits = len([e for e in dp.named("supervisor.child_exited") if e["child"] == "scheduler-0"])
    assert _with_signal(dp, "scheduler-0", signal.SIGTERM) == reference  # none failed: each has its tokens
    exited = dp.wait_for("supervisor.child_exited", exits + 1, child="scheduler-0")
    assert exited["exit_code"] == 0
    dp.wait_for("frontend.replica_draining", replica=0)
    deadline = time.monotonic() + 120
    with Client(dp.address) as c:
        while time.monotonic() < deadline:
            stats = c.stats()
            if stats["replicas_routable"] == 2:
                break
            time.sleep(0.5)
    assert stats["replicas_routable"] == 2, stats["replicas"]
    assert asyncio.run(_streams(dp.address, [0])) == reference
    check_events_against_docs(dp.events)


def test_sighup_makes_the_frontend_take_the_engines_list_again(dp, tmp_path):
    config = tmp_path / "frontend.toml"
    both = engines(dp)
    config.write_text(f'[routing]\nengines = ["{both[0]}"]\n')
    fe = Frontend(dp.run_dir, [], "--config", str(config))
    try:
        with Client(fe.address) as c:
            assert [r["addr"] for r in c.stats()["replicas"]] == both[:1]
        config.write_text(f'[routing]\nengines = ["{both[1]}"]\n')  # replica 1 joins, replica 0 leaves
        fe.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not any(e.get("event") == "frontend.replica_retired" for e in fe.events):
            assert time.monotonic() < deadline, fe.events[-3:]
            time.sleep(0.1)
        changed = next(e for e in fe.events if e.get("event") == "frontend.engines_changed")
        assert changed["added"] == both[1:] and changed["retired"] == both[:1]
        with Client(fe.address) as c:
            for _ in range(100):  # the new replica answers its first ping within a second
                if c.stats()["replicas_routable"] == 1 and c.stats()["replicas"][1]["routable"]:
                    break
                time.sleep(0.1)
            c.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0))
            stats = c.stats()
        assert stats["replicas"][1]["routed"] and not stats["replicas"][0]["routed"]
        assert stats["replicas"][0]["retired"]
    finally:
        fe.stop()
    check_events_against_docs(fe.events)

