"""``ingest.json``: the settings a dataset was ingested with, read back as untrusted input.

Every later run on the dataset must agree with them, and finalize copies a
part's into the merged dataset, so a file that does not hold what an ingest
writes (an unknown key, a NaN spacing, a chunk of 0) is refused with its name
rather than pinned for good.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ingest.options import CODECS, MAX_CHUNK, SHARD_CODECS
from medssl_scale.io.bounded import read_bounded
from medssl_scale.store.layout import FORMAT_VERSION

MAX_BYTES = 1 << 16  # an ingest.json is a few hundred bytes


class PinnedSettings(BaseModel):
    """What :meth:`ingest.runner.IngestConfig.pinned` writes, and nothing else (a key added there is added here)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format_version: int = Field(ge=1, le=FORMAT_VERSION)
    secret_fingerprint: str = Field(pattern=r"^[0-9a-f]{16}$")
    pseudonyms: Literal["HMAC-SHA256"]
    spacing: list[float] | None
    hash_paths: bool
    chunk: int = Field(ge=1, le=MAX_CHUNK)
    codec: str
    shard_shape: int = Field(ge=0)
    shard_codec: str
    follow_symlinks: bool = False  # pinned since links could be followed; older datasets did not follow them

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 3 or not all(math.isfinite(x) and x > 0 for x in v)):
            raise ValueError("spacing must be null or three finite numbers > 0")
        return v

    @model_validator(mode="after")
    def _choices(self) -> PinnedSettings:
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r} is not one of {', '.join(CODECS)}")
        if self.shard_codec not in SHARD_CODECS:
            raise ValueError(f"shard_codec {self.shard_codec!r} is not one of {', '.join(SHARD_CODECS)}")
        if self.shard_shape % self.chunk:
            raise ValueError(f"shard_shape {self.shard_shape} is not a multiple of chunk {self.chunk}")
        return self


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def check_pinned(value: Any, where: str) -> dict[str, Any]:
    """``value`` (parsed JSON) if it is settings an ingest could have pinned; ValueError naming ``where`` otherwise."""
    try:
        return PinnedSettings.model_validate(value).model_dump()
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "top level"
        raise ValueError(f"{where}: {field}: {err['msg']}") from None


def read_pinned(path: Path) -> dict[str, Any]:
    """``ingest.json`` at ``path``, read bounded and validated whole; ValueError naming the file."""
    raw = read_bounded(path, MAX_BYTES, "ingest.json")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return check_pinned(value, str(path))
