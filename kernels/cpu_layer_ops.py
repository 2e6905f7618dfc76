"""The elementwise work of a decoder layer in one C++ op each, on CPU (kernels/csrc/layer_ops_*.h).

Why: a torch op costs a dispatch and a pass over memory whatever its size; a Llama layer's
RMSNorms, residual adds, RoPE, K/V write and SiLU * up were about 30 of them, ~6 ms of a 37 ms
bfloat16 decode step at batch 48 and ~2.5 ms of 11 ms at batch 1 with the default model. Here
they are four per layer.

Each function below computes what the torch code it replaces computes (the `*_reference`
functions, which the tests compare against), bit for bit except where noted in
kernels/csrc/layer_ops_kernel.h (the RMSNorm sum order, SiLU's exp: float32 rounding).

The ops run only after `cpu_kernels.load()` succeeded in this process (the CPU attention backend
loads it) and only on what `applies` accepts; callers keep their torch path otherwise.
`enabled` switches them off, for comparisons.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import cpu_kernels

enabled = True  # tests and benchmarks set False to run the torch ops instead


def applies(*tensors: torch.Tensor) -> bool:
    """The fused ops' domain: module loaded, `enabled`, CPU tensors of one dtype, float32 or
    bfloat16, the innermost axis contiguous (each function checks the rest itself)."""
    if not enabled or cpu_kernels.loaded() is None:
        return False
    dtype = tensors[0].dtype
    if dtype is not torch.float32 and dtype is not torch.bfloat16:
        return False
    for t in tensors:  # a plain loop: this runs four times per layer per step
        if not t.is_cpu or t.dtype is not dtype or t.stride(-1) != 1:
            return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[tokens, H]`` contiguous -> RMSNorm(x) * weight, a new tensor. With `residual` (the
    same shape, contiguous): ``residual += x`` in place first (rounded to the dtype) and the norm
    is of that sum."""
    out = torch.empty_like(x)
    cpu_kernels.loaded().rms_norm(out, x, weight, float(eps), residual)
    return out


def rms_norm_reference(x, weight, eps, residual=None):
    """What `rms_norm` computes, in torch ops (Hugging Face's LlamaRMSNorm)."""
    if residual is not None:
        residual.copy_(residual + x)
        x = residual
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                  key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """qkv ``[tokens, (num_heads + 2 num_kv_heads) head_dim]`` (a fused projection's output);
    cos, sin ``[tokens, head_dim]`` from the model's rope_tables. Rotates q and k (the model's
    apply_rope), writes the rotated k and v into each token's cache slot (int64 `slot_mapping`;
    negative: not written) and returns q ``[tokens, num_heads, head_dim]``, a new contiguous tensor."""
    q = qkv.new_empty(qkv.shape[0], num_heads, key_cache.shape[-1])
    cpu_kernels.loaded().rope_write_kv(q, qkv, cos.contiguous(), sin.contiguous(), key_cache, value_cache,
                                       slot_mapping.long().contiguous())
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up ``[tokens, 2 I]`` contiguous, gate first -> SiLU(gate) * up ``[tokens, I]``."""
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    cpu_kernels.loaded().silu_mul(out, gate_up)
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
