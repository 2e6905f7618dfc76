"""A small random-weight Llama checkpoint (save_pretrained) for worker tests against transformers.

Weights are drawn larger than transformers' default init so logits reach tens: greedy choices
are then far from ties, and a tolerance on logits means something.
"""

from __future__ import annotations

import torch

SHAPE = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)


def write_tiny_llama(path, layer_std: float = 0.15, **shape) -> str:
    """Write a random Llama of SHAPE (updated by `shape`) to `path`; return it as a string."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**SHAPE, **shape}, rms_norm_eps=1e-6, eos_token_id=7, bos_token_id=1)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 1.0 if "embed" in name or "lm_head" in name else layer_std)
            if "norm" in name:
                param.fill_(1.0)
    model.save_pretrained(path)
    return str(path)
