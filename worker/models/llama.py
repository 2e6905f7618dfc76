"""A Llama-family causal LM over a paged KV cache: Llama 2/3, Mistral, Qwen2 (q/k/v bias),
Qwen3 (q/k RMSNorm), SmolLM.

Tokens are flat: the forward pass takes ``[num_tokens]`` ids and positions of every sequence of
the step back to back, and attention finds each sequence's rows and context through
`AttentionMetadata`. With tensor parallelism (worker/parallel.py) the module holds one rank's
share: its query and KV heads, its MLP channels and its vocabulary rows, plus the all-reduces
that make every rank's hidden states whole again. Numerics follow Hugging Face transformers
(fp32 RMSNorm statistics, fp32 RoPE angles, ``rotate_half`` RoPE layout) so logits match it to
rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kernels import cpu_layer_ops
from worker.attention import AttentionBackend, AttentionMetadata, TorchAttentionBackend
from worker.models.llama_weights import load_sharded_weights
from worker.parallel import ParallelGroup, ShardLayout, shard_layout

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None, or {"rope_type": "llama3" | "linear", ...}
    max_position_embeddings: int = 2048  # tokens: the model's context length
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # tokens; we attend fully, so contexts are capped to it
    model_type: str = "llama"

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """From a Hugging Face config.json dict (transformers 4 and 5 spellings of RoPE)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported (have: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        num_heads = cfg["num_attention_heads"]
        rope_params = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or dict(rope_params)
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"rope type {rope_type!r} is not supported (default, llama3, linear)")
        window = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_scaling=None if rope_type == "default" else {**scaling, "rope_type": rope_type},
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            sliding_window=window,
            model_type=model_type,
        )


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """float32 ``[head_dim // 2]`` angular frequency per rotated pair, in radians per position."""
    dim = args.head_dim
    # Explicit CPU: the model may be built under a meta-device context.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (args.rope_theta ** exponents)
    scaling = args.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(is_medium, blended, scaled)
    return inv_freq


def rope_tables(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) ``[num_tokens, head_dim]`` in `dtype` for `apply_rope`, from the angles
    ``[num_tokens, head_dim / 2]``: cos repeats over both halves; sin is negated on the first."""
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x ``[num_tokens, heads, head_dim]``; tables from `rope_tables`. Hugging Face's
    ``x * cos + rotate_half(x) * sin`` with rotate_half(x) = [-x2, x1]: rolling by half gives
    [x2, x1] and the signed sin carries the minus (x2 * -s == -(x2 * s) exactly), so the result is
    bit for bit the same in 4 ops instead of 7."""
    return x * cos[:, None, :] + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin[:, None, :]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x); with `residual`, (RMSNorm(residual + x), residual + x), the residual add of
        a layer fused into its next norm (the CPU op updates `residual` in place)."""
        if x.dim() == 2 and cpu_layer_ops.applies(x, self.weight) and x.is_contiguous() and (
                residual is None or residual.is_contiguous()):
            out = cpu_layer_ops.rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            residual = residual + x
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Hugging Face's LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) in float32, rounded to x's dtype,
        # then times the weight. F.rms_norm computes the first part in one op, bit for bit the same.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Column-parallel q/k/v (this rank's heads), row-parallel o, then an all-reduce."""

    def __init__(self, args: ModelArgs, backend: AttentionBackend, layout: ShardLayout, group: ParallelGroup):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = layout.num_q_heads, layout.num_kv_heads, args.head_dim
        self.q_size, self.kv_size = self.num_heads * args.head_dim, self.num_kv_heads * args.head_dim
        self.wqkv = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.attention_bias)
        self.wo = nn.Linear(self.q_size, args.hidden_size, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.scale = args.head_dim ** -0.5
        self.backend = backend
        self.group = group

    def forward(self, x, cos, sin, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        num_tokens = x.shape[0]
        qkv = self.wqkv(x)
        key_cache, value_cache = kv_cache
        # The backend's fused RoPE and K/V write where it has one (CPU), else torch ops and write_kv.
        q = None if self.q_norm is not None else self.backend.rope_write_kv(
            qkv, cos, sin, self.num_heads, self.num_kv_heads, key_cache, value_cache, meta)
        if q is not None:
            out = self.backend.attend(q, key_cache, value_cache, meta, self.scale)
            return self.group.all_reduce(self.wo(out.reshape(num_tokens, self.q_size)))
        v = qkv[:, self.q_size + self.kv_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:  # q and k are adjacent in the fused output: one rotation for both
            qk = qkv[:, :self.q_size + self.kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
            q, k = apply_rope(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
            q = q.contiguous()  # the attention backends take a dense query
        else:
            q = self.q_norm(qkv[:, :self.q_size].view(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, self.q_size:self.q_size + self.kv_size].view(num_tokens, self.num_kv_heads,
                                                                                   self.head_dim))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.backend.write_kv(k, v, key_cache, value_cache, meta)
        out = self.backend.attend(q, key_cache, value_cache, meta, self.scale)
        return self.group.all_reduce(self.wo(out.reshape(num_tokens, self.q_size)))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused in one matmul. Column-parallel
    gate/up (this rank's channels), row-parallel down, then an all-reduce."""

    def __init__(self, args: ModelArgs, layout: ShardLayout, group: ParallelGroup):
        super().__init__()
        self.w13 = nn.Linear(args.hidden_size, 2 * layout.intermediate_size, bias=False)
        self.w2 = nn.Linear(layout.intermediate_size, args.hidden_size, bias=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w13(x)
        if cpu_layer_ops.applies(gate_up) and gate_up.is_contiguous():
            return self.group.all_reduce(self.w2(cpu_layer_ops.silu_mul(gate_up)))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.group.all_reduce(self.w2(F.silu(gate) * up))


class VocabParallelEmbedding(nn.Module):
    """This rank's `layout.vocab` rows of the embedding, padded to `vocab_per_rank` rows (the
    padding is zero and never looked up). Each rank embeds the ids it holds, zeros for the
    others; the all-reduce then gives every rank every row."""

    def __init__(self, args: ModelArgs, layout: ShardLayout, group: ParallelGroup):
        super().__init__()
        # No random init: weights are always loaded (and normal_ on the meta device is slow).
        self.weight = nn.Parameter(torch.empty(layout.vocab_per_rank, args.hidden_size))
        self.vocab, self.group = layout.vocab, group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return F.embedding(input_ids, self.weight)
        start, end = self.vocab
        inside = (input_ids >= start) & (input_ids < end)
        x = F.embedding((input_ids - start) * inside, self.weight)  # others read row 0, zeroed next
        return self.group.all_reduce(x.masked_fill(~inside[:, None], 0.0))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, backend: AttentionBackend, layout: ShardLayout, group: ParallelGroup):
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attention = Attention(args, backend, layout, group)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.feed_forward = FeedForward(args, layout, group)

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        """x: the last layer's output (the embeddings at the first, with residual None);
        residual: the running sum of the layers' outputs before it. Returns this layer's
        (output, residual): the residual adds happen inside the next norm."""
        if residual is None:
            x, residual = self.attention_norm(x), x
        else:
            x, residual = self.attention_norm(x, residual)
        x, residual = self.ffn_norm(self.attention(x, cos, sin, kv_cache, meta), residual)
        return self.feed_forward(x), residual


class LlamaForCausalLM(nn.Module):
    """One rank's share of the model (the whole model when `group` is absent or has one rank).
    Raises TensorParallelError when the model cannot be split `group.world_size` ways."""

    def __init__(self, args: ModelArgs, backend: AttentionBackend | None = None, group: ParallelGroup | None = None):
        super().__init__()
        self.args = args
        self.group = group or ParallelGroup()
        self.layout = shard_layout(args.num_heads, args.num_kv_heads, args.intermediate_size, args.vocab_size,
                                   self.group.rank, self.group.world_size)
        backend = backend or TorchAttentionBackend()
        self.tok_embeddings = VocabParallelEmbedding(args, self.layout, self.group)
        self.layers = nn.ModuleList(Block(args, backend, self.layout, self.group) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.output = (None if args.tie_word_embeddings
                       else nn.Linear(args.hidden_size, self.layout.vocab_per_rank, bias=False))
        # A plain attribute, not a buffer: it must survive building on the meta device.
        self.inv_freq = rope_inv_freq(args)
        # A packed copy of the tied embedding for the logits (worker/cpu_linear.py), or None.
        self.lm_head: nn.Module | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """input_ids, positions: int64 ``[num_tokens]``; kv_caches: (K, V) per layer, this rank's
        KV heads. Returns the final-norm hidden states ``[num_tokens, hidden_size]`` (the same on
        every rank)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        x = self.tok_embeddings(input_ids)
        cos, sin = rope_tables(angles, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[rows, hidden_size]`` (only the rows to sample) -> float32
        ``[rows, layout.vocab_per_rank]``: this rank's vocabulary shard (the whole vocabulary at
        TP=1). `ParallelGroup.gather_vocab` assembles the full rows on rank 0."""
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        if self.output is not None:
            return self.output(hidden).float()
        return F.linear(hidden, self.tok_embeddings.weight).float()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy this rank's slice of each Hugging Face-named tensor into our fused parameters
        (worker/models/llama_weights.py). Raises if a parameter is left unset or a name is unknown."""
        load_sharded_weights(self, named_tensors)
