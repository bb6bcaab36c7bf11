"""MixCL (Li, Quan, Zhou, arXiv 2203.02114): identity, label and reconstruction consistency on partly labelled data.

Per REFERENCES.md; no code is public, so the design is ours where marked,
and every choice is a setting. Input: two overlapping views of a crop
(``data.views.kind: pair``) with their label crops (``data.labels: true``;
volumes without a label map give -1 everywhere, "unknown"). Network: a 3D
U-Net with skips (``unet``) [ours].

- **identity** [paper]: an image and its transformed version share an
  identity. NT-Xent (InfoNCE) on projected, pooled bottleneck features of the
  two views, negatives from the global batch (all ranks) [ours: SimCLR form,
  ``identity_temperature``].
- **label** [paper]: voxels with the same label attract. A supervised
  contrastive loss on projected decoder voxel embeddings of both views,
  sampling up to ``voxels_per_class`` voxels per class per micro-batch
  (class-balanced) among labelled voxels; unknown voxels (-1) are never
  positives or negatives [ours]. ``background: class`` treats label 0 as a
  class (fully annotated data); ``unknown`` drops it (partly annotated data,
  where 0 may be an unannotated organ) [ours].
- **reconstruction** [paper]: restore each view from its disrupted version
  (Gaussian noise and patch swapping) [ours: L1, these disruptions].
- total: ``identity_weight * identity + label_weight * label +
  reconstruction_weight * reconstruction`` (1/1/1 [ours]).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from medssl_scale import kernels
from medssl_scale.objectives import register_objective
from medssl_scale.objectives.dae import step_seed
from medssl_scale.objectives.losses import (
    projection_head,
    supervised_contrastive,
    two_view_nce,
)
from medssl_scale.objectives.settings import ObjectiveConfig


class MixCLConfig(ObjectiveConfig):
    DEFAULT_MODEL = "unet"
    MODELS_ALLOWED = ("unet", "pcrl_unet")

    model: dict[str, Any] = Field(default_factory=lambda: {"name": "unet", "channels": [32, 64, 128, 256]})
    identity_weight: float = Field(1.0, ge=0)
    label_weight: float = Field(1.0, ge=0)
    reconstruction_weight: float = Field(1.0, ge=0)
    identity_temperature: float = Field(0.1, gt=0)
    label_temperature: float = Field(0.1, gt=0)
    projection_dim: int = Field(64, ge=1)
    voxels_per_class: int = Field(128, ge=1)
    background: Literal["class", "unknown"] = "class"
    noise_std: float = Field(0.1, ge=0)
    swap_patch: int = Field(8, ge=0)
    swap_count: int = Field(10, ge=0)


def sample_voxels(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices into ``labels`` (flat, -1 unknown): up to ``per_class`` of each known class, drawn without replacement."""
    picked = []
    for c in labels[labels >= 0].unique():
        idx = (labels == c).nonzero(as_tuple=True)[0]
        picked.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class].to(idx.device)])
    return torch.cat(picked) if picked else labels.new_zeros(0, dtype=torch.long)


@register_objective("mixcl")
class MixCL(nn.Module):
    Config = MixCLConfig

    def __init__(self, **config: Any):
        super().__init__()
        self.cfg = MixCLConfig(**config)
        self.net = self.cfg.build_net()
        c_top, c_dec = self.net.channels[-1], self.net.pyramid_channels[-1]
        d = self.cfg.projection_dim
        self.identity_head = projection_head(c_top, d)
        self.voxel_head = nn.Sequential(nn.Conv3d(c_dec, c_dec, 1), nn.ReLU(inplace=True), nn.Conv3d(c_dec, d, 1))

    def encoder(self) -> nn.Module:
        return self.net.encoder_module()

    def disrupt(self, x: torch.Tensor, step: int, rank: int, micro: int, what: str) -> torch.Tensor:
        cfg = self.cfg
        seed = step_seed(cfg.seed, step, rank, what, micro)
        if cfg.swap_patch and cfg.swap_count:
            x = kernels.patch_swap(x, cfg.swap_patch, cfg.swap_count, seed + 1)
        if cfg.noise_std > 0:
            x = kernels.gaussian_noise(x, cfg.noise_std, seed + 2, backend=cfg.kernels)
        return x

    def forward(self, batch: dict[str, Any], step: int = 0, rank: int = 0, micro: int = 0) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        pooled, voxels, recon = [], [], 0.0
        for v in (1, 2):
            clean = batch[f"view{v}"]
            out, pyramid = self.net(self.disrupt(clean, step, rank, micro, f"view{v}"))
            recon = recon + F.l1_loss(out.float(), clean.float()) / 2
            pooled.append(self.net.bottleneck.mean(dim=(2, 3, 4)))
            voxels.append(self.voxel_head(pyramid[-1]))
        losses = {"reconstruction": recon}

        losses["identity"] = two_view_nce(self.identity_head(torch.cat(pooled)), rank, cfg.identity_temperature)

        # label: class-balanced voxels of both views, unknown voxels excluded
        if "label1" in batch:
            feats = torch.cat([f.movedim(1, -1).reshape(-1, f.shape[1]) for f in voxels])
            labels = torch.cat([batch[f"label{v}"].reshape(-1).long() for v in (1, 2)]).to(feats.device)
            if cfg.background == "unknown":
                labels = labels.masked_fill(labels == 0, -1)
            g = torch.Generator().manual_seed(step_seed(cfg.seed, step, rank, "voxels", micro))
            idx = sample_voxels(labels.cpu(), cfg.voxels_per_class, g).to(feats.device)
            losses["label"] = (supervised_contrastive(feats[idx], labels[idx], cfg.label_temperature)
                               if idx.numel() > 1 else feats.sum() * 0.0)
        else:
            losses["label"] = sum(p.sum() for p in self.voxel_head.parameters()) * 0.0
        losses["loss"] = (cfg.identity_weight * losses["identity"] + cfg.label_weight * losses["label"]
                          + cfg.reconstruction_weight * losses["reconstruction"])
        return losses

    @torch.no_grad()
    def visuals(self, batch: dict[str, Any], step: int = 0) -> dict[str, torch.Tensor]:
        x = batch["view1"][:1]
        disrupted = self.disrupt(x, step, 0, 0, "view1")
        recon = self.net(disrupted)[0]
        return {"input": x[0, 0].float().cpu(), "disrupted": disrupted[0, 0].float().cpu(), "reconstruction": recon[0, 0].float().cpu()}

