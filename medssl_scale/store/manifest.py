"""manifest.jsonl: one record per input item, whatever became of it.

During an ingest the runner appends one line per finished item (a single
``write`` of a whole line to an O_APPEND file, so a killed process leaves
whole lines only, or a torn last line without its newline). At the end the
file is compacted: the last record per item wins, sorted by source, written
to a temporary name and renamed.

A manifest is untrusted input: every record is validated (volume ids match
the store's pattern before anything turns them into paths; shapes and
spacings are three positive numbers), and an invalid line is an error naming
the file and line. A torn last line is what an interrupted ingest leaves: the
ingest itself drops it and redoes the item (``--resume``); readers of a
finished dataset refuse it (``read_manifest(..., torn_tail="refuse")``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from medssl_scale.store.layout import atomic_write_text, check_volume_id, open_dataset_file

Status = Literal["ok", "skipped", "failed"]


class ManifestRecord(BaseModel):
    """One input item (a file, a DICOM series, or a label map)."""

    model_config = ConfigDict(extra="forbid")

    source: str  # path relative to the input roots' parent (or its keyed hash)
    status: Status
    kind: Literal["image", "label"] = "image"
    reason: str | None = None  # why skipped / failed; also notes on an ok item
    source_sha256: str | None = None
    source_bytes: int | None = None
    source_mtime_ns: int | None = None  # with source_bytes: re-runs skip unchanged items without hashing
    files: list[str] | None = None  # every file of a DICOM series or header/data pair
    format: str | None = None
    volume_id: str | None = None
    modality: Literal["CT", "MR"] | None = None
    modality_from: Literal["header", "override", "intensity"] | None = None
    shape: list[int] | None = None
    spacing: list[float] | None = None
    dtype: str | None = None
    has_label: bool | None = None  # set on ok images
    label_source: str | None = None
    patient: str | None = None  # keyed hash, never the raw id
    study: str | None = None  # keyed hash
    warnings: list[str] | None = None
    duplicate_of: str | None = None  # volume id this item's content already is

    @field_validator("volume_id", "duplicate_of")
    @classmethod
    def _volume_id(cls, v: str | None) -> str | None:
        return None if v is None else check_volume_id(v, "volume id")

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 3 or any(n < 1 for n in v)):
            raise ValueError(f"shape must be 3 positive integers, not {v}")
        return v

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 3 or not all(math.isfinite(x) and x > 0 for x in v)):
            raise ValueError(f"spacing must be 3 finite positive numbers, not {v}")
        return v

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.source)

    def to_line(self) -> str:
        return self.model_dump_json(exclude_none=True, exclude_defaults=False) + "\n"


class TornManifestError(ValueError):
    """The manifest's last line has no newline: an ingest was interrupted mid-append, or the file was cut short."""


def torn_last_line(path: Path) -> str | None:
    """Why the manifest's last line is torn, or None when it ends in a whole line."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return None
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return None
    except FileNotFoundError:
        return None
    return (f"{path}: the last line is torn (no newline: an ingest was interrupted or the file was cut short); "
            "rerun the ingest with --resume to repair it")


def read_manifest(path: Path, torn_tail: Literal["drop", "refuse"] = "drop") -> list[ManifestRecord]:
    """All records; ValueError naming file and line for an invalid one.

    A torn last line (no newline) is dropped (``"drop"``: the ingest redoes that
    item, and :class:`ManifestAppender` cuts it off) or refused (``"refuse"``:
    :class:`TornManifestError`), which is what readers of a finished dataset want.
    """
    path = Path(path)
    try:
        fd = open_dataset_file(path)  # a FIFO planted as the manifest is refused, not waited on
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines[-1]:  # no newline after the last line
        if torn_tail == "refuse":
            raise TornManifestError(torn_last_line(path) or f"{path}: the last line is torn")
        lines.pop()
    records: list[ManifestRecord] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(ManifestRecord.model_validate(json.loads(line.decode("utf-8"))))
        except (ValueError, RecursionError) as e:  # also JSON and UTF-8 errors, and nesting thousands deep
            raise ValueError(f"{path}:{n}: invalid manifest record: {e}") from None
    return records


def latest(records: Iterable[ManifestRecord]) -> dict[tuple[str, str], ManifestRecord]:
    """The current record of each item: later lines supersede earlier ones."""
    out: dict[tuple[str, str], ManifestRecord] = {}
    for r in records:
        out[r.key] = r
    return out


def compact(path: Path) -> list[ManifestRecord]:
    """Rewrite the manifest with one record per item, sorted; returns them."""
    current = sorted(latest(read_manifest(path)).values(), key=lambda r: (r.source, r.kind))
    atomic_write_text(path, "".join(r.to_line() for r in current))
    return current


class ManifestAppender:
    """Appends whole lines; safe against kill -9 between lines."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _repair_tail(self) -> None:
        # A torn last line would glue itself to the next append: cut it off.
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def append(self, *records: ManifestRecord) -> None:
        """One write(2) for all of an item's records: a kill leaves all of them or none."""
        data = memoryview("".join(r.to_line() for r in records).encode("utf-8"))
        while data:  # a regular file takes it in one write; loop in case it does not
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ManifestAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
