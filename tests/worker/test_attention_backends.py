"""The Triton attention backend against the torch one: backend selection, the backend calls on
decode-only / prefill-only / mixed steps, and a small random-weight Llama through `ModelRunner`.

Without CUDA the Triton kernels run in Triton's interpreter (set below, before anything imports
them), on CPU in float32, so shapes stay tiny.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from tiny_llama import write_tiny_llama

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before kernels/triton_*.py are imported

from shared.config import ServerConfig  # noqa: E402
from shared.config_file import ConfigError, load_config  # noqa: E402
from shared.protocol import NewSeq, SamplingParams, ScheduledSeq  # noqa: E402
from worker.attention import AttentionMetadata, TorchAttentionBackend, get_attention_backend  # noqa: E402
from worker.attention_triton import TritonAttentionBackend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


def test_backend_selection():
    assert get_attention_backend("auto", "cpu").name == "torch"
    assert get_attention_backend("auto", torch.device("cuda:0")).name == "triton"
    assert get_attention_backend("torch", "cuda").name == "torch"
    assert isinstance(get_attention_backend("triton", DEVICE), TritonAttentionBackend)
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("flash", "cpu")
    assert load_config(None, {"attention_backend": "triton"}).worker.attention_backend == "triton"
    assert ServerConfig().worker.attention_backend == "auto"
    with pytest.raises(ConfigError, match="attention_backend"):
        load_config(None, {"attention_backend": "flash"})


def step_metadata(chunks: list[tuple[int, int]], block_size: int, num_blocks: int, gen: torch.Generator):
    """(context tokens, tokens this step) per sequence -> AttentionMetadata over shuffled blocks."""
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(-(-c // block_size) for c, _ in chunks)
    tables = torch.zeros(len(chunks), max_blocks, dtype=torch.int32)
    slots, starts = [], [0]
    for b, (context, q_len) in enumerate(chunks):
        ids = [free.pop() for _ in range(-(-context // block_size))]
        tables[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        slots += [ids[p // block_size] * block_size + p % block_size for p in range(context - q_len, context)]
        starts.append(starts[-1] + q_len)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE), block_tables=tables.to(DEVICE),
        seq_lens=torch.tensor([c for c, _ in chunks], dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        decode_only=all(q == 1 for _, q in chunks))


STEPS = {
    "decode_only": [(1, 1), (19, 1), (33, 1)],
    "prefill_only": [(12, 12), (30, 9), (5, 2)],
    "mixed": [(17, 1), (26, 26), (9, 1), (40, 7)],
}


@pytest.mark.parametrize("kind", sorted(STEPS))
def test_backend_calls_match_torch(kind):
    """write_kv then attend, as each model layer calls them, on caches with random prior contents."""
    gen = torch.Generator().manual_seed(len(kind))
    block_size, num_blocks, num_kv_heads, group, head_dim = 8, 24, 2, 3, 32
    meta = step_metadata(STEPS[kind], block_size, num_blocks, gen)
    num_tokens = int(meta.query_start_loc[-1])
    cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    key, value = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE) for _ in range(2))
    query = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=gen).to(DEVICE)
    results = []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        key_cache, value_cache = cache.clone(), cache.clone()
        backend.write_kv(key, value, key_cache, value_cache, meta)
        results.append((key_cache, value_cache, backend.attend(query, key_cache, value_cache, meta, 0.2)))
    (k0, v0, out0), (k1, v1, out1) = results
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    assert not out1.isnan().any()
    torch.testing.assert_close(out1, out0, atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("transformers")
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


# Tokens per sequence per step (prompts of 1, 9, 23 and 6 tokens): a prefill-only step, two
# mixed steps (chunks beside one-token chunks), then decode-only steps.
SCHEDULE = [{1: 5, 2: 8, 3: 2}, {0: 1, 1: 1, 2: 8, 3: 2}, {1: 1, 2: 7, 3: 1}, {1: 1, 3: 1}, {1: 1}]
PROMPT_LENS = (1, 9, 23, 6)


def step_kind(step: dict[int, int]) -> str:
    ones = sum(n == 1 for n in step.values())
    return "decode_only" if ones == len(step) else "prefill_only" if ones == 0 else "mixed"


def run_steps(backend: str, model_dir: str) -> list[torch.Tensor]:
    """Teacher-forced logits of every step of SCHEDULE through the runner's model."""
    from worker.model_runner import ModelRunner

    runner = ModelRunner(ServerConfig.from_settings(model=model_dir, device=str(DEVICE), num_kv_blocks=40, block_size=8,
                                                    attention_backend=backend))
    runner.load()
    assert runner.attention_backend == backend
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    free = list(range(40))
    random.Random(3).shuffle(free)
    for i, p in enumerate(prompts):
        runner.batch.add(NewSeq(i, p, len(p), [free.pop() for _ in range(-(-len(p) // 8))], GREEDY))
    done, logits = [0] * len(prompts), []
    with torch.inference_mode():
        for step in SCHEDULE:
            scheduled = [ScheduledSeq(i, n, done[i]) for i, n in step.items()]
            inputs = runner.batch.prepare(scheduled)
            assert inputs.meta.decode_only == (step_kind(step) == "decode_only")
            hidden = runner.model(inputs.input_ids, inputs.positions, inputs.meta, runner.kv_cache.layers())
            logits.append(runner.model.compute_logits(hidden).float().cpu())
            for i, n in step.items():
                done[i] += n
    assert done == list(PROMPT_LENS)
    return logits


def test_model_runner_logits_match_torch_backend(tiny_llama):
    assert {step_kind(s) for s in SCHEDULE} == {"prefill_only", "mixed", "decode_only"}
    expected_steps = run_steps("torch", tiny_llama)
    actual_steps = run_steps("triton", tiny_llama)
    for expected, actual in zip(expected_steps, actual_steps, strict=True):
        assert expected.abs().max() > 1.0  # logits of a useful size, so the tolerance means something
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
