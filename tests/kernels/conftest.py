"""Kernel tests run natively on CUDA, and in Triton's numpy interpreter everywhere else.

Triton decides at ``@triton.jit`` time (when a kernel module is imported) whether to interpret,
so the variable is set here, before any test module imports kernels/triton_*.py. Only when CUDA
is absent: with a GPU the same tests compile and run the real kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
