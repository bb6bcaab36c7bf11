"""Published encoders: ``publish`` a run's encoder to the MLflow registry, ``load_encoder`` it anywhere.

``load_encoder`` takes ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a
local directory written by :func:`medssl_scale.registry.format.write`, and
returns the encoder in eval mode. The registry URI is the ``tracking_uri``
argument, else ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch.nn as nn

from medssl_scale.registry import format as fmt
from medssl_scale.registry.errors import EncoderLoadError, RegistryFormatError

__all__ = ["EncoderLoadError", "RegistryFormatError", "fetch", "listing", "load_encoder", "publish", "pull"]

_MODELS_URI = re.compile(r"models:/(?P<name>[\w.\- ]+)(?:@(?P<alias>[\w\-]+)|/(?P<version>[0-9]+))", re.ASCII)


def load_encoder(uri: str | Path, in_channels: int | None = None, tracking_uri: str | None = None) -> nn.Module:
    """The published encoder behind ``uri``, ready to use (eval mode; ``in_channels`` adapts the first layers)."""
    blobs, where = fetch(uri, tracking_uri)
    return fmt.read(blobs, where, in_channels)


def pull(uri: str, out: Path, tracking_uri: str | None = None) -> Path:
    """Copy a published encoder's checked files to the directory ``out`` (for machines without registry access)."""
    blobs, _ = fetch(uri, tracking_uri)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in blobs.items():
        tmp = out / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(out / name)
    (out / fmt.HASHES).write_text(json.dumps({n: hashlib.sha256(d).hexdigest() for n, d in blobs.items()}, indent=1) + "\n")
    return out


def fetch(uri: str | Path, tracking_uri: str | None = None) -> tuple[dict[str, bytes], str]:
    """The bytes of a published encoder's files, each checked against its recorded sha256, and a name for messages."""
    text = str(uri)
    if not text.startswith("models:"):
        directory = Path(text)
        if not directory.is_dir():
            raise EncoderLoadError(f"{text}: neither models:/NAME@ALIAS, models:/NAME/VERSION nor a directory")
        return fmt.verify(directory, fmt.read_hashes(directory), str(directory)), str(directory)

    m = _MODELS_URI.fullmatch(text)
    if not m:
        raise EncoderLoadError(f"{text}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    import mlflow

    from medssl_scale.registry.publish import client, recorded_hashes
    from medssl_scale.mlflow_access import redact

    c = client(tracking_uri)
    name = m["name"]
    try:
        c.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        known = sorted(r.name for r in c.search_registered_models())
        raise EncoderLoadError(f"{text}: no registered model {name!r} at {redact(c.tracking_uri)}; registered: {', '.join(known) or 'none'}") from None
    try:
        mv = c.get_model_version_by_alias(name, m["alias"]) if m["alias"] else c.get_model_version(name, m["version"])
    except mlflow.exceptions.MlflowException:
        rm = c.get_registered_model(name)
        what = f"alias {m['alias']!r}" if m["alias"] else f"version {m['version']}"
        aliases = ", ".join(f"{a} -> {v}" for a, v in sorted((rm.aliases or {}).items())) or "none"
        raise EncoderLoadError(f"{text}: model {name!r} has no {what} (aliases: {aliases})") from None
    where = f"{text} (version {mv.version})"
    with tempfile.TemporaryDirectory(prefix="medssl-pull-") as tmp:
        local = Path(tmp)
        for name in fmt.FILES:  # only the format's files come down, whatever else sits at the source
            try:
                got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source.rstrip('/')}/{name}", dst_path=tmp,
                                                               tracking_uri=c.tracking_uri))
            except Exception as e:  # noqa: BLE001 - any store failure, said with the model's name
                if "exist" in str(e).lower() or "not found" in str(e).lower():
                    raise EncoderLoadError(f"{where}: artifact {name} is missing") from None
                raise EncoderLoadError(f"{where}: artifact {name} at {mv.source} could not be downloaded: {e}") from None
            if got != local / name:
                shutil.copyfile(got, local / name)  # not through memory: its size is checked when it is read
        return fmt.verify(local, recorded_hashes(mv.tags), where), where


def publish(*args, **kwargs):
    from medssl_scale.registry.publish import publish as _publish

    return _publish(*args, **kwargs)


def listing(*args, **kwargs):
    from medssl_scale.registry.publish import listing as _listing

    return _listing(*args, **kwargs)
