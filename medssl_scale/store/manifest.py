"""manifest.jsonl: one record per input item, whatever became of it.

During an ingest the runner appends one line per finished item (a single
``write`` of a whole line to an O_APPEND file, so a killed process leaves
whole lines only). At the end the file is compacted: the last record per
item wins, sorted by source, written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from medssl_scale.store.layout import atomic_write_text

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

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.source)

    def to_line(self) -> str:
        return self.model_dump_json(exclude_none=True, exclude_defaults=False) + "\n"


def read_manifest(path: Path) -> list[ManifestRecord]:
    """All records, tolerating a torn last line (a crash mid-append)."""
    path = Path(path)
    if not path.exists():
        return []
    records: list[ManifestRecord] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(ManifestRecord.model_validate(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as e:
            if n == len(lines):  # torn tail of an interrupted append: the item is redone
                break
            raise ValueError(f"{path}:{n}: invalid manifest record: {e}") from e
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
