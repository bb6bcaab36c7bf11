"""Fused disruption in Triton: channel masking (shared or per-token subsets, zero or learned fill) plus Gaussian noise, one pass.

Semantics are :func:`medssl_scale.kernels.reference.channel_mask` followed by
:func:`~medssl_scale.kernels.reference.gaussian_noise`; the random numbers are
the same Philox draws (:mod:`.philox`), so the two paths agree element for
element. ``x`` is seen as [B, C, S] with any strides: channels-first
embeddings [B, C, D, H, W] and token-major [B, N, C] (as its [B, C, N]
transpose) both work without a copy. No mask is stored: backward draws it again.

Per-token subsets are exact: a token's ``k`` lowest scores are masked. The
kernel sorts each token's scores (padding channels score 2, above any
uniform) and takes the k-th as the threshold. float32 scores can tie: every
score below the threshold is masked, then of those equal to it the lowest
channel indices up to ``k`` in all, the reference's order
(:func:`~medssl_scale.kernels.reference.lowest_k_keep`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from medssl_scale.kernels import reference


@triton.jit
def _disrupt(x_ptr, y_ptr, keep_ptr, val_ptr, T, C, S, sxb, sxc, sxs, syb, syc, sys_,
             mask_seed, noise_seed, k, std, PER_TOKEN: tl.constexpr, HAS_VALUES: tl.constexpr, NOISE: tl.constexpr,
             BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]  # tokens (batch-major, then spatial)
    c = tl.arange(0, BLOCK_C)[None, :]
    valid = (t < T) & (c < C)
    b, s = t // S, t % S
    if PER_TOKEN:
        score = tl.rand(mask_seed, (t * C + c).to(tl.int32))
        score = tl.where(c < C, score, 2.0)
        ranked = tl.sort(score, dim=1)
        kth = tl.max(tl.where(tl.arange(0, BLOCK_C)[None, :] == k - 1, ranked, -1.0), axis=1)[:, None]
        below = score < kth
        tie = score == kth
        # a tie at the threshold would mask more than k: take the tied channels in index order, k in all
        room = k - tl.sum(below.to(tl.int32), axis=1)[:, None]
        masked = (below | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= room))) & (k > 0)
    else:
        masked = tl.load(keep_ptr + c, mask=c < C, other=1.0) == 0.0
    x = tl.load(x_ptr + b * sxb + c * sxc + s * sxs, mask=valid, other=0.0).to(tl.float32)
    if BACKWARD:
        # x holds the incoming gradient; y receives the gradient for x; masked positions sum into the values' gradient
        tl.store(y_ptr + b * syb + c * syc + s * sys_, tl.where(masked, 0.0, x).to(y_ptr.dtype.element_ty), mask=valid)
        if HAS_VALUES:
            tl.atomic_add(val_ptr + tl.arange(0, BLOCK_C), tl.sum(tl.where(masked & valid, x, 0.0), axis=0), mask=tl.arange(0, BLOCK_C) < C)
    else:
        if HAS_VALUES:
            fill = tl.load(val_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        else:
            fill = tl.zeros_like(x)
        y = tl.where(masked, fill, x)
        if NOISE:
            # the reference's noise offsets: each element's place in the logical [B, C, S] order
            y += std * tl.randn(noise_seed, (b * C * S + c * S + s).to(tl.int32))
        tl.store(y_ptr + b * syb + c * syc + s * sys_, y.to(y_ptr.dtype.element_ty), mask=valid)


def _as_bcs(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    b, c = x.shape[:2]
    v = x.reshape(b, c, -1) if x.ndim != 3 else x  # a view when possible; reshape copies only if it must
    return v, b, c, v.shape[2]


def _launch(src: torch.Tensor, out: torch.Tensor, keep: torch.Tensor, values: torch.Tensor | None, ratio: float, mask_seed: int,
            noise_seed: int, std: float, per_token: bool, backward: bool) -> None:
    xs, b, c, s = _as_bcs(src)
    ys, _, _, _ = _as_bcs(out)
    k = reference.masked_count(c, ratio)
    block_c = triton.next_power_of_2(c)
    block_t = max(1, min(1024, 8192 // block_c))  # about 8k elements per program, whatever C is
    grid = (triton.cdiv(b * s, block_t),)
    _disrupt[grid](xs, ys, keep, values if values is not None else keep, b * s, c, s, *xs.stride(), *ys.stride(),
                   mask_seed, noise_seed, k, float(std), PER_TOKEN=per_token, HAS_VALUES=values is not None,
                   NOISE=(std > 0 and not backward), BACKWARD=backward, BLOCK_T=block_t, BLOCK_C=block_c)


class FusedDisrupt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, ratio, mask_seed, per_token, std, noise_seed):
        c = x.shape[1]
        # The shared subset is one draw of C scores: ranked here (C elements), applied in the kernel.
        keep = reference.channel_keep(x[:1, :, :1], ratio, mask_seed, False).reshape(c).float() if not per_token else x.new_ones(1, dtype=torch.float32)
        if values is not None and ratio > 0:
            values = values.contiguous()
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        _launch(x, y, keep, values, ratio, mask_seed, noise_seed, std, per_token, backward=False)
        ctx.save_for_backward(keep)
        ctx.args = (ratio, mask_seed, per_token, values is not None, x.shape, values.dtype if values is not None else None)
        return y

    @staticmethod
    @once_differentiable  # a second derivative would need a kernel of its own
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        ratio, mask_seed, per_token, has_values, shape, vdtype = ctx.args
        gx = torch.empty(shape, dtype=grad.dtype, device=grad.device)
        gv = torch.zeros(shape[1], dtype=torch.float32, device=grad.device) if has_values else None
        _launch(grad, gx, keep, gv, ratio, mask_seed, 0, 0.0, per_token, backward=True)
        return gx, (gv.to(vdtype) if gv is not None else None), None, None, None, None, None


def disrupt(x: torch.Tensor, ratio: float, mask_seed: int, per_token: bool = False, values: torch.Tensor | None = None,
            std: float = 0.0, noise_seed: int = 0) -> torch.Tensor:
    """Channel masking, then ``std`` Gaussian noise, fused; ``x`` [B, C, *S] (or [B, C, N])."""
    return FusedDisrupt.apply(x, values, ratio, mask_seed, per_token, std, noise_seed)
