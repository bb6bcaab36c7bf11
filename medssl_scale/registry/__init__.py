"""Published encoders: ``publish`` a run's encoder to the MLflow registry, ``load_encoder`` it anywhere.

``load_encoder`` takes ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a
local directory written by :func:`medssl_scale.registry.format.write`, and
returns the encoder in eval mode. The registry URI is the ``tracking_uri``
argument, else ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch.nn as nn

from medssl_scale.registry import format as fmt
from medssl_scale.registry.format import EncoderLoadError

__all__ = ["EncoderLoadError", "load_encoder", "publish", "listing"]

_MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")


def load_encoder(uri: str | Path, in_channels: int | None = None, tracking_uri: str | None = None) -> nn.Module:
    """The published encoder behind ``uri``, ready to use (eval mode; ``in_channels`` adapts the first layers)."""
    text = str(uri)
    if not text.startswith("models:"):
        directory = Path(text)
        if not directory.is_dir():
            raise EncoderLoadError(f"{text}: neither models:/NAME@ALIAS, models:/NAME/VERSION nor a directory")
        hashes_file = directory / fmt.HASHES
        try:
            expected = json.loads(hashes_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EncoderLoadError(f"{directory}: {fmt.HASHES} is missing or unreadable: {e}") from None
        return fmt.read(fmt.verify(directory, expected, str(directory)), str(directory), in_channels)

    m = _MODELS_URI.fullmatch(text)
    if not m:
        raise EncoderLoadError(f"{text}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    import mlflow

    from medssl_scale.registry.publish import client, recorded_hashes

    c = client(tracking_uri)
    name = m["name"]
    try:
        c.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        known = sorted(r.name for r in c.search_registered_models())
        raise EncoderLoadError(f"{text}: no registered model {name!r} at {c.tracking_uri}; registered: {', '.join(known) or 'none'}") from None
    try:
        mv = c.get_model_version_by_alias(name, m["alias"]) if m["alias"] else c.get_model_version(name, m["version"])
    except mlflow.exceptions.MlflowException:
        rm = c.get_registered_model(name)
        what = f"alias {m['alias']!r}" if m["alias"] else f"version {m['version']}"
        aliases = ", ".join(f"{a} -> {v}" for a, v in sorted((rm.aliases or {}).items())) or "none"
        raise EncoderLoadError(f"{text}: model {name!r} has no {what} (aliases: {aliases})") from None
    where = f"{text} (version {mv.version})"
    expected = recorded_hashes(mv.tags)
    with tempfile.TemporaryDirectory(prefix="medssl-pull-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp, tracking_uri=c.tracking_uri))
        except Exception as e:  # noqa: BLE001 - any store failure, said with the model's name
            raise EncoderLoadError(f"{where}: its artifacts at {mv.source} could not be downloaded: {e}") from None
        return fmt.read(fmt.verify(local, expected, where), where, in_channels)


def publish(*args, **kwargs):
    from medssl_scale.registry.publish import publish as _publish

    return _publish(*args, **kwargs)


def listing(*args, **kwargs):
    from medssl_scale.registry.publish import listing as _listing

    return _listing(*args, **kwargs)
