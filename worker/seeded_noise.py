"""Counter-based random noise for seeded rows: a pure function of
(seed, output index, generated-token index, vocabulary position), computed with integer tensor
ops for a whole batch at once, so no per-row generator is needed and a seeded request's tokens
do not depend on the batch around it, on preemption or on a restart.

The mixer is Chris Wellons' "lowbias32" integer hash (a bijection of 32-bit integers). torch has
no unsigned 32-bit multiply, so values are kept in int64 below 2**32 and each multiplication is
split in 16-bit halves: no intermediate reaches 2**63, so nothing relies on signed overflow.
"""

from __future__ import annotations

import functools

import torch

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_ROW_SALT = 0x9E3779B9  # golden-ratio constant: keeps key 0 from starting at state 0
_POSITION_SALT = 0x85EBCA6B


def _mul32_(x: torch.Tensor, constant: int) -> torch.Tensor:
    """x = (x * constant) mod 2**32, in place, for int64 tensors holding values in [0, 2**32)."""
    if constant < 2**31:  # the product stays below 2**63
        return x.mul_(constant).bitwise_and_(_MASK32)
    low, high = constant & _MASK16, constant >> 16
    high_part = (x * high).bitwise_and_(_MASK16).bitwise_left_shift_(16)
    return x.mul_(low).add_(high_part).bitwise_and_(_MASK32)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2**32); returns a new tensor."""
    x = x ^ (x >> 16)
    _mul32_(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def row_keys(seed_words: torch.Tensor) -> torch.Tensor:
    """int64 ``[S, 4]`` words, each in [0, 2**32): (seed low, seed high, output index, generated
    index) -> one 32-bit key per row, ``[S, 1]``."""
    key = torch.full_like(seed_words[:, :1], _ROW_SALT)
    for column in range(seed_words.shape[1]):
        key = mix32(key ^ seed_words[:, column:column + 1])
    return key


@functools.lru_cache(maxsize=4)
def _position_hashes(vocab_size: int, device: torch.device) -> torch.Tensor:
    """mix32 of every vocabulary position (salted): computed once per vocabulary and device."""
    return mix32(torch.arange(vocab_size, device=device, dtype=torch.int64) ^ _POSITION_SALT)


def gumbel_noise(seed_words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 ``[S, vocab_size]`` Gumbel(0, 1) noise, ``-log(E)`` with ``E ~ Exp(1)``, one row
    per row of `seed_words`. ``argmax(logits + noise)`` samples from ``softmax(logits)``."""
    positions = _position_hashes(vocab_size, seed_words.device)
    bits = mix32(row_keys(seed_words) ^ positions[None, :])
    # The top 23 bits m give u = (m + 0.5) / 2**23: exact in float32 and strictly inside (0, 1),
    # so E = -log(u) > 0 and the noise is finite (at most ~16.6).
    uniform = bits.bitwise_right_shift_(9).to(torch.float32).add_(0.5).mul_(1.0 / 8388608.0)
    return uniform.log_().neg_().log_().neg_()
