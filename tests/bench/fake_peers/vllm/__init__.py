"""A stand-in for vLLM's offline API, just what bench/vllm_offline.py calls: no model, known answers.

Each request's output is its prompt's first token repeated, one token per `step()`, so the bench's
plumbing (job file, progress lines, timing, token ids, result file) runs without vLLM installed.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

__version__ = "0.0.fake"


class SamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, min_tokens=0, ignore_eos=False, output_kind=None):
        self.max_tokens, self.ignore_eos = max_tokens, ignore_eos


def TokensPrompt(prompt_token_ids):  # noqa: N802 (vLLM's name: a TypedDict)
    return {"prompt_token_ids": list(prompt_token_ids)}


class _Engine:
    def __init__(self):
        self.live: deque = deque()

    def add_request(self, request_id, prompt, params):
        self.live.append([request_id, prompt["prompt_token_ids"][0], params.max_tokens])

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self):
        outputs = []
        for entry in list(self.live):
            entry[2] -= 1
            finished = entry[2] == 0
            outputs.append(SimpleNamespace(request_id=entry[0], finished=finished,
                                           outputs=[SimpleNamespace(token_ids=[entry[1]])]))
            if finished:
                self.live.remove(entry)
        return outputs


class LLM:
    def __init__(self, model, tokenizer=None, seed=0, **settings):
        self.llm_engine = _Engine()

    def generate(self, prompts, params, use_tqdm=True):
        return []
