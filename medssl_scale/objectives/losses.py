"""Loss terms shared by objectives."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def supervised_contrastive(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the "L_out" form) over a batch.

    ``features`` [N, D] are L2-normalised here; samples with equal ``labels``
    are positives of one another, all other samples are negatives; a label of
    -1 is unknown and makes a sample neither (it still counts in denominators).
    Anchors without a positive do not contribute; with none at all the loss is
    a zero that keeps the graph.
    """
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.T / temperature
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    known = labels >= 0
    pos = (labels[:, None] == labels[None, :]) & ~self_mask & known[:, None] & known[None, :]
    counts = pos.sum(1)
    anchors = counts > 0
    if not anchors.any():
        return features.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~pos, 0.0).sum(1)[anchors] / counts[anchors])
    return per_anchor.mean()


def gather_from_ranks(features: torch.Tensor, *labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's batch, in rank order, for losses that compare samples with each other.

    Gradients flow back to each rank's own features (``torch.distributed.nn``'s
    all-gather sums them over ranks), so every rank computing the same loss on
    the gathered batch, then DeepSpeed averaging gradients, gives exactly the
    gradient of that loss on one big batch. Micro-batches must be the same
    size on every rank, which the data loader guarantees. Outside a process
    group (or with one rank) the inputs come back as they are.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return (features, *labels)
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Its suggested successor (functional collectives' autograd all-gather) needs reduce-scatter
        # in the backward, which gloo lacks; this one falls back to all-to-all there.
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)
        out = [torch.cat(all_gather(features))]
    for t in labels:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)


def projection_head(c: int, d: int) -> nn.Sequential:
    """The two-layer MLP (C -> C -> D) the contrastive terms project pooled features through."""
    return nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, d))


def two_view_nce(z: torch.Tensor, rank: int, temperature: float) -> torch.Tensor:
    """NT-Xent over the global batch: ``z`` [2B, D] is view 1 of B samples then view 2 of the same samples.

    The two views of a sample are positives; every other crop on any rank is a negative.
    """
    b = z.shape[0] // 2
    ident = torch.arange(b, device=z.device).repeat(2) + b * rank  # unique across ranks once gathered
    z, ident = gather_from_ranks(z.float(), ident)
    return supervised_contrastive(z, ident, temperature)
