"""A lean read path for crops: the store's chunks read with ``pread``, decoded once, cached.

zarr-python (even through the Rust ``zarrs`` pipeline) spends most of a 96^3
crop on per-call overhead and on decoding whole chunks it only needs a
corner of, and it keeps nothing between calls. Training cuts many crops out
of the same few volumes, so here each chunk is read with one ``pread`` (its
offset comes from the shard index at the end of the shard file), decoded by
numcodecs into a bounded LRU cache of decoded chunks, and a crop is a few
``memcpy`` of cached chunks. Measurements: ``docs/benchmarks.md``.

It reads the layouts :class:`~medssl_scale.store.volumes.ArrayStore` writes
(regular grid, optional ``sharding_indexed`` with the index at the end,
``bytes``, an optional blosc/zstd/gzip codec, then ``crc32c``), which are the
only ones :func:`~medssl_scale.store.integrity.read_meta` accepts.

Nothing is read that could not be verified (:mod:`medssl_scale.store.integrity`):
the metadata is checked (and its sha256) when a reader opens, every chunk's
crc32c before it is decoded, and each chunk file against the array's checksum
list when it is first opened (a listed file that is missing or has another
size is an error, never a box of fill values; a link or a FIFO is refused,
never waited on). A chunk never decodes to more than its shape holds.
Errors are :class:`VolumeError`, naming the file.
"""

from __future__ import annotations

import collections
import itertools
import os
import zlib
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr

from medssl_scale.store.integrity import VolumeError, check_stored_file, open_stored, read_meta

_EMPTY = 2**64 - 1  # offset and length of a chunk the shard does not hold
_CRC32C = numcodecs.CRC32C()


def open_checked(path: Path) -> zarr.Array:
    """zarr's own reader, through zarr's Python codec pipeline, which checks every chunk's crc32c.

    zarrs (0.2) skips the crc32c of chunks inside a shard (measured: a flipped
    byte reads back as a wrong voxel), so arrays are read through it only to write.
    """
    with zarr.config.set({"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline"}):
        return zarr.open_array(str(path), mode="r")


class ChunkCache:
    """Decoded chunks, bounded in bytes; the least recently used go first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: collections.OrderedDict[Any, np.ndarray] = collections.OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any) -> np.ndarray | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: Any, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def paths(self) -> set[Path]:
        """The arrays that have chunks in the cache."""
        return {k[0] for k in self._items}

    def drop(self, path: Path) -> None:
        """Forget the chunks of the array at ``path`` (keys are ``(path, grid)``)."""
        for key in [k for k in self._items if k[0] == path]:
            self.nbytes -= self._items.pop(key).nbytes


def _compressor(codecs: list[dict[str, Any]]) -> str | None:
    """The compressor of a checked ``[bytes, compressor?, crc32c]`` pipeline (read_meta allows no other)."""
    return codecs[1]["name"] if len(codecs) == 3 else None


def _inflate(name: str | None, data: bytes, nbytes: int) -> bytes | np.ndarray:
    """A chunk's bytes decompressed into at most ``nbytes`` (a crafted chunk is no decompression bomb)."""
    if name is None:
        return data
    if name == "gzip":
        d = zlib.decompressobj(wbits=47)  # gzip or zlib framing
        out = d.decompress(data, nbytes + 1)
        if len(out) > nbytes or not d.eof:
            raise ValueError(f"decompresses to more than the chunk's {nbytes} bytes, or not completely")
        return out
    if name == "blosc":
        # A Blosc frame states its decoded size in its 16-byte header (bytes 4-7, little-endian): one
        # that fills the chunk exactly can decode into an uninitialised buffer, and a short or long
        # one is refused before decoding.
        stated = int.from_bytes(bytes(data[4:8]), "little") if len(data) >= 16 else -1
        if stated != nbytes:
            raise ValueError(f"its Blosc header states {stated} decoded bytes, not the chunk's {nbytes}")
        return numcodecs.Blosc().decode(data, out=np.empty(nbytes, dtype=np.uint8))
    out = np.zeros(nbytes, dtype=np.uint8)  # zstd refuses a frame larger than the buffer it is given
    return numcodecs.Zstd().decode(data, out=out)


class VolumeReader:
    """Boxes of one Zarr v3 array, axes as stored (z, y, x), through a shared chunk cache."""

    def __init__(self, path: Path, cache: ChunkCache | None = None):
        self.path = Path(path)
        self.meta = read_meta(self.path)  # checked: shapes, codecs, checksum list, attributes
        self.shape: tuple[int, ...] = tuple(self.meta["shape"])
        self.cache = cache if cache is not None else ChunkCache(0)
        self.fill_value = self.meta.get("fill_value", 0)
        outer = tuple(self.meta["chunk_grid"]["configuration"]["chunk_shape"])
        self._sep = self.meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self._indexes: dict[tuple[int, ...], np.ndarray] = {}
        codecs = self.meta["codecs"]
        if codecs[0]["name"] == "sharding_indexed":
            conf = codecs[0]["configuration"]
            self.chunk = tuple(conf["chunk_shape"])
            self.shard: tuple[int, ...] | None = outer
            if any(s % c for s, c in zip(outer, self.chunk)):
                raise VolumeError(f"{self.path / 'zarr.json'}: shard shape {list(outer)} is not a multiple of the chunk shape")
            self._codec = _compressor(conf["codecs"])
        else:
            self.chunk, self.shard = outer, None
            self._codec = _compressor(codecs)
        self.dtype = np.dtype(self.meta["data_type"]).newbyteorder("<")  # read_meta allows little-endian only
        self._chunk_bytes = int(np.prod(self.chunk)) * self.dtype.itemsize

    # -- chunk access -------------------------------------------------------------
    def _key(self, grid: tuple[int, ...]) -> str:
        return "c" + self._sep + self._sep.join(map(str, grid))

    def _key_path(self, grid: tuple[int, ...]) -> Path:
        return self.path / self._key(grid)

    def _shard_index(self, shard: tuple[int, ...], fd: int, size: int) -> np.ndarray:
        index = self._indexes.get(shard)
        if index is None:
            assert self.shard is not None
            per = [s // c for s, c in zip(self.shard, self.chunk)]
            n = int(np.prod(per))
            if size < n * 16 + 4:
                raise VolumeError(f"{self._key_path(shard)}: {size} bytes, too short for its shard index")
            raw = os.pread(fd, n * 16 + 4, size - (n * 16 + 4))
            try:
                body = numcodecs.CRC32C().decode(raw)
            except (RuntimeError, ValueError) as e:
                raise VolumeError(f"{self._key_path(shard)}: corrupt shard index ({e})") from None
            index = np.frombuffer(body, dtype="<u8").reshape(*per, 2)
            self._indexes[shard] = index
        return index

    def _decode(self, data: bytes, where: Path) -> np.ndarray:
        try:
            data = _CRC32C.decode(data)
        except (RuntimeError, ValueError) as e:
            raise VolumeError(f"{where}: chunk checksum mismatch ({e})") from None
        try:
            data = _inflate(self._codec, data, self._chunk_bytes)
            return np.frombuffer(data, dtype=self.dtype, count=-1).reshape(self.chunk)
        except (RuntimeError, ValueError, SystemError, TypeError, zlib.error) as e:  # blosc raises SystemError on some bad headers
            raise VolumeError(f"{where}: corrupt chunk ({type(e).__name__}: {e})") from None

    def _load(self, grid: tuple[int, ...], fds: dict[Path, tuple[int, int]]) -> np.ndarray | None:
        """Decoded chunk ``grid`` (None where the store holds none: the fill value)."""
        if self.shard is None:
            file, inner = self._key_path(grid), None
        else:
            per = [s // c for s, c in zip(self.shard, self.chunk)]
            file = self._key_path(tuple(g // p for g, p in zip(grid, per)))
            inner = tuple(g % p for g, p in zip(grid, per))
        if file not in fds:
            key = file.relative_to(self.path).as_posix()
            try:
                fd = open_stored(self.path, key)  # no link, no FIFO
            except FileNotFoundError:
                check_stored_file(self.path, self.meta, key, None)  # raises where the file was written
                fds[file] = (-1, 0)
            else:
                fds[file] = (fd, os.fstat(fd).st_size)
                try:
                    check_stored_file(self.path, self.meta, key, fds[file][1])
                except VolumeError:
                    os.close(fd)
                    del fds[file]
                    raise
        fd, size = fds[file]
        if fd < 0:
            return None
        if inner is None:
            return self._decode(os.pread(fd, size, 0), file)
        index = self._shard_index(tuple(g // p for g, p in zip(grid, per)), fd, size)
        offset, nbytes = (int(v) for v in index[inner])
        if offset == _EMPTY and nbytes == _EMPTY:
            return None
        if offset + nbytes > size:
            raise VolumeError(f"{file}: the shard index points past the end of the file")
        return self._decode(os.pread(fd, nbytes, offset), file)

    # -- boxes --------------------------------------------------------------------
    def box(self, start: tuple[int, ...], size: tuple[int, ...], fill: float | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """The box ``[start, start + size)`` as a C-contiguous array; voxels outside the array get ``fill``.

        ``start`` may be negative and the box may run past the end: that is
        how crops larger than a volume are padded.
        """
        fill = self.fill_value if fill is None else fill
        if out is None:
            out = np.empty(tuple(size), dtype=self.dtype.newbyteorder("="))
        lo = [max(0, s) for s in start]
        hi = [min(n, s + k) for s, k, n in zip(start, size, self.shape)]
        if any(h <= l for l, h in zip(lo, hi)):
            out.fill(fill)
            return out
        if any(l > s for l, s in zip(lo, start)) or any(h < s + k for h, s, k in zip(hi, start, size)):
            out.fill(fill)
        ranges = [range(l // c, (h - 1) // c + 1) for l, h, c in zip(lo, hi, self.chunk)]
        fds: dict[Path, tuple[int, int]] = {}
        try:
            for grid in itertools.product(*ranges):
                key = (self.path, grid)
                chunk = self.cache.get(key)
                if chunk is None:
                    chunk = self._load(grid, fds)
                    if chunk is None:
                        chunk = np.full(self.chunk, self.fill_value, dtype=self.dtype)
                    self.cache.put(key, chunk)
                c0 = [g * c for g, c in zip(grid, self.chunk)]
                a = [max(l, o) for l, o in zip(lo, c0)]
                b = [min(h, o + c) for h, o, c in zip(hi, c0, self.chunk)]
                out[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, start))] = chunk[
                    tuple(slice(x - o, y - o) for x, y, o in zip(a, b, c0))
                ]
        finally:
            for fd, _ in fds.values():
                if fd >= 0:
                    os.close(fd)
        return out
