"""A small random-weight Llama that a server can load, for tests of multi-rank serving: 8 query
heads and 4 KV heads (the default model's 3 KV heads do not split two ways), 2 layers, with the
default model's tokenizer and vocabulary size so the frontend can serve it."""

from __future__ import annotations

import os
import sys

from shared.models import resolve_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "worker"))
from test_random_checkpoints import randomize  # noqa: E402


def save_small_llama(path, attention_output_scale: float = 1.0):
    """Writes the model and tokenizer under `path` (seeded: always the same weights); returns the
    transformers model, the reference. `attention_output_scale` multiplies each o_proj: below 1 the
    attention is weak and the next token depends mostly on the last, so greedy runs repeat."""
    import torch
    import transformers

    files = resolve_model("default")
    transformers.AutoTokenizer.from_pretrained(files.directory, gguf_file=files.gguf_file).save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=49152,
                                      max_position_embeddings=4096, rms_norm_eps=1e-6, eos_token_id=2,
                                      bos_token_id=1)
    hf = transformers.LlamaForCausalLM(config).eval()
    randomize(hf)
    if attention_output_scale != 1.0:
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.self_attn.o_proj.weight.mul_(attention_output_scale)
    hf.save_pretrained(path)
    return hf
