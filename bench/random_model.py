"""A model directory of a given shape with no weights: for benchmarks of real shapes anywhere.

`write_random_model(preset, directory)` writes a Llama config.json and a synthetic word-level
tokenizer (token i is the word ``w<i>``), no checkpoint. pagedserve serves it with
`--load-format dummy` (random weights); the transformers peers build it with `from_config`.
Speed does not depend on the weights' values, and every engine generates exactly the requested
lengths (EOS ignored), so random weights measure the same work as real ones.
"""

from __future__ import annotations

import json
import os

PRESETS: dict[str, dict] = {
    # Meta-Llama-3-8B's shapes.
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "rope_theta": 500000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5},
    # Llama-3.2-1B's shapes.
    "llama3-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                  "rope_theta": 500000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                  "tie_word_embeddings": True},
    # For tests: seconds on a CPU.
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
}
BOS, EOS = 1, 2  # token ids


def write_random_model(preset: str, directory: str) -> str:
    """-> `directory`, holding config.json, generation_config.json and tokenizer files."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (have: {', '.join(PRESETS)})")
    os.makedirs(directory, exist_ok=True)
    shape = PRESETS[preset]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "bos_token_id": BOS, "eos_token_id": EOS, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              **shape}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BOS, "eos_token_id": EOS}, f)
    _write_tokenizer(directory, shape["vocab_size"])
    return directory


def _write_tokenizer(directory: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.save_pretrained(directory)
