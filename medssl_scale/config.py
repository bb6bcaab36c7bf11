"""YAML run configs as plain data, with ``key.sub=value`` overrides from the command line.

Values of overrides are parsed as YAML (``crop=[64,96,96]``, ``views.flip=false``,
``modalities=[CT]``), so the command line takes exactly what the file does.
Validation is the schema's job (pydantic models with ``extra="forbid"``).

A config file is parsed as plain YAML data (no tags that build objects) and
bounded before anything walks it: at most :data:`MAX_BYTES` of text, and at
most :data:`MAX_NODES` values once every alias is expanded, so an alias bomb
("billion laughs": a few lines whose aliases expand to billions of values) is
refused while it is still a small graph. Duplicate keys are errors, not a
silent last-one-wins.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from medssl_scale.io.bounded import read_bounded

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

MAX_BYTES = 1 << 20  # a run config is a few KiB
MAX_NODES = 100_000  # values after alias expansion (the shipped configs hold a few hundred)
MAX_DEPTH = 64


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys; sizes are checked on the composed graph (see :func:`parse_yaml`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *defaults" then explicit keys: overriding the merged ones is the point
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                raise yaml.constructor.ConstructorError(None, None, "a key must be a plain value", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> int:
    """Values in the tree ``root`` stands for with every alias expanded (aliases share nodes: memoised by id)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise ValueError("an alias refers to a value that contains it")
        open_.add(key)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            n += sum(size(c, depth + 1) for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            n += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        if n > MAX_NODES:
            raise ValueError(f"more than {MAX_NODES} values once its aliases are expanded (an alias bomb?)")
        open_.discard(key)
        sizes[key] = n
        return n

    return size(root, 0)


def parse_yaml(text: str, where: str) -> Any:
    """Plain data from YAML ``text``, bounded in size, expansion and depth; ValueError naming ``where``."""
    if len(text) > MAX_BYTES:
        raise ValueError(f"{where}: {len(text)} characters; a config may hold at most {MAX_BYTES}")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()  # composed (aliases are shared nodes), nothing constructed yet
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML: {e}") from None
    except ValueError as e:
        raise ValueError(f"{where}: refused: {e}") from None
    except RecursionError:
        raise ValueError(f"{where}: refused: nested too deeply") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = read_bounded(path, MAX_BYTES, "the config")  # a config is a few KiB
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    data = parse_yaml(text, str(path)) or {}
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
            value = parse_yaml(raw, f"override {key.strip()}") if raw.strip() else None
        except ValueError as e:
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
