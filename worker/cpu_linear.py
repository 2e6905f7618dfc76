"""CPU matmuls through oneDNN with weights packed once at load.

Why: on CPU, `F.linear` runs MKL's sgemm on a row-major weight every call. oneDNN with the
weight reordered once into its own blocked layout is much faster where a decode step spends
its time: measured on the 2-core AMD EPYC (AVX-512) CI machine, the default model's layer
matmuls for 1 / 8 / 64 tokens take 20.5 / 21.5 / 79.5 ms per forward pass against MKL's 34.4 /
41.0 / 113.7 ms, and the 49,152-row LM head 4.5 / 5.6 / 20.0 ms against 10.4 / 15.9 / 43.3 ms
(`python bench/cpu_linear.py` reproduces this). Results agree with `F.linear` to float32
rounding (only the summation order differs).

`pack_linears` runs after the weights are loaded (tensor-parallel shards included) and before
the first step. A packed weight replaces the module's own (no second copy); a tied LM head
gets a packed copy of the embedding, since the embedding lookup needs the plain rows.
"""

from __future__ import annotations

import torch
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)  # oneDNN's float16 matmul needs AVX512-FP16


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward with the weight in oneDNN's layout; any number of leading dims."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # Opaque oneDNN tensor: plain attributes, not parameters (they cannot be loaded or moved).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = None if bias is None else bias.detach()
        self.nbytes = weight.numel() * weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def should_pack(device: torch.device, dtype: torch.dtype, choice: str = "auto") -> bool:
    """choice (ServerConfig.cpu_linear, validated there): "auto" (oneDNN where it applies),
    "onednn" (the same, but an error where it does not) or "torch" (plain F.linear)."""
    applies = device.type == "cpu" and dtype in PACKABLE_DTYPES and onednn_available()
    if choice == "onednn" and not applies:
        raise ValueError(f"oneDNN linears need a CPU device, float32 or bfloat16 and torch built with "
                         f"oneDNN (have {device.type}, {str(dtype).removeprefix('torch.')}, "
                         f"oneDNN {'available' if onednn_available() else 'missing'})")
    return choice != "torch" and applies


def pack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` in `model` by a `PackedLinear`; give a model whose LM head is
    tied to its embedding (`model.output is None`) a packed copy as `model.lm_head`. Returns
    the bytes added (the tied head's copy; replaced weights are freed)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child.weight, child.bias))
    added = 0
    if getattr(model, "output", "absent") is None and hasattr(model, "tok_embeddings"):
        model.lm_head = PackedLinear(model.tok_embeddings.weight, None)
        added = model.lm_head.nbytes
    return added
