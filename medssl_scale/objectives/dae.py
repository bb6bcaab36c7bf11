"""Disruptive Autoencoders (Valanarasu et al., arXiv 2307.16896): restore a crop from its disrupted self.

Per REFERENCES.md. Every sample at every step gets, in this order:
1. additive Gaussian noise on the normalised image (variance ``noise_variance``, 0.1);
2. nearest-neighbour downsampling by ``downsample_factor`` (4) and back up;
3. local masking: right after the patch embedding, a ``mask_ratio`` (0.6) of
   the channels is zeroed: one subset per step for every token (the
   released recipe) or, with ``mask_per_token``, a subset per token [ours],
   optionally filled with a learned per-channel value (``mask_fill: learned``) [ours].
The order of 1 and 2 is ours (the paper lists them; the combination's order
is not stated). The SwinUNETR-shaped network reconstructs the clean crop;
the loss is L1 over the whole volume (the released ``all_img`` recipe).

Cross-modal contrastive loss (CMCL), weight ``cmcl_weight`` (0.03),
temperature ``cmcl_temperature`` (0.5): the paper's intent, not the released
code's form [ours]: the bottleneck is average-pooled, projected by a small
MLP, L2-normalised, and a supervised contrastive loss treats crops of the same
modality (``cmcl_positives: modality``), of the same pseudonymous patient
(``subject``, for CT/MR pairs from ``data.pairs``) or both as positives,
across the global batch (every rank's crops).
Random draws come from ``(seed, step, rank)``: the same on a rerun, different
on each rank and step.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from medssl_scale import kernels
from medssl_scale.objectives import register_objective
from medssl_scale.objectives.losses import (
    gather_from_ranks,
    projection_head,
    supervised_contrastive,
)
from medssl_scale.objectives.settings import ObjectiveConfig


class DAEConfig(ObjectiveConfig):
    DEFAULT_MODEL = "swin_unetr"

    # The released encoder's nonlinear patch embedding: with MONAI's linear one, masking hides nothing (models/swin.py).
    model: dict[str, Any] = Field(default_factory=lambda: {"name": "swin_unetr", "feature_size": 48, "patch_embed": "conv_block"})
    disruptions: list[Literal["noise", "downsample", "mask"]] = Field(default_factory=lambda: ["noise", "downsample", "mask"])
    noise_variance: float = Field(0.1, ge=0)
    downsample_factor: int = Field(4, ge=1)
    mask_ratio: float = Field(0.6, ge=0, le=1)
    mask_per_token: bool = False
    mask_fill: Literal["zero", "learned"] = "zero"
    cmcl_weight: float = Field(0.03, ge=0)
    cmcl_temperature: float = Field(0.5, gt=0)
    cmcl_positives: Literal["modality", "subject", "both"] = "modality"
    projection_dim: int = Field(128, ge=1)
    # Publish the decoder stages with the encoder where the network has them, so fine-tuning starts from both
    # (the released fine-tuning's default, finetune_choice both).
    publish_decoder: bool = True


def step_seed(seed: int, step: int, rank: int, what: str, micro: int = 0) -> int:
    """A 63-bit seed per (run seed, step, rank, micro-batch, purpose): independent streams without global RNG state."""
    h = hashlib.blake2b(f"{seed}/{step}/{rank}/{micro}/{what}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


@register_objective("dae")
class DisruptiveAutoencoder(nn.Module):
    Config = DAEConfig

    def __init__(self, **config: Any):
        super().__init__()
        self.cfg = DAEConfig(**config)
        self.net = self.cfg.build_net()
        c = self.net.embed_channels
        self.mask_values = nn.Parameter(torch.zeros(c)) if self.cfg.mask_fill == "learned" else None
        b = self.net.bottleneck_channels
        # No projector without the contrastive term: unused parameters would stall DDP's gradient reduction.
        self.projector = projection_head(b, self.cfg.projection_dim) if self.cfg.cmcl_weight > 0 else None

    def encoder(self) -> nn.Module:
        """What gets published: the network's encoder half (with its decoder stages, where it has them), sharing this objective's parameters."""
        if self.cfg.publish_decoder and "decoder" in inspect.signature(self.net.encoder_module).parameters:
            return self.net.encoder_module(decoder=True)
        return self.net.encoder_module()

    def disrupt(self, x: torch.Tensor, step: int, rank: int, micro: int = 0) -> torch.Tensor:
        """The image-space disruptions (noise, downsampling); masking happens inside the network."""
        cfg = self.cfg
        if "noise" in cfg.disruptions and cfg.noise_variance > 0:
            x = kernels.gaussian_noise(x, math.sqrt(cfg.noise_variance), step_seed(cfg.seed, step, rank, "noise", micro), backend=cfg.kernels)
        if "downsample" in cfg.disruptions:
            x = kernels.downsample(x, cfg.downsample_factor)
        return x

    def _mask_fn(self, step: int, rank: int, micro: int = 0):
        cfg = self.cfg
        if "mask" not in cfg.disruptions or cfg.mask_ratio == 0:
            return None
        seed = step_seed(cfg.seed, step, rank, "mask", micro)
        return lambda e: kernels.channel_mask(e, cfg.mask_ratio, seed, cfg.mask_per_token, self.mask_values, backend=cfg.kernels)

    def forward(self, batch: dict[str, Any], step: int = 0, rank: int = 0, micro: int = 0) -> dict[str, torch.Tensor]:
        clean = batch["image"]
        recon = self.net(self.disrupt(clean, step, rank, micro), embed_fn=self._mask_fn(step, rank, micro))
        out = {"recon_l1": F.l1_loss(recon.float(), clean.float())}
        total = out["recon_l1"]
        if self.cfg.cmcl_weight > 0:
            out["cmcl"] = self._cmcl(batch)
            total = total + self.cfg.cmcl_weight * out["cmcl"]
        out["loss"] = total
        return out

    def _cmcl(self, batch: dict[str, Any]) -> torch.Tensor:
        assert self.net.bottleneck is not None and self.projector is not None
        z = self.projector(self.net.bottleneck.mean(dim=(2, 3, 4))).float()
        keys = {"modality": ["modality"], "subject": ["subject"], "both": ["modality", "subject"]}[self.cfg.cmcl_positives]
        # Positives and negatives come from the global batch: a rank's few crops alone often hold no positive pair.
        z, *labels = gather_from_ranks(z, *(torch.as_tensor(batch[k], device=z.device) for k in keys))
        return torch.stack([supervised_contrastive(z, y, self.cfg.cmcl_temperature) for y in labels]).mean()

    @torch.no_grad()
    def visuals(self, batch: dict[str, Any], step: int = 0) -> dict[str, torch.Tensor]:
        """Input, disrupted input and reconstruction of the first sample, for plots."""
        x = batch["image"][:1]
        disrupted = self.disrupt(x, step, 0)
        recon = self.net(disrupted, embed_fn=self._mask_fn(step, 0))
        return {"input": x[0, 0].float().cpu(), "disrupted": disrupted[0, 0].float().cpu(), "reconstruction": recon[0, 0].float().cpu()}
