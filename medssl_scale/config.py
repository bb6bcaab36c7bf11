"""YAML run configs as plain data, with ``key.sub=value`` overrides from the command line.

Values of overrides are parsed as YAML (``crop=[64,96,96]``, ``views.flip=false``,
``modalities=[CT]``), so the command line takes exactly what the file does.
Validation is the schema's job (pydantic models with ``extra="forbid"``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config is a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``tree`` with each ``a.b.c=value`` applied (value parsed as YAML)."""
    out = _copy(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected key=value, e.g. data.batch_size=4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: value is not valid YAML ({e})") from None
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 as a string; a learning rate is a number
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {p} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x
