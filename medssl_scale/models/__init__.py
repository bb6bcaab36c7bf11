"""Networks by name.

``build_model("swin_unetr", **config)`` returns the module; the config is plain
JSON-able data, which is what the registry stores next to the weights so
that an encoder can be rebuilt without unpickling anything.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from medssl_scale.named import Registry

MODELS: Registry[nn.Module] = Registry("model")
register_model = MODELS.register
model_names = MODELS.names


def build_model(name: str, **config: Any) -> nn.Module:
    try:
        return MODELS.build(name, **config)
    except TypeError as e:  # a misspelt or missing setting
        raise ValueError(f"model {name}: {e}") from None


from medssl_scale.models import conv, swin  # noqa: E402,F401  (register their models)
