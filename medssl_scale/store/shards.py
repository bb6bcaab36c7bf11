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

Shards are read as untrusted input: ``read_index`` validates every field of
``index.json`` (names against the store's own patterns), and
``verified_samples`` hands out a sample only once each of its members has
matched the sha256 its writer put in the member's PAX header
(``MEDSSL.sha256``; stock tar readers and webdataset ignore the record), and
checks the whole shard against the index's sha256 and byte count before
handing out the shard's last sample. ``decode_sample`` then turns a verified
sample into arrays only if its ``meta.json`` passes the same attribute checks
as the Zarr store's (finite numbers, no NaN, a foreground map that fits) and
each ``.npy`` member's header agrees with meta's shape and dtype.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import tarfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medssl_scale.store import foreground
from medssl_scale.store.integrity import DTYPES, MAX_EXTENT, check_attrs
from medssl_scale.store.layout import (
    SHA256_HEX,
    SHARD_NAME,
    VOLUME_ID,
    DatasetDir,
    UnsafeFileError,
    atomic_write_text,
    open_dataset_file,
)

BLOCK = tarfile.BLOCKSIZE
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
INDEX_FORMAT = "medssl-shards/1"
SHARD_CODECS = ("npy", "npy.gz")
MEMBER_DIGEST = "MEDSSL.sha256"  # PAX record: sha256 of the member's data
MEMBER_SUFFIXES = ("image.npy", "image.npy.gz", "label.npy", "label.npy.gz", "meta.json")
MAX_NPY_HEADER = 65536  # numpy writes a few hundred bytes; more is not an npy file the store wrote


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
    digest = hashlib.sha256()
    for p in parts:
        digest.update(p)
    info.pax_headers = {MEMBER_DIGEST: digest.hexdigest()}
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


class ShardIndexError(ValueError):
    """shards/index.json is not one the store wrote: names the file and the field."""


class ShardError(ValueError):
    """A shard's bytes disagree with its index entry or its members' digests: names the shard and the member."""


class _ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=f"^{SHARD_NAME.pattern}$")
    samples: int = Field(ge=1)
    bytes: int = Field(gt=0)
    sha256: str = Field(pattern=f"^{SHA256_HEX.pattern}$")
    volume_ids: list[Annotated[str, Field(pattern=f"^{VOLUME_ID.pattern}$")]]

    @model_validator(mode="after")
    def _counts(self) -> _ShardEntry:
        if self.samples != len(self.volume_ids):
            raise ValueError(f"samples is {self.samples} but {len(self.volume_ids)} volume ids are listed")
        return self


class _ShardIndex(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["medssl-shards/1"]
    samples: int = Field(ge=0)
    shards: list[_ShardEntry]

    @model_validator(mode="after")
    def _consistent(self) -> _ShardIndex:
        if self.samples != sum(s.samples for s in self.shards):
            raise ValueError(f"samples is {self.samples} but the shards hold {sum(s.samples for s in self.shards)}")
        names: set[str] = set()
        owner: dict[str, str] = {}
        for s in self.shards:
            if s.name in names:
                raise ValueError(f"{s.name} is listed twice")
            names.add(s.name)
            for v in s.volume_ids:
                if v in owner:
                    raise ValueError(f"volume {v} is listed in {owner[v]} and in {s.name}")
                owner[v] = s.name
        return self


def check_index(data: bytes | str, where: str) -> dict[str, Any]:
    """A shard index's JSON text, validated whole (types, counts, names, digests); ShardIndexError naming ``where``."""
    try:
        return _ShardIndex.model_validate_json(data).model_dump()
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "top level"
        got = f" (got {str(err['input'])[:80]!r})" if isinstance(err.get("input"), (str, int, float)) else ""
        more = f" and {e.error_count() - 1} more problem(s)" if e.error_count() > 1 else ""
        raise ShardIndexError(f"{where}: {field}: {err['msg']}{got}{more}") from None


def read_index(ds: DatasetDir) -> dict[str, Any]:
    """``shards/index.json``, validated (an empty index when there is none)."""
    try:
        fd = open_dataset_file(ds.shard_index)  # a FIFO planted as the index is refused, not waited on
    except FileNotFoundError:
        return {"format": INDEX_FORMAT, "samples": 0, "shards": []}
    except UnsafeFileError as e:
        raise ShardIndexError(str(e)) from None
    with os.fdopen(fd, "rb") as f:
        return check_index(f.read(), str(ds.shard_index))


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


class _Counted:
    """A read-only stream that hashes and counts every byte taken from it, for the whole-shard check."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(8 << 20):
            pass


def _check_member(info: tarfile.TarInfo, entry: dict[str, Any], where: str) -> tuple[str, str, str]:
    """(key, suffix, expected sha256) of a member, or ShardError: only what the writer writes passes."""
    name = info.name
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):  # no links, devices, folders or sparse files
        raise ShardError(f"{where}: member {name!r} is not a regular file")
    key, _, suffix = name.partition(".")
    if suffix not in MEMBER_SUFFIXES or not VOLUME_ID.fullmatch(key):
        raise ShardError(f"{where}: member {name!r} is not a shard member name (<volume id>.{{{','.join(MEMBER_SUFFIXES)}}})")
    if key not in entry["_ids"]:
        raise ShardError(f"{where}: member {name!r} belongs to a volume shards/index.json does not list for this shard")
    if info.size > entry["bytes"]:
        raise ShardError(f"{where}: member {name!r} claims {info.size} bytes, more than the shard's {entry['bytes']}")
    digest = info.pax_headers.get(MEMBER_DIGEST, "")
    if len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise ShardError(f"{where}: member {name!r} carries no {MEMBER_DIGEST} digest "
                         "(written before members were checksummed, or altered): re-ingest to use it")
    return key, suffix, digest


def verified_samples(raw: BinaryIO, entry: dict[str, Any], where: str, read_size: int = 4 << 20) -> Iterator[dict[str, Any]]:
    """The samples of one shard (``{"__key__": volume_id, suffix: bytes}``) read from ``raw``, each verified first.

    A sample is yielded only once every member of it matched its own digest;
    the last one only once the whole stream matched the index entry's sha256
    and byte count and every listed volume was met, so added, dropped,
    reordered or rewritten members never reach the caller unnoticed. A
    ShardError names ``where`` (the shard) and the member.
    """
    entry = {**entry, "_ids": set(entry["volume_ids"])}
    stream = _Counted(raw)
    done: set[str] = set()
    sample: dict[str, Any] | None = None
    last = at = "none"
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=read_size) as tar:  # type: ignore[call-overload]
            for info in tar:
                key, suffix, digest = _check_member(info, entry, where)
                if sample is not None and sample["__key__"] != key:
                    done.add(sample["__key__"])
                    yield sample
                    sample = None
                if key in done:
                    raise ShardError(f"{where}: member {info.name!r} comes after its sample had ended")
                if sample is None:
                    sample = {"__key__": key}
                if suffix in sample:
                    raise ShardError(f"{where}: member {info.name!r} appears twice")
                at = f"member {info.name!r}"
                f = tar.extractfile(info)
                assert f is not None
                data = f.read()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise ShardError(f"{where}: member {info.name!r}: sha256 mismatch with its {MEMBER_DIGEST} (corrupt or altered)")
                sample[suffix] = data
                last = f"member {info.name!r}"
        stream.drain()  # tarfile stops at the end marker, or silently at a garbled header: the rest must be hashed too
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(f"{where}: unreadable tar at or after {at} ({e})") from e
    if stream.size != entry["bytes"] or stream.sha.hexdigest() != entry["sha256"]:
        raise ShardError(f"{where}: sha256 mismatch with shards/index.json ({stream.size} bytes read, "
                         f"{entry['bytes']} listed; last member read: {last}): corrupt or altered")
    if sample is not None:
        done.add(sample["__key__"])
    missing = entry["_ids"] - done
    if missing:
        raise ShardError(f"{where}: holds no member of volume {sorted(missing)[0]} that shards/index.json lists for it")
    if sample is not None:
        yield sample


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _npy(data: bytes, what: str, shape: list[int] | None, dtype: np.dtype | None) -> np.ndarray:
    """An .npy member as a read-only (x, y, z) array over the member's own bytes (np.load would copy it).

    Its header must give ``shape`` and ``dtype`` (where given: meta.json's) and
    its data exactly as many bytes as they need.
    """
    head = io.BytesIO(data[:MAX_NPY_HEADER])
    try:
        version = np.lib.format.read_magic(head)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got_shape, fortran, got_dtype = read_header(head)
    except (ValueError, TypeError, EOFError, SyntaxError) as e:
        raise ValueError(f"{what} has no readable npy header ({e})") from None
    if got_dtype.hasobject or got_dtype.name not in DTYPES or not got_dtype.isnative:
        raise ValueError(f"{what} holds {got_dtype.str}, not a voxel type the store writes")
    if len(got_shape) != 3:
        raise ValueError(f"{what} has {len(got_shape)} dimensions, not 3")
    if shape is not None and list(got_shape) != shape:
        raise ValueError(f"{what} is {list(got_shape)} but meta.json shape is {shape}")
    if dtype is not None and got_dtype != dtype:
        raise ValueError(f"{what} holds {got_dtype.name} but meta.json dtype is {dtype.name}")
    count = math.prod(got_shape)
    if len(data) - head.tell() != count * got_dtype.itemsize:
        raise ValueError(f"{what} holds {len(data) - head.tell()} data bytes, not the {count * got_dtype.itemsize} of its header")
    flat = np.frombuffer(data, dtype=got_dtype, count=count, offset=head.tell())
    return flat.reshape(got_shape, order="F" if fortran else "C")


def _gunzip(data: bytes, limit: int, what: str) -> bytes:
    """A gzip member's content, refused past ``limit`` bytes (a small member must not inflate to any size)."""
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise ValueError(f"{what} does not inflate ({e})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ValueError(f"{what} inflates to more than the {limit} bytes meta.json's shape allows")
    return out


def _meta(raw: bytes, key: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw, parse_constant=_refuse_constant)
    except ValueError as e:  # UnicodeDecodeError included
        raise ValueError(f"meta.json is not valid JSON ({e})") from None
    check_attrs(meta)
    if meta.get("volume_id", key) != key:
        raise ValueError(f"meta.json names volume {str(meta.get('volume_id'))[:40]!r}")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(n) is int and 1 <= n <= MAX_EXTENT for n in shape)):
        raise ValueError(f"meta.json shape {str(shape)[:40]} is not three sizes in [1, {MAX_EXTENT}]")
    if meta.get("dtype") not in DTYPES:
        raise ValueError(f"meta.json dtype {str(meta.get('dtype'))[:20]!r} is not one of {', '.join(DTYPES)}")
    if "foreground" in meta:
        fg = meta["foreground"]
        fits = [-(-n // fg["block"]) for n in shape]
        if fg["shape"] != fits:
            raise ValueError(f"meta.json foreground map is {fg['shape']}, not the {fits} blocks of shape {shape}")
        foreground.decode(fg)  # holds exactly its shape's bytes
    return meta


def _member_array(sample: dict[str, Any], name: str, shape: list[int], dtype: np.dtype | None) -> np.ndarray:
    if f"{name}.npy.gz" in sample:  # --shard-codec npy.gz
        if f"{name}.npy" in sample:
            raise ValueError(f"{name} is stored twice (npy and npy.gz)")
        itemsize = dtype.itemsize if dtype is not None else 8  # 8: the widest voxel type
        raw = _gunzip(sample[f"{name}.npy.gz"], math.prod(shape) * itemsize + MAX_NPY_HEADER, f"{name}.npy.gz")
        return _npy(raw, f"{name}.npy.gz", shape, dtype)
    return _npy(sample[f"{name}.npy"], f"{name}.npy", shape, dtype)


def decode_sample(sample: dict[str, Any], where: str) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None]:
    """(image, meta, label or None) of a verified sample, arrays as (z, y, x) views of the stored (x, y, z) ones.

    ``meta.json`` must be strict JSON (no NaN or Infinity) that passes
    :func:`~medssl_scale.store.integrity.check_attrs`, with shape and dtype;
    each array's npy header must agree with them (labels: shape, an integer
    type). ShardError names ``where`` (the shard) and the sample otherwise.
    """
    key = sample.get("__key__", "?")
    try:
        if "meta.json" not in sample:
            raise ValueError("no meta.json member")
        meta = _meta(sample["meta.json"], key)
        shape = meta["shape"]
        image = _member_array(sample, "image", shape, np.dtype(meta["dtype"]))
        label = None
        if "label.npy" in sample or "label.npy.gz" in sample:
            label = _member_array(sample, "label", shape, None)
            if label.dtype.kind not in "biu":
                raise ValueError(f"label holds {label.dtype.name}, not integers")
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{where}: sample {key}: {e}") from None
    if "image.npy" not in sample and "image.npy.gz" not in sample:
        raise ShardError(f"{where}: sample {key}: no image member")
    return image.transpose(2, 1, 0), meta, None if label is None else label.transpose(2, 1, 0)


def verify_shards(ds: DatasetDir) -> list[str]:
    """Problems found by reading every shard as the training stream does (member digests, sha256, samples); empty if sound."""
    problems = []
    for s in read_index(ds)["shards"]:
        path = ds.shards / s["name"]
        try:
            fd = open_dataset_file(path)  # no link, no FIFO to wait on
        except FileNotFoundError:
            problems.append(f"{s['name']}: missing")
            continue
        except UnsafeFileError as e:
            problems.append(str(e))
            continue
        try:
            with os.fdopen(fd, "rb") as f:
                for sample in verified_samples(f, s, s["name"]):
                    decode_sample(sample, s["name"])
        except ShardError as e:
            problems.append(str(e))
    return problems
