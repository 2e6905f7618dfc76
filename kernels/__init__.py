"""Attention and cache kernels: torch references (the oracle) and Triton kernels."""
