"""Run one tensor-parallel rank of a `ModelRunner`, driven by the real (torch-free) `Scheduler`.

`run_group(spec, world_size)` starts `world_size` processes of this file (`python FILE SPEC RANK`),
joined over gloo on a free 127.0.0.1 port, and returns rank 0's answers. Every rank builds the
same `Scheduler` from the same spec and feeds it its own `StepResult`s, whose tokens are equal
on every rank (rank 0 broadcasts them), so every rank sees the same plans, as if one scheduler
had sent them. No sockets of our protocol are involved: inputs and outputs are JSON and .npy
files (never pickle).

Each rank:
1. teacher-forced logits of `logit_prompts` (one batched prefill of `first_chunk` tokens each,
   then one token per step; rank 0 saves them, float32, as logits_<i>.npy);
2. serves `requests` (greedy, all at once) through a Scheduler with the spec's KV blocks and
   chunked-prefill budget, once per mode of `preemption_modes`; rank 0 saves every request's
   tokens and the scheduler's counters (preemptions included) per mode as result.json.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(spec: dict, world_size: int, out_dir: str, timeout_s: float = 600.0) -> dict:
    """Run every rank; return {"result": rank 0's result.json, "logits": [np arrays]}."""
    import numpy as np

    os.makedirs(out_dir, exist_ok=True)
    spec = {**spec, "world_size": world_size, "out_dir": out_dir, "dist_init_addr": f"tcp://127.0.0.1:{free_port()}"}
    spec_path = os.path.join(out_dir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, __file__, spec_path, str(rank)], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(os.path.join(out_dir, f"rank{rank}.err"), "w"))
             for rank in range(world_size)]
    deadline = time.monotonic() + timeout_s
    try:
        for rank, proc in enumerate(procs):
            proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        if proc.returncode != 0:
            with open(os.path.join(out_dir, f"rank{rank}.err")) as f:
                raise RuntimeError(f"rank {rank} of {world_size} exited {proc.returncode}:\n{f.read()[-4000:]}")
    with open(os.path.join(out_dir, "result.json")) as f:
        result = json.load(f)
    logits = [np.load(os.path.join(out_dir, f"logits_{i}.npy"), allow_pickle=False)
              for i in range(len(spec["logit_prompts"]))]
    return {"result": result, "logits": logits}


# ---- one rank ------------------------------------------------------------------------------


def teacher_forced_logits(runner, prompts: list[list[int]], first_chunk: int):
    """Every position's logits (rank 0; None elsewhere): one batched prefill of `first_chunk`
    tokens per prompt, then one token per prompt per step."""
    import torch

    from shared.protocol import NewSeq, SamplingParams, ScheduledSeq

    batch, bs = runner.batch, runner.config.worker.block_size
    free = list(range(runner.kv_cache.num_blocks))[::-1]
    for i, p in enumerate(prompts):
        batch.add(NewSeq(i, p, len(p), [free.pop() for _ in range(-(-len(p) // bs))], SamplingParams(temperature=0)))
    done, rows = [0] * len(prompts), [[] for _ in prompts]
    with torch.inference_mode():
        while any(d < len(p) for d, p in zip(done, prompts)):
            scheduled = [ScheduledSeq(i, min(first_chunk if done[i] == 0 else 1, len(p) - done[i]), done[i])
                         for i, p in enumerate(prompts) if done[i] < len(p)]
            inputs = batch.prepare(scheduled)
            hidden = runner.model(inputs.input_ids, inputs.positions, inputs.meta, runner.kv_cache.layers())
            logits = runner.compute_logits(hidden)
            start = 0
            for s in scheduled:
                if logits is not None:
                    rows[s.seq_id].append(logits[start:start + s.num_tokens])
                start += s.num_tokens
                done[s.seq_id] += s.num_tokens
    batch.drop(list(range(len(prompts))))
    return [torch.cat(r).numpy() for r in rows] if runner.group.is_driver else None


def serve(runner, spec: dict, preemption_mode: str) -> dict:
    """The spec's requests, all queued at once, through a real Scheduler and this runner.
    Returns the tokens per request id and the scheduler's counters."""
    import msgspec

    from scheduler.scheduler import Scheduler
    from shared.protocol import AddRequest, SamplingParams, StepPlan

    config = runner.config.replace(preemption_mode=preemption_mode)
    scheduler = Scheduler(config.scheduler, num_device_blocks=runner.kv_cache.num_blocks,
                          block_size=config.worker.block_size, max_model_len=runner.max_model_len,
                          vocab_size=runner.args.vocab_size,
                          eos_token_ids=runner.eos_token_ids, num_host_blocks=runner.num_host_blocks)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    if spec.get("beam_width"):  # beam search: the best hypothesis of that many beams
        params = msgspec.structs.replace(params, use_beam_search=True, best_of=spec["beam_width"])
    for i, prompt in enumerate(spec["requests"]):
        rejected = scheduler.add_request(AddRequest(f"r{i}", prompt, params, arrival_time=float(i)), b"test")
        assert rejected is None, rejected
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(spec["requests"]))}
    finished = set()
    for _ in range(10_000):
        if not scheduler.has_work():
            break
        plan = scheduler.schedule()
        if not plan.scheduled:
            continue
        result = runner.execute(plan)
        if any(work.num_candidates for work in plan.scheduled):
            share_candidates(runner, result)
        for _, delta in scheduler.update(result):
            tokens[delta.request_id] += delta.token_ids
            if delta.finish_reason is not None:
                finished.add(delta.request_id)
    assert finished == set(tokens), "every request must finish"
    runner.execute(StepPlan(step_id=-1, scheduled=[], finished_seq_ids=sorted(runner.batch.seqs)))  # a clean slate
    return {"tokens": tokens, "stats": scheduler.stats()}


def share_candidates(runner, result) -> None:
    """Rank 0 alone returns beam candidates (as in serving, where only its result reaches the one
    scheduler); here every rank drives its own Scheduler, so rank 0's are broadcast to the others,
    msgpack-encoded in a uint8 tensor."""
    import msgspec
    import torch

    from shared.protocol import BeamCandidates

    kind = list[BeamCandidates | None]
    data = msgspec.msgpack.encode(result.candidates) if runner.group.is_driver else b""
    size = runner.group.broadcast(torch.tensor([len(data)], dtype=torch.int64))
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8)
    if runner.group.is_driver:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    runner.group.broadcast(buffer)
    result.candidates = msgspec.msgpack.decode(buffer.numpy().tobytes(), type=kind)


def main(spec_path: str, rank: int) -> int:
    import numpy as np
    import torch

    from shared.config import ServerConfig
    from shared.logging import configure_logging
    from worker.model_runner import ModelRunner

    torch.set_num_threads(1)
    configure_logging("worker", "warning")
    with open(spec_path) as f:
        spec = json.load(f)
    config = ServerConfig.from_settings(model=spec["model"], dtype="float32", num_kv_blocks=spec["num_kv_blocks"],
                                        block_size=spec["block_size"], max_num_seqs=spec.get("max_num_seqs", 8),
                                        max_num_batched_tokens=spec.get("max_num_batched_tokens"),
                                        max_model_len=spec.get("max_model_len"),
                                        swap_space_gib=spec.get("swap_space_gib", 0.0),
                                        tensor_parallel_size=spec["world_size"], rank=rank,
                                        dist_init_addr=spec["dist_init_addr"], dist_timeout_s=120.0)
    runner = ModelRunner(config)
    runner.load()
    logits = teacher_forced_logits(runner, spec["logit_prompts"], spec.get("first_chunk", 5))
    result = {mode: serve(runner, spec, mode) for mode in spec["preemption_modes"]}
    result["modes"] = spec["preemption_modes"]
    result["kv_heads"] = runner.num_kv_heads
    result["num_host_blocks"] = runner.num_host_blocks
    runner.close()
    if rank == 0:
        for i, array in enumerate(logits):
            np.save(os.path.join(spec["out_dir"], f"logits_{i}.npy"), array, allow_pickle=False)
        with open(os.path.join(spec["out_dir"], "result.json"), "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
