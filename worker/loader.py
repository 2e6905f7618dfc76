"""Load a Llama-family model into our own module from a Hugging Face directory or a GGUF file.

Both paths yield Hugging Face tensor names (``model.layers.0.self_attn.q_proj.weight``) into
`LlamaForCausalLM.load_weights`, so the model knows one naming only. GGUF tensors are dequantized
to float32 and then cast: we compute in `dtype`, never in a quantized format.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from shared.models import ModelFiles
from worker.attention import AttentionBackend
from worker.models.llama import LlamaForCausalLM, ModelArgs
from worker.parallel import ParallelGroup, shard_layout

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    args: ModelArgs
    eos_token_ids: list[int]  # generation stops on any of these
    weights_bytes: int  # this rank's share


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" is float32 on CPU (fast and exact there) and bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(files: ModelFiles, device: torch.device, dtype: torch.dtype,
               backend: AttentionBackend | None = None, group: ParallelGroup | None = None,
               load_format: str = "auto") -> LoadedModel:
    """This rank's share of the model (all of it without a group). Raises TensorParallelError
    before reading any weight when the model cannot be split group.world_size ways.

    load_format "dummy": only config.json is read; weights are random (vLLM's
    `--load-format dummy`), for benchmarks of real shapes without the checkpoint."""
    group = group or ParallelGroup()
    if load_format == "dummy":
        config = read_json(os.path.join(files.directory, "config.json"))
        tensors = None
        eos = hf_eos_token_ids(files.directory, config)
    elif files.gguf_path:
        from gguf import GGUFReader

        reader = GGUFReader(files.gguf_path)
        config = gguf_config(reader)
        tensors = _gguf_tensors(reader, config)
        eos = gguf_eos_token_ids(reader)
    else:
        config = read_json(os.path.join(files.directory, "config.json"))
        tensors = _safetensors_tensors(files.directory)
        eos = hf_eos_token_ids(files.directory, config)
    args = ModelArgs.from_hf_config(config)
    shard_layout(args.num_heads, args.num_kv_heads, args.intermediate_size, args.vocab_size, group.rank,
                 group.world_size, model=files.name)  # the clear message, before any weight is read
    with torch.device("meta"):
        model = LlamaForCausalLM(args, backend, group)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        if tensors is None:
            _init_dummy_weights(model, seed=group.rank)
        else:
            # Full tensors on the host: each rank copies only its slice to the device (copy_ casts).
            model.load_weights(tensors)
    model.eval().requires_grad_(False)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return LoadedModel(model=model, args=args, eos_token_ids=eos, weights_bytes=weights_bytes)


def _init_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Norm weights 1, everything else N(0, 0.02): activations stay finite through any depth."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)


# ---- Hugging Face directory -----------------------------------------------------------------


def read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _safetensors_tensors(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        names = sorted(set(read_json(index)["weight_map"].values()))
    else:
        # Mistral repos also ship consolidated.safetensors in the original (non-HF) naming.
        names = sorted(f for f in os.listdir(directory)
                       if f.endswith(".safetensors") and not f.startswith("consolidated"))
    if not names:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    for name in names:
        with safe_open(os.path.join(directory, name), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def hf_eos_token_ids(directory: str, config: dict[str, Any]) -> list[int]:
    """generation_config.json's eos ids first (what the model was tuned to stop on), then config.json's."""
    sources = [config]
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_path):
        sources.insert(0, read_json(gen_path))
    ids: list[int] = []
    for source in sources:
        value = source.get("eos_token_id")
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids


# ---- GGUF -----------------------------------------------------------------------------------


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader) -> dict[str, Any]:
    """The facts of a GGUF file's metadata, spelled as a Hugging Face config.json dict."""
    arch = _field(reader, "general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    config: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # ggml order: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": _field(reader, f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": _field(reader, f"{arch}.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _field(reader, f"{arch}.rope.scaling.factor")}
    return config


def gguf_eos_token_ids(reader) -> list[int]:
    """End-of-generation ids: eos, plus end-of-turn / end-of-message where the file names them."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = _field(reader, key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight", "rope_freqs.weight": "rope_freq_factors"}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_to_hf_name(name: str) -> str:
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    m = _GGUF_LAYER_RE.fullmatch(name)
    if m is None or m.group(2) not in _GGUF_LAYER:
        raise KeyError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter, which reorders each head's q/k rows from the
    ``rotate_half`` layout (first half, second half) to interleaved pairs for its RoPE kernel.
    Per head the rows are stored as [pair, 2]; we want them back as [2, pair]."""
    rows_per_half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, rows_per_half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _gguf_tensors(reader, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    # Only the llama converter (llama, mistral, smollm) permutes; qwen2/qwen3 keep HF's layout.
    permuted = config["model_type"] == "llama"
    for tensor in reader.tensors:
        array = dequantize(tensor.data, tensor.tensor_type)
        name = gguf_to_hf_name(tensor.name)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = unpermute_rope_rows(array, config["num_attention_heads"])
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = unpermute_rope_rows(array, config["num_key_value_heads"])
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.writeable:  # a view of the memory-mapped file
            array = array.copy()
        yield name, torch.from_numpy(array)
