"""Loss terms shared by objectives."""

from __future__ import annotations

import torch
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
