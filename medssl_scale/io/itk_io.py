"""NRRD (``.nrrd``, ``.nhdr`` + data) and MetaImage (``.mha``, ``.mhd`` + data)
through SimpleITK.

ITK works in LPS with arrays indexed (z, y, x); we return the array in the
file's (i, j, k) = (x, y, z) order and the affine in RAS+ mm.

Before ITK touches the voxel data we read the text header ourselves, to
(a) find detached data files (single names, LIST and printf patterns) and
refuse ones named outside the header's folder, resolving outside the source
root or not regular files, (b) refuse data-file references we cannot be sure
to read as ITK does (ITK opens them itself), and (c) compare the bytes the
header declares with the bytes on disk, so a truncated file fails with a
clear reason and a lying header never makes ITK allocate a huge buffer.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import functools

import numpy as np

from medssl_scale.io.containment import SourceRoot, header_root
from medssl_scale.io.types import (
    FailedInput,
    InputError,
    Limits,
    RawVolume,
    SkippedInput,
    reader_errors,
)

MAX_HEADER_BYTES = 1 << 20  # a real header is a few kB; more is hostile or not a header
MAX_DATA_FILES = 65_536

_IO_NAMES = {"nrrd": "NrrdImageIO", "metaimage": "MetaImageIO"}



@functools.cache
def _sitk():
    """SimpleITK, imported on the first NRRD or MetaImage read: a 50 MB package that nothing else needs."""
    import SimpleITK

    return SimpleITK


@functools.cache
def _pixel_types() -> tuple[dict[int, type], frozenset[int]]:
    """SimpleITK's scalar pixel ids -> numpy types, and its complex ids."""
    sitk = _sitk()
    scalars = {
        sitk.sitkUInt8: np.uint8, sitk.sitkInt8: np.int8,
        sitk.sitkUInt16: np.uint16, sitk.sitkInt16: np.int16,
        sitk.sitkUInt32: np.uint32, sitk.sitkInt32: np.int32,
        sitk.sitkUInt64: np.uint64, sitk.sitkInt64: np.int64,
        sitk.sitkFloat32: np.float32, sitk.sitkFloat64: np.float64,
    }
    return scalars, frozenset({sitk.sitkComplexFloat32, sitk.sitkComplexFloat64})

# MetaImage's Modality is a controlled vocabulary, not free text.
_MET_MODALITY = {"MET_MOD_CT": "CT", "MET_MOD_MR": "MR"}
_MET_MODALITY_NAMES = {"MET_MOD_CT", "MET_MOD_MR", "MET_MOD_NM", "MET_MOD_US", "MET_MOD_OTHER"}

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def itk_format(path: str | os.PathLike[str]) -> str:
    """``"nrrd"`` or ``"metaimage"`` by suffix."""
    return "nrrd" if str(path).lower().endswith((".nrrd", ".nhdr")) else "metaimage"


@dataclasses.dataclass
class TextHeader:
    fields: dict[str, str]  # field name (lower case) -> value; NRRD key:=value pairs left out
    length: int             # bytes before attached voxel data
    data_names: list[str]   # detached data files as written; [] when data is attached
    refusal: str | None = None  # why the data-file reference cannot be validated


def _expand_pattern(tokens: list[str]) -> list[str] | None:
    """``fmt min max step [...]`` (NRRD and MetaImage): ``img%03d.raw 1 40 1``."""
    if len(tokens) not in (4, 5) or not re.fullmatch(r"[^%]*%0?\d*d[^%]*", tokens[0]):
        return None
    try:
        lo, hi, step, *_subdim = (int(t) for t in tokens[1:])  # NRRD may add a slice dimension
    except ValueError:
        return None
    if step == 0 or (hi - lo) * step < 0 or abs(hi - lo) // abs(step) + 1 > MAX_DATA_FILES:
        return None
    return [tokens[0] % i for i in range(lo, hi + (1 if step > 0 else -1), step)]


_UNSURE = "the header's data file reference is not one we can validate ({}); refusing it"


def _data_names(value: str, rest: list[str], truncated: bool) -> tuple[list[str], str | None]:
    """(names, refusal). LIST: every later line names one file; a pattern expands;
    otherwise one name. Anything ITK might read another way is refused."""
    tokens = value.split()
    if tokens and tokens[0].upper() == "LIST":
        if tokens[0] != "LIST":
            return [], _UNSURE.format(f"{tokens[0]!r} instead of LIST")
        names = [line.strip() for line in rest if line.strip()]
        if truncated or len(names) > MAX_DATA_FILES:
            return [], _UNSURE.format("a LIST longer than we read")
        return names, None
    expanded = _expand_pattern(tokens)
    if expanded is not None:
        return expanded, None
    if "%" in value or len(tokens) != 1:
        return [], _UNSURE.format("a pattern we do not expand, or a name with spaces")
    return [value.strip()], None


def read_text_header(path: str | os.PathLike[str]) -> TextHeader:
    """Parse a NRRD or MetaImage header; FailedInput when it is not one."""
    kind = itk_format(path)
    try:
        with open(path, "rb") as f:
            buf = f.read(MAX_HEADER_BYTES)
    except OSError as e:
        raise FailedInput(f"cannot open the file: {e.strerror}") from e
    label = "NRRD" if kind == "nrrd" else "MetaImage"
    lines = buf.split(b"\n")
    text = [line.decode("latin-1").rstrip("\r") for line in lines]
    fields: dict[str, str] = {}
    pos = 0
    if kind == "nrrd":
        if not text[0].startswith("NRRD000"):
            raise FailedInput("unreadable or corrupt NRRD header: no NRRD magic at the start")
        detached: TextHeader | None = None  # fields may follow a single data file name: read on to the end
        for n, line in enumerate(text):
            pos += len(lines[n]) + 1
            if n == 0 or line.startswith("#") or ":=" in line.split(": ", 1)[0]:
                continue
            if line == "":
                return detached or TextHeader(fields, pos, [])
            key, sep, value = line.partition(": ")
            if not sep:
                raise FailedInput("unreadable or corrupt NRRD header: a line is not 'field: value'")
            key = key.strip().lower()  # NRRD field names match in any case
            if key in ("data file", "datafile"):
                if any(k in fields for k in ("data file", "datafile")):
                    return TextHeader(fields, pos, [], _UNSURE.format("two data file fields"))
                fields[key] = value.strip()
                if value.split()[:1] and value.split()[0].upper() == "LIST":
                    # LIST ends the header: every later line names one file.
                    names, refusal = _data_names(value, text[n + 1:], len(buf) >= MAX_HEADER_BYTES)
                    return TextHeader(fields, pos, names, refusal)
                detached = TextHeader(fields, pos, *_data_names(value, [], False))
                continue
            fields[key] = value.strip()
        if len(buf) < MAX_HEADER_BYTES:  # a .nhdr may end at EOF without a blank line
            return detached or TextHeader(fields, len(buf), [])
        if detached is not None:
            return TextHeader(fields, pos, [], _UNSURE.format("a header longer than we read"))
    else:
        for n, line in enumerate(text):
            pos += len(lines[n]) + 1
            key, sep, value = line.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", key.strip()):
                if line.strip():
                    raise FailedInput("unreadable or corrupt MetaImage header: a line is not 'Key = Value'")
                continue
            # MetaIO matches field names case-sensitively: "ELEMENTDATAFILE" is not the data
            # file field to ITK, which reads on to the real one. So do we.
            exact = key.strip()
            key = exact.lower()
            fields[key] = value.strip()
            if exact == "ElementDataFile":  # always the last field
                v = value.strip()
                if v.upper() == "LOCAL":
                    if os.path.lexists(Path(path).parent / v):  # ITK might read that file instead
                        return TextHeader(fields, pos, [], _UNSURE.format(f"a file named {v!r} lies beside the header"))
                    return TextHeader(fields, pos, [])
                return TextHeader(fields, pos, *_data_names(v, text[n + 1:], len(buf) >= MAX_HEADER_BYTES))
    raise FailedInput(f"unreadable or corrupt {label} header: it never ends (no data section found)")


def _inside(name: str) -> bool:
    norm = os.path.normpath(name)
    return bool(name) and "\0" not in name and not os.path.isabs(name) and not norm.startswith("..")


def data_files(path: str | os.PathLike[str]) -> list[Path]:
    """Detached data files of a NRRD/MetaImage header named inside its folder that
    exist as a name (links and special files included: the caller checks them)."""
    try:
        hdr = read_text_header(path)
    except InputError:
        return []
    base = Path(path).parent
    return [base / n for n in hdr.data_names if _inside(n) and os.path.lexists(base / n)]


def _checked_data_files(path: Path, hdr: TextHeader, root: SourceRoot) -> list[Path]:
    if hdr.refusal:
        raise FailedInput(hdr.refusal)
    out = []
    for name in hdr.data_names:
        if not _inside(name):
            raise FailedInput("the header names a data file outside its own folder; refusing to follow it")
        p = path.parent / name
        if not os.path.lexists(p):
            raise FailedInput("data file missing: the header names a data file that is not beside it")
        root.check(p, "its data file")
        out.append(p)
    return out


def _check_data_size(path: Path, hdr: TextHeader, files: list[Path], expected: int) -> None:
    """Fail before ITK allocates when the file cannot hold what the header says."""
    available = sum(p.stat().st_size for p in files) if files else path.stat().st_size - hdr.length
    f = hdr.fields
    if itk_format(path) == "nrrd":
        if f.get("encoding", "raw").lower() != "raw":
            return  # compressed or text: sizes only known after decoding
    elif f.get("compresseddata", "false").lower() == "true":
        declared = f.get("compresseddatasize", "")
        if declared.isdigit() and available < int(declared):
            raise FailedInput(
                f"truncated compressed data: the header declares {int(declared):,} compressed bytes, "
                f"the file holds {max(available, 0):,}"
            )
        return
    if available < expected:
        raise FailedInput(
            f"data shorter than the header declares: expected {expected:,} bytes of voxel data, "
            f"the file holds {max(available, 0):,}"
        )


def _read_error(message: str, fmt: str, compressed: bool) -> str:
    # Library messages carry paths and can echo header text: map them to our own words.
    m = re.search(r"expected (\d+) bytes but received (\d+)", message)
    if m:
        return (
            "truncated gzip stream: the file ends before the compressed data does "
            f"(decoded {int(m.group(2)):,} of {int(m.group(1)):,} bytes)"
        )
    m = re.search(r"got only (\d+) (\d+)-sized things, not (\d+)", message)
    if m:
        size = int(m.group(2))
        return (
            f"data shorter than the header declares: expected {int(m.group(3)) * size:,} bytes, "
            f"got {int(m.group(1)) * size:,}"
        )
    if "allocate" in message:
        return "not enough memory to hold the image the header declares"
    if compressed:
        return "compressed voxel data is truncated or corrupt"
    return f"voxel data unreadable or corrupt ({fmt})"


def _read(path: Path, limits: Limits, root: SourceRoot) -> RawVolume:
    fmt = itk_format(path)
    root.check(path)  # before the header is opened: a FIFO must not block us
    hdr = read_text_header(path)
    files = _checked_data_files(path, hdr, root)

    sitk = _sitk()
    scalars, complex_ids = _pixel_types()
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_IO_NAMES[fmt])  # never let ITK probe other formats on hostile input
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise FailedInput(f"unreadable or corrupt {'NRRD' if fmt == 'nrrd' else 'MetaImage'} header") from e

    size = tuple(int(s) for s in reader.GetSize())
    ncomp = int(reader.GetNumberOfComponents())
    shape_txt = "x".join(map(str, size))
    if len(size) < 3:
        raise SkippedInput(f"2D image ({shape_txt}): a single slice, not a volume")
    if len(size) > 3 and math.prod(size[3:]) > 1:
        raise SkippedInput(
            f"4D image with {math.prod(size[3:])} volumes ({shape_txt}): a time series or multi-volume file; "
            "split it into 3D volumes to ingest it"
        )
    if min(size[:3]) == 0:
        raise FailedInput(f"header declares an empty image ({shape_txt})")
    if min(size[:3]) == 1:
        raise SkippedInput(f"2D image ({shape_txt}): a single slice, not a volume")
    limits.check_shape(size[:3])  # after the 2D/4D verdicts, before anything is allocated
    pid = reader.GetPixelID()
    if pid in complex_ids:
        raise FailedInput(f"unsupported datatype ({sitk.GetPixelIDValueAsString(pid)}): only real scalars are read")
    if ncomp > 1:
        raise SkippedInput(f"multi-component image ({ncomp} values per voxel: RGB or vector), not a scalar volume")
    if pid not in scalars:
        raise FailedInput(f"unsupported datatype ({sitk.GetPixelIDValueAsString(pid)}): only real scalars are read")
    dtype = np.dtype(scalars[pid])
    _check_data_size(path, hdr, files, math.prod(size) * dtype.itemsize)

    nd = int(reader.GetDimension())
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(nd, nd)[:3, :3]
    spacing = np.asarray(reader.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(reader.GetOrigin(), dtype=np.float64)[:3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ (direction * spacing)
    affine[:3, 3] = _LPS_TO_RAS @ origin
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise FailedInput("header geometry is degenerate: spacing or direction is zero, singular or not finite")

    compressed = (
        hdr.fields.get("encoding", "raw").lower() not in ("raw", "ascii", "text", "txt", "hex")
        if fmt == "nrrd" else hdr.fields.get("compresseddata", "").lower() == "true"
    )
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise FailedInput(_read_error(str(e), fmt, compressed)) from e

    view = sitk.GetArrayViewFromImage(image)          # (z, y, x) or (1, z, y, x)
    view = view.reshape(view.shape[-3:])
    array = view.T.copy(order="F")                    # (x, y, z); a plain memcpy, no transposing copy
    del image, view

    modality = None
    meta: dict[str, object] = {"datatype": dtype.name}
    if fmt == "metaimage" and reader.HasMetaDataKey("Modality"):
        token = reader.GetMetaData("Modality").strip()
        modality = _MET_MODALITY.get(token)
        if token in _MET_MODALITY_NAMES:
            meta["file_modality"] = token.removeprefix("MET_MOD_")
    return RawVolume(array, affine, modality=modality, format=fmt, meta=meta)


def read_itk(path: str | os.PathLike[str], limits: Limits = Limits(), root: SourceRoot | None = None) -> RawVolume:
    """Read a NRRD or MetaImage volume; raises SkippedInput / FailedInput for
    anything that is not a readable 3D scalar volume.

    ``root``: where the header and its data files must resolve; by default the header's folder.
    """
    path = Path(path)
    with reader_errors(f"{itk_format(path)} file"):
        return _read(path, limits, root or header_root(path))
