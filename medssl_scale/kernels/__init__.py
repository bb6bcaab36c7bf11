"""Masking and disruption ops behind one dispatch point.

Objectives call these functions and never choose an implementation. Each
takes the run config's kernel backend: ``auto`` dispatches to the fused
Triton kernel (:mod:`.triton_disrupt`, :mod:`.triton_token_masking`,
:mod:`.masked_mse`) for CUDA tensors, once that op has passed its one-time
self-check on the device (:mod:`.selfcheck`), and to the PyTorch
reference in :mod:`.reference` elsewhere; ``reference`` forces the reference
everywhere (debugging, comparing the two); ``triton`` insists on the kernel
(on a CPU only under ``TRITON_INTERPRET=1``, set before triton is imported).
Both paths draw the same Philox numbers, so they agree element for element.
Triton is imported only when a kernel runs.
"""

from __future__ import annotations

import os

import torch

from medssl_scale.kernels import reference, selfcheck

BACKENDS = ("auto", "reference", "triton")


def _use_triton(x: torch.Tensor, op: str, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"kernels backend 'triton' for {op} needs CUDA tensors (or TRITON_INTERPRET=1, set before "
                             "triton is imported, to interpret it on the CPU); use 'auto' or 'reference' here")
        return True
    # auto: the fused kernel only where it compiles, and only once it has matched the reference there
    return backend == "auto" and _compiled_device(x) and _triton_available() and selfcheck.passed(op, x.device)


def _compiled_device(x: torch.Tensor) -> bool:
    """Where ``auto`` may run Triton: CUDA tensors (elsewhere Triton only interprets, far slower than the reference)."""
    return x.is_cuda


def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def channel_mask(x: torch.Tensor, ratio: float, seed: int, per_token: bool = False, values: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    if _use_triton(x, "channel_mask", backend):
        from medssl_scale.kernels.triton_disrupt import disrupt

        return disrupt(x, ratio, seed, per_token, values)
    return reference.channel_mask(x, ratio, seed, per_token, values)


def gaussian_noise(x: torch.Tensor, std: float, seed: int, backend: str = "auto") -> torch.Tensor:
    if _use_triton(x, "gaussian_noise", backend):
        from medssl_scale.kernels.triton_disrupt import disrupt

        return disrupt(x, 0.0, 0, std=std, noise_seed=seed)
    return reference.gaussian_noise(x, std, seed)


def masked_loss(pred: torch.Tensor, target: torch.Tensor, ids: torch.Tensor, norm: str = "none", backend: str = "auto") -> torch.Tensor:
    """MSE over the masked tokens ``ids`` [B, K] of ``pred``/``target`` [B, N, P]; see :mod:`.masked_mse`."""
    from medssl_scale.kernels import masked_mse

    return masked_mse.masked_loss(pred, target, ids, norm, fused=_use_triton(pred, "masked_loss", backend))


def token_mask(x: torch.Tensor, ratio: float, seed: int, mask_token: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``round(ratio N)`` tokens of each sample of ``x`` [B, N, C] replaced by ``mask_token`` [C]; returns (y, ids [B, K]); see :mod:`.token_masking`."""
    from medssl_scale.kernels import token_masking as tm

    return tm.token_mask(x, ratio, seed, mask_token, fused=_use_triton(x, "token_mask", backend))


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    return reference.downsample(x, factor)


def patch_swap(x: torch.Tensor, patch: int | tuple[int, ...], swaps: int, seed: int) -> torch.Tensor:
    return reference.patch_swap(x, patch, swaps, seed)


def gamma(x: torch.Tensor, log_range: float, seed: int) -> torch.Tensor:
    return reference.gamma(x, log_range, seed)


__all__ = ["BACKENDS", "channel_mask", "downsample", "gamma", "gaussian_noise", "masked_loss", "patch_swap", "token_mask"]
