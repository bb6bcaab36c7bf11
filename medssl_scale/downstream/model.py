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

    An encoder published with its pre-trained decoder stages (DAE's SwinUNETR:
    ``encoder.decoder_stages()``) brings its decoder along: those stages decode,
    from their pre-trained weights, and only the output head is new, as the
    released DAE fine-tuning does with ``finetune_choice both``.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, norm: str = "instance"):
        super().__init__()
        self.encoder = encoder
        ch, st = list(encoder.feature_channels), list(encoder.feature_strides)
        stages = encoder.decoder_stages() if hasattr(encoder, "decoder_stages") else None
        self.pretrained_decoder = stages is not None
        if stages is not None:  # they live in the encoder (pre-trained weights); run deepest first
            self.up, self.to_full = None, nn.Identity()
            self.head = UnetOutBlock(3, ch[0], num_classes)
            self.num_classes, self.size_multiple = num_classes, st[-1]
            return
        self.up = nn.ModuleList(
            UnetrUpBlock(3, ch[i + 1], ch[i], kernel_size=3, upsample_kernel_size=st[i + 1] // st[i], norm_name=norm, res_block=True)
            for i in range(len(ch) - 1))
        self.to_full = (nn.Sequential(nn.ConvTranspose3d(ch[0], ch[0], st[0], stride=st[0]), UnetResBlock(3, ch[0], ch[0], 3, 1, norm))
                        if st[0] > 1 else nn.Identity())
        self.head = UnetOutBlock(3, ch[0], num_classes)
        self.num_classes = num_classes
        self.size_multiple = st[-1]  # inputs must divide by the coarsest stride

    def decoder_parameters(self) -> list[nn.Parameter]:
        """What the decoder trains: the pre-trained stages (inside the encoder) or the new ones, and the head."""
        if self.pretrained_decoder:
            stages = [p for m in self.encoder.decoder_stages() for p in m.parameters()]
        else:
            stages = [*self.up.parameters(), *self.to_full.parameters()]
        return stages + list(self.head.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = feats[-1]
        if self.pretrained_decoder:
            for stage, skip in zip(self.encoder.decoder_stages(), reversed(feats[:-1])):
                y = stage(y, skip)
            return self.head(y)
        for i in reversed(range(len(self.up))):
            y = self.up[i](y, feats[i])
        return self.head(self.to_full(y))
