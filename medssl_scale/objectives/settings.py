"""What every objective's settings share: the run's seed and kernel backend, and a network by name, checked on load."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medssl_scale.models import MODELS, build_model


class ObjectiveConfig(BaseModel):
    """Subclasses declare ``model`` (a dict with a ``name``), ``DEFAULT_MODEL`` and, if restricted, ``MODELS_ALLOWED``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # finite floats only
    DEFAULT_MODEL: ClassVar[str]
    MODELS_ALLOWED: ClassVar[tuple[str, ...] | None] = None  # None: any registered network

    seed: int = Field(0, ge=0)
    kernels: Literal["auto", "reference", "triton"] = "auto"

    @field_validator("model", check_fields=False)
    @classmethod
    def _known_model(cls, v: dict[str, Any]) -> dict[str, Any]:
        settings = dict(v)
        name = settings.pop("name", cls.DEFAULT_MODEL)
        MODELS.check(name, **settings)
        if cls.MODELS_ALLOWED is not None and name not in cls.MODELS_ALLOWED:
            raise ValueError(f"this objective needs {' or '.join(cls.MODELS_ALLOWED)}, got {name!r}")
        return v

    def build_net(self) -> nn.Module:
        settings = dict(self.model)
        return build_model(settings.pop("name", self.DEFAULT_MODEL), **settings)
