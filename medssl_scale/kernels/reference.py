"""PyTorch references of the masking and disruption ops: they define the semantics.

Random numbers come from a seed, never from the global RNG: masks and noise
are Triton's Philox numbers at each element's offset (:mod:`.philox`), so a
fused kernel draws exactly the same and can regenerate a mask in backward
instead of storing it; the cube positions of ``patch_swap`` and the
per-sample ``gamma`` come from a seeded ``torch.Generator``.
Gradients flow through plain tensor ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medssl_scale.kernels import philox


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device if device.type == "cuda" else "cpu")
    g.manual_seed(int(seed) % (2**63))
    return g


def masked_count(channels: int, ratio: float) -> int:
    """Channels masked per token: ``round(ratio * C)``, at least 1 and at most C when ratio > 0."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    return 0 if ratio == 0 else min(channels, max(1, round(ratio * channels)))


def channel_keep(x: torch.Tensor, ratio: float, seed: int, per_token: bool) -> torch.Tensor:
    """The keep mask of :func:`channel_mask` (1 keep, 0 masked), broadcastable to ``x`` [B, C, *spatial].

    Scores are Triton's Philox uniforms at element offsets (channel ``c`` of
    token ``t`` at ``t * C + c``; tokens in (batch, spatial) order), and the
    ``k`` lowest scores of a token are its masked channels: exactly ``k`` per
    token, and the same numbers a fused kernel draws. Scores are float32, so
    two channels of a token can draw the same one; ties go to the lower
    channel index (:func:`lowest_k_keep`), as in the fused kernel.
    """
    b, c = x.shape[:2]
    k = masked_count(c, ratio)
    if not per_token:
        # The released recipe: one channel subset per step, the same for every token and sample (token 0's draw).
        scores = philox.rand(seed, torch.arange(c, device=x.device))
        return lowest_k_keep(scores, k).to(x.dtype).view(1, c, *([1] * (x.ndim - 2)))
    spatial = x.shape[2:]
    tokens = b * math.prod(spatial)
    scores = philox.rand(seed, torch.arange(tokens * c, device=x.device)).view(b, *spatial, c)
    return lowest_k_keep(scores, k).to(x.dtype).movedim(-1, 1)


def lowest_k_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep mask: False at the ``k`` lowest of each row of ``scores`` (last dim, float32 in [0, 1)), ties to the lower index.

    Each score becomes a distinct int64 key, its float bits (ordered as the
    floats are, for non-negative values) above its index, so exactly ``k``
    are masked whatever ties the draw holds; ``topk`` of the keys and a
    scatter select them.
    """
    index = torch.arange(scores.shape[-1], device=scores.device)
    keys = (scores.contiguous().view(torch.int32).to(torch.int64) << 32) | index
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(-1, keys.topk(k, dim=-1, largest=False).indices, False)


def channel_mask(x: torch.Tensor, ratio: float, seed: int, per_token: bool = False, values: torch.Tensor | None = None) -> torch.Tensor:
    """Disruptive Autoencoders' local masking of patch embeddings ``x`` [B, C, *spatial].

    A ``ratio`` of the channels is replaced by zero (``values`` None, the
    released recipe) or by a learned per-channel value ``values`` [C]; one
    subset per call, or with ``per_token`` a subset of its own per token.
    """
    keep = channel_keep(x, ratio, seed, per_token)
    out = x * keep
    if values is not None:
        out = out + (1 - keep) * values.view(1, -1, *([1] * (x.ndim - 2))).to(x.dtype)
    return out


def gaussian_noise(x: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """``x + std * n`` with ``n`` Triton's Philox normals at each element's offset in ``x``'s logical (contiguous) order."""
    n = philox.randn(seed, torch.arange(x.numel(), device=x.device)).view(x.shape)
    return x + std * n.to(x.dtype)


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour down by ``factor`` and back up to the input size (DAE's low-resolution disruption)."""
    if factor <= 1:
        return x
    size = x.shape[2:]
    small = F.interpolate(x, size=[max(1, s // factor) for s in size], mode="nearest")
    return F.interpolate(small, size=list(size), mode="nearest")


def patch_swap(x: torch.Tensor, patch: int | tuple[int, ...], swaps: int, seed: int) -> torch.Tensor:
    """Swap ``swaps`` pairs of random patches (``patch``: an edge, or (D, H, W)) inside each sample of ``x`` [B, C, D, H, W].

    PCRLv2's RandomSwap disruption. Pairs are drawn one after the other, each
    from the volume as the earlier swaps left it (torchio's order); a patch
    larger than the volume is clipped to it.
    """
    edges = (patch,) * (x.ndim - 2) if isinstance(patch, int) else tuple(patch)
    if swaps <= 0 or min(edges) <= 0:
        return x
    out = x.clone()
    spatial = x.shape[2:]
    size = [min(p, s) for p, s in zip(edges, spatial)]
    g = _generator(torch.device("cpu"), seed)
    for b in range(x.shape[0]):
        for _ in range(swaps):
            a, c = ([int(torch.randint(0, s - p + 1, (1,), generator=g)) for s, p in zip(spatial, size)] for _ in range(2))
            sa = (b, slice(None), *(slice(o, o + p) for o, p in zip(a, size)))
            sc = (b, slice(None), *(slice(o, o + p) for o, p in zip(c, size)))
            first = out[sa].clone()
            out[sa] = out[sc]
            out[sc] = first
    return out


def gamma(x: torch.Tensor, log_range: float, seed: int) -> torch.Tensor:
    """Per-sample gamma ``sign(x) |x|^g`` with ``log g ~ U(-log_range, log_range)`` (torchio's RandomGamma; the sign keeps negative values negative)."""
    if log_range <= 0:
        return x
    g = _generator(torch.device("cpu"), seed)
    exps = torch.exp(log_range * (2 * torch.rand(x.shape[0], generator=g) - 1)).to(x.device, x.dtype)
    return x.sign() * x.abs().pow(exps.view(-1, *([1] * (x.ndim - 1))))
