"""A segmentation network around a pulled encoder: the encoder as it is, plus a UNet decoder built from its feature shapes."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetResBlock, UnetrUpBlock


class SegmentationNet(nn.Module):
    """``encoder`` (any module from :func:`medssl_scale.load_encoder` or ``build_encoder``) and a decoder.

    Each decoder stage upsamples the deeper features to the next scale,
    concatenates that scale's encoder features and refines them (MONAI's
    ``UnetrUpBlock``, as SwinUNETR's decoder does); an encoder whose finest
    features are below full resolution gets one more upsampling. The encoder's
    parameters keep their names under ``encoder.``: no key surgery.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, norm: str = "instance"):
        super().__init__()
        self.encoder = encoder
        ch, st = list(encoder.feature_channels), list(encoder.feature_strides)
        self.up = nn.ModuleList(
            UnetrUpBlock(3, ch[i + 1], ch[i], kernel_size=3, upsample_kernel_size=st[i + 1] // st[i], norm_name=norm, res_block=True)
            for i in range(len(ch) - 1))
        self.to_full = (nn.Sequential(nn.ConvTranspose3d(ch[0], ch[0], st[0], stride=st[0]), UnetResBlock(3, ch[0], ch[0], 3, 1, norm))
                        if st[0] > 1 else nn.Identity())
        self.head = UnetOutBlock(3, ch[0], num_classes)
        self.num_classes = num_classes
        self.size_multiple = st[-1]  # inputs must divide by the coarsest stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = feats[-1]
        for i in reversed(range(len(self.up))):
            y = self.up[i](y, feats[i])
        return self.head(self.to_full(y))
