"""A Llama-family causal LM over a paged KV cache: Llama 2/3, Mistral, Qwen2 (q/k/v bias),
Qwen3 (q/k RMSNorm), SmolLM.

Tokens are flat: the forward pass takes ``[num_tokens]`` ids and positions of every sequence of
the step back to back, and attention finds each sequence's rows and context through
`AttentionMetadata`. Numerics follow Hugging Face transformers (fp32 RMSNorm statistics, fp32
RoPE angles, ``rotate_half`` RoPE layout) so logits match it to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from worker.attention import AttentionBackend, AttentionMetadata, TorchAttentionBackend

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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[num_tokens, heads, head_dim]``; cos/sin ``[num_tokens, head_dim]`` in x's dtype."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, backend: AttentionBackend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_size, self.kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.wqkv = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.attention_bias)
        self.wo = nn.Linear(self.q_size, args.hidden_size, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.scale = args.head_dim ** -0.5
        self.backend = backend

    def forward(self, x, cos, sin, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        num_tokens = x.shape[0]
        q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        key_cache, value_cache = kv_cache
        self.backend.write_kv(k, v, key_cache, value_cache, meta)
        out = self.backend.attend(q, key_cache, value_cache, meta, self.scale)
        return self.wo(out.reshape(num_tokens, self.q_size))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, backend: AttentionBackend):
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attention = Attention(args, backend)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, kv_cache, meta):
        h = x + self.attention(self.attention_norm(x), cos, sin, kv_cache, meta)
        return h + self.feed_forward(self.ffn_norm(h))


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs, backend: AttentionBackend | None = None):
        super().__init__()
        self.args = args
        backend = backend or TorchAttentionBackend()
        # _weight skips the random init: weights are always loaded (and normal_ on the meta
        # device costs a 2 s import).
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size,
                                           _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(Block(args, backend) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.output = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # A plain attribute, not a buffer: it must survive building on the meta device.
        self.inv_freq = rope_inv_freq(args)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """input_ids, positions: int64 ``[num_tokens]``; kv_caches: (K, V) per layer.
        Returns the final-norm hidden states ``[num_tokens, hidden_size]``."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        x = self.tok_embeddings(input_ids)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[rows, hidden_size]`` (only the rows to sample) -> float32 ``[rows, vocab_size]``."""
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(hidden, weight).float()

    # ---- weights -----------------------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors (``model.layers.0.self_attn.q_proj.weight``...) into our
        fused parameters. Raises if a parameter is left unset or a name is unknown. The extra
        name ``rope_freq_factors`` (GGUF ``rope_freqs``) divides the RoPE frequencies."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in named_tensors:
            if hf_name == "rope_freq_factors":
                self.inv_freq = self.inv_freq / tensor.to(self.inv_freq.device, torch.float32)
                continue
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            name, rows = self._map_name(hf_name)
            if name == "output.weight" and self.output is None:
                continue  # a tied checkpoint that also stores lm_head
            if name not in params:
                raise KeyError(f"unexpected weight {hf_name!r}")
            target = params[name].data if rows is None else params[name].data[rows[0]:rows[1]]
            if target.shape != tensor.shape:
                raise ValueError(f"{hf_name}: shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            target.copy_(tensor)
            loaded.add(name if rows is None else f"{name}[{rows[0]}]")
        expected = set()
        for name, param in params.items():
            ranges = self._fused_ranges(name)
            expected.update([name] if ranges is None else (f"{name}[{r[0]}]" for r in ranges))
        missing = expected - loaded
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {sorted(missing)[:8]}")

    def _fused_ranges(self, name: str) -> list[tuple[int, int]] | None:
        a = self.args
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        if name.endswith("wqkv.weight") or name.endswith("wqkv.bias"):
            return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
        if name.endswith("w13.weight"):
            return [(0, a.intermediate_size), (a.intermediate_size, 2 * a.intermediate_size)]
        return None

    _LAYER_NAMES = {
        "input_layernorm.weight": ("attention_norm.weight", None),
        "post_attention_layernorm.weight": ("ffn_norm.weight", None),
        "self_attn.o_proj.weight": ("attention.wo.weight", None),
        "self_attn.q_norm.weight": ("attention.q_norm.weight", None),
        "self_attn.k_norm.weight": ("attention.k_norm.weight", None),
        "mlp.down_proj.weight": ("feed_forward.w2.weight", None),
        "self_attn.q_proj.weight": ("attention.wqkv.weight", 0),
        "self_attn.k_proj.weight": ("attention.wqkv.weight", 1),
        "self_attn.v_proj.weight": ("attention.wqkv.weight", 2),
        "self_attn.q_proj.bias": ("attention.wqkv.bias", 0),
        "self_attn.k_proj.bias": ("attention.wqkv.bias", 1),
        "self_attn.v_proj.bias": ("attention.wqkv.bias", 2),
        "mlp.gate_proj.weight": ("feed_forward.w13.weight", 0),
        "mlp.up_proj.weight": ("feed_forward.w13.weight", 1),
    }
    _TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                  "lm_head.weight": "output.weight"}

    def _map_name(self, hf_name: str) -> tuple[str, tuple[int, int] | None]:
        if hf_name in self._TOP_NAMES:
            return self._TOP_NAMES[hf_name], None
        parts = hf_name.split(".", 3)
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in self._LAYER_NAMES:
            local, part = self._LAYER_NAMES[parts[3]]
            name = f"layers.{parts[2]}.{local}"
            return name, None if part is None else self._fused_ranges(name)[part]
        raise KeyError(f"unexpected weight {hf_name!r}")
