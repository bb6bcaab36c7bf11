"""The fused token masking of :mod:`.token_masking` in Triton: a per-sample select kernel, then one pass over the tokens."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medssl_scale.kernels.token_masking import MAX_TOKENS, masked_tokens


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
    hidden = key <= kth
    slot = tl.cumsum(hidden.to(tl.int32), axis=0) - 1  # the masked tokens' places in ascending order
    tl.store(ids_ptr + b * K + slot, n.to(tl.int64), mask=hidden)
    tl.store(kth_ptr + b, kth)


@triton.jit
def _apply(x_ptr, y_ptr, tok_ptr, kth_ptr, seed, T, N, C, sxb, sxn, sxc, syb, syn, syc,
           BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b, n = t // N, t % N
    hidden = (_key(seed, b, n, N) <= tl.load(kth_ptr + b, mask=t < T, other=-1))[:, None]
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        valid = (t < T)[:, None] & (c < C)[None, :]
        x = tl.load(x_ptr + b[:, None] * sxb + n[:, None] * sxn + c[None, :] * sxc, mask=valid, other=0.0)
        if BACKWARD:
            # x is the incoming gradient; masked rows sum into the mask token's gradient
            tl.store(y_ptr + b[:, None] * syb + n[:, None] * syn + c[None, :] * syc, tl.where(hidden, 0.0, x).to(y_ptr.dtype.element_ty),
                     mask=valid)
            g = tl.sum(tl.where(hidden & valid, x.to(tl.float32), 0.0), axis=0)
            tl.atomic_add(tok_ptr + c, g, mask=c < C)
        else:
            fill = tl.load(tok_ptr + c, mask=c < C, other=0.0).to(x.dtype)[None, :]
            tl.store(y_ptr + b[:, None] * syb + n[:, None] * syn + c[None, :] * syc, tl.where(hidden, fill, x), mask=valid)


def _apply_launch(src, out, tok, kth, seed, backward):
    b, n, c = src.shape
    block_c = min(triton.next_power_of_2(c), 256)
    block_t = max(1, 4096 // block_c)
    _apply[(triton.cdiv(b * n, block_t),)](src, out, tok, kth, seed, b * n, n, c, *src.stride(), *out.stride(),
                                           BACKWARD=backward, BLOCK_T=block_t, BLOCK_C=block_c)


class FusedTokenMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask_token, ratio, seed):
        b, n, c = x.shape
        if n > MAX_TOKENS:
            raise ValueError(f"fused token masking sorts a sample's tokens in one program: N <= {MAX_TOKENS}, got {n}")
        k = masked_tokens(n, ratio)
        ids = torch.empty(b, k, dtype=torch.long, device=x.device)
        kth = torch.empty(b, dtype=torch.int64, device=x.device)
        y = torch.empty((b, n, c), dtype=x.dtype, device=x.device)
        if x.numel():
            _select[(b,)](ids, kth, seed, n, k, BLOCK_N=triton.next_power_of_2(n))
            _apply_launch(x, y, mask_token.contiguous(), kth, seed, backward=False)
        ctx.save_for_backward(kth)
        ctx.args = (seed, mask_token.dtype)
        ctx.mark_non_differentiable(ids)
        return y, ids

    @staticmethod
    def backward(ctx, grad, _grad_ids):
        (kth,) = ctx.saved_tensors
        seed, tdtype = ctx.args
        gx = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        gtok = torch.zeros(grad.shape[2], dtype=torch.float32, device=grad.device)
        if grad.numel():
            _apply_launch(grad, gx, gtok, kth, seed, backward=True)
        return gx, gtok.to(tdtype), None, None


def fused_token_mask(x: torch.Tensor, ratio: float, seed: int, mask_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return FusedTokenMask.apply(x, mask_token, ratio, seed)
