"""LRC (Yan et al., MICCAI 2023): local region contrast over super-pixels, added on top of another objective.

Per REFERENCES.md, where only the abstract is public, so the design is ours
and every choice is a setting. The loader cuts Felzenszwalb super-pixel maps
with the views (``data.views.superpixels``), so a region id names the same
tissue in both views. For each sample:

1. the host objective's dense features of its two views (its finest decoder
   stage, kept from its own forward pass) are average-pooled inside each
   region (masked average pooling) [ours: the finest decoder stage];
2. ``regions`` regions visible in both views with at least ``min_voxels``
   voxels in each are sampled [ours: sampled from the shared regions];
3. a projection MLP and L2 normalisation, then InfoNCE with temperature
   ``temperature``: the same region in the other view is the positive, the
   other sampled regions of that sample are the negatives, both directions
   [ours: per-sample negatives];
4. the loss is the mean over samples with at least two shared regions.

Its weight is the ``lrc`` weight in ``objectives`` (lambda, 0.1-1 in REFERENCES.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from medssl_scale.objectives import register_objective
from medssl_scale.objectives.dae import step_seed
from medssl_scale.objectives.losses import projection_head
from medssl_scale.objectives.settings import ObjectiveConfig


class LRCConfig(ObjectiveConfig):  # no network of its own: it works on its host's features

    regions: int = Field(32, ge=2)  # K sampled per sample (32-64 in REFERENCES.md)
    temperature: float = Field(0.1, gt=0)
    projection_dim: int = Field(64, ge=1)
    min_voxels: int = Field(4, ge=1)  # a region must cover this many feature voxels in both views


def region_pool(features: torch.Tensor, ids: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Mean feature [K, C] inside each chosen region; ``features`` [C, *S], ``ids`` [*S] region ids, ``chosen`` [K] ids."""
    mask = (ids.reshape(1, -1) == chosen[:, None]).to(features.dtype)  # [K, N]
    return (mask @ features.reshape(features.shape[0], -1).T) / mask.sum(1, keepdim=True).clamp_min(1)


def region_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between matching rows of ``z1`` and ``z2`` [K, D] (row i of each is one region)."""
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    logits = z1 @ z2.T / temperature
    target = torch.arange(z1.shape[0], device=z1.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@register_objective("lrc")
class LRC(nn.Module):
    Config = LRCConfig
    AUXILIARY = True  # added on top of a host objective, never alone

    def __init__(self, **config: Any):
        super().__init__()
        self.cfg = LRCConfig(**config)
        self.projector: nn.Module | None = None

    def attach(self, host: nn.Module) -> None:
        if not getattr(host, "DENSE_VIEWS", False):
            raise ValueError(f"lrc needs a host objective that keeps dense features of two views (pcrlv2); {type(host).__name__} does not")
        c = host.dense_channels
        self.projector = projection_head(c, self.cfg.projection_dim)
        host.keep_dense = True
        self.__dict__["_host"] = host  # a reference, not a submodule: the composite registers the host once

    def forward(self, batch: dict[str, Any], step: int = 0, rank: int = 0, micro: int = 0) -> dict[str, torch.Tensor]:
        assert self.projector is not None, "lrc is used through a composite objective, which attaches it to its host"
        feats = self._host.dense_views
        if "regions1" not in batch:
            raise ValueError("lrc needs region maps: set data.views.superpixels (e.g. superpixels: {})")
        g = torch.Generator().manual_seed(step_seed(self.cfg.seed, step, rank, "lrc", micro))
        maps = []
        for v in (1, 2):
            r = batch[f"regions{v}"].float()
            # Disruptions that move voxels (patch swaps) move their region ids too: the host replays them on the whole batch.
            if hasattr(self._host, "follow_disruption"):
                r = self._host.follow_disruption(r, step, rank, micro, v)
            if r.shape[2:] != feats[v].shape[2:]:
                r = F.interpolate(r, size=feats[v].shape[2:], mode="nearest-exact")
            maps.append(r[:, 0].long())
        terms = []
        for b in range(feats[1].shape[0]):
            ids = [maps[0][b], maps[1][b]]
            u1, c1 = ids[0].unique(return_counts=True)
            u2, c2 = ids[1].unique(return_counts=True)
            shared = u1[(c1 >= self.cfg.min_voxels) & (u1 >= 0)]  # -1: voxels a view's affine brought in from outside
            shared = shared[torch.isin(shared, u2[c2 >= self.cfg.min_voxels])]
            if shared.numel() < 2:
                continue
            chosen = shared[torch.randperm(shared.numel(), generator=g)[: self.cfg.regions].to(shared.device)]
            z = [self.projector(region_pool(feats[v][b], ids[v - 1], chosen)) for v in (1, 2)]
            terms.append(region_nce(z[0], z[1], self.cfg.temperature))
        loss = torch.stack(terms).mean() if terms else feats[1].sum() * 0.0 + sum(p.sum() for p in self.projector.parameters()) * 0.0
        return {"region_nce": loss, "loss": loss}
