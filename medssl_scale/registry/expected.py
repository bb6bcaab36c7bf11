"""What a declared architecture's weights must look like, found without allocating them, and the safetensors header they are compared with.

A hostile ``encoder.json`` may declare a network of any size. The network is
first built with every parameter and buffer on PyTorch's ``meta`` device (shapes,
no storage), counting as it goes and stopping past the caps, so a 100-billion
parameter declaration costs nothing; only an architecture whose tensors match
the safetensors header key for key, shape for shape and dtype for dtype is
then built for real.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from medssl_scale.registry.errors import EncoderLoadError, RegistryFormatError

MAX_PARAMETERS = 2_000_000_000  # 8 GB of fp32: above any encoder this project trains
MAX_TENSORS = 20_000
MAX_BUILD_SECONDS = 60.0  # a declared depth of thousands of blocks is refused by time, whatever it allocates
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own cap on its JSON header

# The allocating factories nn layers build parameters and buffers with; the rest
# (arange, linspace for index tables and drop-path rates) stay real and small.
_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}


class TooLarge(Exception):
    pass


class _OnMeta(TorchFunctionMode):
    """Parameters and buffers on ``meta``, counted; TooLarge past the caps (before the rest is built)."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors = 0
        self.numel = 0
        self.deadline = time.monotonic() + MAX_BUILD_SECONDS

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if time.monotonic() > self.deadline:
            raise TooLarge(f"more than {MAX_BUILD_SECONDS:g} s to build")
        if func in _FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
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

    mode = _OnMeta()
    try:
        with mode:
            enc = build_encoder(name, **arch)
    except TooLarge as e:
        raise EncoderLoadError(f"{where}: {what} declares a {name} too large to load ({e}); refusing to build it") from None
    except (TypeError, ValueError, RuntimeError, AssertionError, IndexError, KeyError, ZeroDivisionError, OverflowError) as e:
        raise EncoderLoadError(f"{where}: {what} declares a {name} that cannot be built: {type(e).__name__}: {str(e)[:300]}") from None
    state = enc.state_dict()
    total = sum(v.numel() for v in state.values())
    if total > MAX_PARAMETERS:
        raise EncoderLoadError(f"{where}: {what} declares a {name} of {total:,} parameters, over {MAX_PARAMETERS:,}; refusing to build it")
    return {k: (tuple(v.shape), _SAFETENSORS_DTYPES.get(torch.float32 if v.is_floating_point() else v.dtype, str(v.dtype)))
            for k, v in state.items()}


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
