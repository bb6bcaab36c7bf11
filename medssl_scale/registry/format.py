"""The on-disk form of a published encoder: safetensors weights and a JSON architecture, nothing executable.

A directory holds exactly:

- ``encoder.safetensors``: the encoder's state dict (fp32), parameter names as
  the encoder module has them;
- ``encoder.json``: ``{"format": ..., "architecture": {"name": ..., settings},
  "feature_channels": [...], "feature_strides": [...], "source": {...}}``;
- ``sha256.json``: the sha256 of the two files above, for directories that
  travel without a registry. A registered version carries the same hashes as
  its own tags, which is what a pull checks against.

Reading builds the architecture by name from the JSON (``build_encoder``)
and fills it from safetensors, strictly: no pickle is ever opened, and any
other file in the directory is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medssl_scale.registry import documents, expected
from medssl_scale.registry.errors import EncoderLoadError, RegistryFormatError
from medssl_scale.store.layout import atomic_write_text

FORMAT = "medssl-encoder/1"
WEIGHTS, ARCH, HASHES = "encoder.safetensors", "encoder.json", "sha256.json"
FILES = (WEIGHTS, ARCH)
log = logging.getLogger(__name__)

__all__ = ["ARCH", "FILES", "FORMAT", "HASHES", "WEIGHTS", "EncoderLoadError", "RegistryFormatError", "read", "read_hashes",
           "verify", "write"]


def read_hashes(directory: Path) -> dict[str, str]:
    """A directory's ``sha256.json``, checked for size, JSON and schema (RegistryFormatError naming it otherwise)."""
    data = documents.read_file(directory / HASHES, HASHES, str(directory))
    return documents.parse(data, documents.HashesDocument, HASHES, str(directory)).by_file()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write(encoder: nn.Module, out: Path, source: dict[str, Any] | None = None) -> dict[str, str]:
    """Write ``encoder`` (a module with ``.config``) to the directory ``out``; returns {file: sha256}."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # fp32 weights; integer buffers (BatchNorm's step count) keep their type.
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in encoder.state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT})
    tmp.replace(out / WEIGHTS)
    arch = {"format": FORMAT, "architecture": dict(encoder.config), "feature_channels": list(encoder.feature_channels),
            "feature_strides": list(encoder.feature_strides), "source": source or {}}
    atomic_write_text(out / ARCH, json.dumps(arch, indent=1) + "\n")
    hashes = {name: sha256(out / name) for name in FILES}
    atomic_write_text(out / HASHES, json.dumps(hashes, indent=1) + "\n")
    return hashes


def verify(directory: Path, recorded: dict[str, str], where: str) -> dict[str, bytes]:
    """The bytes of the published files, each checked against its recorded sha256.

    Only the format's own files are ever opened, whatever else the record or
    the directory holds; the bytes that were hashed are the bytes that get
    parsed, so nothing can change between the check and the load. The
    weights' header is read first, from the file's first bytes, and compared
    with the architecture ``encoder.json`` declares: a weights file that does
    not fit it is refused before its body is read, and the body is read only
    up to the size the declared tensors take.
    """
    for name in FILES:
        if not recorded.get(name):
            raise EncoderLoadError(f"{where}: no recorded sha256 for {name}: not a medssl encoder, or published without hashes")
        if not (directory / name).is_file():
            raise EncoderLoadError(f"{where}: artifact {name} is missing")
    blobs = {ARCH: _checked(documents.read_file(directory / ARCH, ARCH, where), ARCH, recorded[ARCH], where)}
    declared = _declared(blobs[ARCH], where)
    header_bytes, saved = expected.read_header(directory / WEIGHTS, WEIGHTS, where)
    _check_fit(declared, saved, where)
    cap = header_bytes + expected.body_bytes(declared)
    blobs[WEIGHTS] = _checked(documents.read_file(directory / WEIGHTS, WEIGHTS, where, cap), WEIGHTS, recorded[WEIGHTS], where)
    extra = sorted(p.name for p in directory.iterdir() if p.name not in FILES and p.name != HASHES)
    if extra:
        log.warning("%s: ignoring files that were not published with the encoder: %s", where, ", ".join(extra))
    return blobs


def _checked(data: bytes, name: str, want: str, where: str) -> bytes:
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise EncoderLoadError(f"{where}: artifact {name} does not match its recorded sha256 "
                               f"(recorded {want[:12]}..., found {got[:12]}...): it changed after publishing; refusing to load it")
    return data


def _architecture(arch_json: bytes, where: str) -> tuple[str, dict[str, Any]]:
    """(encoder name, its settings) from ``encoder.json``'s bytes, checked for schema, format and a known name."""
    from medssl_scale.models import ENCODERS

    meta = documents.parse(arch_json, documents.EncoderDocument, ARCH, where)
    if meta.format != FORMAT:
        raise RegistryFormatError(f"{where}: {ARCH} has format {meta.format[:100]!r}; this version reads {FORMAT!r}")
    arch = dict(meta.architecture)
    name = arch.pop("name", None)
    if name not in ENCODERS.names():
        raise RegistryFormatError(f"{where}: unknown architecture {str(name)[:100]!r} in {ARCH}; known: {', '.join(ENCODERS.names())}")
    return name, arch


def _declared(arch_json: bytes, where: str) -> dict[str, tuple[tuple[int, ...], str]]:
    name, arch = _architecture(arch_json, where)
    return expected.declared_state(name, arch, where, ARCH)


def _check_fit(declared: dict[str, tuple[tuple[int, ...], str]], saved: dict[str, tuple[tuple[int, ...], str]], where: str) -> None:
    problems = expected.mismatches(declared, saved)
    if problems:
        raise EncoderLoadError(f"{where}: the weights in {WEIGHTS} do not fit the architecture in {ARCH}" + problems)


def read(blobs: dict[str, bytes], where: str, in_channels: int | None = None) -> nn.Module:
    """Build the encoder from ``encoder.json`` and fill it from ``encoder.safetensors`` strictly (the bytes :func:`verify` returns)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from medssl_scale.models import build_encoder

    name, arch = _architecture(blobs[ARCH], where)
    # The declared network's tensors against the weights' header, before either is allocated.
    _check_fit(expected.declared_state(name, arch, where, ARCH), expected.header(blobs[WEIGHTS], WEIGHTS, where), where)
    try:
        state = load(blobs[WEIGHTS])
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise EncoderLoadError(f"{where}: {WEIGHTS} is not a readable safetensors file: {e}") from None
    saved_in = arch.get("in_channels", 1)
    if in_channels is not None and not 1 <= in_channels <= 1024:
        raise EncoderLoadError(f"{where}: in_channels={in_channels} is out of range (1-1024)")
    if in_channels is not None and in_channels != saved_in:
        arch["in_channels"] = in_channels
    encoder = build_encoder(name, **arch)
    if in_channels is not None and in_channels != saved_in:
        state = adapt_input_channels(state, encoder.state_dict(), saved_in, in_channels)
    load_strict(encoder, state, where)
    return encoder.eval()


def adapt_input_channels(state: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], old: int, new: int) -> dict[str, torch.Tensor]:
    """Weights of the layers that read the image, for ``new`` input channels instead of ``old``.

    Those are the tensors whose shape differs from the fresh module's only in
    dimension 1 (``old`` there, ``new`` in the module). Channel ``j`` takes the
    pre-trained filter of channel ``j % old``, scaled by ``old / new`` so that
    an input with the same image in every channel gives the same response.
    """
    out = dict(state)
    for key, w in state.items():
        f = fresh.get(key)
        if f is None or f.shape == w.shape or w.dim() < 2:
            continue
        if w.shape[1] == old and f.shape[1] == new and w.shape[:1] + w.shape[2:] == f.shape[:1] + f.shape[2:]:
            idx = torch.arange(new) % old
            out[key] = w[:, idx] * (old / new)
    return out


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what does not match, by name."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: saved {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        def part(title: str, items: list[str]) -> str:
            shown = ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")
            return f"\n  {title} ({len(items)}): {shown}" if items else ""

        raise EncoderLoadError(f"{where}: the weights do not fit the architecture"
                               + part("missing keys", missing) + part("unexpected keys", unexpected)
                               + part("shape mismatches", shapes))
    module.load_state_dict(state, strict=True)
