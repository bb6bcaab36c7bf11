"""volumes.zarr / labels.zarr: one Zarr v3 array per volume id.

Arrays are chunked for random 3D crops (64^3 by default: a 96^3 crop touches
at most 27 chunks) and grouped into shards (256^3) so a 512x512x400 CT is a
dozen files rather than hundreds. Blosc-lz4 with byte shuffle is the default:
it decodes about 3x faster than Blosc-zstd (what random crops wait on) for
about 30% more disk; ``--codec zstd`` picks the smaller store
(docs/benchmarks.md has the figures).

Axis order on disk is (z, y, x), OME-Zarr's convention, with x varying
fastest: the same bytes as the canonical (x, y, z) RAS array in Fortran
order, so writing is a zero-copy ``.T`` (measured 3x faster than letting zarr
gather chunks out of a Fortran array). :class:`ArrayStore` hands arrays back
as (x, y, z) RAS views; attributes describe the (x, y, z) axes.

Each array is written complete into ``DATASET/.tmp``, sealed (every chunk
file's size and sha256 recorded in its attributes, see
:mod:`medssl_scale.store.integrity`) and renamed into the group, so readers
and a resumed ingest never see a partial volume. Every chunk ends in a
``crc32c``. Reads go through :class:`~medssl_scale.store.chunks.VolumeReader`,
which checks the metadata, that every recorded file is there with its size,
and each chunk's crc32c before decoding it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from medssl_scale.store.chunks import VolumeReader, open_checked
from medssl_scale.store.integrity import CHECKSUMS, VolumeError, read_meta, seal, verify_files
from medssl_scale.store.layout import DatasetDir, atomic_write_text, check_volume_id, publish_dir

_FAST_CODECS: bool | None = None


def use_fast_codecs() -> bool:
    """Route zarr's codecs through the Rust `zarrs` pipeline where installed.

    Measured here 2-3x faster than zarr's Python pipeline for both writes and
    crop reads (bench/ingest.py). It is zarr's own process-wide setting, so it
    is set once, by the store that owns the format.
    """
    global _FAST_CODECS
    if _FAST_CODECS is None:
        try:
            import zarrs  # noqa: F401

            zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
            _FAST_CODECS = True
        except ImportError:
            _FAST_CODECS = False
    return _FAST_CODECS


@dataclasses.dataclass(frozen=True)
class VolumeLayout:
    chunk: int = 64
    shard: int = 256  # 0: no sharding (one file per chunk)
    cname: str = "lz4"
    clevel: int = 5

    def chunks_for(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """Chunk and shard shapes for an array of ``shape`` (any axis order)."""
        chunks = tuple(min(self.chunk, s) for s in shape)
        if not self.shard:
            return chunks, None
        # Shards must be whole multiples of the chunk; no larger than the array needs.
        per = max(1, self.shard // self.chunk)
        shards = tuple(min(per, math.ceil(s / c)) * c for s, c in zip(shape, chunks))
        return chunks, shards

    def compressors(self) -> tuple[BloscCodec, Crc32cCodec]:
        # crc32c after the compressor: a changed byte fails the checksum before Blosc decodes garbage.
        return BloscCodec(cname=self.cname, clevel=self.clevel, shuffle=BloscShuffle.shuffle), Crc32cCodec()


class ArrayStore:
    """A Zarr v3 group of content-addressed arrays (volumes or labels)."""

    def __init__(self, path: Path, tmp: Path, layout: VolumeLayout | None = None):
        self.path = Path(path)
        self.tmp = Path(tmp)
        self.layout = layout or VolumeLayout()
        use_fast_codecs()

    def ensure(self) -> None:
        if not (self.path / "zarr.json").exists():
            # The group's metadata, written atomically: a torn one would never be repaired.
            atomic_write_text(self.path / "zarr.json", json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))

    def dir(self, volume_id: str) -> Path:
        """Where array ``volume_id`` lives; ValueError for anything but a volume id (ids become directory names)."""
        return self.path / check_volume_id(volume_id, str(self.path))

    def exists(self, volume_id: str) -> bool:
        return (self.dir(volume_id) / "zarr.json").exists()

    def write(self, volume_id: str, array: np.ndarray, attrs: dict[str, Any]) -> bool:
        """Write one (x, y, z) array under ``volume_id``; False if it was already there."""
        if self.exists(volume_id):
            return False
        self.ensure()
        self.tmp.mkdir(parents=True, exist_ok=True)
        staging = self.tmp / f"{self.path.stem}-{volume_id}-{uuid.uuid4().hex[:8]}"
        zyx = np.asfortranarray(array).T  # C-contiguous view, no copy
        chunks, shards = self.layout.chunks_for(zyx.shape)
        z = zarr.create_array(
            store=str(staging),
            shape=zyx.shape,
            dtype=zyx.dtype,
            chunks=chunks,
            shards=shards,
            compressors=self.layout.compressors(),
            fill_value=0,
            attributes=attrs,
            dimension_names=("z", "y", "x"),
            zarr_format=3,
        )
        z[...] = zyx
        seal(staging)
        return publish_dir(staging, self.dir(volume_id))

    def meta(self, volume_id: str) -> dict[str, Any]:
        """The array's checked ``zarr.json`` (KeyError if there is no such array)."""
        if not self.exists(volume_id):
            raise KeyError(f"no array {volume_id!r} in {self.path}")
        return read_meta(self.dir(volume_id))

    def open(self, volume_id: str) -> zarr.Array:
        """The Zarr array itself, axes (z, y, x), after checking that every recorded chunk file is there.

        Reads through it check each chunk's crc32c but raise zarr's errors, which name no file:
        :meth:`read` and :meth:`crop` do.
        """
        meta = self.meta(volume_id)
        problems = verify_files(self.dir(volume_id), meta, rehash=False)
        if problems:
            raise VolumeError(problems[0])
        return open_checked(self.dir(volume_id))

    def reader(self, volume_id: str) -> VolumeReader:
        """A verifying reader of boxes (axes z, y, x)."""
        if not self.exists(volume_id):
            raise KeyError(f"no array {volume_id!r} in {self.path}")
        return VolumeReader(self.dir(volume_id))

    def verify(self, volume_id: str, rehash: bool = True) -> list[str]:
        """Everything wrong with the stored array: metadata, missing or changed files (``rehash``: by sha256)."""
        try:
            meta = self.meta(volume_id)
        except VolumeError as e:
            return [str(e)]
        return verify_files(self.dir(volume_id), meta, rehash=rehash)

    def shape(self, volume_id: str) -> tuple[int, int, int]:
        """(x, y, z) shape."""
        return tuple(reversed(self.meta(volume_id)["shape"]))  # type: ignore[return-value]

    def read(self, volume_id: str) -> np.ndarray:
        """The whole volume as an (x, y, z) RAS array (a Fortran-ordered view)."""
        r = self.reader(volume_id)
        return r.box((0, 0, 0), r.shape).T

    def crop(self, volume_id: str, start: tuple[int, int, int], size: tuple[int, int, int]) -> np.ndarray:
        """An (x, y, z) box, reading only the chunks it touches (cut at the volume's end, like slicing)."""
        r = self.reader(volume_id)
        lo = [max(0, s) for s in reversed(start)]
        hi = [max(l, min(n, s + k)) for l, s, k, n in zip(lo, reversed(start), reversed(size), r.shape)]
        return r.box(tuple(lo), tuple(h - l for l, h in zip(lo, hi))).T

    def attrs(self, volume_id: str) -> dict[str, Any]:
        """The volume's attributes, checked (without the store's own checksum list)."""
        return {k: v for k, v in self.meta(volume_id).get("attributes", {}).items() if k != CHECKSUMS}

    def ids(self) -> list[str]:
        if not self.path.exists():
            return []
        return sorted(p.name for p in self.path.iterdir() if (p / "zarr.json").exists())

    def nbytes_stored(self, volume_id: str) -> int:
        return sum(f.stat().st_size for f in self.dir(volume_id).rglob("*") if f.is_file())


def volume_store(ds: DatasetDir, layout: VolumeLayout | None = None) -> ArrayStore:
    return ArrayStore(ds.volumes, ds.tmp, layout)


def label_store(ds: DatasetDir, layout: VolumeLayout | None = None) -> ArrayStore:
    return ArrayStore(ds.labels, ds.tmp, layout)
