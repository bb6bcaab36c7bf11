"""What a stored Zarr array must be before anything reads it: checksums, metadata, attributes.

Two layers of checksums, both written at ingest:

- every chunk ends in a ``crc32c`` (the Zarr v3 codec, after the compressor),
  so a flipped byte or a corrupt Blosc header is caught before Blosc decodes
  it, by zarr, zarrs and the lean reader in :mod:`medssl_scale.store.chunks`
  alike;
- the ``checksums`` attribute lists every stored chunk (or shard) file with
  its size and sha256, recorded in staging before the array is renamed into
  place. A deleted file would read back as the fill value, which no chunk
  checksum can notice: readers refuse a listed file that is missing or has
  another size, and ``medssl inspect`` re-hashes every file;
- the same record holds the sha256 of the array's own metadata (``zarr.json``
  without the record, as canonical JSON), checked whenever an array is
  opened: a changed ``data_type``, ``fill_value``, codec, spacing or origin
  would otherwise give wrong voxels or geometry that no chunk checksum sees.

These catch corruption and careless edits; they are not signatures (whoever
can write a dataset can recompute them).

The array's ``zarr.json`` is untrusted input too (a dataset directory may
come from anywhere): :func:`read_meta` checks the metadata and the
attributes readers use before any value becomes a path, a shape or a loop
bound, and allows only the codecs, with the configurations, that the store
writes (no codec a chunk could decompress without bound through). Files are
opened through :func:`~medssl_scale.store.layout.open_dataset_file`: never
through a link, never blocking on a FIFO. Every failure is a
:class:`VolumeError` naming the file and the cause.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from medssl_scale.store.layout import (
    SHA256_HEX,
    UnsafeFileError,
    atomic_write_text,
    check_volume_id,
    open_dataset_file,
    read_dataset_file,
)

CHECKSUMS = "checksums"  # the attribute; ArrayStore.attrs() leaves it out
_HASH_BLOCK = 1 << 22
_CHUNK_KEY = re.compile(r"c(/(0|[1-9][0-9]{0,8}))+")
MAX_META_BYTES = 64 << 20  # a zarr.json: its checksum list grows with the chunk count, never near this
DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64")
MAX_EXTENT = 1 << 20  # voxels along one axis: far beyond any scanner, small enough to loop over


class VolumeError(OSError):
    """A stored array that cannot be read as it was written (message: the file, then the cause)."""


def stored_files(array_dir: Path) -> list[str]:
    """Keys (``c/0/0/0``) of the chunk or shard files under ``array_dir``, sorted."""
    root = Path(array_dir)
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = (Path(dirpath) / n).relative_to(root).as_posix()
            if rel != "zarr.json":
                out.append(rel)
    return sorted(out)


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def open_stored(array_dir: Path, key: str) -> int:
    """A descriptor of the array's file ``key`` (FileNotFoundError if absent; links and special files refused)."""
    root = Path(array_dir)
    try:
        return open_dataset_file(root / key, below=root)
    except UnsafeFileError as e:
        raise VolumeError(str(e)) from None


def metadata_digest(meta: dict[str, Any]) -> str:
    """sha256 of the array's metadata without its checksum record, as canonical JSON (key order and spacing fixed)."""
    attrs = {k: v for k, v in (meta.get("attributes") or {}).items() if k != CHECKSUMS}
    body = {**meta, "attributes": attrs}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()).hexdigest()


def seal(array_dir: Path) -> None:
    """Record every stored file's size and sha256, and the metadata's, in the array's attributes (before it is published)."""
    root = Path(array_dir)
    meta = json.loads((root / "zarr.json").read_text())
    files = {}
    for key in stored_files(root):
        fd = open_stored(root, key)
        files[key] = {"bytes": os.fstat(fd).st_size, "sha256": _sha256_fd(fd)}
    meta.setdefault("attributes", {})[CHECKSUMS] = {"algorithm": "sha256", "files": files, "metadata": metadata_digest(meta)}
    atomic_write_text(root / "zarr.json", json.dumps(meta, indent=2))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice in one object")  # readers would disagree on which one counts
    return out


def read_meta(array_dir: Path) -> dict[str, Any]:
    """The array's ``zarr.json``, checked: a layout the store writes, checksums recorded, attributes well-formed, unchanged."""
    root = Path(array_dir)
    path = root / "zarr.json"
    try:
        meta = json.loads(read_dataset_file(path, MAX_META_BYTES, below=root).decode("utf-8"), object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise VolumeError(f"{path}: missing") from None
    except UnsafeFileError as e:
        raise VolumeError(str(e)) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nesting thousands deep
        raise VolumeError(f"{path}: unreadable array metadata ({type(e).__name__}: {e})") from None
    try:
        _check_meta(meta)
        check_attrs(meta.get("attributes", {}))
        _check_record(meta)
        if metadata_digest(meta) != meta["attributes"][CHECKSUMS]["metadata"]:
            raise ValueError("the array metadata differs from its sha256 recorded at ingest "
                             "(data type, fill value, codecs or attributes were changed)")
    except (ValueError, TypeError, KeyError) as e:
        raise VolumeError(f"{path}: {e}") from None
    return meta


def checksum_record(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """key -> {bytes, sha256} of a checked array's stored files."""
    return meta["attributes"][CHECKSUMS]["files"]


def verify_files(array_dir: Path, meta: dict[str, Any], rehash: bool = True) -> list[str]:
    """Problems with the stored files: missing, other size, unlisted, and (``rehash``) other content."""
    root = Path(array_dir)
    record = checksum_record(meta)
    problems = []
    for key, want in record.items():
        f = root / key
        try:
            fd = open_stored(root, key)
        except FileNotFoundError:
            problems.append(f"{f}: missing (listed in the array's checksums: it would read back as zeros)")
            continue
        except OSError as e:  # VolumeError names the file already
            problems.append(str(e) if isinstance(e, VolumeError) else f"{f}: unreadable ({e})")
            continue
        size = os.fstat(fd).st_size
        if size != want["bytes"]:
            os.close(fd)
            problems.append(f"{f}: {size} bytes, {want['bytes']} recorded at ingest")
        elif not rehash:
            os.close(fd)
        elif _sha256_fd(fd) != want["sha256"]:
            problems.append(f"{f}: content differs from its sha256 recorded at ingest")
    for key in stored_files(root):
        if key not in record:
            problems.append(f"{root / key}: not listed in the array's checksums")
    return problems


def check_stored_file(array_dir: Path, meta: dict[str, Any], key: str, size: int | None) -> bool:
    """Whether ``key`` should be there (listed), raising if what is there (``size``; None: absent) is not what was written."""
    want = checksum_record(meta).get(key)
    where = Path(array_dir) / key
    if want is None:
        if size is not None:
            raise VolumeError(f"{where}: not listed in the array's checksums")
        return False
    if size is None:
        raise VolumeError(f"{where}: missing (listed in the array's checksums: it would read back as zeros)")
    if size != want["bytes"]:
        raise VolumeError(f"{where}: {size} bytes, {want['bytes']} recorded at ingest")
    return True


# -- checks -------------------------------------------------------------------------


def _ints(value: Any, n: int, what: str, lo: int = 1, hi: int = MAX_EXTENT) -> list[int]:
    if not isinstance(value, list) or len(value) != n or not all(type(v) is int and lo <= v <= hi for v in value):
        raise ValueError(f"{what} must be {n} integers in [{lo}, {hi}], not {value!r}")
    return value


def _floats(value: Any, n: int, what: str, positive: bool = False) -> list[float]:
    ok = isinstance(value, list) and len(value) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive) for v in value
    )
    if not ok:
        raise ValueError(f"{what} must be {n} finite{' positive' if positive else ''} numbers, not {value!r}")
    return value


_META_KEYS = {"zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value",
              "codecs", "attributes", "dimension_names", "storage_transformers"}
_BLOSC_CNAMES = ("lz4", "zstd")  # ingest's --codec
_BLOSC_SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")


def _codec(c: Any, what: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(c, dict) or not isinstance(c.get("name"), str) or set(c) - {"name", "configuration"}:
        raise ValueError(f"{what}: {c!r} is not a codec")
    conf = c.get("configuration", {})
    if not isinstance(conf, dict):
        raise ValueError(f"{what}: codec {c['name']!r} has a configuration that is not an object")
    return c["name"], conf


def _small_int(conf: dict[str, Any], key: str, lo: int, hi: int, what: str) -> None:
    v = conf.get(key, lo)
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"{what}: {key} {v!r} is not in [{lo}, {hi}]")


def _check_compressor(name: str, conf: dict[str, Any], what: str) -> None:
    """The bytes-to-bytes codecs the store writes, each with only the settings it writes."""
    allowed = {"blosc": {"typesize", "cname", "clevel", "shuffle", "blocksize"}, "zstd": {"level", "checksum"}, "gzip": {"level"}}
    if name not in allowed:
        raise ValueError(f"{what}: codec {name!r} is not one the store writes (bytes, blosc, zstd, gzip, crc32c, sharding_indexed)")
    if set(conf) - allowed[name]:
        raise ValueError(f"{what}: {name} settings {sorted(set(conf) - allowed[name])} are not ones the store writes")
    if name == "blosc":
        if conf.get("cname", "lz4") not in _BLOSC_CNAMES or conf.get("shuffle", "shuffle") not in _BLOSC_SHUFFLES:
            raise ValueError(f"{what}: blosc {conf.get('cname')!r}/{conf.get('shuffle')!r} is not a compressor the store writes")
        _small_int(conf, "clevel", 0, 9, what)
        _small_int(conf, "typesize", 1, 8, what)
        _small_int(conf, "blocksize", 0, 1 << 30, what)
    elif name == "zstd":
        _small_int(conf, "level", -131072, 22, what)
        if not isinstance(conf.get("checksum", False), bool):
            raise ValueError(f"{what}: zstd checksum is not true or false")
    else:
        _small_int(conf, "level", 0, 9, what)


def _check_chunk_codecs(codecs: Any, what: str, compressed: bool = True) -> None:
    """``[bytes (little-endian), one compressor (optional), crc32c]``: the only pipeline the store writes."""
    if not isinstance(codecs, list) or not codecs:
        raise ValueError(f"{what} are not a list of codecs")
    named = [_codec(c, what) for c in codecs]
    if named[0][0] != "bytes":
        raise ValueError(f"{what}: codec {named[0][0]!r} first, where the store writes bytes (no array-to-array codecs)")
    if set(named[0][1]) - {"endian"} or named[0][1].get("endian", "little") != "little":
        raise ValueError(f"{what}: bytes codec {named[0][1]!r}, where the store writes little-endian")
    if named[-1][0] != "crc32c" or len(named) < 2:
        raise ValueError(f"{what}: chunks carry no crc32c checksum (written before checksums: re-ingest the dataset into a new directory)")
    if named[-1][1]:
        raise ValueError(f"{what}: crc32c with settings {named[-1][1]!r}")
    middle = named[1:-1]
    if len(middle) > (1 if compressed else 0):
        raise ValueError(f"{what}: {[n for n, _ in middle]} between bytes and crc32c, where the store writes at most one compressor")
    for name, conf in middle:
        _check_compressor(name, conf, what)


def _check_meta(meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise ValueError("not Zarr v3 array metadata")
    if set(meta) - _META_KEYS:
        raise ValueError(f"metadata fields {sorted(set(meta) - _META_KEYS)} are not ones the store writes")
    if meta.get("storage_transformers", []) != []:
        raise ValueError("storage transformers are not something the store writes")
    names = meta.get("dimension_names")
    if names is not None and (not isinstance(names, list) or len(names) != 3 or not all(n is None or isinstance(n, str) for n in names)):
        raise ValueError(f"dimension_names {names!r} are not three names")
    _ints(meta.get("shape"), 3, "shape")
    if meta.get("data_type") not in DTYPES:
        raise ValueError(f"data_type {meta.get('data_type')!r} is not one the store writes")
    grid = meta.get("chunk_grid")
    if not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(grid.get("configuration"), dict):
        raise ValueError("chunk_grid is not a regular grid")
    _ints(grid["configuration"].get("chunk_shape"), 3, "chunk_shape")
    enc = meta.get("chunk_key_encoding")
    if not isinstance(enc, dict) or enc.get("name") != "default" or (enc.get("configuration") or {}).get("separator", "/") != "/":
        raise ValueError("chunk_key_encoding is not the default one")
    fill = meta.get("fill_value")
    if not isinstance(fill, (int, float)) or isinstance(fill, bool) or not math.isfinite(fill):
        raise ValueError(f"fill_value {fill!r} is not a finite number")
    codecs = meta.get("codecs")
    if not isinstance(codecs, list) or not codecs:
        raise ValueError("codecs are not a list of codecs")
    name, conf = _codec(codecs[0], "codecs")
    if name != "sharding_indexed":
        _check_chunk_codecs(codecs, "codecs")
        return
    if len(codecs) != 1 or set(conf) != {"chunk_shape", "codecs", "index_codecs", "index_location"}:
        raise ValueError("sharding codec without exactly the configuration the store writes")
    _ints(conf.get("chunk_shape"), 3, "inner chunk_shape")
    if conf["index_location"] != "end":
        raise ValueError(f"shard index at {conf['index_location']!r}, where the store writes it at the end")
    try:
        _check_chunk_codecs(conf["index_codecs"], "shard index codecs", compressed=False)
    except ValueError as e:
        raise ValueError(f"{e} (the shard index carries no crc32c checksum)" if "crc32c" in str(e) else str(e)) from None
    _check_chunk_codecs(conf["codecs"], "codecs inside shards")


def _check_record(meta: dict[str, Any]) -> None:
    rec = meta.get("attributes", {}).get(CHECKSUMS)
    if rec is None:
        raise ValueError("no checksums recorded (written before checksums: re-ingest the dataset into a new directory)")
    if not isinstance(rec, dict) or rec.get("algorithm") != "sha256" or not isinstance(rec.get("files"), dict):
        raise ValueError("malformed checksums attribute")
    for key, want in rec["files"].items():
        if not _CHUNK_KEY.fullmatch(key) or key.count("/") != 3:
            raise ValueError(f"checksums list {key!r}, which is not a chunk key of a 3D array")
        # The store writes no empty file; a size of 0 would also match a FIFO or a device.
        if (not isinstance(want, dict) or type(want.get("bytes")) is not int or want["bytes"] < 1
                or not isinstance(want.get("sha256"), str) or not SHA256_HEX.fullmatch(want["sha256"])):
            raise ValueError(f"malformed checksum of {key!r}")
    if not isinstance(rec.get("metadata"), str) or not SHA256_HEX.fullmatch(rec["metadata"]):
        raise ValueError("no sha256 of the array metadata recorded (written before it was: re-ingest the dataset into a new directory)")


def check_attrs(attrs: Any) -> dict[str, Any]:
    """The attributes readers use, checked for type and shape (absent ones are fine; extra ones are left alone)."""
    if not isinstance(attrs, dict):
        raise ValueError("attributes are not an object")
    if "volume_id" in attrs:
        check_volume_id(attrs["volume_id"], "attribute volume_id")
    if "modality" in attrs and attrs["modality"] not in ("CT", "MR"):
        raise ValueError(f"modality {attrs['modality']!r} is neither CT nor MR")
    if "spacing" in attrs:
        _floats(attrs["spacing"], 3, "spacing", positive=True)
    if "origin" in attrs:
        _floats(attrs["origin"], 3, "origin")
    if "direction" in attrs:
        d = attrs["direction"]
        if not isinstance(d, list) or len(d) != 3:
            raise ValueError(f"direction must be a 3x3 matrix, not {d!r}")
        for row in d:
            _floats(row, 3, "direction rows")
    if "stats" in attrs:
        s = attrs["stats"]
        if not isinstance(s, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in s.values()):
            raise ValueError("stats must map names to finite numbers")
    if "foreground" in attrs:
        fg = attrs["foreground"]
        if not isinstance(fg, dict) or not isinstance(fg.get("zlib_b64"), str):
            raise ValueError("foreground must be {block, shape, zlib_b64}")
        _ints([fg.get("block")], 1, "foreground block")
        _ints(fg.get("shape"), 3, "foreground shape")
    if "classes" in attrs:
        c = attrs["classes"]
        if c is not None and (not isinstance(c, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in c.items())):
            raise ValueError("classes must map label values to names")
    return attrs
