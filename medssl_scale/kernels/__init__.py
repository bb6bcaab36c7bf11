"""Masking and disruption ops behind one dispatch point.

Objectives call these functions and never choose an implementation. Each
takes the run config's kernel backend: ``auto`` dispatches to a fused Triton
kernel for CUDA tensors once one exists (the kernels issue) and to the
PyTorch reference in :mod:`.reference` elsewhere; ``reference`` forces the
reference everywhere (debugging, comparing the two); ``triton`` insists on
the kernel.
"""

from __future__ import annotations

import torch

from medssl_scale.kernels import reference

BACKENDS = ("auto", "reference", "triton")


def _use_triton(x: torch.Tensor, op: str, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise NotImplementedError(f"no Triton kernel for {op} yet: use kernels backend 'auto' or 'reference'")
    return False  # no fused kernel yet: the reference is the implementation on every device


def channel_mask(x: torch.Tensor, ratio: float, seed: int, per_token: bool = False, values: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    _use_triton(x, "channel_mask", backend)
    return reference.channel_mask(x, ratio, seed, per_token, values)


def gaussian_noise(x: torch.Tensor, std: float, seed: int, backend: str = "auto") -> torch.Tensor:
    _use_triton(x, "gaussian_noise", backend)
    return reference.gaussian_noise(x, std, seed)


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    return reference.downsample(x, factor)


def patch_swap(x: torch.Tensor, patch: int, swaps: int, seed: int) -> torch.Tensor:
    return reference.patch_swap(x, patch, swaps, seed)


def gamma(x: torch.Tensor, log_std: float, seed: int) -> torch.Tensor:
    return reference.gamma(x, log_std, seed)


__all__ = ["BACKENDS", "channel_mask", "downsample", "gamma", "gaussian_noise", "patch_swap"]
