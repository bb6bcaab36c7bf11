"""Triton's counter-based random numbers (Philox 4x32-10), bit for bit, in plain PyTorch.

A fused kernel draws ``tl.rand(seed, offset)`` / ``tl.randn(seed, offset)``
from a seed and each element's offset, so it stores no mask: backward draws
the same numbers again. The PyTorch references draw through these functions,
so the reference and the kernel agree element for element on any device,
and "the same seed gives the same mask" holds across both paths.
(``triton.language.random`` is the definition; the test compares the two
under ``TRITON_INTERPRET=1``.)

uint32 arithmetic is done in int64 tensors, masked to 32 bits.
"""

from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _umulhi(a: int, b: torch.Tensor) -> torch.Tensor:
    # The high 32 bits of a 32x32-bit product, without overflowing int64: split b into 16-bit halves.
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo = a * b_lo
    mid = a * b_hi + (lo >> 16)
    return (mid >> 16) & _M32


def randint4x(seed: int, offset: torch.Tensor, n_rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Four blocks of uint32 (as int64) for int ``offset`` (< 2^32), as ``tl.randint4x(seed, offset)``."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0 = torch.full_like(offset, seed & _M32, dtype=torch.int64)
    k1 = torch.full_like(k0, (seed >> 32) & _M32)
    c0 = offset.to(torch.int64) & _M32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(n_rounds):
        _c0, _c2 = c0, c2
        c0 = _umulhi(_ROUND_B, _c2) ^ c1 ^ k0
        c2 = _umulhi(_ROUND_A, _c0) ^ c3 ^ k1
        c1 = (_ROUND_B * _c2) & _M32
        c3 = (_ROUND_A * _c0) & _M32
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(x: torch.Tensor) -> torch.Tensor:
    signed = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x
    return signed.to(torch.float32) * 4.6566127342e-10


def rand(seed: int, offset: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1), as ``tl.rand(seed, offset)``."""
    return _uniform(randint4x(seed, offset)[0])


def randn(seed: int, offset: torch.Tensor) -> torch.Tensor:
    """float32 N(0, 1), as ``tl.randn(seed, offset)`` (Box-Muller on the first two Philox outputs)."""
    i1, i2, _, _ = randint4x(seed, offset)
    u1 = torch.clamp_min(_uniform(i1), 1.0e-7)
    th = 2 * math.pi * _uniform(i2)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th)
