"""PCRLv2 (Zhou et al., TPAMI 2023): multi-scale restoration and siamese feature comparison on a non-skip U-Net's pyramid.

Per REFERENCES.md, from the authors' code. The loader's ``views: {kind: pcrl}``
gives two global crops of one volume (IoU above ``min_iou``) and ``n_local``
local crops inside their union, resized, each flipped and affinely
transformed on its own (``views.pcrl_spatial``): as in the released
pipeline, the spatially transformed crops are the restoration targets.
Here, every step, each crop on its own draws, as the released torchio
pipeline draws per crop:

1. every view is blurred (sigma per axis ~ U(0, ``blur_sigma``)), gets
   Gaussian noise (sigma ~ U(0, ``noise_std``)) and gamma
   (``sign(x) |x|^g``, log g ~ U(+-``gamma_log_range``)); the global views
   also get ``swap_count`` patch swaps (torchio's RandomSwap); then each
   view is z-normalised (``znorm``); the un-disrupted global views are the
   restoration targets;
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
from typing import Annotated, Any, Literal

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
    # The released pipeline's intensity disruptions, torchio's defaults (RL4M/PCRLv2 data.py) [code]:
    blur_sigma: float = Field(2.0, ge=0)  # RandomBlur: a Gaussian sigma per axis ~ U(0, 2) voxels
    noise_std: float = Field(0.25, ge=0)  # RandomNoise: sigma ~ U(0, 0.25) per crop
    gamma_log_range: float = Field(0.3, ge=0)  # RandomGamma: log gamma ~ U(-0.3, 0.3)
    swap_patch: tuple[Annotated[int, Field(ge=0)], ...] | Annotated[int, Field(ge=0)] = (4, 4, 8)  # RandomSwap((8, 4, 4)) on (x, y, z); (D, H, W) here; 0 disables
    swap_count: int = Field(100, ge=0)  # RandomSwap's iterations per global view
    znorm: bool = True  # ZNormalization of every disrupted view, the pipeline's last step
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
        import monai.transforms as mt

        s = (0.0, self.cfg.blur_sigma)
        self._blur = mt.RandGaussianSmooth(sigma_x=s, sigma_y=s, sigma_z=s, prob=1.0)
        self._noise = mt.RandGaussianNoise(prob=1.0, mean=0.0, std=self.cfg.noise_std, sample_std=True)
        self._normalize = mt.NormalizeIntensity()  # the whole crop's mean and std, as torchio's ZNormalization

    def encoder(self) -> nn.Module:
        return self.net.encoder_module()

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) if self.cfg.output_activation == "sigmoid" else x

    def beta(self, step: int) -> float:
        if self.cfg.beta_schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step, self.cfg.total_steps) / self.cfg.total_steps))

    def disrupt(self, x: torch.Tensor, step: int, rank: int, micro: int, what: str, swap: bool) -> torch.Tensor:
        """The released order, blur, noise, gamma, swap (global views), z-normalisation, with MONAI's transforms where they match torchio's."""
        cfg = self.cfg
        seed = step_seed(cfg.seed, step, rank, what, micro)
        dtype, x = x.dtype, x.float()  # the disruptions in fp32 whatever the run's precision
        base = seed % 2**31  # MONAI's random states take 32-bit seeds
        x = torch.stack([self._blur_and_noise(crop, base + 7 * i) for i, crop in enumerate(x)])
        x = kernels.gamma(x, cfg.gamma_log_range, seed + 2)  # torchio's sign-keeping power; MONAI's contrast rescales first
        if swap:  # a no-op with swap_count 0 or an empty patch
            x = kernels.patch_swap(x, cfg.swap_patch, cfg.swap_count, seed + 1)
        if cfg.znorm:
            x = torch.stack([self._znorm(crop) for crop in x])
        return x.to(dtype)

    def _blur_and_noise(self, crop: torch.Tensor, seed: int) -> torch.Tensor:
        """One crop [C, D, H, W], on its own draws (MONAI's RandGaussianSmooth and RandGaussianNoise)."""
        cfg = self.cfg
        if cfg.blur_sigma > 0:
            self._blur.set_random_state(seed)
            crop = self._blur(crop)
        if cfg.noise_std > 0:
            self._noise.set_random_state(seed + 1)
            crop = self._noise(crop)
        return torch.as_tensor(crop, dtype=crop.dtype)  # a plain tensor, not MONAI's MetaTensor

    def _znorm(self, crop: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self._normalize(crop))

    def follow_disruption(self, t: torch.Tensor, step: int, rank: int, micro: int, view: int) -> torch.Tensor:
        """Move ``t`` (e.g. region ids, [B, 1, *S] float) the way view ``view``'s patch swaps moved its voxels."""
        cfg = self.cfg
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
