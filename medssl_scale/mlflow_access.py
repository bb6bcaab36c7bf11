"""Where MLflow lives and how to name it safely: used by training, the registry and fine-tuning alike."""

from __future__ import annotations

import os
from pathlib import Path


def tracking_uri(workdir: Path) -> str:
    """``MLFLOW_TRACKING_URI``, or a SQLite store in ``workdir`` (nothing needs a server)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workdir / 'mlruns.db').absolute()}"


def redact(uri: str) -> str:
    """``uri`` without a password, for anything printed or logged (database URIs carry credentials)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
