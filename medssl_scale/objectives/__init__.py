"""Pre-training objectives by name.

An objective is an ``nn.Module`` that owns its network (and heads) and maps
a batch to a dict of named losses, the weighted total under ``"loss"``:
``objective(batch, step=step)``. ``build_objective(name, config)`` makes one
from plain config data; ``objective.encoder()`` is what gets published.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

_OBJECTIVES: dict[str, Callable[..., nn.Module]] = {}


def register_objective(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice")
        _OBJECTIVES[name] = fn
        return fn

    return deco


def build_objective(name: str, **config: Any) -> nn.Module:
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(sorted(_OBJECTIVES))}")
    return _OBJECTIVES[name](**config)


def objective_names() -> list[str]:
    return sorted(_OBJECTIVES)


from medssl_scale.objectives import dae  # noqa: E402,F401  (registers its objective)
