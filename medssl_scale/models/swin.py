"""SwinUNETR-shaped networks from MONAI, with a hook for disruptions after the patch embedding.

Disruptive Autoencoders mask channels of the patch embeddings (REFERENCES.md):
MONAI's Swin transformer applies ``pos_drop`` right after ``patch_embed`` to
the [B, C, D, H, W] embeddings, so the masking is a module placed in front of
``pos_drop``; the rest of MONAI's forward is untouched. A forward hook keeps
the bottleneck features (the last Swin stage) for the cross-modal loss.

``patch_embed``: MONAI embeds each 2x2x2 patch with one linear stride-2
convolution (``linear``). Masking 60% of its 48 channels hides nothing: the
19 kept channels still span the patch's 8 voxels. The released DAE encoder
embeds with a nonlinear stride-2 block instead (``conv_block``: MONAI's
``UnetBasicBlock``, two 3x3x3 convolutions with instance norm and
LeakyReLU), under the names the released weights have after the released
fine-tuning loader maps ``encoder.`` to ``swinViT.``:
``swinViT.patch_embed.proj.conv1.conv.weight`` and so on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn
from monai.networks.blocks import UnetBasicBlock
from monai.networks.nets import SwinUNETR

from medssl_scale.models import EncoderHalf, register_encoder, register_model

PatchEmbedding = Literal["linear", "conv_block"]
DECODER_STAGES = ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1")  # deepest first, as SwinUNETR runs them


def _swin_unetr(in_channels: int, out_channels: int, feature_size: int, depths, num_heads, window_size: int,
                patch_embed: PatchEmbedding, use_checkpoint: bool = False) -> SwinUNETR:
    net = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size, depths=tuple(depths),
                    num_heads=tuple(num_heads), window_size=window_size, use_checkpoint=use_checkpoint)
    if patch_embed == "conv_block":  # the released DAE encoder's PatchEmbed3D.proj
        net.swinViT.patch_embed.proj = UnetBasicBlock(3, in_channels, feature_size, kernel_size=3, stride=2,
                                                      norm_name=("INSTANCE", {"affine": True}))
    return net


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
                 window_size: int = 7, use_checkpoint: bool = False, patch_embed: PatchEmbedding = "linear"):
        super().__init__()
        self.arch = {"in_channels": in_channels, "feature_size": feature_size, "depths": list(depths),
                     "num_heads": list(num_heads), "window_size": window_size, "patch_embed": patch_embed}
        self.net = _swin_unetr(in_channels, out_channels, feature_size, depths, num_heads, window_size, patch_embed, use_checkpoint)
        vit = self.net.swinViT
        self.embedding_hook = _EmbeddingHook(vit.pos_drop)
        vit.pos_drop = self.embedding_hook
        self.bottleneck: torch.Tensor | None = None
        vit.register_forward_hook(self._keep_bottleneck)
        self.bottleneck_channels = 16 * feature_size

    def _keep_bottleneck(self, module: nn.Module, inputs: tuple, outputs: list[torch.Tensor]) -> None:
        self.bottleneck = outputs[-1]

    def encoder_module(self, decoder: bool = False) -> SwinEncoder:
        """The encoder half; with ``decoder``, carrying the decoder stages too (for fine-tuning to start from them)."""
        return SwinEncoder.sharing(self.net, {**self.arch, "decoder": decoder})

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

    ``decoder=True`` (what DAE publishes, as the released fine-tuning's
    ``finetune_choice both`` loads) also holds SwinUNETR's decoder stages
    (``decoder5`` ... ``decoder1``, :data:`DECODER_STAGES`): not run by
    ``forward``, which returns features, but taken up by a segmentation
    network as its decoder (:class:`medssl_scale.downstream.model.SegmentationNet`).
    """

    def __init__(self, in_channels: int = 1, feature_size: int = 48, depths: tuple[int, ...] = (2, 2, 2, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), window_size: int = 7, patch_embed: PatchEmbedding = "linear",
                 decoder: bool = False):
        super().__init__()
        arch = {"in_channels": in_channels, "feature_size": feature_size, "depths": list(depths),
                "num_heads": list(num_heads), "window_size": window_size, "patch_embed": patch_embed, "decoder": decoder}
        self._adopt(_swin_unetr(in_channels, 1, feature_size, depths, num_heads, window_size, patch_embed), arch)

    def _adopt(self, net: SwinUNETR, arch: dict) -> None:
        self.swinViT = net.swinViT
        self.encoder1, self.encoder2, self.encoder3, self.encoder4, self.encoder10 = (
            net.encoder1, net.encoder2, net.encoder3, net.encoder4, net.encoder10)
        if arch.get("decoder"):
            for name in DECODER_STAGES:
                setattr(self, name, getattr(net, name))
        self.normalize = net.normalize
        self.config = {"name": "swin_unetr", **arch}
        self.in_channels = arch["in_channels"]
        f = arch["feature_size"]
        self.feature_channels = [f, f, 2 * f, 4 * f, 8 * f, 16 * f]
        self.feature_strides = [1, 2, 4, 8, 16, 32]

    def decoder_stages(self) -> list[nn.Module] | None:
        """The pre-trained decoder stages, deepest first, or None when the encoder came without them."""
        return [getattr(self, n) for n in DECODER_STAGES] if self.config.get("decoder") else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.swinViT(x, self.normalize)
        return [self.encoder1(x), self.encoder2(hidden[0]), self.encoder3(hidden[1]), self.encoder4(hidden[2]),
                hidden[3], self.encoder10(hidden[4])]
