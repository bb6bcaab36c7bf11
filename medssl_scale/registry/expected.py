"""What a declared architecture's weights must look like, found without allocating them, and the safetensors header they are compared with.

A hostile ``encoder.json`` may declare a network of any size. Its settings are
first checked against the encoder's signature (types) and against explicit
bounds (:data:`SETTING_BOUNDS`: every integer setting must be listed there).
The network is then built with every tensor on PyTorch's ``meta`` device
(shapes, no storage: parameters, buffers and the index tables built with
``arange``/``meshgrid`` alike), counting as it goes and stopping past the
caps, so a 100-billion parameter declaration costs nothing; only an
architecture whose tensors match the safetensors header key for key, shape
for shape and dtype for dtype is then built for real.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import time
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from medssl_scale.registry.errors import EncoderLoadError, RegistryFormatError

MAX_PARAMETERS = 2_000_000_000  # 8 GB of fp32: above any encoder this project trains
MAX_TENSORS = 20_000
MAX_BUILD_SECONDS = 60.0  # a declared depth of thousands of blocks is refused by time, whatever it allocates
MAX_HEADER_BYTES = 16_000_000  # ~200 bytes per tensor entry at MAX_TENSORS is 4 MB (the format itself allows 100 MB)
# Every integer setting an encoder.json may give, with its range (a list setting: each entry, at most
# MAX_LIST entries). A setting that is not listed is refused, so a new encoder argument needs its bound here.
SETTING_BOUNDS: dict[str, tuple[int, int]] = {
    "in_channels": (1, 1024), "channels": (1, 8192), "feature_size": (1, 1024), "depths": (1, 64),
    "num_heads": (1, 256), "window_size": (1, 16), "dim": (1, 16384), "depth": (1, 256), "heads": (1, 256),
}
MAX_LIST = 8

# Factories whose result Python reads back while building (MONAI's drop-path rates: linspace(...).item()),
# so they stay real; their size is bounded by the settings above.
_REAL = {torch.linspace}
_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.arange, torch.tensor}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}


class TooLarge(Exception):
    pass


class _OnMeta(TorchFunctionMode):
    """Tensors counted as they are made (on ``meta``: run inside ``torch.device("meta")``); TooLarge past the caps or the time."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors = 0
        self.numel = 0
        self.deadline = time.monotonic() + MAX_BUILD_SECONDS

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if time.monotonic() > self.deadline:
            raise TooLarge(f"more than {MAX_BUILD_SECONDS:g} s to build")
        if func in _REAL and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        elif func in _FACTORIES:
            out = func(*args, **kwargs)
            self.tensors += 1
            self.numel += out.numel()
            if self.numel > MAX_PARAMETERS or self.tensors > MAX_TENSORS:
                raise TooLarge(f"over {MAX_PARAMETERS:,} parameters or {MAX_TENSORS:,} tensors")
            return out
        return func(*args, **kwargs)


def declared_state(name: str, arch: dict[str, Any], where: str, what: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, safetensors dtype)} of the state dict the architecture ``name`` with ``arch`` has, as published (fp32)."""
    from medssl_scale.models import build_encoder

    check_settings(name, arch, where, what)
    mode = _OnMeta()
    try:
        with torch.device("meta"), mode:  # every factory op, arange and meshgrid included, makes shapes only
            enc = build_encoder(name, **arch)
    except TooLarge as e:
        raise EncoderLoadError(f"{where}: {what} declares a {name} too large to load ({e}); refusing to build it") from None
    except MemoryError:
        raise EncoderLoadError(f"{where}: {what} declares a {name} that ran out of memory while its shapes were worked out; "
                               "refusing to build it") from None
    except (TypeError, ValueError, RuntimeError, AssertionError, IndexError, KeyError, ZeroDivisionError, OverflowError) as e:
        raise EncoderLoadError(f"{where}: {what} declares a {name} that cannot be built: {type(e).__name__}: {str(e)[:300]}") from None
    state = enc.state_dict()
    total = sum(v.numel() for v in state.values())
    if total > MAX_PARAMETERS:
        raise EncoderLoadError(f"{where}: {what} declares a {name} of {total:,} parameters, over {MAX_PARAMETERS:,}; refusing to build it")
    return {k: (tuple(v.shape), _SAFETENSORS_DTYPES.get(torch.float32 if v.is_floating_point() else v.dtype, str(v.dtype)))
            for k, v in state.items()}


def check_settings(name: str, arch: dict[str, Any], where: str, what: str) -> None:
    """EncoderLoadError naming ``what`` unless ``arch`` fits ``name``'s signature and :data:`SETTING_BOUNDS`."""
    from medssl_scale.models import ENCODERS

    try:
        ENCODERS.check(name, **arch)
    except ValueError as e:
        raise EncoderLoadError(f"{where}: {what} declares a {name} with settings it does not take: {str(e)[:300]}") from None
    for key, value in arch.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and len(value) > MAX_LIST:
            raise EncoderLoadError(f"{where}: {what}: {name} setting {key} has {len(value)} entries, at most {MAX_LIST}")
        ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        if key in SETTING_BOUNDS and len(ints) != len(values):  # the signature check coerces "12" to 12; the network would not
            raise EncoderLoadError(f"{where}: {what}: {name} setting {key} must be whole numbers, found {str(value)[:100]!r}")
        if not ints:
            continue
        if key not in SETTING_BOUNDS:
            raise EncoderLoadError(f"{where}: {what}: {name} setting {key[:100]!r} has no known bounds; refusing to build it")
        lo, hi = SETTING_BOUNDS[key]
        bad = [v for v in ints if not lo <= v <= hi]
        if bad:
            raise EncoderLoadError(f"{where}: {what}: {name} setting {key}={bad[0]} is out of range ({lo}-{hi}); refusing to build it")


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def body_bytes(state: dict[str, tuple[tuple[int, ...], str]]) -> int:
    """Bytes the tensors of ``state`` take in a safetensors file's body."""
    return sum(math.prod(shape) * _DTYPE_BYTES.get(dtype, 8) for shape, dtype in state.values())


def read_header(path: Path, name: str, where: str) -> tuple[int, dict[str, tuple[tuple[int, ...], str]]]:
    """(bytes up to the body, {key: (shape, dtype)}) of the safetensors file ``path``, read from its first bytes only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise EncoderLoadError(f"{where}: {name} is missing or unreadable: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RegistryFormatError(f"{where}: {name} is not a regular file; refusing to read it")
        os.set_blocking(fd, True)
        head = f.read(8)
        if len(head) < 8:
            raise RegistryFormatError(f"{where}: {name} is not a safetensors file: {len(head)} bytes, shorter than its header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > st.st_size:
            raise RegistryFormatError(f"{where}: {name} is not a safetensors file: its header claims {n:,} bytes of a {st.st_size:,}-byte file")
        head += f.read(n)
    return 8 + n, header(head, name, where)


def header(data: bytes, name: str, where: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype)} from a safetensors file's header (the format: an 8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise RegistryFormatError(f"{where}: {name} is not a safetensors file: {len(data)} bytes, shorter than its header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise RegistryFormatError(f"{where}: {name} is not a safetensors file: its header claims {n:,} bytes of a {len(data):,}-byte file")
    try:
        doc = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RegistryFormatError(f"{where}: {name} has a header that is not valid JSON: {type(e).__name__}") from None
    if not isinstance(doc, dict):
        raise RegistryFormatError(f"{where}: {name} has a header that is not a JSON object")
    out = {}
    for key, entry in doc.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape) and isinstance(dtype, str)):
            raise RegistryFormatError(f"{where}: {name} has a malformed header entry for {key[:100]!r}")
        out[key] = (tuple(shape), dtype)
    return out


def mismatches(model: dict[str, tuple[tuple[int, ...], str]], saved: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """The keys that differ, by name ('' when the two agree): missing, unexpected, other shapes or dtypes."""
    missing = sorted(set(model) - set(saved))
    unexpected = sorted(set(saved) - set(model))
    both = set(model) & set(saved)
    shapes = sorted(f"{k}: saved {saved[k][0]}, model {model[k][0]}" for k in both if model[k][0] != saved[k][0])
    dtypes = sorted(f"{k}: saved {saved[k][1]}, model {model[k][1]}" for k in both
                    if model[k][0] == saved[k][0] and model[k][1] != saved[k][1])

    def part(title: str, items: list[str]) -> str:
        shown = ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")
        return f"\n  {title} ({len(items)}): {shown}" if items else ""

    return part("missing keys", missing) + part("unexpected keys", unexpected) + part("shape mismatches", shapes) \
        + part("dtype mismatches", dtypes)
