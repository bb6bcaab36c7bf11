"""A small convolutional autoencoder for CPU tests and the demo (the ``tiny`` configs).

It keeps the interface objectives rely on, as :class:`~medssl_scale.models.swin.SwinAutoencoder`
does: a patch embedding (a stride-2 convolution, like Swin's) with a hook for
disruptions right after it, a bottleneck kept for contrastive terms, and an
image-sized output. A training step on a 32^3 crop costs milliseconds, where
a SwinUNETR needs 64^3 crops and seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from medssl_scale.models import EncoderHalf, register_encoder, register_model


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01, inplace=True))


@register_model("conv_ae")
class ConvAutoencoder(nn.Module):
    def __init__(self, in_channels: int = 1, out_channels: int = 1, channels: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        c = list(channels)
        self.in_channels, self.channels = in_channels, tuple(c)
        self.patch_embed = nn.Conv3d(in_channels, c[0], 2, stride=2)
        self.encoder = nn.Sequential(*[_block(a, b, stride=2) for a, b in zip(c[:-1], c[1:])])
        ups = []
        for a, b in zip(reversed(c[1:]), reversed(c[:-1])):
            ups += [nn.ConvTranspose3d(a, b, 2, stride=2), _block(b, b)]
        self.decoder = nn.Sequential(*ups, nn.ConvTranspose3d(c[0], c[0], 2, stride=2), nn.Conv3d(c[0], out_channels, 1))
        self.bottleneck: torch.Tensor | None = None
        self.embed_channels = c[0]
        self.bottleneck_channels = c[-1]

    def encoder_module(self) -> ConvEncoder:
        return ConvEncoder.sharing(self)

    def forward(self, x: torch.Tensor, embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        e = self.patch_embed(x)
        if embed_fn is not None:
            e = embed_fn(e)
        self.bottleneck = self.encoder(e)
        return self.decoder(self.bottleneck)



@register_encoder("conv_ae")
class ConvEncoder(EncoderHalf):
    """The encoder half of :class:`ConvAutoencoder`: features at strides 2, 4, 8, ... (same parameter names)."""

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        ae = ConvAutoencoder(in_channels=in_channels, channels=channels)
        self._adopt(ae)

    def _adopt(self, ae: ConvAutoencoder) -> None:
        self.patch_embed, self.encoder = ae.patch_embed, ae.encoder
        c = list(ae.channels)
        self.config = {"name": "conv_ae", "in_channels": ae.in_channels, "channels": c}
        self.in_channels = ae.in_channels
        self.feature_channels = c
        self.feature_strides = [2 ** (i + 1) for i in range(len(c))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.patch_embed(x)]
        for block in self.encoder:
            feats.append(block(feats[-1]))
        return feats
