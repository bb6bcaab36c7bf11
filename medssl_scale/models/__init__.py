"""Networks by name: a registry, as timm and torchtitan keep one.

``build_model("swin_unetr", **config)`` returns the module; the config is plain
JSON-able data, which is what the registry stores next to the weights so
that an encoder can be rebuilt without unpickling anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        return fn

    return deco


def build_model(name: str, **config: Any) -> nn.Module:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(_MODELS))}")
    try:
        return _MODELS[name](**config)
    except TypeError as e:
        raise ValueError(f"model {name}: {e}") from None


def model_names() -> list[str]:
    return sorted(_MODELS)


from medssl_scale.models import conv, swin  # noqa: E402,F401  (register their models)
