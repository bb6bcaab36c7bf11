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
  another size, and ``medssl inspect`` re-hashes every file.

The array's ``zarr.json`` is untrusted input too (a dataset directory may
come from anywhere): :func:`read_meta` checks the metadata and the
attributes readers use before any value becomes a path, a shape or a loop
bound. Every failure is a :class:`VolumeError` naming the file and the cause.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from medssl_scale.store.layout import atomic_write_text, check_volume_id

CHECKSUMS = "checksums"  # the attribute; ArrayStore.attrs() leaves it out
_HASH_BLOCK = 1 << 22
_CHUNK_KEY = re.compile(r"c(/(0|[1-9][0-9]{0,8}))+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def seal(array_dir: Path) -> None:
    """Record every stored file's size and sha256 in the array's attributes (before it is published)."""
    root = Path(array_dir)
    meta = json.loads((root / "zarr.json").read_text())
    files = {key: {"bytes": (root / key).stat().st_size, "sha256": sha256_file(root / key)} for key in stored_files(root)}
    meta.setdefault("attributes", {})[CHECKSUMS] = {"algorithm": "sha256", "files": files}
    atomic_write_text(root / "zarr.json", json.dumps(meta, indent=2))


def read_meta(array_dir: Path) -> dict[str, Any]:
    """The array's ``zarr.json``, checked: a layout the store writes, checksums recorded, attributes well-formed."""
    path = Path(array_dir) / "zarr.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VolumeError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise VolumeError(f"{path}: unreadable array metadata ({e})") from None
    try:
        _check_meta(meta)
        check_attrs(meta.get("attributes", {}))
        _check_record(meta)
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
            size = f.stat().st_size
        except FileNotFoundError:
            problems.append(f"{f}: missing (listed in the array's checksums: it would read back as zeros)")
            continue
        if size != want["bytes"]:
            problems.append(f"{f}: {size} bytes, {want['bytes']} recorded at ingest")
        elif rehash and sha256_file(f) != want["sha256"]:
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


def decode_error(array_dir: Path, meta: dict[str, Any], cause: BaseException) -> VolumeError:
    """A decode failure inside zarr, named: the file whose bytes changed when one can be found."""
    bad = verify_files(array_dir, meta, rehash=True)
    where = bad[0] if bad else f"{array_dir}: {type(cause).__name__}: {cause}"
    return VolumeError(f"{where} (reading it failed: {cause})")


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


def _check_meta(meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise ValueError("not Zarr v3 array metadata")
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
    if not isinstance(fill, (int, float)) or not math.isfinite(fill):
        raise ValueError(f"fill_value {fill!r} is not a finite number")
    codecs = meta.get("codecs")
    if not isinstance(codecs, list) or not codecs or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in codecs):
        raise ValueError("codecs are not a list of codecs")
    inner = codecs
    if codecs[0]["name"] == "sharding_indexed":
        conf = codecs[0].get("configuration")
        if len(codecs) != 1 or not isinstance(conf, dict) or not isinstance(conf.get("codecs"), list):
            raise ValueError("sharding codec without its configuration")
        _ints(conf.get("chunk_shape"), 3, "inner chunk_shape")
        index = conf.get("index_codecs")
        if not isinstance(index, list) or [c.get("name") if isinstance(c, dict) else None for c in index][-1:] != ["crc32c"]:
            raise ValueError("the shard index carries no crc32c checksum")
        inner = conf["codecs"]
    if not inner or not isinstance(inner[-1], dict) or inner[-1].get("name") != "crc32c":
        raise ValueError("chunks carry no crc32c checksum (written before checksums: re-ingest the dataset into a new directory)")


def _check_record(meta: dict[str, Any]) -> None:
    rec = meta.get("attributes", {}).get(CHECKSUMS)
    if rec is None:
        raise ValueError("no checksums recorded (written before checksums: re-ingest the dataset into a new directory)")
    if not isinstance(rec, dict) or rec.get("algorithm") != "sha256" or not isinstance(rec.get("files"), dict):
        raise ValueError("malformed checksums attribute")
    for key, want in rec["files"].items():
        if not _CHUNK_KEY.fullmatch(key) or key.count("/") != 3:
            raise ValueError(f"checksums list {key!r}, which is not a chunk key of a 3D array")
        if (not isinstance(want, dict) or type(want.get("bytes")) is not int or want["bytes"] < 0
                or not isinstance(want.get("sha256"), str) or not _SHA256.fullmatch(want["sha256"])):
            raise ValueError(f"malformed checksum of {key!r}")


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
