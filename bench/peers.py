"""Peers measured in the same run as pagedserve, on the same requests, model, dtype
and output lengths: transformers `generate` in static batches, and transformers'
own continuous batching (`init_continuous_batching`, one request per prompt with
its own max_new_tokens).

Both run greedy with EOS ignored, so each request produces exactly its output
length, as pagedserve does with ignore_eos. Static batches pad to the longest
prompt and generate up to the longest output of the batch; tokens past a
request's own length are the waste static batching pays, so they are not
counted as output.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.metrics import RequestRecord
from bench.workload import BenchRequest

NEVER_EOS = -1  # transformers' continuous batching: a negative EOS id never matches


def load_hf_model(model_dir: str, gguf_file: str | None, dtype: str, device: str, random_weights: bool = False):
    """The same weights pagedserve serves, through transformers (or, for a random-weight
    directory, random weights of its config, built on the device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, "float32" if dtype == "auto" and device == "cpu" else
                          "bfloat16" if dtype == "auto" else dtype)
    if random_weights:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch_dtype)
        return model.eval()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **kwargs)
    return model.to(device).eval()


def run_static_batches(model, requests: list[BenchRequest], batch_size: int,
                       progress: Callable[[int], None] = lambda n: None) -> tuple[list[RequestRecord], float]:
    """transformers `generate`, `batch_size` requests at a time in order, left-padded.

    Returns one record per request (every token of a batch arrives at the batch's end,
    so TTFT is the batch's wall time) and the wall time in seconds."""
    import torch

    records: list[RequestRecord] = []
    device = next(model.parameters()).device
    pad = 0
    started = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first:first + batch_size]
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        sent = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                           max_new_tokens=max(r.output_len for r in batch), min_new_tokens=max(r.output_len for r in batch),
                           eos_token_id=None, pad_token_id=pad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        done = time.perf_counter()
        for r in batch:
            records.append(RequestRecord(prompt_len=len(r.prompt_ids), sent_s=sent - started,
                                         token_times_s=[done - started] * r.output_len))
        progress(len(records))
    return records, time.perf_counter() - started


def run_continuous_batching(model, requests: list[BenchRequest],
                            progress: Callable[[int], None] = lambda n: None) -> tuple[list[RequestRecord], float]:
    """transformers' continuous batching: every request submitted at once, per-token timestamps."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(r.output_len for r in requests),
                              eos_token_id=NEVER_EOS, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        started = time.perf_counter()
        ids = {}
        for i, r in enumerate(requests):
            rid = manager.add_request(r.prompt_ids, request_id=f"bench-{i}", max_new_tokens=r.output_len,
                                      record_timestamps=True, eos_token_id=NEVER_EOS)
            ids[rid] = i
        records: list[RequestRecord | None] = [None] * len(requests)
        done = 0
        while done < len(requests):
            result = manager.get_result(timeout=1.0)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching stopped before finishing")
                continue
            if not result.is_finished():
                continue
            if result.error:
                raise RuntimeError(f"transformers' continuous batching failed a request: {result.error}")
            i = ids[result.request_id]
            stamps = [t - started for t in (result.timestamps or [])] or [time.perf_counter() - started]
            records[i] = RequestRecord(prompt_len=len(requests[i].prompt_ids), sent_s=0.0, token_times_s=stamps,
                                       num_output_tokens=len(result.generated_tokens))
            done += 1
            progress(done)
        return [r for r in records if r is not None], time.perf_counter() - started
    finally:
        manager.stop(block=True, timeout=30)
