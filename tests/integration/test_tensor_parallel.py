"""Tensor parallelism with the real processes on loopback, gloo between the ranks.

1. `serve --tensor-parallel-size 3` with the default model (9 query heads, 3 KV heads): 6
   concurrent greedy requests through a KV cache too small for them (forced preemption) give
   transformers' tokens, which the TP=1 server gives too (tests/integration/test_serve.py); two
   structured requests beside them match their regex and choice (rank 0 alone applies the masks).
2. The roles started separately, as systemd units would be, with a small random-weight Llama
   (8 query heads, 4 KV heads) at TP=2: concurrent greedy requests with preemption equal to
   transformers; then one rank is killed mid-request: the group fails as one (the request ends
   with finish_reason "error", the scheduler logs `scheduler.worker_group_failed`, the other
   rank exits 1).
3. `serve` refuses a size that does not divide the heads, with a clear message.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import re
import threading
import time

import pytest
from server_process import ServerProcess, free_port
from small_llama import save_small_llama

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "worker"))
from hf_reference import hf_greedy  # noqa: E402
from test_operations import check_events_against_docs  # noqa: E402

from shared.client import AsyncClient, Client
from shared.protocol import SamplingParams
from shared.structured import StructuredOutputs

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["Once upon a time", "The three primary colors are", "def fibonacci(n):", "The capital of Japan is",
           "Explain why the sky is blue in one sentence.", "Q: What is 12 times 12?\nA:"]


async def _generate_all(address: str, requests: list[dict]) -> list:
    async with AsyncClient(address) as client:
        return await asyncio.gather(*(client.generate(**r) for r in requests))


def test_default_model_at_tp3_serves_concurrent_streams_with_preemption(tmp_path, hf_model):
    _, model = hf_model
    # Each sequence grows to 3 blocks of 16 tokens (4..18 prompt tokens + 30 generated) and the cache
    # has 4: as soon as two run at once, whenever the requests arrive, one of them must be preempted.
    srv = ServerProcess(str(tmp_path / "run"), "--tensor-parallel-size", "3", "--num-kv-blocks", "4",
                        "--block-size", "16")
    try:
        params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        # Two structured requests ride along: rank 0 alone gets their masks and samples for all ranks.
        shaped = [dict(prompt="Call me at", params=SamplingParams(max_tokens=20, temperature=1.0, seed=3,
                       structured_outputs=StructuredOutputs(regex=r" [0-9]{3}-[0-9]{4}"))),
                  dict(prompt="The sky is", params=SamplingParams(max_tokens=20, temperature=1.0, seed=4,
                       structured_outputs=StructuredOutputs(choice=[" blue", " green"])))]
        everything = asyncio.run(_generate_all(srv.address, [dict(prompt=p, params=params) for p in PROMPTS] + shaped))
        results, (phone, sky) = everything[:len(PROMPTS)], everything[len(PROMPTS):]
        with Client(srv.address) as c:
            stats = c.stats()
    finally:
        assert srv.stop() == 0
    for completion in results:
        assert 4 <= len(completion.prompt_token_ids) <= 18
        assert completion.token_ids == hf_greedy(model, completion.prompt_token_ids, 30), completion.prompt_token_ids
    assert sum(r.num_preemptions for r in results) > 0 and srv.named("request.preempted")
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", phone.text) and sky.text in (" blue", " green")
    assert stats["kv_blocks_total"] == 4 and stats["workers_ready"] == 3
    assert sorted(e["rank"] for e in srv.named("scheduler.worker_joined")) == [0, 1, 2]
    assert sorted(e["rank"] for e in srv.named("worker.loaded")) == [0, 1, 2]
    assert {e["kv_heads"] for e in srv.named("worker.loaded")} == {1}
    check_events_against_docs(srv.events)
    assert not srv.non_json_lines


# ---- the roles started separately --------------------------------------------------------------


class Roles:
    """scheduler, one worker per rank and the frontend as separate processes sharing flags."""

    def __init__(self, run_dir: str, model: str, world_size: int, *extra: str):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        flags = ["--model", model, "--device", "cpu", "--dtype", "float32", "--listen", self.address,
                 "--run-dir", run_dir, "--tensor-parallel-size", str(world_size),
                 "--dist-init-addr", f"tcp://127.0.0.1:{free_port()}", "--stats-interval-s", "2", *extra]
        commands = {"scheduler": ["scheduler"], "frontend": ["frontend"]}
        commands.update({f"worker{r}": ["worker", "--rank", str(r)] for r in range(world_size)})
        self.events: list[dict] = []
        self.procs = {name: subprocess.Popen([sys.executable, "-m", "launcher", *cmd, *flags], cwd=ROOT,
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                             stdin=subprocess.DEVNULL, text=True, start_new_session=True)
                      for name, cmd in commands.items()}
        for proc in self.procs.values():
            threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        self.wait_for("server.ready", 300)

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                pass

    def named(self, name: str) -> list[dict]:
        return [e for e in list(self.events) if e.get("event") == name]

    def wait_for(self, name: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.named(name):
                return self.named(name)[0]
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"no {name} event; last events: {self.events[-5:]}")

    def stop(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes[name] = proc.wait()
        return codes


@pytest.fixture(scope="module")
def small_llama_with_tokenizer(tmp_path_factory):
    """tests/integration/small_llama.py's model, saved once for the module."""
    path = tmp_path_factory.mktemp("small_llama_tok")
    return str(path), save_small_llama(path)


def test_small_llama_tp2_roles_apart_and_a_dead_rank_fails_the_group(small_llama_with_tokenizer, tmp_path):
    path, hf = small_llama_with_tokenizer
    roles = Roles(str(tmp_path / "run"), path, 2, "--num-kv-blocks", "10", "--block-size", "8")
    try:
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        prompts = [[(7 * i + 3 * j) % 49152 + 10 for j in range(5 + 4 * i)] for i in range(6)]
        results = asyncio.run(_generate_all(roles.address, [dict(prompt_token_ids=p, params=params)
                                                             for p in prompts]))
        assert [r.token_ids for r in results] == [hf_greedy(hf, p, 16) for p in prompts]  # EOS ignored
        assert sum(r.num_preemptions for r in results) > 0

        with Client(roles.address) as c:
            # 3 + 76 tokens: the whole cache (10 blocks of 8), so the request is admitted.
            long = SamplingParams(max_tokens=76, temperature=0.0, ignore_eos=True)
            stream = c.stream(prompt_token_ids=[5, 6, 7], params=long)
            for i, _ in enumerate(stream):
                if i == 2:
                    roles.procs["worker1"].kill()  # SIGKILL: no goodbye, its sockets just close
            assert stream.completion.finish_reason == "error"
            assert len(stream.completion.token_ids) < 76
            failed = roles.wait_for("scheduler.worker_group_failed", 60)
            assert roles.procs["worker0"].wait(60) == 1, "the surviving rank fails with its group"
            assert c.stats()["workers_ready"] == 0
    finally:
        codes = roles.stop()
    assert failed["rank"] in (0, 1) and failed["workers"] == 2
    errors = roles.named("scheduler.worker_error")
    assert errors and stream.completion.request_id in errors[0]["request_ids"]
    assert codes["scheduler"] == 0 and codes["frontend"] == 0 and codes["worker0"] == 1
    check_events_against_docs(roles.events)


def test_serve_refuses_a_size_that_does_not_divide_the_heads(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launcher", "serve", "--model", "default", "--device", "cpu",
                           "--listen", f"tcp://127.0.0.1:{free_port()}", "--run-dir", str(tmp_path / "run"),
                           "--tensor-parallel-size", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    fatal = [e for e in events if e["event"] == "worker.fatal"]
    assert fatal, events[-5:]
    message = fatal[0]["exception"].strip().splitlines()[-1]
    assert "tensor_parallel_size 2: SmolLM2-135M-Instruct cannot be split 2 ways" in message
    assert "2 does not divide its 9 attention heads" in message and "Sizes that work: 1, 3" in message
    assert any(e["event"] == "supervisor.child_exited" and e["exit_code"] == 1 for e in events)
