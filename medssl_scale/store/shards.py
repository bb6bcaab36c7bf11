"""shards/*.tar: WebDataset shards of whole volumes, and shards/index.json.

A sample is the volume id as key with members ``image.npy`` (or
``image.npy.gz``), ``label.npy`` when there is a label map, and ``meta.json``
(geometry, modality, pseudonymous ids). Stock ``webdataset.WebDataset(url)
.decode()`` reads them.

Workers encode each sample once, in parallel, as a *tar fragment* (the
members without the end-of-archive marker) under ``.pending/``. The main
process concatenates fragments into a shard until it reaches the target
size, seals it (end marker, fsync), renames it into ``shards/`` and only then
records it in ``index.json`` and deletes its fragments. A crash at any point
leaves either a recorded shard or fragments that the next run shards again.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medssl_scale.store.layout import DatasetDir, atomic_write_text

BLOCK = tarfile.BLOCKSIZE
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
INDEX_FORMAT = "medssl-shards/1"
SHARD_CODECS = ("npy", "npy.gz")


def _npy_parts(array: np.ndarray) -> tuple[bytes, memoryview]:
    """The .npy header and a zero-copy view of the data: no second copy of a volume in memory.

    Fortran-ordered arrays (the canonical layout) are written as such
    (``fortran_order: True``), which every npy reader honours.
    """
    if not array.flags.f_contiguous:
        array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, np.lib.format.header_data_from_array_1_0(array))
    data = array.T if array.flags.f_contiguous and not array.flags.c_contiguous else array
    return header.getvalue(), memoryview(data).cast("B")


def _member(f: Any, name: str, parts: list[bytes | memoryview]) -> None:
    info = tarfile.TarInfo(name)
    info.size = sum(len(p) for p in parts)
    info.mode = 0o444
    info.mtime = 0  # fixed, so the same samples make byte-identical shards
    info.uname = info.gname = "medssl"
    f.write(info.tobuf(format=tarfile.PAX_FORMAT))
    for p in parts:
        f.write(p)
    pad = -info.size % BLOCK
    if pad:
        f.write(b"\0" * pad)


def _write_sample(f: Any, volume_id: str, image: np.ndarray, meta: dict[str, Any], label: np.ndarray | None, codec: str) -> None:
    if codec not in SHARD_CODECS:
        raise ValueError(f"shard codec must be one of {SHARD_CODECS}, got {codec!r}")
    for name, arr in (("image", image), ("label", label)):
        if arr is None:
            continue
        head, data = _npy_parts(arr)
        if codec == "npy.gz":
            _member(f, f"{volume_id}.{name}.npy.gz", [gzip.compress(head + bytes(data), compresslevel=1, mtime=0)])
        else:
            _member(f, f"{volume_id}.{name}.npy", [head, data])
    _member(f, f"{volume_id}.meta.json", [json.dumps(meta, sort_keys=True).encode()])


def write_sample_fragment(
    ds: DatasetDir,
    volume_id: str,
    image: np.ndarray,
    meta: dict[str, Any],
    label: np.ndarray | None = None,
    codec: str = "npy",
) -> Path:
    """Encode one sample as a tar fragment in ``.pending/`` (complete or absent)."""
    ds.tmp.mkdir(parents=True, exist_ok=True)
    ds.pending.mkdir(parents=True, exist_ok=True)
    tmp = ds.tmp / f"fragment-{volume_id}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        _write_sample(f, volume_id, image, meta, label, codec)
        f.flush()
        os.fsync(f.fileno())
    final = ds.pending / f"{volume_id}.tar"
    os.replace(tmp, final)
    return final


class _HashingFile:
    """A file that hashes and counts what goes through it: the shard's sha256 costs no second read."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)


def read_index(ds: DatasetDir) -> dict[str, Any]:
    if ds.shard_index.exists():
        return json.loads(ds.shard_index.read_text())
    return {"format": INDEX_FORMAT, "samples": 0, "shards": []}


def sharded_ids(index: dict[str, Any]) -> set[str]:
    return {v for s in index["shards"] for v in s["volume_ids"]}


def shard_urls(ds: DatasetDir) -> list[str]:
    """Local paths of the recorded shards, in order (what webdataset takes)."""
    return [str(ds.shards / s["name"]) for s in read_index(ds)["shards"]]


class ShardWriter:
    """Appends samples to a shard until it reaches about ``target_bytes``, then seals it.

    Samples come either as finished fragments from worker processes
    (:meth:`add`) or as arrays from the process that writes the shard
    (:meth:`add_sample`, no intermediate file). A shard that is not sealed
    when the process dies is discarded; its volumes are recorded in the
    manifest but in no shard, and the next run shards them again.
    """

    def __init__(self, ds: DatasetDir, target_bytes: int = 1 << 30):
        self.ds = ds
        self.target = int(target_bytes)
        self.index = read_index(ds)
        self.done = sharded_ids(self.index)
        for stale in ds.tmp.glob("shard-*.partial") if ds.tmp.exists() else []:
            stale.unlink()
        self._out: _HashingFile | None = None
        self._ids: list[str] = []

    def _name(self) -> str:
        return f"shard-{len(self.index['shards']):06d}.tar"

    def _open(self) -> _HashingFile:
        if self._out is None:
            self.ds.tmp.mkdir(parents=True, exist_ok=True)
            self._partial = self.ds.tmp / (self._name() + ".partial")
            self._out = _HashingFile(self._partial)
        return self._out

    def wants(self, volume_id: str) -> bool:
        return volume_id not in self.done and volume_id not in self._ids

    def add(self, volume_id: str) -> None:
        """Append the pending fragment of ``volume_id``."""
        if not self.wants(volume_id):
            return
        out = self._open()
        with open(self.ds.pending / f"{volume_id}.tar", "rb") as src:
            while chunk := src.read(8 << 20):
                out.write(chunk)
        self._added(volume_id)

    def add_sample(self, volume_id: str, image: np.ndarray, meta: dict[str, Any], label: np.ndarray | None = None, codec: str = "npy") -> None:
        """Encode a sample straight into the open shard."""
        if not self.wants(volume_id):
            return
        _write_sample(self._open(), volume_id, image, meta, label, codec)
        self._added(volume_id)

    def _added(self, volume_id: str) -> None:
        self._ids.append(volume_id)
        if self._out is not None and self._out.size >= self.target:
            self.seal()

    def seal(self) -> None:
        out = self._out
        if out is None:
            return
        out.write(END_OF_ARCHIVE)
        out.f.flush()
        os.fsync(out.f.fileno())
        out.f.close()
        self._out = None
        name = self._name()
        self.ds.shards.mkdir(parents=True, exist_ok=True)
        os.replace(self._partial, self.ds.shards / name)
        self.index["shards"].append(
            {"name": name, "samples": len(self._ids), "bytes": out.size, "sha256": out.sha.hexdigest(), "volume_ids": self._ids}
        )
        self.index["samples"] = sum(s["samples"] for s in self.index["shards"])
        atomic_write_text(self.ds.shard_index, json.dumps(self.index, indent=1) + "\n")
        self.done.update(self._ids)
        for v in self._ids:
            (self.ds.pending / f"{v}.tar").unlink(missing_ok=True)
        self._ids = []

    def close(self) -> None:
        """Seal the last shard, then drop what no recorded shard needs."""
        self.seal()
        if not self.ds.shard_index.exists():
            atomic_write_text(self.ds.shard_index, json.dumps(self.index, indent=1) + "\n")
        recorded = {s["name"] for s in self.index["shards"]}
        for f in self.ds.shards.glob("shard-*.tar"):
            if f.name not in recorded:  # renamed by a run killed before it updated the index
                f.unlink()


def iter_members(path: Path) -> Iterator[tarfile.TarInfo]:
    with tarfile.open(path, mode="r|") as tf:
        yield from tf


def file_digest(path: Path) -> dict[str, Any]:
    """``bytes`` and ``sha256`` of a file, as the index records them."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def filter_shard(src: Path, dst: Path, keep: set[str]) -> dict[str, Any]:
    """Write ``dst`` with only the samples of ``keep`` from ``src``, their members' bytes as they were.

    Members are copied in pieces (a sample's image may be hundreds of MB);
    ``dst`` is sealed and fsynced. Returns its ``bytes`` and ``sha256``.
    """
    out = _HashingFile(dst)
    try:
        with open(src, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
            members = tf.getmembers()
            for i, m in enumerate(members):
                if m.name.split(".", 1)[0] not in keep:
                    continue
                end = members[i + 1].offset if i + 1 < len(members) else m.offset_data + m.size + (-m.size % BLOCK)
                raw.seek(m.offset)  # the member's header blocks (PAX included), data and padding, untouched
                left = end - m.offset
                while left:
                    chunk = raw.read(min(left, 8 << 20))
                    out.write(chunk)
                    left -= len(chunk)
        out.write(END_OF_ARCHIVE)
        out.f.flush()
        os.fsync(out.f.fileno())
    finally:
        out.f.close()
    return {"bytes": out.size, "sha256": out.sha.hexdigest()}


def verify_shards(ds: DatasetDir) -> list[str]:
    """Problems found by re-hashing every shard and counting its samples; empty if sound."""
    problems = []
    for s in read_index(ds)["shards"]:
        path = ds.shards / s["name"]
        if not path.exists():
            problems.append(f"{s['name']}: missing")
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        if h.hexdigest() != s["sha256"]:
            problems.append(f"{s['name']}: sha256 mismatch (file changed or corrupt)")
            continue
        try:
            keys = {m.name.split(".", 1)[0] for m in iter_members(path)}
        except tarfile.TarError as e:
            problems.append(f"{s['name']}: unreadable tar ({e})")
            continue
        if keys != set(s["volume_ids"]):
            problems.append(f"{s['name']}: holds {len(keys)} samples, index lists {len(s['volume_ids'])}")
    return problems
