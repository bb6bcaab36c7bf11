"""Masked reconstruction loss: MSE over the masked tokens only, as a PyTorch reference and a fused Triton kernel.

``pred`` and ``target`` are [B, N, P] (a token's P values: a patch's voxels or
a representation), ``ids`` [B, K] the masked tokens of each sample (an exact
count per sample, so no [B, N] boolean is needed). ``norm`` says what is
compared, per token:

- ``none``: ``mean_p (pred - target)^2``;
- ``patch``: the target standardised by its own mean and variance (MAE's
  ``norm_pix_loss``, eps 1e-6);
- ``l2``: both L2-normalised, ``|pred/|pred| - target/|target||^2`` (RepRec's recovery).

The loss is the mean over the B*K masked tokens. The target gets no
gradient. Inputs may be bf16: everything accumulates in fp32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

Norm = Literal["none", "patch", "l2"]
NORMS = {"none": 0, "patch": 1, "l2": 2}


def reference(pred: torch.Tensor, target: torch.Tensor, ids: torch.Tensor, norm: Norm = "none") -> torch.Tensor:
    b = torch.arange(pred.shape[0], device=pred.device)[:, None]
    acc = torch.promote_types(pred.dtype, torch.float32)  # fp32 accumulation for bf16; float64 stays float64 (gradcheck)
    p, t = pred[b, ids].to(acc), target[b, ids].to(acc).detach()
    if norm == "patch":
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    elif norm == "l2":
        p, t = F.normalize(p, dim=-1), F.normalize(t, dim=-1)
    per = ((p - t) ** 2).sum(-1) if norm == "l2" else ((p - t) ** 2).mean(-1)
    return per.mean() if per.numel() else pred.sum() * 0.0


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _rows(pred_ptr, tgt_ptr, ids_ptr, out_ptr, gpred_ptr, scale, K, N, P, spb, spn, stb, stn, gb, gn,
              NORM: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_P: tl.constexpr):
        row = tl.program_id(0)  # one masked token
        b = row // K
        n = tl.load(ids_ptr + row).to(tl.int64)
        p_off = tl.arange(0, BLOCK_P)
        valid = p_off < P
        p = tl.load(pred_ptr + b * spb + n * spn + p_off, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(tgt_ptr + b * stb + n * stn + p_off, mask=valid, other=0.0).to(tl.float32)
        if NORM == 1:
            mean = tl.sum(t, axis=0) / P
            var = tl.sum(tl.where(valid, (t - mean) * (t - mean), 0.0), axis=0) / P
            t = tl.where(valid, (t - mean) / tl.sqrt(var + 1e-6), 0.0)
        if NORM == 2:
            pn = tl.maximum(tl.sqrt(tl.sum(p * p, axis=0)), 1e-12)
            tn = tl.maximum(tl.sqrt(tl.sum(t * t, axis=0)), 1e-12)
            ph, th = p / pn, t / tn
            if BACKWARD:
                # d|ph - th|^2/dp = 2 (ph - th - ((ph - th) . ph) ph) / |p|
                d = ph - th
                gp = 2.0 * (d - tl.sum(d * ph, axis=0) * ph) / pn * scale
                tl.store(gpred_ptr + b * gb + n * gn + p_off, gp.to(gpred_ptr.dtype.element_ty), mask=valid)
            else:
                tl.store(out_ptr + row, tl.sum((ph - th) * (ph - th), axis=0))
        else:
            d = tl.where(valid, p - t, 0.0)
            if BACKWARD:
                tl.store(gpred_ptr + b * gb + n * gn + p_off, (2.0 * d / P * scale).to(gpred_ptr.dtype.element_ty), mask=valid)
            else:
                tl.store(out_ptr + row, tl.sum(d * d, axis=0) / P)

    return triton, _rows


class FusedMaskedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, ids, norm):
        triton, rows = _kernels()
        bsz, n, p = pred.shape
        k = ids.shape[1]
        ids = ids.contiguous()
        per = torch.empty(bsz * k, dtype=torch.float32, device=pred.device)
        if per.numel():
            rows[(bsz * k,)](pred, target, ids, per, per, 1.0, k, n, p, pred.stride(0), pred.stride(1), target.stride(0),
                             target.stride(1), 0, 0, NORM=NORMS[norm], BACKWARD=False, BLOCK_P=triton.next_power_of_2(p))
        ctx.save_for_backward(pred, target, ids)
        ctx.norm = norm
        return per.mean() if per.numel() else per.sum()

    @staticmethod
    @once_differentiable  # a second derivative would need a kernel of its own
    def backward(ctx, grad):
        triton, rows = _kernels()
        pred, target, ids = ctx.saved_tensors
        bsz, n, p = pred.shape
        k = ids.shape[1]
        gpred = torch.zeros_like(pred, memory_format=torch.contiguous_format)
        if bsz * k:
            rows[(bsz * k,)](pred, target, ids, gpred, gpred, float(grad) / (bsz * k), k, n, p, pred.stride(0), pred.stride(1),
                             target.stride(0), target.stride(1), gpred.stride(0), gpred.stride(1), NORM=NORMS[ctx.norm],
                             BACKWARD=True, BLOCK_P=triton.next_power_of_2(p))
        return gpred, None, None, None


def masked_loss(pred: torch.Tensor, target: torch.Tensor, ids: torch.Tensor, norm: Norm = "none", fused: bool = False) -> torch.Tensor:
    if pred.stride(-1) != 1 or target.stride(-1) != 1:
        pred, target = pred.contiguous(), target.contiguous()  # the kernel reads a token's values contiguously
    return FusedMaskedLoss.apply(pred, target, ids, norm) if fused else reference(pred, target, ids, norm)
