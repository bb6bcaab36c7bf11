"""The fused token masking of :mod:`.token_masking` in Triton: a per-sample select kernel, then one pass over the tokens.

Up to ``SORT_TOKENS`` tokens, one program sorts a sample's keys in registers
(measured by compiling for sm_90: 4096 int64 keys fit 4 warps without
spilling, 8192 need 8, 16384 spill); above that the keys are drawn and
ranked by torch (B x N int64, small next to x) and only the pass over x is
fused. Programs of the pass cover (token block, sample), so the token index
is contiguous and a token-major transpose is read with vector loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from medssl_scale.kernels import token_masking

SORT_TOKENS = 8192


@triton.jit
def _key(seed, b, n, N):
    r = tl.randint(seed, (b * N + n).to(tl.int32))
    return ((r >> 1).to(tl.int64) << 32) | n.to(tl.int64)


@triton.jit
def _select(ids_ptr, kth_ptr, seed, N, K, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    key = tl.where(n < N, _key(seed, b, n, N), 0x7FFFFFFFFFFFFFFF)  # padding sorts last
    kth = tl.max(tl.where(n == K - 1, tl.sort(key), -1), axis=0)
    hidden = key <= kth  # exactly K: keys are distinct (the token index is in their low bits), so no tie can add one
    slot = tl.cumsum(hidden.to(tl.int32), axis=0) - 1  # the masked tokens' places in ascending order
    tl.store(ids_ptr + b.to(tl.int64) * K + slot, n.to(tl.int64), mask=hidden)
    tl.store(kth_ptr + b, kth)


@triton.jit
def _apply(x_ptr, y_ptr, tok_ptr, kth_ptr, seed, N, C, sxb, sxn, sxc, syb, syn, syc,
           BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1)
    hidden = (_key(seed, b, n, N) <= tl.load(kth_ptr + b))[:, None]
    xrow = x_ptr + b.to(tl.int64) * sxb + n.to(tl.int64)[:, None] * sxn
    yrow = y_ptr + b.to(tl.int64) * syb + n.to(tl.int64)[:, None] * syn
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        valid = (n < N)[:, None] & (c < C)[None, :]
        x = tl.load(xrow + c[None, :] * sxc, mask=valid, other=0.0)
        if BACKWARD:
            # x is the incoming gradient; masked rows sum into the mask token's gradient
            tl.store(yrow + c[None, :] * syc, tl.where(hidden, 0.0, x).to(y_ptr.dtype.element_ty), mask=valid)
            g = tl.sum(tl.where(hidden & valid, x.to(tl.float32), 0.0), axis=0)
            tl.atomic_add(tok_ptr + c, g, mask=c < C)
        else:
            fill = tl.load(tok_ptr + c, mask=c < C, other=0.0).to(x.dtype)[None, :]
            tl.store(yrow + c[None, :] * syc, tl.where(hidden, fill, x), mask=valid)


def _apply_launch(src, out, tok, kth, seed, backward):
    b, n, c = src.shape
    block_c = min(triton.next_power_of_2(c), 128)
    block_t = max(1, min(triton.next_power_of_2(n), 4096 // block_c))
    _apply[(triton.cdiv(n, block_t), b)](src, out, tok, kth, seed, n, c, *src.stride(), *out.stride(),
                                         BACKWARD=backward, BLOCK_T=block_t, BLOCK_C=block_c)


def _select_launch(b: int, n: int, k: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if n > SORT_TOKENS:
        keys = token_masking.keys(b, n, seed, device)
        if k == 0:
            return torch.empty(b, 0, dtype=torch.long, device=device), torch.full((b,), -1, dtype=torch.int64, device=device)
        low = keys.topk(k, dim=1, largest=False)
        return (low.indices.sort(dim=1).values, low.values.max(dim=1).values)
    ids = torch.empty(b, k, dtype=torch.long, device=device)
    kth = torch.empty(b, dtype=torch.int64, device=device)
    if b * n:
        block = triton.next_power_of_2(n)
        _select[(b,)](ids, kth, seed, n, k, BLOCK_N=block, num_warps=4 if block <= 2048 else 8)
    return ids, kth


class FusedTokenMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask_token, ratio, seed):
        b, n, c = x.shape
        if b * n >= 2**31:
            raise ValueError(f"token masking draws at int32 offsets: B*N must be below 2^31, got {b * n}")
        ids, kth = _select_launch(b, n, token_masking.masked_tokens(n, ratio), seed, x.device)
        y = torch.empty((b, n, c), dtype=x.dtype, device=x.device)
        if x.numel():
            _apply_launch(x, y, mask_token.contiguous(), kth, seed, backward=False)
        ctx.save_for_backward(kth)
        ctx.args = (seed, mask_token.dtype)
        ctx.mark_non_differentiable(ids)
        return y, ids

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_ids):
        (kth,) = ctx.saved_tensors
        seed, tdtype = ctx.args
        gx = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        gtok = torch.zeros(grad.shape[2], dtype=torch.float32, device=grad.device)
        if grad.numel():
            _apply_launch(grad, gx, gtok, kth, seed, backward=True)
        return (gx if ctx.needs_input_grad[0] else None), (gtok.to(tdtype) if ctx.needs_input_grad[1] else None), None, None


def fused_token_mask(x: torch.Tensor, ratio: float, seed: int, mask_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return FusedTokenMask.apply(x, mask_token, ratio, seed)
