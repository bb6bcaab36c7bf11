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
        raise FailedInput("not enough memory to hold the image the header declares") from e
    except Exception as e:
        raise FailedInput(f"unreadable {what} ({type(e).__name__})") from e


@dataclasses.dataclass(frozen=True)
class Limits:
    """Guards against hostile headers; checked before any pixel is allocated."""

    max_voxels: int = 1_000_000_000

    def check_shape(self, shape: tuple[int, ...], what: str = "header") -> None:
        n = 1
        for s in shape:
            if s < 0:
                raise FailedInput(f"{what} declares a negative dimension {tuple(shape)}")
            n *= int(s)
        if n > self.max_voxels:
            raise FailedInput(
                f"{what} declares {'x'.join(str(int(s)) for s in shape)} = {n:,} voxels, "
                f"over the per-volume cap of {self.max_voxels:,} (--max-voxels)"
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
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str | None
    format: str
    identity: dict[str, str] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"RawVolume needs a 3D array, got shape {self.array.shape}")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES} or None, got {self.modality!r}")
