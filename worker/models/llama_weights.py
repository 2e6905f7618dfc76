"""Hugging Face tensor names -> our fused, possibly sharded, Llama parameters.

Each checkpoint tensor lands in one parameter (or one part of a fused one: q/k/v in `wqkv`,
gate/up in `w13`), after cutting this rank's slice out of it (worker/parallel.py says which):

    q_proj, k_proj, v_proj   rows of this rank's heads        (column-parallel)
    gate_proj, up_proj       rows of this rank's channels     (column-parallel)
    o_proj, down_proj        columns, the same ranges         (row-parallel)
    embed_tokens, lm_head    rows of this rank's vocabulary   (vocab-parallel; the shard's
                             padding rows are zeroed)
    norms                    whole                            (replicated)

So the loader yields full tensors and never needs to know about tensor parallelism.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:
    from worker.models.llama import LlamaForCausalLM

# HF layer-tensor suffix -> (our parameter under layers.N, fused part or None, how it is split)
_LAYER_NAMES = {
    "input_layernorm.weight": ("attention_norm.weight", None, None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None, None),
    "self_attn.q_norm.weight": ("attention.q_norm.weight", None, None),
    "self_attn.k_norm.weight": ("attention.k_norm.weight", None, None),
    "self_attn.o_proj.weight": ("attention.wo.weight", None, "q_cols"),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", None, "mlp_cols"),
    "self_attn.q_proj.weight": ("attention.wqkv.weight", 0, "q_rows"),
    "self_attn.k_proj.weight": ("attention.wqkv.weight", 1, "kv_rows"),
    "self_attn.v_proj.weight": ("attention.wqkv.weight", 2, "kv_rows"),
    "self_attn.q_proj.bias": ("attention.wqkv.bias", 0, "q_rows"),
    "self_attn.k_proj.bias": ("attention.wqkv.bias", 1, "kv_rows"),
    "self_attn.v_proj.bias": ("attention.wqkv.bias", 2, "kv_rows"),
    "mlp.gate_proj.weight": ("feed_forward.w13.weight", 0, "mlp_rows"),
    "mlp.up_proj.weight": ("feed_forward.w13.weight", 1, "mlp_rows"),
}
_TOP_NAMES = {"model.embed_tokens.weight": ("tok_embeddings.weight", "vocab_rows"),
              "model.norm.weight": ("norm.weight", None), "lm_head.weight": ("output.weight", "vocab_rows")}
_VOCAB_PARAMS = ("tok_embeddings.weight", "output.weight")


def load_sharded_weights(model: LlamaForCausalLM, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy each tensor's slice for this rank into `model` (converting device and dtype). The
    extra name ``rope_freq_factors`` (GGUF ``rope_freqs``) divides the RoPE frequencies.
    Raises KeyError for an unknown name, ValueError for a wrong shape or a missing parameter."""
    params = dict(model.named_parameters())
    for name in _VOCAB_PARAMS:  # padding rows past the real vocabulary
        if name in params:
            params[name].data.zero_()
    loaded: set[str] = set()
    for hf_name, tensor in named_tensors:
        if hf_name == "rope_freq_factors":
            model.inv_freq = model.inv_freq / tensor.to(model.inv_freq.device, torch.float32)
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name, part, split = _map_name(hf_name)
        if name == "output.weight" and model.output is None:
            continue  # a tied checkpoint that also stores lm_head
        if name not in params:
            raise KeyError(f"unexpected weight {hf_name!r}")
        source = _slice(model, tensor, split, hf_name)
        rows = _fused_ranges(model, name)[part] if part is not None else None
        if split == "vocab_rows":
            rows = (0, source.shape[0])
        target = params[name].data if rows is None else params[name].data[rows[0]:rows[1]]
        if target.shape != source.shape:
            raise ValueError(f"{hf_name}: shape {tuple(source.shape)} (this rank's slice), "
                             f"expected {tuple(target.shape)}")
        target.copy_(source)
        loaded.add(name if part is None else f"{name}[{part}]")
    expected = set()
    for name in params:
        ranges = _fused_ranges(model, name)
        expected.update([name] if ranges is None else (f"{name}[{i}]" for i in range(len(ranges))))
    missing = expected - loaded
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {sorted(missing)[:8]}")


def _map_name(hf_name: str) -> tuple[str, int | None, str | None]:
    if hf_name in _TOP_NAMES:
        name, split = _TOP_NAMES[hf_name]
        return name, None, split
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        local, part, split = _LAYER_NAMES[parts[3]]
        return f"layers.{parts[2]}.{local}", part, split
    raise KeyError(f"unexpected weight {hf_name!r}")


def _fused_ranges(model: LlamaForCausalLM, name: str) -> list[tuple[int, int]] | None:
    """Row ranges of the parts of a fused parameter on this rank (local sizes)."""
    layout, head_dim = model.layout, model.args.head_dim
    q, kv = layout.num_q_heads * head_dim, layout.num_kv_heads * head_dim
    if name.endswith("wqkv.weight") or name.endswith("wqkv.bias"):
        return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
    if name.endswith("w13.weight"):
        n = layout.intermediate_size
        return [(0, n), (n, 2 * n)]
    return None


def _slice(model: LlamaForCausalLM, tensor: torch.Tensor, split: str | None, hf_name: str) -> torch.Tensor:
    """This rank's part of a full checkpoint tensor (a view; the copy converts it). The split
    dimension must have the full model's size, whatever the rank."""
    if split is None:
        return tensor
    args, layout, head_dim = model.args, model.layout, model.args.head_dim
    dim = 1 if split.endswith("_cols") else 0
    full, (start, end) = {
        "q_rows": (args.num_heads * head_dim, (layout.q_heads[0] * head_dim, layout.q_heads[1] * head_dim)),
        "q_cols": (args.num_heads * head_dim, (layout.q_heads[0] * head_dim, layout.q_heads[1] * head_dim)),
        "kv_rows": (args.num_kv_heads * head_dim, (layout.kv_heads[0] * head_dim, layout.kv_heads[1] * head_dim)),
        "mlp_rows": (args.intermediate_size, layout.intermediate),
        "mlp_cols": (args.intermediate_size, layout.intermediate),
        "vocab_rows": (args.vocab_size, layout.vocab),
    }[split]
    if tensor.dim() <= dim or tensor.shape[dim] != full:
        raise ValueError(f"{hf_name}: shape {tuple(tensor.shape)}, expected {full} along dim {dim}")
    if (start, end) == (0, full):
        return tensor
    return tensor.narrow(dim, start, end - start)
