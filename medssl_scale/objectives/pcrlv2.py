"""PCRLv2 (Zhou et al., TPAMI 2023): multi-scale restoration and siamese feature comparison on a non-skip U-Net's pyramid.

Per REFERENCES.md, from the authors' code. The loader's ``views: {kind: pcrl}``
gives two global crops of one volume (IoU above ``min_iou``) and ``n_local``
local crops inside their union, resized (no flips yet). They are the
restoration targets, so loader augmentations (``data.augment``) become part
of the target: the disruptions belong here, and the shipped configs have none. Here, every step:

1. the global views are disrupted (Gaussian noise, gamma, and patch swapping,
   torchio's RandomSwap), the local views get noise and gamma; the clean
   global views are the restoration targets;
2. one pyramid level ``l`` (a decoder stage) is drawn for the step;
3. restoration: ``MSE(out(x), x_clean) + beta * MSE(head_l(x), x_clean)`` over
   both global views, with ``beta = 0.5 (1 + cos(pi t / T))`` over the run
   (the code's epochs become steps [ours]);
4. global siamese: ``-1/2 [cos(pre_l(x1), sg(pro_l(x2))) + cos(pre_l(x2), sg(pro_l(x1)))]``;
5. global-local: the same symmetric cosine between each global view and each
   local view, averaged over the pairs;
6. the loss is the sum of the four terms.

``pro_l`` is global average pooling + BatchNorm, ``pre_l`` an MLP
C -> 2C -> C with BatchNorm and ReLU, ``head_l`` a 1-channel 1x1x1 convolution
upsampled to the input size: one of each per level. Restoration outputs pass
through ``output_activation``: the code's sigmoid suits CT-only data scaled
to [0, 1]; the default ``none`` [ours] also fits z-scored MR in a mixed dataset. The disruption strengths are ours where torchio's defaults
are not documented in REFERENCES.md: every one is a setting.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from medssl_scale import kernels
from medssl_scale.objectives import register_objective
from medssl_scale.objectives.dae import step_seed
from medssl_scale.objectives.settings import ObjectiveConfig


class PCRLv2Config(ObjectiveConfig):
    DEFAULT_MODEL = "pcrl_unet"
    MODELS_ALLOWED = ("pcrl_unet",)

    model: dict[str, Any] = Field(default_factory=lambda: {"name": "pcrl_unet", "channels": [64, 128, 256, 512]})
    output_activation: Literal["sigmoid", "none"] = "none"  # [ours] sigmoid is the code's, right for CT-only data in [0, 1]
    noise_std: float = Field(0.05, ge=0)  # [ours] torchio RandomNoise's strength on [0, 1] inputs
    gamma_log_std: float = Field(0.3, ge=0)  # [ours] torchio RandomGamma's log-gamma spread
    swap_patch: int = Field(8, ge=0)  # [ours] RandomSwap cube edge (voxels); 0 disables
    swap_count: int = Field(20, ge=0)  # [ours] RandomSwap iterations per global view
    beta_schedule: Literal["cosine", "constant"] = "cosine"
    total_steps: int = Field(1, ge=1)  # the run's steps, set by the engine (beta's cosine period)


class _Level(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.projector = nn.BatchNorm1d(c)  # applied after global average pooling
        self.predictor = nn.Sequential(nn.Linear(c, 2 * c), nn.BatchNorm1d(2 * c), nn.ReLU(inplace=True), nn.Linear(2 * c, c))
        self.head = nn.Conv3d(c, 1, 1)

    def project(self, f: torch.Tensor) -> torch.Tensor:
        return self.projector(f.mean(dim=(2, 3, 4)))


def symmetric_cosine(p1: torch.Tensor, z1: torch.Tensor, p2: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """SimSiam's symmetric loss: ``-1/2 [cos(p1, sg(z2)) + cos(p2, sg(z1))]``, averaged over the batch."""
    return -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=-1).mean() + F.cosine_similarity(p2, z1.detach(), dim=-1).mean())


@register_objective("pcrlv2")
class PCRLv2(nn.Module):
    Config = PCRLv2Config
    DENSE_VIEWS = True  # keeps its global views' finest decoder features for auxiliary objectives (lrc)

    def __init__(self, **config: Any):
        super().__init__()
        self.cfg = PCRLv2Config(**config)
        self.net = self.cfg.build_net()
        self.levels = nn.ModuleList(_Level(c) for c in self.net.pyramid_channels)
        self.dense_channels = self.net.pyramid_channels[-1]
        self.keep_dense = False  # set when an auxiliary objective attaches; the composite clears them after use
        self.dense_views: dict[int, torch.Tensor] = {}

    def encoder(self) -> nn.Module:
        return self.net.encoder_module()

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) if self.cfg.output_activation == "sigmoid" else x

    def beta(self, step: int) -> float:
        if self.cfg.beta_schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step, self.cfg.total_steps) / self.cfg.total_steps))

    def disrupt(self, x: torch.Tensor, step: int, rank: int, micro: int, what: str, swap: bool) -> torch.Tensor:
        cfg = self.cfg
        seed = step_seed(cfg.seed, step, rank, what, micro)
        if swap and cfg.swap_patch and cfg.swap_count:
            x = kernels.patch_swap(x, cfg.swap_patch, cfg.swap_count, seed + 1)
        x = kernels.gamma(x, cfg.gamma_log_std, seed + 2)
        if cfg.noise_std > 0:
            x = kernels.gaussian_noise(x, cfg.noise_std, seed + 3, backend=cfg.kernels)
        return x

    def follow_disruption(self, t: torch.Tensor, step: int, rank: int, micro: int, view: int) -> torch.Tensor:
        """Move ``t`` (e.g. region ids, [B, 1, *S] float) the way view ``view``'s patch swaps moved its voxels."""
        cfg = self.cfg
        if not (cfg.swap_patch and cfg.swap_count):
            return t
        return kernels.patch_swap(t, cfg.swap_patch, cfg.swap_count, step_seed(cfg.seed, step, rank, f"global{view - 1}", micro) + 1)

    def level(self, step: int, rank: int, micro: int) -> int:
        # The same level on every rank of a step: the gradient reduction then sums like with like.
        return step_seed(self.cfg.seed, step, 0, "level", micro) % len(self.levels)

    def forward(self, batch: dict[str, Any], step: int = 0, rank: int = 0, micro: int = 0) -> dict[str, torch.Tensor]:
        views = [batch["global1"], batch["global2"]]
        lv = self.level(step, rank, micro)
        head = self.levels[lv]
        beta = self.beta(step)
        restore, restore_level, z, p = 0.0, 0.0, [], []
        for i, clean in enumerate(views):
            out, pyramid = self.net(self.disrupt(clean, step, rank, micro, f"global{i}", swap=True))
            if self.keep_dense:
                self.dense_views[i + 1] = pyramid[-1]
            f = pyramid[lv]
            restore = restore + F.mse_loss(self._act(out).float(), clean.float()) / 2
            level_out = F.interpolate(head.head(f), size=clean.shape[2:], mode="trilinear", align_corners=False)
            restore_level = restore_level + F.mse_loss(self._act(level_out).float(), clean.float()) / 2
            z.append(head.project(f).float())
            p.append(head.predictor(z[-1]).float())
        out = {"restore": restore, "restore_level": beta * restore_level, "siamese": symmetric_cosine(p[0], z[0], p[1], z[1])}
        local = batch.get("local")
        if local is not None and local.shape[1] > 0:
            b, n = local.shape[:2]
            xl = self.disrupt(local.reshape(b * n, 1, *local.shape[2:]), step, rank, micro, "local", swap=False)
            zl = head.project(self.net(xl)[1][lv]).float()
            pl = head.predictor(zl).float()
            zl, pl = zl.view(b, n, -1), pl.view(b, n, -1)
            pairs = [symmetric_cosine(p[g][:, None].expand_as(pl), z[g][:, None].expand_as(zl), pl, zl) for g in range(2)]
            out["global_local"] = torch.stack(pairs).mean()
        out["loss"] = sum(out.values())
        return out

    @torch.no_grad()
    def visuals(self, batch: dict[str, Any], step: int = 0) -> dict[str, torch.Tensor]:
        x = batch["global1"][:1]
        disrupted = self.disrupt(x, step, 0, 0, "global0", swap=True)
        recon = self._act(self.net(disrupted)[0])
        return {"input": x[0, 0].float().cpu(), "disrupted": disrupted[0, 0].float().cpu(), "reconstruction": recon[0, 0].float().cpu()}
