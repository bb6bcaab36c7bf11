"""Registries by name, as timm and torchtitan keep them: ``@REG.register("name")``, ``REG.build("name", **config)``."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import pydantic

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._makers: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._makers:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._makers[name] = fn
            return fn

        return deco

    def build(self, name: str, **config: Any) -> T:
        if name not in self._makers:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._makers[name](**config)

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._makers:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._makers[name]

    def check(self, name: str, **config: Any) -> None:
        """Raise ValueError if ``build(name, **config)`` would be refused for its settings, without building anything.

        A maker with a pydantic ``Config`` validates through it; any other is
        checked against its signature: names, and values against the annotated
        types (finite numbers, Literal choices), so a config cannot hand a
        network a string or a NaN where it takes a number.
        """
        if name not in self._makers:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        maker = self._makers[name]
        schema = getattr(maker, "Config", None)
        if schema is not None:
            schema(**config)  # pydantic's ValidationError is a ValueError
            return
        try:
            inspect.signature(maker).bind(**config)
        except TypeError as e:
            raise ValueError(f"{self.kind} {name}: {e}") from None
        _signature_model(maker).model_validate(config)

    def names(self) -> list[str]:
        return sorted(self._makers)


def _signature_model(maker: Callable[..., Any]) -> type[pydantic.BaseModel]:
    """A pydantic model of ``maker``'s annotated keyword arguments (unannotated ones take anything)."""
    target = maker.__init__ if inspect.isclass(maker) else maker
    hints = typing.get_type_hints(target)
    fields: dict[str, Any] = {}
    for p in inspect.signature(maker).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (hints.get(p.name, Any), default)
    config = pydantic.ConfigDict(extra="allow", allow_inf_nan=False, arbitrary_types_allowed=True)
    return pydantic.create_model(f"{getattr(maker, '__name__', 'maker')}Settings", __config__=config, **fields)
