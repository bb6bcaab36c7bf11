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

from medssl_scale.models import register_model


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

    @property
    def embed_channels(self) -> int:
        return self.net.swinViT.patch_embed.embed_dim

    def forward(self, x: torch.Tensor, embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        self.embedding_hook.fn = embed_fn
        try:
            return self.net(x)
        finally:
            self.embedding_hook.fn = None

