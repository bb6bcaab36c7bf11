"""Networks by name.

``build_model("swin_unetr", **config)`` returns the module; the config is plain
JSON-able data, which is what the registry stores next to the weights so
that an encoder can be rebuilt without unpickling anything.

Every pre-training network has an encoder half: ``model.encoder_module()`` returns
it as a module sharing the model's parameters, and ``build_encoder(name,
**config)`` builds the same architecture fresh from ``encoder.config``. An
encoder maps ``[B, C, D, H, W]`` to a list of feature maps, finest first, with
``feature_channels`` and ``feature_strides`` telling a decoder their shapes.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from medssl_scale.named import Registry

MODELS: Registry[nn.Module] = Registry("model")
register_model = MODELS.register
model_names = MODELS.names
ENCODERS: Registry[nn.Module] = Registry("encoder")
register_encoder = ENCODERS.register


def build_model(name: str, **config: Any) -> nn.Module:
    try:
        return MODELS.build(name, **config)
    except TypeError as e:  # a misspelt or missing setting
        raise ValueError(f"model {name}: {e}") from None


class EncoderHalf(nn.Module):
    """An encoder made of another network's modules: ``sharing(net, ...)`` adopts them (same parameters), ``__init__`` builds a fresh network to adopt."""

    @classmethod
    def sharing(cls, *parts: Any):
        enc = cls.__new__(cls)
        nn.Module.__init__(enc)
        enc._adopt(*parts)
        return enc

    def _adopt(self, *parts: Any) -> None:
        raise NotImplementedError


def build_encoder(name: str, **config: Any) -> nn.Module:
    try:
        return ENCODERS.build(name, **config)
    except TypeError as e:
        raise ValueError(f"encoder {name}: {e}") from None


from medssl_scale.models import conv, pcrl, reprec, swin  # noqa: E402,F401  (register their models)
