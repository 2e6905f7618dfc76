"""Tensor parallelism on CPU over gloo: the sharded model against the whole one.

Each group runs as real processes (tests/worker/tensor_parallel_harness.py), one per rank, driven
by the real Scheduler with concurrent requests and a KV cache too small for them (forced
preemption, by recompute and by swap). Checks against TP=1 on the same weights:

* teacher-forced logits within float32 tolerance: max abs difference below 1e-4 for the small
  random Llama (logits ~30; we measure ~1e-5: the all-reduces only reorder sums) and below
  1e-3 for the default model (logits ~40; as tests/worker/test_model_vs_transformers.py);
* greedy tokens equal, token for token.

Models: a small random-weight Llama (8 query heads, 4 KV heads) at TP=2 and TP=4 (at TP=4 a rank
holds 1 KV head; its vocabulary of 302 leaves the last shard padded), preempting by recompute and
by swap; and the default model (9 query heads, 3 KV heads) at TP=3, preempting by recompute (the
slow one; tests/integration/test_tensor_parallel.py also serves it at TP=3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensor_parallel_harness import run_group

from shared.config import ServerConfig
from shared.models import ModelNotFound, resolve_model
from worker.loader import load_model
from worker.model_runner import ModelRunner
from worker.parallel import ParallelGroup, TensorParallelError, shard_layout

transformers = pytest.importorskip("transformers")

RANDOM_ATOL = 1e-4
DEFAULT_ATOL = 1e-3
SMALL_LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=302, max_position_embeddings=256, rms_norm_eps=1e-6)


# ---- the split itself -----------------------------------------------------------------------


def test_layout_of_the_default_model_at_tp3():
    layouts = [shard_layout(9, 3, 1536, 49152, rank, 3) for rank in range(3)]
    assert [lay.q_heads for lay in layouts] == [(0, 3), (3, 6), (6, 9)]
    assert [lay.kv_heads for lay in layouts] == [(0, 1), (1, 2), (2, 3)]
    assert [lay.intermediate for lay in layouts] == [(0, 512), (512, 1024), (1024, 1536)]
    assert [lay.vocab for lay in layouts] == [(0, 16384), (16384, 32768), (32768, 49152)]


def test_kv_heads_are_replicated_when_fewer_than_ranks():
    # 8 query heads, 2 KV heads, 4 ranks: query heads 0-3 read KV head 0, 4-7 read KV head 1.
    layouts = [shard_layout(8, 2, 96, 302, rank, 4) for rank in range(4)]
    assert [lay.q_heads for lay in layouts] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [lay.kv_heads for lay in layouts] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [lay.vocab for lay in layouts] == [(0, 76), (76, 152), (152, 228), (228, 302)]
    assert {lay.vocab_per_rank for lay in layouts} == {76}
    assert shard_layout(8, 1, 96, 302, 3, 8).kv_heads == (0, 1)


@pytest.mark.parametrize("heads, kv_heads, size, words", [
    (9, 3, 2, ["tensor_parallel_size 2: M cannot be split 2 ways", "2 does not divide its 9 attention heads",
               "Sizes that work: 1, 3"]),
    (8, 4, 3, ["3 does not divide its 8 attention heads", "3 neither divides its 4 KV heads"]),
    (8, 3, 2, ["2 neither divides its 3 KV heads nor is a multiple of them", "Sizes that work: 1"]),
])
def test_a_size_that_does_not_divide_the_heads_is_refused_clearly(heads, kv_heads, size, words):
    with pytest.raises(TensorParallelError) as e:
        shard_layout(heads, kv_heads, 96 * 3, 300, 0, size, model="M")
    for word in words:
        assert word in str(e.value)


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """A random-weight Llama with 8 query and 4 KV heads, saved as a Hugging Face directory."""
    from test_random_checkpoints import randomize

    path = tmp_path_factory.mktemp("small_llama")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL_LLAMA, eos_token_id=7, bos_token_id=1))
    randomize(hf.eval())
    hf.save_pretrained(path)
    return str(path)


def test_shards_put_back_together_are_the_whole_model(small_llama):
    """Every rank's parameters, concatenated along the split dimension, equal the TP=1 ones."""
    files = resolve_model(small_llama)
    whole = dict(load_model(files, torch.device("cpu"), torch.float32).model.named_parameters())
    parts = [dict(load_model(files, torch.device("cpu"), torch.float32, group=ParallelGroup(r, 4)).model
                  .named_parameters()) for r in range(4)]
    q, kv, inter = 2 * 8, 1 * 8, 24  # per rank: 2 query heads, 1 KV head (of 8 dims), 24 MLP channels
    for name, full in whole.items():
        shards = [p[name] for p in parts]
        if name.endswith("wqkv.weight"):
            qs = torch.cat([s[:q] for s in shards])
            ks = [s[q:q + kv] for s in shards]  # KV head r on rank r
            vs = [s[q + kv:] for s in shards]
            assert torch.equal(qs, full[:64])
            assert torch.equal(torch.cat(ks), full[64:96]) and torch.equal(torch.cat(vs), full[96:128])
        elif name.endswith("wo.weight") or name.endswith("w2.weight"):
            assert torch.equal(torch.cat(shards, dim=1), full)
        elif name.endswith("w13.weight"):
            gate = torch.cat([s[:inter] for s in shards])
            up = torch.cat([s[inter:] for s in shards])
            assert torch.equal(torch.cat([gate, up]), full)
        elif name in ("tok_embeddings.weight", "output.weight"):
            assert all(s.shape[0] == 76 for s in shards)
            assert torch.equal(torch.cat(shards)[:302], full)
            assert torch.equal(shards[-1][74:], torch.zeros(2, 64)), "padding rows are zero"
        else:
            assert all(torch.equal(s, full) for s in shards), name


def test_start_up_refuses_a_size_that_does_not_divide_the_heads(small_llama):
    """Before any weight is read, so before the ranks wait for each other."""
    runner = ModelRunner(ServerConfig.from_settings(model=small_llama, tensor_parallel_size=3, rank=1, num_kv_blocks=8))
    with pytest.raises(TensorParallelError, match="3 does not divide its 8 attention heads"):
        runner.load()


def test_default_model_refuses_tp2():
    try:
        files = resolve_model("default")
    except ModelNotFound as e:
        pytest.skip(str(e))
    runner = ModelRunner(ServerConfig.from_settings(model="default", tensor_parallel_size=2, num_kv_blocks=8))
    with pytest.raises(TensorParallelError) as e:
        runner.load()
    assert str(e.value).startswith(f"tensor_parallel_size 2: {files.name} cannot be split 2 ways")
    assert "9 attention heads" in str(e.value) and str(e.value).endswith("Sizes that work: 1, 3")


# ---- groups of processes against TP=1 ----------------------------------------------------------


def _compare(reference: dict, sharded: dict, atol: float) -> float:
    """Asserts equal greedy tokens and preemption in every mode; returns the max logit difference."""
    worst = 0.0
    for ours, theirs in zip(sharded["logits"], reference["logits"]):
        assert ours.shape == theirs.shape
        assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst < atol, worst
    for mode in reference["result"]["modes"]:
        ref, got = reference["result"][mode], sharded["result"][mode]
        assert got["tokens"] == ref["tokens"], mode
        assert got["stats"][f"preemptions_{mode}"] > 0, f"the small cache must force {mode} preemption"
    return worst


def _small_spec(model: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    lengths = (3, 17, 30, 9, 41, 12, 25, 6)
    return dict(model=model, block_size=8, num_kv_blocks=14, max_num_seqs=8, max_num_batched_tokens=40,
                swap_space_gib=0.001, max_tokens=14, preemption_modes=["recompute", "swap"], first_chunk=6,
                requests=[torch.randint(0, 302, (n,), generator=gen).tolist() for n in lengths],
                logit_prompts=[torch.randint(0, 302, (n,), generator=gen).tolist() for n in (1, 9, 30)])


@pytest.fixture(scope="module")
def small_reference(small_llama, tmp_path_factory):
    return run_group(_small_spec(small_llama), 1, str(tmp_path_factory.mktemp("tp1")))


@pytest.mark.parametrize("world_size", [2, 4])
def test_small_llama_matches_tp1(small_llama, small_reference, world_size, tmp_path):
    sharded = run_group(_small_spec(small_llama), world_size, str(tmp_path))
    assert sharded["result"]["kv_heads"] == 4 // world_size
    worst = _compare(small_reference, sharded, RANDOM_ATOL)
    print(f"TP={world_size}: max |logit difference| {worst:.2e}")


@pytest.mark.slow
def test_default_model_at_tp3_matches_tp1(tmp_path):
    try:
        files = resolve_model("default")
    except ModelNotFound as e:
        pytest.skip(str(e))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files.directory, gguf_file=files.gguf_file)
    texts = ["The capital of France is", "Once upon a time, in a land far away,", "def fibonacci(n):",
             "The three primary colors are"]
    # 4 sequences of up to 3 blocks each in 6 blocks: preemption.
    spec = dict(model="default", block_size=8, num_kv_blocks=6, max_num_seqs=4, max_num_batched_tokens=24,
                max_tokens=12, preemption_modes=["recompute"], first_chunk=5,
                requests=[tok.encode(t) for t in texts], logit_prompts=[tok.encode(t) for t in texts[:2]])
    reference = run_group(spec, 1, str(tmp_path / "tp1"))
    sharded = run_group(spec, 3, str(tmp_path / "tp3"))
    assert sharded["result"]["kv_heads"] == 1
    worst = _compare(reference, sharded, DEFAULT_ATOL)
    print(f"default model TP=3: max |logit difference| {worst:.2e}")


def test_beam_search_on_tp2_matches_tp1(small_llama, tmp_path):
    """Beam rows under tensor parallelism: rank 0's candidates, no rank appending a sampled token,
    the same best hypotheses as TP=1, with preemption by recompute and swap."""
    spec = {**_small_spec(small_llama), "beam_width": 2, "logit_prompts": []}
    reference = run_group(spec, 1, str(tmp_path / "tp1"))["result"]
    sharded = run_group(spec, 2, str(tmp_path / "tp2"))["result"]
    for mode in reference["modes"]:
        assert sharded[mode]["tokens"] == reference[mode]["tokens"], mode
        assert all(len(t) == spec["max_tokens"] for t in reference[mode]["tokens"].values())
        assert reference[mode]["stats"]["beam_forks"] > 0
    assert sum(reference[mode]["stats"]["preemptions"] for mode in reference["modes"]) > 0
