"""Token masking (MAE / SimMIM style): per sample an exact count of tokens replaced by a mask token.

``x`` [B, N, C] (any strides) becomes ``y`` with ``k = round(ratio N)`` (at
least 1 when ratio > 0) tokens of each sample replaced by ``mask_token`` [C]; also returned
are the masked ids [B, K], ascending, which is all a masked loss needs: no
[B, N] boolean exists on the fused path.

Which tokens: each token gets a key from Triton's Philox at its offset
``b N + n`` (the first 32-bit output, its top 31 bits, then the token index
in the low 32 bits, so keys are distinct and the count is exact even when
two draws tie), and the ``k`` lowest keys of a sample are masked.

Fused path (:mod:`.triton_token_masking`), two kernels: one program per
sample sorts its N keys, writes its ids (a prefix sum compacts them in order)
and the k-th key; then one pass over x writes y, each token drawing its key
again and comparing it with its sample's k-th key. Backward is the same pass
on the gradient (masked rows get zero, their sum is the mask token's
gradient), so nothing [B, N] is saved.
"""

from __future__ import annotations

import torch

from medssl_scale.kernels import philox


def masked_tokens(tokens: int, ratio: float) -> int:
    """``round(ratio N)``, at least 1 when ratio > 0 (0 masks nothing: ids [B, 0])."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"token mask ratio must be in [0, 1), got {ratio}")
    return 0 if ratio == 0 else min(tokens, max(1, round(ratio * tokens)))


def keys(batch: int, tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    """[B, N] int64 keys, distinct within a sample; the lowest k are masked."""
    n = torch.arange(tokens, device=device)
    offsets = torch.arange(batch, device=device)[:, None] * tokens + n
    r = philox.randint4x(seed, offsets)[0]
    return ((r >> 1) << 32) | n


def mask_ids(batch: int, tokens: int, ratio: float, seed: int, device: torch.device) -> torch.Tensor:
    """[B, K] masked token ids per sample, ascending."""
    k = masked_tokens(tokens, ratio)
    return keys(batch, tokens, seed, device).topk(k, dim=1, largest=False).indices.sort(dim=1).values


def reference(x: torch.Tensor, ratio: float, seed: int, mask_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, _ = x.shape
    ids = mask_ids(b, n, ratio, seed, x.device)
    hidden = torch.zeros(b, n, dtype=torch.bool, device=x.device).scatter_(1, ids, True)
    return torch.where(hidden[..., None], mask_token.to(x.dtype), x), ids


def token_mask(x: torch.Tensor, ratio: float, seed: int, mask_token: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim != 3 or mask_token.shape != (x.shape[2],):
        raise ValueError(f"token_mask wants x [B, N, C] and mask_token [C], got {tuple(x.shape)} and {tuple(mask_token.shape)}")
    if fused:
        from medssl_scale.kernels.triton_token_masking import fused_token_mask

        return fused_token_mask(x, ratio, seed, mask_token)
    return reference(x, ratio, seed, mask_token)
