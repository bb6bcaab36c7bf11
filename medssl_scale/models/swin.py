"""SwinUNETR-shaped networks from MONAI, with a hook for disruptions after the patch embedding.

Disruptive Autoencoders mask channels of the patch embeddings (REFERENCES.md):
MONAI's Swin transformer applies ``pos_drop`` right after ``patch_embed`` to
the [B, C, D, H, W] embeddings, so the masking is a module placed in front of
``pos_drop``; the rest of MONAI's forward is untouched. A forward hook keeps
the bottleneck features (the last Swin stage) for the cross-modal loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from monai.networks.nets import SwinUNETR

from medssl_scale.models import EncoderHalf, register_encoder, register_model


class _EmbeddingHook(nn.Module):
    """Applies ``fn`` (when set) to the patch embeddings, then the original dropout."""

    def __init__(self, drop: nn.Module):
        super().__init__()
        self.drop = drop
        self.fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fn(x) if self.fn is not None else x)


@register_model("swin_unetr")
class SwinAutoencoder(nn.Module):
    """MONAI SwinUNETR as an image-to-image network, exposing embeddings and bottleneck."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, feature_size: int = 48,
                 depths: tuple[int, ...] = (2, 2, 2, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                 window_size: int = 7, use_checkpoint: bool = False):
        super().__init__()
        self.arch = {"in_channels": in_channels, "feature_size": feature_size, "depths": list(depths),
                     "num_heads": list(num_heads), "window_size": window_size}
        self.net = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                             depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
                             use_checkpoint=use_checkpoint)
        vit = self.net.swinViT
        self.embedding_hook = _EmbeddingHook(vit.pos_drop)
        vit.pos_drop = self.embedding_hook
        self.bottleneck: torch.Tensor | None = None
        vit.register_forward_hook(self._keep_bottleneck)
        self.bottleneck_channels = 16 * feature_size

    def _keep_bottleneck(self, module: nn.Module, inputs: tuple, outputs: list[torch.Tensor]) -> None:
        self.bottleneck = outputs[-1]

    def encoder_module(self) -> SwinEncoder:
        return SwinEncoder.sharing(self.net, self.arch)

    @property
    def embed_channels(self) -> int:
        return self.net.swinViT.patch_embed.embed_dim

    def forward(self, x: torch.Tensor, embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        self.embedding_hook.fn = embed_fn
        try:
            return self.net(x)
        finally:
            self.embedding_hook.fn = None



@register_encoder("swin_unetr")
class SwinEncoder(EncoderHalf):
    """The encoder half of SwinUNETR: the Swin transformer and the convolutional blocks on its skip paths.

    Parameter names are MONAI's (``swinViT.*``, ``encoder1.*`` ... ``encoder10.*``),
    so a MONAI ``SwinUNETR`` takes these weights with ``strict=False`` too.
    Features: strides 1, 2, 4, 8, 16, 32 with F, F, 2F, 4F, 8F, 16F channels.
    """

    def __init__(self, in_channels: int = 1, feature_size: int = 48, depths: tuple[int, ...] = (2, 2, 2, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), window_size: int = 7):
        super().__init__()
        arch = {"in_channels": in_channels, "feature_size": feature_size, "depths": list(depths),
                "num_heads": list(num_heads), "window_size": window_size}
        self._adopt(SwinUNETR(out_channels=1, **{**arch, "depths": tuple(depths), "num_heads": tuple(num_heads)}), arch)

    def _adopt(self, net: SwinUNETR, arch: dict) -> None:
        self.swinViT = net.swinViT
        self.encoder1, self.encoder2, self.encoder3, self.encoder4, self.encoder10 = (
            net.encoder1, net.encoder2, net.encoder3, net.encoder4, net.encoder10)
        self.normalize = net.normalize
        self.config = {"name": "swin_unetr", **arch}
        self.in_channels = arch["in_channels"]
        f = arch["feature_size"]
        self.feature_channels = [f, f, 2 * f, 4 * f, 8 * f, 16 * f]
        self.feature_strides = [1, 2, 4, 8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.swinViT(x, self.normalize)
        return [self.encoder1(x), self.encoder2(hidden[0]), self.encoder3(hidden[1]), self.encoder4(hidden[2]),
                hidden[3], self.encoder10(hidden[4])]
