"""PCRLv2's network, a 3D U-Net without skip connections whose decoder stages form a feature pyramid, and the U-Net with them.

As the authors' code builds it (REFERENCES.md): encoder levels of two
conv-norm-ReLU blocks with max-pooling between (64/128/256/512 channels at
``base``), three decoder stages (transposed convolution x2, two convolutions)
and a 1x1x1 output convolution. The skip concatenations are left out on
purpose: the decoder must restore from the bottleneck alone, which is what
makes the pyramid's features semantic. ``forward`` returns the restoration
and the three decoder stages, coarsest first. ``unet`` is the same network
with the skip concatenations (MixCL's encoder-decoder); both publish the
same encoder, the downsampling path.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from medssl_scale.models import EncoderHalf, register_encoder, register_model


def _norm(kind: str, c: int) -> nn.Module:
    return nn.BatchNorm3d(c) if kind == "batch" else nn.InstanceNorm3d(c, affine=True)


def _double(cin: int, cout: int, norm: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True),
                         nn.Conv3d(cout, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True))


def _encode(down: nn.ModuleList, pool: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    feats = []
    for i, block in enumerate(down):
        x = block(pool(x) if i else x)
        feats.append(x)
    return feats


@register_model("pcrl_unet")
class PCRLUNet(nn.Module):
    name = "pcrl_unet"
    skips = False

    def __init__(self, in_channels: int = 1, out_channels: int = 1, channels: tuple[int, ...] = (64, 128, 256, 512),
                 norm: Literal["batch", "instance"] = "batch"):
        super().__init__()
        c = list(channels)
        self.in_channels, self.channels, self.norm = in_channels, tuple(c), norm
        self.down = nn.ModuleList([_double(a, b, norm) for a, b in zip([in_channels, *c[:-1]], c)])
        self.pool = nn.MaxPool3d(2)
        widen = 2 if self.skips else 1
        self.lift = nn.ModuleList(nn.ConvTranspose3d(c[i], c[i - 1], 2, stride=2) for i in range(len(c) - 1, 0, -1))
        self.up = nn.ModuleList(_double(widen * c[i - 1], c[i - 1], norm) for i in range(len(c) - 1, 0, -1))
        self.out = nn.Conv3d(c[0], out_channels, 1)
        self.pyramid_channels = [c[i - 1] for i in range(len(c) - 1, 0, -1)]  # decoder stages, coarsest first

    def encoder_module(self) -> PCRLEncoder:
        return (UNetEncoder if self.skips else PCRLEncoder).sharing(self)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return _encode(self.down, self.pool, x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = self.encode(x)
        self.bottleneck = feats[-1]
        y = feats[-1]
        pyramid = []
        for i, (lift, stage) in enumerate(zip(self.lift, self.up)):
            y = lift(y)
            y = stage(torch.cat([y, feats[-2 - i]], dim=1) if self.skips else y)
            pyramid.append(y)
        return self.out(y), pyramid


@register_model("unet")
class UNet(PCRLUNet):
    """The same network with skip concatenations: a plain 3D U-Net (MixCL's encoder-decoder [ours])."""

    name = "unet"
    skips = True


@register_encoder("pcrl_unet")
class PCRLEncoder(EncoderHalf):
    """The encoder half of :class:`PCRLUNet` (``down.*`` parameter names): features at strides 1, 2, 4, 8, ..."""

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (64, 128, 256, 512), norm: Literal["batch", "instance"] = "batch"):
        super().__init__()
        self._adopt(PCRLUNet(in_channels=in_channels, channels=channels, norm=norm))

    def _adopt(self, net: PCRLUNet) -> None:
        self.down, self.pool = net.down, net.pool
        self.config = {"name": net.name, "in_channels": net.in_channels, "channels": list(net.channels), "norm": net.norm}
        self.in_channels = net.in_channels
        self.feature_channels = list(net.channels)
        self.feature_strides = [2**i for i in range(len(net.channels))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return _encode(self.down, self.pool, x)


@register_encoder("unet")
class UNetEncoder(PCRLEncoder):
    """The encoder half of :class:`UNet`: the same downsampling path and names; it says ``unet`` in its config."""

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (64, 128, 256, 512), norm: Literal["batch", "instance"] = "batch"):
        nn.Module.__init__(self)
        self._adopt(UNet(in_channels=in_channels, channels=channels, norm=norm))
