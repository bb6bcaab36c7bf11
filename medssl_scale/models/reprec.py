"""RepRec's hybrid CNN-transformer (REFERENCES.md; the design is ours, from the abstract).

A 3D CNN (``pcrl_unet``'s downsampling path: two conv-norm-ReLU blocks per
level, max-pooling between) carries low-level features at strides 1-8; its
deepest feature map becomes tokens (one per voxel at stride 8, a 1x1x1
projection to ``dim``) for a pre-norm transformer encoder with fixed 3D
sine-cosine positions, so any crop size works [ours]. The encoder a
downstream task gets returns the CNN's features at strides 1, 2, 4 and, at
stride 8, the CNN's features concatenated with the transformer's.
Parameter names say which part is which: ``cnn.*`` and ``transformer.*``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn

from medssl_scale import kernels
from medssl_scale.models import register_encoder, register_model
from medssl_scale.models.pcrl import _double, _encode


def sincos_3d(grid: tuple[int, int, int], dim: int, device: torch.device) -> torch.Tensor:
    """Fixed positions [N, dim] for a (D, H, W) token grid: sine-cosine per axis on a third of the channels each."""
    per = 2 * math.ceil(dim / 6)  # channels per axis, even
    freqs = torch.exp(-math.log(10000.0) * torch.arange(per // 2, device=device) / max(per // 2, 1))
    axes = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij")
    parts = []
    for a in axes:
        angles = a.reshape(-1, 1) * freqs
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)[:, :dim]


@register_encoder("reprec_hybrid")
class HybridEncoder(nn.Module):
    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (32, 64, 128, 256), norm: Literal["batch", "instance"] = "instance",
                 dim: int = 384, depth: int = 6, heads: int = 6):
        super().__init__()
        c = list(channels)
        self.config = {"name": "reprec_hybrid", "in_channels": in_channels, "channels": c, "norm": norm, "dim": dim, "depth": depth, "heads": heads}
        self.in_channels = in_channels
        self.cnn = nn.ModuleDict({"down": nn.ModuleList([_double(a, b, norm) for a, b in zip([in_channels, *c[:-1]], c)]),
                                  "pool": nn.MaxPool3d(2)})
        self.embed = nn.Conv3d(c[-1], dim, 1)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.dim = dim
        self.feature_channels = [*c[:-1], c[-1] + dim]
        self.feature_strides = [2**i for i in range(len(c))]

    def cnn_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return _encode(self.cnn["down"], self.cnn["pool"], x)

    def embed_tokens(self, f: torch.Tensor) -> torch.Tensor:
        """The deepest CNN map [B, C, d, h, w] as tokens [B, N, dim], before positions (a token-major view, no copy)."""
        return self.embed(f).flatten(2).transpose(1, 2)

    def positions(self, f: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return sincos_3d(tuple(f.shape[2:]), self.dim, f.device).to(dtype)

    def tokens(self, f: torch.Tensor) -> torch.Tensor:
        t = self.embed_tokens(f)
        return t + self.positions(f, t.dtype)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.cnn_features(x)
        f = feats[-1]
        t = self.transformer(self.tokens(f))
        grid = t.transpose(1, 2).reshape(f.shape[0], self.dim, *f.shape[2:])
        return [*feats[:-1], torch.cat([f, grid], dim=1)]


@register_model("reprec_hybrid")
class HybridNet(nn.Module):
    """The pre-training network: the hybrid encoder, a mask token and a head predicting CNN features of masked tokens."""

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (32, 64, 128, 256), norm: Literal["batch", "instance"] = "instance",
                 dim: int = 384, depth: int = 6, heads: int = 6):
        super().__init__()
        self.encoder = HybridEncoder(in_channels, channels, norm, dim, depth, heads)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.predictor = nn.Linear(dim, list(channels)[-1])
        self.channels = tuple(channels)

    def encoder_module(self) -> HybridEncoder:
        return self.encoder

    @property
    def token_stride(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def masked_prediction(self, x: torch.Tensor, ratio: float, seed: int, backend: str = "auto",
                          grad_cnn: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The CNN features of the tokens ``seed`` hides in image ``x``, predicted from what stays visible.

        Each deep token covers a stride^3 block of voxels, but its CNN features see a few tokens around it:
        masking only the tokens would leave the hidden content in their visible neighbours. So the hidden
        tokens' voxels are blanked (0) before the CNN runs, then those tokens are replaced by the mask token
        (positions are added after masking: a hidden token keeps only its position), and the transformer and
        the head predict. Returns the prediction [B, N, C] and the hidden token ids [B, K].
        """
        from medssl_scale.kernels import token_masking

        s = self.token_stride
        grid = [n // s for n in x.shape[2:]]
        ids = token_masking.mask_ids(x.shape[0], math.prod(grid), ratio, seed, x.device)
        hidden = torch.zeros(x.shape[0], math.prod(grid), dtype=x.dtype, device=x.device).scatter_(1, ids, 1.0)
        blank = hidden.view(x.shape[0], 1, *grid)
        for axis in (2, 3, 4):
            blank = blank.repeat_interleave(s, dim=axis)
        blank = torch.nn.functional.pad(blank, [0, x.shape[4] - blank.shape[4], 0, x.shape[3] - blank.shape[3], 0, x.shape[2] - blank.shape[2]])
        with torch.set_grad_enabled(grad_cnn and torch.is_grad_enabled()):
            f = self.encoder.cnn_features(x * (1 - blank))[-1]
        t = self.encoder.embed_tokens(f)
        t, same = kernels.token_mask(t, ratio, seed, self.mask_token, backend)
        t = t + self.encoder.positions(f, t.dtype)
        return self.predictor(self.encoder.transformer(t)), same
