"""Dispatch for single-file image formats (everything except DICOM series).

``image_format`` says by suffix which reader handles a path; ``companions``
lists the data files that belong to a header file (so discovery counts them
as part of one item, hashes them with it, and refuses the item when one of
them resolves outside its source root or is not a regular file);
``read_image_file`` reads, checking every file it opens against that root.

Format names (what ``image_format`` returns) and their readers:

=============  ===========================================  ==============
format         suffixes (case-insensitive)                  reader
=============  ===========================================  ==============
``nifti``      ``.nii``, ``.nii.gz``                        nibabel
``analyze``    ``.hdr`` (+ ``.img``, SPM ``.mat``)          nibabel
``mgh``        ``.mgh``, ``.mgz``                           nibabel
``minc``       ``.mnc``                                     nibabel
``parrec``     ``.par`` (+ ``.rec``)                        nibabel
``afni``       ``.head`` (+ ``.brik``, ``.brik.gz``)        nibabel
``nrrd``       ``.nrrd``, ``.nhdr`` (+ its data file)       SimpleITK
``metaimage``  ``.mha``, ``.mhd`` (+ its data file)         SimpleITK
=============  ===========================================  ==============
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from medssl_scale.io import itk_io, nibabel_io
from medssl_scale.io.containment import SourceRoot, header_root
from medssl_scale.io.types import FailedInput, Limits, RawVolume, SkippedInput

_SUFFIX_FORMAT = {
    ".nii.gz": "nifti", ".nii": "nifti",
    ".hdr": "analyze",
    ".mgh": "mgh", ".mgz": "mgh",
    ".mnc": "minc",
    ".par": "parrec",
    ".head": "afni",
    ".nrrd": "nrrd", ".nhdr": "nrrd",
    ".mha": "metaimage", ".mhd": "metaimage",
}
READERS: dict[str, Callable[[Path, Limits, SourceRoot], RawVolume]] = {
    **{f: nibabel_io.read_nibabel for f in ("nifti", "analyze", "mgh", "minc", "parrec", "afni")},
    "nrrd": itk_io.read_itk,
    "metaimage": itk_io.read_itk,
}
# Suffixes that only ever hold the voxels of a header file above.
_COMPANION_SUFFIXES = (".img", ".img.gz", ".rec", ".brik", ".brik.gz", ".raw", ".raw.gz", ".zraw")
# Header suffix -> files beside it under the same stem that its reader opens
# (nibabel reads an SPM Analyze header's orientation from a .mat beside it).
_SIBLING_DATA = {".hdr": (".img", ".mat"), ".par": (".rec",), ".head": (".brik", ".brik.gz")}
# Companions that are not voxel data: on their own they are just some other file.
_SIDECAR_SUFFIXES = (".mat",)


def _suffix(path: str | os.PathLike[str], suffixes) -> str | None:
    name = Path(path).name.lower()
    for s in sorted(suffixes, key=len, reverse=True):  # ".nii.gz" before ".gz"-less ".nii"
        if name.endswith(s) and len(name) > len(s):
            return s
    return None


def image_format(path: str | os.PathLike[str]) -> str | None:
    """Format name for a path by its suffix (see the module table), or None."""
    s = _suffix(path, _SUFFIX_FORMAT)
    return _SUFFIX_FORMAT[s] if s else None


def is_companion_suffix(path: str | os.PathLike[str]) -> bool:
    """True for suffixes that hold only voxel data of a header file
    (``.img``, ``.rec``, ``.brik[.gz]``, ``.raw[.gz]``, ``.zraw``)."""
    return _suffix(path, _COMPANION_SUFFIXES) is not None


def is_sidecar_suffix(path: str | os.PathLike[str]) -> bool:
    """True for files a header's reader may open beside it that hold no voxels (an SPM ``.mat``)."""
    return _suffix(path, _SIDECAR_SUFFIXES) is not None


def _case_variants(suffix: str, like: str) -> list[str]:
    # Match the header's case first (scan.HDR -> scan.IMG), then the other forms.
    first = suffix.upper() if like.isupper() else suffix
    return list(dict.fromkeys([first, suffix, suffix.upper(), suffix.replace(".brik", ".BRIK")]))


def companions(path: str | os.PathLike[str]) -> list[Path]:
    """Files that belong to the header file ``path`` and exist as a name
    (a link or special file included, so that a caller can refuse it).

    ``.img`` and SPM's ``.mat`` beside ``.hdr``, ``.rec`` beside ``.par``,
    ``.brik[.gz]`` beside ``.head`` (any case), and the detached data files a NRRD/MetaImage header
    names (only names inside the header's folder). Empty for single-file
    formats, unreadable headers and non-image paths; never raises.
    """
    path = Path(path)
    fmt = image_format(path)
    found: list[Path] = []
    if fmt in ("nrrd", "metaimage"):
        found = itk_io.data_files(path)
    else:
        s = _suffix(path, _SIBLING_DATA)
        if s is not None:
            stem = path.name[: -len(s)]
            like = path.name[-len(s):]
            for data_suffix in _SIBLING_DATA[s]:
                for variant in _case_variants(data_suffix, like):
                    p = path.with_name(stem + variant)
                    if os.path.lexists(p):
                        found.append(p)
                        break
    unique: dict[str, Path] = {}
    for p in found:  # case-insensitive file systems find one file under several spellings
        unique.setdefault(os.path.realpath(p), p)
    return list(unique.values())


def read_image_file(path: str | os.PathLike[str], limits: Limits = Limits(), root: SourceRoot | None = None) -> RawVolume:
    """Read one single-file (or header + data) image; SkippedInput/FailedInput otherwise.

    ``root``: where every file opened for it must resolve (discovery's source
    root); by default the header's own folder.
    """
    path = Path(path)
    fmt = image_format(path)
    if fmt is None:
        if is_companion_suffix(path):
            raise SkippedInput("voxel data file of a header + data pair: it is read through its header")
        raise SkippedInput("not an image format we read (unknown suffix)")
    if not path.is_file():
        raise FailedInput("file not found or not a regular file")
    root = root or header_root(path)
    root.check(path)
    comp = companions(path)
    for c in comp:  # before the reader: nibabel opens a pair's .img by itself
        root.check(c, "its data file")
    raw = READERS[fmt](path, limits, root)
    note = root.hard_link_warning([path, *comp])
    if note:
        raw.warnings.append(note)
    return raw
