"""Everything nibabel reads: NIfTI-1/2 (``.nii``, ``.nii.gz``, ``.hdr``/``.img``
pairs), Analyze, MGH/MGZ, MINC (MINC2 only with the optional h5py, and only
when its HDF5 names no other file), PAR/REC and AFNI BRIK/HEAD.

nibabel parses the header on load and touches voxels only when asked, so the
shape is checked against the limits and the file size against the header
before a byte of voxel data is read.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import re
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.filebasedimages import ImageFileError
from nibabel.minc1 import Minc1Image
from nibabel.openers import ImageOpener

from medssl_scale.io.containment import SourceRoot, header_root
from medssl_scale.io.types import (
    FailedInput,
    InputError,
    Limits,
    RawVolume,
    SkippedInput,
    not_enough_memory,
    reader_errors,
)

_FORMATS = {  # nibabel class name -> RawVolume.format
    "Nifti1Image": "nifti1", "Nifti2Image": "nifti2",
    "Nifti1Pair": "nifti1-pair", "Nifti2Pair": "nifti2-pair",
    "AnalyzeImage": "analyze", "Spm99AnalyzeImage": "analyze", "Spm2AnalyzeImage": "analyze",
    "MGHImage": "mgh", "Minc1Image": "minc1", "Minc2Image": "minc2",
    "PARRECImage": "parrec", "AFNIImage": "afni",
}
_COMPRESSED = (".gz", ".bz2", ".zst", ".mgz")
_UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}


def _gzip_problem(path: Path) -> FailedInput | None:
    """What nibabel reports as an unknown file type, when the cause is the gzip layer."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"\x1f\x8b":
        if path.name.lower().endswith((".gz", ".mgz")):
            return FailedInput("not a gzip stream although the name ends in .gz/.mgz")
        return None
    try:
        with gzip.open(path) as g:
            g.read(1 << 16)  # the header lies in the first bytes
    except EOFError:
        return FailedInput("truncated gzip stream: the file ends before the compressed data does")
    except (zlib.error, OSError):
        return FailedInput("corrupt gzip stream: the compressed data does not decode")
    if not path.name.lower().endswith((".gz", ".mgz")):
        return FailedInput("gzip-compressed data under a name without .gz: rename it (e.g. to .nii.gz)")
    return None


def _load(path: Path):
    try:
        return nib.load(path)
    except FileNotFoundError as e:
        raise FailedInput("data file missing: the header's companion data file is not beside it") from e
    except EOFError as e:
        raise FailedInput("truncated gzip stream: the file ends before the compressed data does") from e
    except ImportError as e:
        raise FailedInput(f"reading this file needs the optional package {e.name!r}, which is not installed") from e
    except ImageFileError as e:
        unknown = FailedInput("unreadable or corrupt header: not a format nibabel recognises")
        raise _gzip_problem(path) or unknown from e
    except zlib.error as e:
        raise FailedInput("corrupt gzip stream: the compressed data does not decode") from e
    except OSError as e:
        raise FailedInput(f"unreadable or corrupt file ({type(e).__name__})") from e
    except Exception as e:  # HeaderDataError, PARRECError, AFNIHeaderError, MincError, ...
        raise FailedInput(f"unreadable, corrupt or inconsistent header ({type(e).__name__})") from e


def _volume_shape(img, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The 3D shape, or the reason this is not one volume."""
    txt = "x".join(map(str, shape))
    if any(s < 0 for s in shape):
        raise FailedInput(f"header declares a negative dimension ({txt})")
    if len(shape) < 3:
        raise SkippedInput(f"2D image ({txt}): a single slice, not a volume")
    # MINC puts time/vector dimensions first; every other format puts them last.
    spatial, extra = (shape[-3:], shape[:-3]) if isinstance(img, Minc1Image) else (shape[:3], shape[3:])
    n_extra = math.prod(extra)  # exact: np.prod can overflow on a hostile header
    if n_extra > 1:
        if isinstance(img, nib.Nifti1Pair) and len(extra) >= 2 and extra[0] == 1:  # NIfTI .nii too
            # NIfTI dim 5 with dim 4 == 1: vector/tensor/displacement data per voxel.
            raise SkippedInput(f"multi-component image ({txt}: {n_extra} values per voxel), not a scalar volume")
        raise SkippedInput(
            f"4D image with {n_extra} volumes ({txt}): a time series or multi-volume file; "
            "split it into 3D volumes to ingest it"
        )
    if min(spatial) == 0:
        raise FailedInput(f"header declares an empty image ({txt})")
    if min(spatial) == 1:
        raise SkippedInput(f"2D image ({txt}): a single slice, not a volume")
    return int(spatial[0]), int(spatial[1]), int(spatial[2])


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.fields is not None:
        raise SkippedInput(f"RGB/multi-component image (datatype {dtype.names}), not a scalar volume")
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        name = dtype.newbyteorder("=").name
        raise FailedInput(f"unsupported datatype {name}: only real integer and float voxels are read")


def _check_file_size(proxy) -> None:
    """An uncompressed data file must hold offset + the declared voxels."""
    if not isinstance(proxy, ArrayProxy) or not isinstance(proxy.file_like, str):
        return
    fname = proxy.file_like
    if fname.lower().endswith(_COMPRESSED):
        return
    if not os.path.isfile(fname):
        raise FailedInput("data file missing: the header's companion data file is not beside it")
    expected = int(proxy.offset) + math.prod(int(n) for n in proxy.shape) * np.dtype(proxy.dtype).itemsize
    actual = os.path.getsize(fname)
    if actual < expected:
        raise FailedInput(
            f"data shorter than the header declares: expected {expected:,} bytes (header offset + voxels), "
            f"the file holds {actual:,}"
        )


def _affine(img) -> np.ndarray:
    affine = np.array(img.affine, dtype=np.float64)
    header = img.header
    if hasattr(header, "get_xyzt_units"):  # NIfTI may store metres or microns
        affine[:3, :] *= _UNIT_TO_MM.get(header.get_xyzt_units()[0], 1.0)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise FailedInput("header geometry is degenerate: voxel sizes or orientation zero, singular or not finite")
    return affine


def _native_copy(raw: np.ndarray) -> np.ndarray:
    # Own the memory (no memmap on the input file) in native byte order, one copy at most.
    native = raw.dtype.newbyteorder("=")
    if isinstance(raw, np.memmap) or raw.dtype != native:
        return np.array(raw, dtype=native, copy=True)
    return np.asarray(raw)


def _scaled(raw: np.ndarray, slope: float, inter: float) -> tuple[np.ndarray, bool]:
    """Apply NIfTI/Analyze/MGH scaling without float64 copies."""
    if slope == 1.0 and inter == 0.0:
        return raw, False
    if raw.dtype.kind in "iu" and slope.is_integer() and inter.is_integer() and raw.size:
        # e.g. CT stored as uint16 with inter = -1024: stay integer (int16 HU).
        lo, hi = float(raw.min()), float(raw.max())
        bounds = [lo, hi, lo * slope, hi * slope, lo * slope + inter, hi * slope + inter]
        for dt in (np.int16, np.int32):
            info = np.iinfo(dt)
            if info.min <= min(bounds) and max(bounds) <= info.max:
                out = raw if raw.dtype == dt and raw.flags.writeable else raw.astype(dt)  # ours: scale in place
                if slope != 1.0:
                    out *= dt(slope)
                out += dt(inter)
                return out, True
    out = raw.astype(np.float32)
    out *= np.float32(slope)
    out += np.float32(inter)
    return out, True


def _decompressed(proxy: ArrayProxy) -> np.ndarray:
    """The voxels of a compressed file, decoded piece by piece into one array.

    Python's gzip/bz2 ``readinto`` builds the whole decompressed payload as a
    bytes object first and then copies it: twice the volume at the peak.
    """
    arr = np.empty(proxy.shape, dtype=proxy.dtype, order=proxy.order)
    flat = memoryview(arr.T if proxy.order == "F" else arr).cast("B")  # the transpose of an F array is C-contiguous
    with ImageOpener(proxy.file_like) as f:
        f.seek(proxy.offset)
        pos = 0
        while pos < len(flat):
            n = f.readinto(flat[pos:pos + (8 << 20)])
            if not n:
                raise OSError(f"Expected {len(flat)} bytes, got {pos} bytes")  # _read_error's wording for short data
            pos += n
    return arr


def _read_voxels(img, disk_dtype: np.dtype) -> tuple[np.ndarray, bool]:
    proxy = img.dataobj
    if isinstance(proxy, ArrayProxy) and getattr(proxy, "scaling", None) is None:
        compressed = isinstance(proxy.file_like, str) and proxy.file_like.lower().endswith(_COMPRESSED)
        raw = _native_copy(_decompressed(proxy) if compressed else np.asarray(proxy.get_unscaled()))
        return _scaled(raw, float(proxy.slope), float(proxy.inter))
    # MINC, PAR/REC, scaled AFNI: nibabel applies per-slice/per-brick scaling itself.
    arr = np.asanyarray(proxy)
    scaled = arr.dtype != disk_dtype.newbyteorder("=")
    if arr.dtype == np.float64 and disk_dtype.kind != "f":
        arr = arr.astype(np.float32)
    return _native_copy(arr), scaled


def _read_error(e: Exception) -> FailedInput:
    if isinstance(e, EOFError):
        return FailedInput("truncated gzip stream: the file ends before the compressed data does")
    if isinstance(e, zlib.error | gzip.BadGzipFile):
        return FailedInput("corrupt gzip stream: the compressed data does not decode")
    m = re.search(r"Expected (\d+) bytes, got (\d+) bytes", str(e))
    if m:
        return FailedInput(
            f"data shorter than the header declares: expected {int(m.group(1)):,} bytes of voxel data, "
            f"got {int(m.group(2)):,}"
        )
    if isinstance(e, FileNotFoundError):
        return FailedInput("data file missing: the header's companion data file is not beside it")
    if isinstance(e, MemoryError):
        return not_enough_memory("to hold the image the header declares")
    return FailedInput(f"voxel data unreadable or corrupt ({type(e).__name__})")


def _check_file_map(img, root: SourceRoot) -> None:
    """Every file nibabel will open for the voxels (a pair's .img, a .REC, a .BRIK)
    resolves inside the source root and is a regular file."""
    for holder in img.file_map.values():
        # Absent ones (an Analyze .mat is optional) are left to nibabel, which reports a missing .img itself.
        if isinstance(holder.filename, str | os.PathLike) and os.path.lexists(holder.filename):
            root.check(holder.filename, "its data file")


MAX_SPM_MAT_BYTES = 16 << 10


def _spellings(name: str, stem: str) -> list[str]:
    """``name`` and its suffix (what follows ``stem``) in lower and upper case:
    on a case-insensitive file system any of them is the file nibabel opens."""
    folder, base = os.path.split(name)
    if not base.startswith(stem):
        return [name]
    tail = base[len(stem):]
    return list(dict.fromkeys(os.path.join(folder, stem + t) for t in (tail, tail.lower(), tail.upper())))


def _check_candidate_files(path: Path, root: SourceRoot) -> None:
    """Before ``nib.load``: every file that any image class could open for ``path``
    (an SPM Analyze header's ``.mat`` is read while loading, a pair's ``.img``
    after) resolves inside the source root and is a regular file, in any case
    spelling that exists. Loading picks the class by sniffing, so all are checked."""
    stem = nib.filename_parser.splitext_addext(path.name, (".gz", ".bz2", ".zst"))[0]
    for klass in nib.imageclasses.all_image_classes:
        try:
            file_map = klass.filespec_to_file_map(path)
        except Exception:  # not a name this class reads
            continue
        for key, holder in file_map.items():
            if not isinstance(holder.filename, str | os.PathLike):
                continue
            for name in _spellings(os.fspath(holder.filename), stem):
                if name != os.fspath(path) and os.path.lexists(name):
                    root.check(name, "its data file")
                    # nibabel reads and scipy inflates a whole .mat while loading: a small compressed one
                    # could fill memory. SPM writes two 4x4 matrices (a few hundred bytes).
                    if key == "mat" and os.path.getsize(name) > MAX_SPM_MAT_BYTES:
                        raise FailedInput(
                            f"its SPM .mat companion is larger than {MAX_SPM_MAT_BYTES:,} bytes "
                            "(it holds two 4x4 matrices); refusing to read it"
                        )


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _is_hdf5(path: Path) -> bool:
    """The HDF5 signature at 0 or at any power of two from 512 (where a user block ends)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        offset = 0
        while offset + len(_HDF5_SIGNATURE) <= size:
            f.seek(offset)
            if f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def _hdf5_storage_refusal(path: Path) -> str | None:
    """Why h5py would read bytes of other files for this HDF5 file, or None.

    HDF5 keeps a dataset's raw data in external files, maps virtual datasets
    onto other files, and follows external links: h5py honours all three,
    with paths the file itself names."""
    try:
        import h5py
    except ImportError:
        return "a MINC2 (HDF5) file: reading it needs the optional package h5py, which is not installed"
    found: list[str] = []

    def visit(name: str, link) -> None:
        if isinstance(link, h5py.ExternalLink):
            found.append("an external link to another file")
            return
        obj = f.get(name) if isinstance(link, h5py.HardLink) else None
        if isinstance(obj, h5py.Dataset):
            if obj.is_virtual:
                found.append("a virtual dataset (its data mapped from other files)")
            elif obj.external:
                found.append("a dataset stored in external files")

    try:
        with h5py.File(path, "r") as f:
            if not hasattr(f, "visititems_links"):
                return "a MINC2 (HDF5) file: the installed h5py is too old to check it for external storage"
            f.visititems_links(visit)
    except Exception as e:
        return f"a MINC2 (HDF5) file that h5py cannot read ({type(e).__name__})"
    if found:
        return f"a MINC2 (HDF5) file holding {found[0]}: refusing to read outside the file"
    return None


def _check_minc2(path: Path) -> None:
    """A MINC2 file is HDF5, which can make h5py read other files: only a self-contained one is read."""
    if not path.name.lower().endswith(".mnc") or not _is_hdf5(path):
        return  # MINC1 (netCDF) is read by nibabel's own parser, from the file alone
    reason = _hdf5_storage_refusal(path)
    if reason:
        raise FailedInput(reason)


_EXTENDER = 4  # the extension flag bytes every single-file NIfTI has after its header
# nibabel keeps each extension as an object: millions of tiny ones would cost far more than their bytes.
MAX_EXTENSIONS = 1024


class _NiftiHead(NamedTuple):
    size: int  # sizeof_hdr: 348 (NIfTI-1) or 540 (NIfTI-2)
    single: bool  # voxels in the same file (.nii), not a .hdr/.img pair
    offset: float  # vox_offset as declared
    extended: bool  # the extension flag says extensions follow the header
    order: str  # the header's byte order, "<" or ">"


def _nifti_header(path: Path) -> _NiftiHead | None:
    """The NIfTI-1/2 header's layout, or None when it is not one.

    Read from the first bytes alone (decompressed when the name says so), so it
    can be judged before nibabel reads the extensions up to the offset.
    """
    try:
        with ImageOpener(str(path)) as f:
            head = f.read(nib.nifti2.header_dtype.itemsize + _EXTENDER)
    except Exception:
        return None  # nibabel's load says what is wrong with it
    for dtype, magics in ((nib.nifti1.header_dtype, (b"n+1", b"ni1")), (nib.nifti2.header_dtype, (b"n+2", b"ni2"))):
        if len(head) < dtype.itemsize:
            continue
        for order in "<>":
            hdr = np.frombuffer(head[: dtype.itemsize], dtype=dtype.newbyteorder(order))[0]
            magic = bytes(hdr["magic"])[:3]
            if int(hdr["sizeof_hdr"]) == dtype.itemsize and magic in magics:
                flag = head[dtype.itemsize: dtype.itemsize + _EXTENDER]
                extended = len(flag) == _EXTENDER and flag[0] != 0  # nibabel's own test
                return _NiftiHead(dtype.itemsize, magic == magics[0], float(hdr["vox_offset"]), extended, order)
    return None


def _check_nifti_offset(path: Path, head: _NiftiHead, limits: Limits) -> None:
    """vox_offset must be a number inside the file, and cheap to reach in a compressed one."""
    offset = head.offset
    if not math.isfinite(offset) or offset < 0:
        raise FailedInput("header's vox_offset is negative or not a number")
    if not head.single:
        return  # the offset is into the .img: checked with its size after loading
    if path.name.lower().endswith(_COMPRESSED):
        if offset > limits.max_header_bytes:
            raise FailedInput(
                f"header's vox_offset ({offset:,.0f}) puts the voxels behind {offset:,.0f} bytes to decompress, "
                f"over the {limits.max_header_bytes:,} bytes allowed for header and extensions"
            )
    elif offset > (size := os.path.getsize(path)):
        raise FailedInput(f"header's vox_offset ({offset:,.0f}) lies beyond the end of the file ({size:,} bytes)")


def _check_nifti_extensions(path: Path, head: _NiftiHead, limits: Limits) -> None:
    """The extension chain nibabel will read into memory stays inside the header's room and the header cap.

    nibabel trusts each extension's declared size, and reads a pair's header,
    or a single file whose vox_offset lies inside its header, to the end of the
    (decompressed) file. The chain is walked here first without holding it.
    """
    if not head.extended:
        return
    start = head.size + _EXTENDER
    if head.single and head.offset < start:
        raise FailedInput(
            f"header's extension flag is set but its vox_offset ({head.offset:g}) leaves no room for extensions"
        )
    end = head.offset if head.single else None  # a pair's header holds extensions to its end
    try:
        _walk_extensions(path, head, start, end, limits)
    except (EOFError, zlib.error, OSError):
        return  # a cut or corrupt stream: nibabel stops at the same byte, and its load says why


def _walk_extensions(path: Path, head: _NiftiHead, start: int, end: float | None, limits: Limits) -> None:
    pos = start
    with ImageOpener(str(path)) as f:
        f.seek(pos)
        for n in range(1, MAX_EXTENSIONS + 2):
            if end is not None and end - pos < 16:  # where nibabel stops too
                return
            ext_def = f.read(8)
            if len(ext_def) < 8:
                return  # the end of a pair's header, or a cut one that nibabel reports
            if n > MAX_EXTENSIONS:
                raise FailedInput(f"header declares more than {MAX_EXTENSIONS:,} extensions")
            esize = int(np.frombuffer(ext_def[:4], dtype=f"{head.order}i4")[0])
            if esize < 8:  # nibabel would read a negative size as "to the end of the file"
                raise FailedInput(f"header extension {n} declares a size of {esize} bytes, less than its own 8")
            if end is not None and pos + esize > end:
                raise FailedInput(
                    f"header extension {n} ({esize:,} bytes) runs past the vox_offset ({end:,.0f}) into the voxels"
                )
            if pos + esize > limits.max_header_bytes:
                raise FailedInput(
                    f"header extension {n} ({esize:,} bytes) runs past the {limits.max_header_bytes:,} bytes "
                    "allowed for header and extensions"
                )
            pos += esize
            f.seek(pos)


def _check_compressed_offset(proxy, limits: Limits) -> None:
    """A compressed data file (a pair's .img.gz included) is decompressed up to the offset: bound it."""
    if not isinstance(proxy, ArrayProxy) or not isinstance(proxy.file_like, str):
        return
    if proxy.file_like.lower().endswith(_COMPRESSED) and int(proxy.offset) > limits.max_header_bytes:
        raise FailedInput(
            f"header's vox_offset ({int(proxy.offset):,}) puts the voxels behind {int(proxy.offset):,} bytes to "
            f"decompress, over the {limits.max_header_bytes:,} bytes allowed for header and extensions"
        )


def _stored_size(path: Path) -> int | None:
    """The bytes a single-file NIfTI holds once decompressed, modulo 2**32; None where that is unknown.

    A gzip file's trailer (ISIZE) says it without decompressing: exact below
    4 GiB for a one-member file, and what one writer produces.
    """
    name = path.name.lower()
    if not name.endswith(_COMPRESSED):
        return os.path.getsize(path) % (1 << 32)
    if not name.endswith(".gz") or os.path.getsize(path) < 18:  # a gzip member is at least 18 bytes
        return None
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


def _repair_data_offset(img, path: Path) -> tuple[object, list[str]]:
    """A single-file NIfTI whose vox_offset points into its own header is read from after the header.

    nifticlib raises such an offset to the header's size (348 for NIfTI-1) and
    reads the voxels from there, rather than header bytes as voxels. We do the
    same when the file's size (a .nii's size, a .nii.gz's gzip trailer) shows
    that the voxels follow the header at once; otherwise we read them from after
    the 4-byte extension flag, which the standard puts in every single file and
    which is where a writer that left vox_offset unset put them.
    """
    proxy = img.dataobj
    if not isinstance(img, nib.Nifti1Image) or not isinstance(proxy, ArrayProxy):
        return img, []
    header_size = int(img.header.sizeof_hdr)
    # The offset the file declares: a loaded header with extensions reports 0 (nibabel recomputes it on save).
    declared = int(proxy.offset)
    if declared >= header_size:
        return img, []
    offset = header_size + _EXTENDER
    data_bytes = math.prod(int(n) for n in proxy.shape) * np.dtype(proxy.dtype).itemsize
    if _stored_size(path) == (header_size + data_bytes) % (1 << 32):
        offset = header_size  # no extension flag in this file: the voxels follow the header at once
    fixed = ArrayProxy(proxy.file_like, (proxy.shape, proxy.dtype, offset, proxy.slope, proxy.inter), order=proxy.order)
    warning = (
        f"header's vox_offset {declared:g} lies inside the {header_size}-byte header of a single-file NIfTI: "
        f"voxels read from byte {offset}, where they start after the header"
    )
    return type(img)(fixed, img.affine, img.header), [warning]


def _unextended_header(path: Path, head: _NiftiHead):
    """The header alone, as nibabel parses it, with no extension read after it."""
    klass = nib.Nifti1Image if head.size == nib.nifti1.header_dtype.itemsize else nib.Nifti2Image
    with ImageOpener(str(path)) as f:
        raw = f.read(head.size)
    return klass, klass.header_class.from_fileobj(io.BytesIO(raw + b"\0" * _EXTENDER), check=False)


def _flag_is_a_voxel(path: Path, head: _NiftiHead) -> bool:
    """A single file whose vox_offset lies inside its header, with no extension flag at all:
    the file's size shows the voxels right after the header, so what reads as a set flag is
    the first voxel's bytes (nifticlib ignores extensions when the offset leaves no room)."""
    if not (head.single and head.extended and head.offset < head.size + _EXTENDER):
        return False
    _, hdr = _unextended_header(path, head)
    data_bytes = math.prod(int(n) for n in hdr.get_data_shape()) * hdr.get_data_dtype().itemsize
    return _stored_size(path) == (head.size + data_bytes) % (1 << 32)


def _load_without_extensions(path: Path, head: _NiftiHead) -> tuple[object, list[str]]:
    klass, hdr = _unextended_header(path, head)
    slope, inter = hdr.get_slope_inter()
    spec = (hdr.get_data_shape(), hdr.get_data_dtype(), head.size,
            1.0 if slope is None else slope, 0.0 if inter is None else inter)
    warning = (
        f"header's vox_offset {head.offset:g} lies inside the {head.size}-byte header of a single-file NIfTI: "
        f"voxels read from byte {head.size}, where they start after the header (no extension flag)"
    )
    return klass(ArrayProxy(str(path), spec), hdr.get_best_affine(), hdr), [warning]


def _read(path: Path, limits: Limits, root: SourceRoot) -> RawVolume:
    root.check(path)  # stat only: a FIFO is refused before nibabel opens it
    _check_candidate_files(path, root)
    _check_minc2(path)
    head = _nifti_header(path)
    early: list[str] = []
    if head is not None:
        _check_nifti_offset(path, head, limits)
    if head is not None and _flag_is_a_voxel(path, head):
        img, early = _load_without_extensions(path, head)
    else:
        if head is not None:
            _check_nifti_extensions(path, head, limits)
        img = _load(path)
    _check_file_map(img, root)
    fmt = _FORMATS.get(type(img).__name__)
    if fmt is None:
        raise SkippedInput(f"not a volume image ({type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    shape3 = _volume_shape(img, shape)  # a 2D/4D verdict comes first, whatever the size
    limits.check_shape(shape3)
    disk_dtype = np.dtype(img.get_data_dtype())
    _check_dtype(disk_dtype)
    img, notes = _repair_data_offset(img, path)
    notes = early + notes
    _check_file_size(img.dataobj)
    _check_compressed_offset(img.dataobj, limits)
    affine = _affine(img)
    try:
        array, scaled = _read_voxels(img, disk_dtype)
    except InputError:
        raise
    except Exception as e:
        raise _read_error(e) from e
    if array.dtype.kind not in "iuf":
        raise FailedInput(f"unsupported datatype {array.dtype.name}: only real integer and float voxels are read")

    meta: dict[str, object] = {"datatype": disk_dtype.newbyteorder("=").name, "scaled": scaled}
    if hasattr(img.header, "get_intent"):
        intent = img.header.get_intent()[0]  # a code's name, never the free-text intent_name
        if intent != "none":
            meta["intent"] = intent
    # PAR/REC only comes from Philips MR scanners; other formats do not say.
    modality = "MR" if fmt == "parrec" else None
    return RawVolume(array.reshape(shape3), affine, modality=modality, format=fmt, meta=meta, warnings=notes)


def read_nibabel(path: str | os.PathLike[str], limits: Limits = Limits(), root: SourceRoot | None = None) -> RawVolume:
    """Read one 3D volume with nibabel; SkippedInput / FailedInput otherwise.

    ``root``: where the file and its data files must resolve; by default the file's folder.
    """
    path = Path(path)
    # nibabel warns with header details; those must not reach logs.
    with reader_errors("file"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read(path, limits, root or header_root(path))
