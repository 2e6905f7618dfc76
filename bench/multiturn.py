"""A multi-turn chat workload from ShareGPT (bench/workload.py loads it): each conversation's
turn t sends the whole conversation so far (turn t-1's prompt, its answer, then the next human
message), as a chat client does, so every turn extends the previous prompt token for token.
Used by bench/data_parallel.py and tests/integration/test_data_parallel.py.
"""

from __future__ import annotations

import asyncio
import random

from shared.protocol import SamplingParams

SEPARATOR = "\nUser: "
ANSWER_CUE = "\nAssistant:"


def sharegpt_conversations(num: int, turns: int, user_tokens: int, seed: int, tokenizer) -> list[list[list[int]]]:
    """`num` conversations of `turns` human messages each (ShareGPT conversations with at least
    that many, shuffled by `seed`), each message as token ids of `SEPARATOR + text + ANSWER_CUE`,
    the text cut to `user_tokens` tokens."""
    from bench.workload import iter_sharegpt

    convs = []
    for c in iter_sharegpt():
        human = [m["value"] for m in c.get("conversations", []) if m.get("from") == "human" and m.get("value")]
        if len(human) >= turns:
            convs.append(human[:turns])
        if len(convs) >= num * 20:
            break
    random.Random(seed).shuffle(convs)
    if len(convs) < num:
        raise ValueError(f"only {len(convs)} ShareGPT conversations have {turns} turns")
    hf = tokenizer.hf
    out = []
    for human in convs[:num]:
        msgs = []
        for text in human:
            ids = hf.encode(text, add_special_tokens=False)[:user_tokens]
            msgs.append(hf.encode(SEPARATOR, add_special_tokens=False) + ids
                        + hf.encode(ANSWER_CUE, add_special_tokens=False))
        out.append(msgs)
    return out


async def run_conversations(client, conversations: list[list[list[int]]], answer_tokens: int,
                            session_keys: bool = False, header=None, think_s: float = 0.0,
                            seed: int = 0) -> list[list[list[int]]]:
    """Every conversation concurrently, its turns in order (each after the previous answer);
    greedy answers of exactly `answer_tokens` tokens. The answers' token ids per conversation and
    turn. `session_keys`: each conversation's requests carry its own session key. `header(i)`:
    token ids put before conversation i (so two runs of the same conversations share no cached
    block: every block key depends on everything before it). `think_s`: each turn waits a random
    0..think_s seconds first (seeded by `seed` and the conversation), as a user reads and types:
    conversations then interleave as they would, not in lockstep."""
    async def one(i: int, turns: list[list[int]]) -> list[list[int]]:
        prompt: list[int] = list(header(i)) if header is not None else []
        answers = []
        rng = random.Random(seed * 1_000_003 + i)
        for msg in turns:
            if think_s:
                await asyncio.sleep(rng.uniform(0, think_s))
            prompt = prompt + msg
            params = SamplingParams(max_tokens=answer_tokens, temperature=0.0, ignore_eos=True,
                                    session_key=f"conv-{i}" if session_keys else "")
            completion = await client.generate(prompt_token_ids=prompt, params=params)
            answer = completion.outputs[0].token_ids
            answers.append(answer)
            prompt = prompt + answer
        return answers

    return list(await asyncio.gather(*(one(i, c) for i, c in enumerate(conversations))))


def hit_rate(before: dict, after: dict) -> float:
    """Prefix-cache hit rate between two `stats` readings: prompt tokens found cached / looked up."""
    hits = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    queried = after["prefix_cache_queried_tokens"] - before["prefix_cache_queried_tokens"]
    return hits / queried if queried else 0.0
