"""What every reader returns, and how it says no.

Readers turn one input item (a file, or the files of one DICOM series) into a
:class:`RawVolume`: the voxel array as the file lays it out plus the affine to
RAS+ millimetres. Canonical orientation, resampling, dtype policy and
de-identification happen later, once, for every format alike.

A reader never lets a library exception escape for a bad input: it raises
:class:`SkippedInput` (not something we ingest: 2D, localizer, 4D, not an
image) or :class:`FailedInput` (something we should have ingested but cannot:
truncated, inconsistent, unsupported), each with a reason a person can act
on. Reasons never contain header values: they may be identifying.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

MODALITIES = ("CT", "MR")


class InputError(Exception):
    """An input that does not become a volume; ``status`` goes to the manifest."""

    status: ClassVar[str] = "failed"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SkippedInput(InputError):
    status = "skipped"


class FailedInput(InputError):
    status = "failed"


@contextlib.contextmanager
def reader_errors(what: str) -> Iterator[None]:
    """Let InputError through; turn anything else a library raises into a FailedInput naming ``what``.

    A bad file must never crash the ingest, and a library's message may echo
    header text, so only the exception type is kept.
    """
    try:
        yield
    except InputError:
        raise
    except MemoryError as e:
        raise not_enough_memory("to hold the image the header declares") from e
    except Exception as e:
        raise FailedInput(f"unreadable {what} ({type(e).__name__})") from e


def not_enough_memory(detail: str) -> FailedInput:
    """The failure of an item that does not fit in a worker's memory (``detail`` says what did not fit)."""
    return FailedInput(f"not enough memory ({detail})")


# What one item costs a worker at its peak, per voxel of the volume, as
# measured through the whole worker path (bench/ingest_memory.py): up to
# three copies of the volume at 4 bytes per voxel (a scaled or float source,
# the float32 working copy, the stored copy). The up-front estimate uses it.
PEAK_BYTES_PER_VOXEL = 12


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError


@dataclasses.dataclass(frozen=True)
class Limits:
    """Guards against hostile headers; checked before any pixel is allocated.

    ``max_memory`` (bytes, None for no cap) bounds what one worker may hold:
    a volume whose estimated need (voxels x :data:`PEAK_BYTES_PER_VOXEL`) is
    over it is refused up front, and the worker process runs under that cap
    (see ``ingest.pool``), so what the estimate misses fails cleanly too.

    ``max_header_bytes`` bounds what a header costs before the first voxel:
    the decompressed header and extensions of a NIfTI file (so its vox_offset
    in a compressed file), and the inflated header of a deflated DICOM file.
    """

    max_voxels: int = 1_000_000_000
    max_memory: int | None = None
    max_header_bytes: int = 64 << 20

    def check_shape(self, shape: tuple[int, ...], what: str = "header", verb: str = "declares") -> None:
        n = 1
        for s in shape:
            if s < 0:
                raise FailedInput(f"{what} declares a negative dimension {tuple(shape)}")
            n *= int(s)
        dims = "x".join(str(int(s)) for s in shape)
        if n > self.max_voxels:
            raise FailedInput(
                f"{what} {verb} {dims} = {n:,} voxels, "
                f"over the per-volume cap of {self.max_voxels:,} (--max-voxels)"
            )
        need = n * PEAK_BYTES_PER_VOXEL
        if self.max_memory is not None and need > self.max_memory:
            raise not_enough_memory(
                f"{what} {verb} {dims} voxels, which need about {format_bytes(need)} in a worker, "
                f"over the cap of {format_bytes(self.max_memory)} (--max-worker-memory)"
            )


@dataclasses.dataclass
class RawVolume:
    """One 3D image as read, before canonicalisation.

    array:    3D voxel array, axes in the file's own voxel order (i, j, k).
    affine:   4x4 float64 mapping voxel (i, j, k) to RAS+ millimetres
              (nibabel's convention; DICOM/ITK LPS is converted by the reader).
    modality: "CT" or "MR" when the file says so, else None (inferred later).
    format:   short name of the source format ("nifti1", "dicom", "mha", ...).
    identity: raw patient/study/series identifiers, used only to derive keyed
              hashes; never stored or logged. Keys: "patient", "study", "series".
    meta:     whitelisted, non-identifying technical metadata (JSON-able).
    warnings: notes for the item's manifest record (a repaired header, a guessed
              encoding); never header values.
    duplicates: (dropped path, kept path) for input files left out as exact
              copies of another file of the item (DICOM instances).
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str | None
    format: str
    identity: dict[str, str] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    duplicates: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"RawVolume needs a 3D array, got shape {self.array.shape}")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES} or None, got {self.modality!r}")
