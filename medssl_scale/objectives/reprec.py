"""RepRec (Yan et al., WACV 2023): a contrastive CNN plus a transformer that recovers masked CNN representations.

Only the abstract is public (REFERENCES.md): a convolutional encoder is
pre-trained contrastively for low-level features, and a transformer encoder
generatively, by recovering the representations the CNN gives masked tokens
(not pixels). The design below is ours; every choice is a setting.

- **contrastive** (stage A): NT-Xent (InfoNCE) between two views
  (``data.views.kind: pair``) on the CNN's pooled deepest features through a
  projection MLP, negatives from the global batch, temperature ``temperature``.
- **representation recovery** (stage B): the CNN's deepest map (stride 8) as
  tokens; a ``mask_ratio`` of them hidden: their 8^3 voxel blocks are
  blanked in the image before the CNN computes the transformer's input (a
  visible token's features see about +-4 tokens around it, so masking tokens
  alone would leave the hidden content in its neighbours), and the hidden
  tokens are replaced by a learned mask token (SimMIM style, positions
  kept); the transformer and a linear head predict the CNN's features of the
  whole view at the hidden tokens; loss: MSE between L2-normalised
  prediction and target over hidden tokens only. The target is the online
  CNN under stop-gradient (``target: stopgrad``), and by default the
  transformer's input is too (``recovery_trains_cnn: false``), so the CNN
  cannot flatten its maps to make recovery trivial.
- **schedule**: ``stage_a_steps`` of contrastive training alone, then both
  terms (``joint`` from step 0 when 0); ``freeze_cnn_after_stage_a`` stops
  the CNN's gradients in stage B, as sequential training would (the
  optimizer's weight decay and momentum still move it a little: a per-stage
  learning rate is not in the engine yet).
- Both encoders are published together: the hybrid encoder's ``cnn.*`` and
  ``transformer.*`` parameters, and ``load_encoder`` returns the hybrid.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from medssl_scale import kernels
from medssl_scale.objectives import register_objective
from medssl_scale.objectives.dae import step_seed
from medssl_scale.objectives.losses import projection_head, two_view_nce
from medssl_scale.objectives.settings import ObjectiveConfig


class RepRecConfig(ObjectiveConfig):
    DEFAULT_MODEL = "reprec_hybrid"
    MODELS_ALLOWED = ("reprec_hybrid",)

    model: dict[str, Any] = Field(default_factory=lambda: {"name": "reprec_hybrid"})
    temperature: float = Field(0.2, gt=0)  # 0.1-0.2 in REFERENCES.md
    projection_dim: int = Field(128, ge=1)
    mask_ratio: float = Field(0.6, gt=0, lt=1)  # 0.6-0.75, MAE-style
    contrastive_weight: float = Field(1.0, ge=0)
    recovery_weight: float = Field(1.0, ge=0)
    target: Literal["stopgrad"] = "stopgrad"
    # The transformer reads the CNN's map; with this off (the default), recovery trains only the transformer, so
    # the CNN cannot make its maps uniform to make recovery trivial (the contrastive term sees pooled features only).
    recovery_trains_cnn: bool = False
    stage_a_steps: int = Field(0, ge=0)
    freeze_cnn_after_stage_a: bool = False


def recovery_loss(pred: torch.Tensor, target: torch.Tensor, ids: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """MSE between L2-normalised predicted and target features [B, N, C] over the hidden tokens ``ids`` [B, K] only."""
    return kernels.masked_loss(pred, target, ids, "l2", backend=backend)


@register_objective("reprec")
class RepRec(nn.Module):
    Config = RepRecConfig

    def __init__(self, **config: Any):
        super().__init__()
        self.cfg = RepRecConfig(**config)
        self.net = self.cfg.build_net()
        c = self.net.channels[-1]
        self.projector = projection_head(c, self.cfg.projection_dim)

    def encoder(self) -> nn.Module:
        return self.net.encoder_module()

    def forward(self, batch: dict[str, Any], step: int = 0, rank: int = 0, micro: int = 0) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        stage_b = step >= cfg.stage_a_steps
        freeze = stage_b and cfg.stage_a_steps > 0 and cfg.freeze_cnn_after_stage_a
        deep = []
        for v in (1, 2):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze):
                deep.append(self.net.encoder.cnn_features(batch[f"view{v}"])[-1])
        out: dict[str, torch.Tensor] = {}
        out["contrastive"] = two_view_nce(self.projector(torch.cat([f.mean(dim=(2, 3, 4)) for f in deep])), rank, cfg.temperature)
        if stage_b:
            f = deep[0]
            seed = step_seed(cfg.seed, step, rank, "tokens", micro)
            # The hidden tokens' voxels are blanked before the CNN: no visible token's receptive field carries them.
            pred, ids = self.net.masked_prediction(batch["view1"], cfg.mask_ratio, seed, cfg.kernels,
                                                   grad_cnn=cfg.recovery_trains_cnn and not freeze)
            target = f.detach().flatten(2).transpose(1, 2)  # the CNN's own representations of the whole view, stop-gradient
            out["recovery"] = recovery_loss(pred, target, ids, cfg.kernels)
        else:  # stage A: the transformer waits (its parameters get no gradient, the same on every rank)
            out["recovery"] = deep[0].sum() * 0.0
        out["loss"] = cfg.contrastive_weight * out["contrastive"] + cfg.recovery_weight * out["recovery"]
        return out
