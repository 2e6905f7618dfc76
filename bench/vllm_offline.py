"""vLLM's offline engine on the bench's requests: run by vLLM's own venv's python, never imported.

    python vllm_offline.py JOB.json RESULT.json

JOB: {"model": HF dir, "dtype", "max_model_len", "requests": [[prompt ids, output len], ...]}; other
settings are vLLM's defaults, except prefix caching, off as in pagedserve's bench server.
Every request is added at once to vLLM's `LLMEngine` (what `LLM.generate` drives), greedy with EOS
ignored and exactly its output length, as pagedserve runs them; `step()` is then called until all
finish, and every token's arrival is timed (seconds since the requests were added) from the
DELTA outputs. A short warm-up request runs first, outside the timing.

RESULT: {"vllm_version", "duration_s", "settings", "requests": [{"token_times_s", "token_ids"}, ...]}.
This file imports only vLLM and the standard library: it runs in a venv without pagedserve.
"""

from __future__ import annotations

import json
import sys
import time


def _sampling(SamplingParams, RequestOutputKind, output_len: int):
    # ignore_eos alone gives exactly max_tokens tokens. min_tokens must stay unset: vLLM's min_tokens
    # masks EOS's logit even with ignore_eos, so greedy rows would avoid EOS where pagedserve (and
    # transformers) pick it, and every later token would differ.
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                          output_kind=RequestOutputKind.DELTA)


def run(job: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    settings = {"dtype": job["dtype"], "max_model_len": job["max_model_len"], "enable_prefix_caching": False}
    llm = LLM(model=job["model"], tokenizer=job["model"], seed=0, **settings)
    engine = llm.llm_engine
    llm.generate([TokensPrompt(prompt_token_ids=job["requests"][0][0][:8])],
                 SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    print("ready", file=sys.stderr, flush=True)
    requests = job["requests"]
    times: list[list[float]] = [[] for _ in requests]
    tokens: list[list[int]] = [[] for _ in requests]
    started = time.perf_counter()
    for i, (prompt_ids, output_len) in enumerate(requests):
        engine.add_request(f"bench-{i}", TokensPrompt(prompt_token_ids=prompt_ids),
                           _sampling(SamplingParams, RequestOutputKind, output_len))
    finished = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter() - started
        for out in outputs:
            i = int(out.request_id.rsplit("-", 1)[1])
            new = list(out.outputs[0].token_ids)
            tokens[i].extend(new)
            times[i].extend([now] * len(new))
            if out.finished:
                finished += 1
                print(f"finished {finished}/{len(requests)}", file=sys.stderr, flush=True)
    duration = time.perf_counter() - started
    return {"vllm_version": vllm.__version__, "duration_s": duration, "settings": settings,
            "requests": [{"token_times_s": t, "token_ids": k} for t, k in zip(times, tokens)]}


if __name__ == "__main__":  # vLLM starts its engine core in a child process: the guard is required
    with open(sys.argv[1]) as f:
        job_spec = json.load(f)
    result = run(job_spec)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
