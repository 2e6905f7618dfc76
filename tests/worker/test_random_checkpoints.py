"""Small random-weight Llama/Qwen2/Qwen3/Mistral checkpoints written by transformers'
`save_pretrained`, loaded by our Hugging Face directory loader: logits within 3e-4 of
transformers' (logits ~35; we measure ~3e-5), greedy outputs equal token for token; and the
GGUF loader's undoing of llama.cpp's rotary row permutation."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_greedy
from paged_driver import PlanDriver, hf_logits, paged_logits

from shared.config import ServerConfig
from worker.model_runner import ModelRunner

transformers = pytest.importorskip("transformers")

RANDOM_ATOL = 3e-4


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's convert_hf_to_gguf.py permutes q/k rows per head as
    reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2); we must undo exactly that."""
    import numpy as np

    from worker.loader import unpermute_rope_rows

    heads, head_dim, cols = 3, 8, 5
    weight = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    permuted = weight.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(weight.shape)
    assert np.array_equal(unpermute_rope_rows(permuted, heads), weight)


SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-6)

RANDOM_MODELS = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "llama3_rope_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=1, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen3_qk_norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=32)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1, sliding_window=None)),
}


def randomize(hf_model) -> None:
    """Default init leaves biases at 0 and norms at 1, and gives logits below 1, where greedy
    near-ties would make the comparison fragile. These give logits of ~30 and top-2 margins of
    >2e-3 along the greedy paths below (our differences are ~1e-5)."""
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif "embed" in name or "lm_head" in name:
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, 0.15)


@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
def test_random_hf_checkpoint_matches(name, tmp_path):
    config_cls, model_cls, extra = RANDOM_MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**SMALL, **extra, eos_token_id=7, bos_token_id=1)
    hf = getattr(transformers, model_cls)(config).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    runner = ModelRunner(ServerConfig.from_settings(model=str(tmp_path), num_kv_blocks=64, block_size=8))
    runner.load()
    assert runner.eos_token_ids == [7]

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (1, 9, 30, 17)]
    for prompt, logits in zip(prompts, paged_logits(runner, prompts, first_chunk=6)):
        assert (logits - hf_logits(hf, prompt)).abs().max().item() < RANDOM_ATOL
    ours = PlanDriver(runner).run([(p, len(p)) for p in prompts], max_new=12, chunk=10)
    assert ours == [hf_greedy(hf, p, 12) for p in prompts]
