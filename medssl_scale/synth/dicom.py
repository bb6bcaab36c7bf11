"""Synthetic DICOM series that look like what hospitals export.

:func:`write_series` turns a voxel array and its RAS affine into a series of
CT/MR Image Storage files (or one Enhanced CT/MR multi-frame object) whose
geometry reproduces that affine exactly, oblique ones included. File names and
InstanceNumbers are scrambled by default, so a reader that sorts by either
gets the volume wrong. Every identifying field is filled (with the caller's
marker strings, if given) so de-identification can be tested end to end.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from medssl_scale.io.dicom import quiet_pydicom

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["DEFAULT_IDENTIFIERS", "PRIVATE_CREATOR", "available_transfer_syntaxes", "write_series"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

PRIVATE_CREATOR = "MEDSSL SYNTH"
PRIVATE_GROUP = 0x0011

# Keys of `identifiers`: DICOM keywords, plus "PrivateText" for the free text
# written into a private tag block (group 0011, creator PRIVATE_CREATOR).
DEFAULT_IDENTIFIERS: dict[str, str] = {
    "PatientName": "SYNTHETIC^PATIENT",
    "PatientID": "SYNTH-0001",
    "PatientBirthDate": "19700101",
    "PatientAddress": "1 Synthetic Street, Nowhere",
    "OtherPatientIDs": "SYNTH-ALT-0001",
    "AccessionNumber": "ACC0001",
    "InstitutionName": "Synthetic General Hospital",
    "InstitutionAddress": "2 Hospital Road, Nowhere",
    "ReferringPhysicianName": "REFERRING^DOCTOR",
    "PerformingPhysicianName": "PERFORMING^DOCTOR",
    "OperatorsName": "OPERATOR^TECH",
    "StudyDescription": "Synthetic study",
    "SeriesDescription": "Synthetic series",
    "ImageComments": "Synthetic image comment",
    "StudyID": "STUDY1",
    "PrivateText": "Synthetic private free text",
}


def available_transfer_syntaxes() -> dict[str, bool]:
    """Which lossless compressed transfer syntaxes pydicom can encode here (by UID).

    RLE is native to pydicom; JPEG 2000 needs pylibjpeg-openjpeg; JPEG-LS
    needs pyjpegls (not a dependency, so usually False).
    """
    out = {}
    for uid in (RLELossless, JPEG2000Lossless, JPEGLSLossless):
        try:
            out[uid] = get_encoder(uid).is_available
        except NotImplementedError:
            out[uid] = False
    return out


def _quietly(fn: Callable[P, R]) -> Callable[P, R]:
    # Planted markers are rarely valid VR values (a name in a date field);
    # pydicom writes them in its default WARN mode, and its warnings would
    # echo them, so keep it quiet.
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with quiet_pydicom():
            return fn(*args, **kwargs)

    return wrapper


@_quietly
def write_series(
    out_dir: str | os.PathLike[str],
    volume: np.ndarray,
    affine_ras: np.ndarray,
    *,
    modality: str = "CT",
    identifiers: dict[str, str] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    enhanced: bool = False,
    rescale: tuple[float, float] | Sequence[tuple[float, float]] | None = (1.0, -1024.0),
    shuffle: bool = True,
    seed: int = 0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    file_prefix: str = "IM",
    file_meta: bool = True,
) -> list[Path]:
    """Write ``volume[i, j, k]`` with ``affine_ras`` as a DICOM series; return the paths.

    Voxel (i, j, k) goes to column i, row j of slice k. ``identifiers``
    overrides DEFAULT_IDENTIFIERS (keys are DICOM keywords, plus "PrivateText"
    for a private tag); every file carries all of them. ``enhanced`` writes one
    Enhanced CT/MR multi-frame object instead of one file per slice.
    ``rescale`` is (slope, intercept), or one pair per slice k (slices may
    differ, as on some scanners), or None for no Modality LUT tags. Stored
    values are ``round((volume - intercept) / slope)``, so pick a rescale the
    volume survives. Paths are returned in spatial (k) order. ``file_meta=False``
    writes legacy files: no preamble, no file meta, implicit VR little endian
    (``transfer_syntax`` is then ignored).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D, got shape {volume.shape}")
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be CT or MR, got {modality!r}")
    nx, ny, nz = volume.shape
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = {**DEFAULT_IDENTIFIERS, **(identifiers or {})}

    iop, pixel_spacing, positions, thickness = _geometry(np.asarray(affine_ras, dtype=np.float64), nz)
    pairs = _rescale_pairs(rescale, nz)
    stored = np.stack(
        [_to_stored(volume[:, :, k].T, pairs[k]) for k in range(nz)]
    )  # (k, rows=j, cols=i)
    lo, hi = int(stored.min()), int(stored.max())
    signed = lo < 0
    if hi > (32767 if signed else 65535) or lo < -32768:
        raise ValueError("volume does not fit 16-bit stored values with this rescale")
    stored = stored.astype(np.int16 if signed else np.uint16)

    entropy = [str(seed), file_prefix, modality, "enhanced" if enhanced else "classic"]
    study_uid = study_uid or generate_uid(entropy_srcs=[*entropy, "study"])
    series_uid = series_uid or generate_uid(entropy_srcs=[*entropy, "series"])
    frame_of_ref = generate_uid(entropy_srcs=[*entropy, "for"])

    base = _base_dataset(ids, modality, study_uid, series_uid, frame_of_ref)
    base.Rows, base.Columns = ny, nx
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.BitsAllocated = 16
    # Like scanners, store 12 bits when the values fit (readers must honour BitsStored).
    needed = max(hi.bit_length(), (-lo - 1).bit_length()) + int(signed)
    base.BitsStored = max(12, needed)
    base.HighBit = base.BitsStored - 1
    base.PixelRepresentation = 1 if signed else 0
    base.SliceThickness = _ds(thickness)

    if enhanced:
        order = _scramble(nz, rng) if shuffle else np.arange(nz)
        ds = _enhanced(base, modality, iop, pixel_spacing, positions, pairs, thickness, order)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[*entropy, "sop"])
        name = f"{file_prefix}_{rng.integers(16**8):08x}.dcm" if shuffle else f"{file_prefix}0001.dcm"
        path = out / name
        _save(ds, stored[order], transfer_syntax, path, file_meta)
        return [path]

    names = _names(nz, rng, file_prefix, shuffle)
    instance = (_scramble(nz, rng) if shuffle else np.arange(nz)) + 1
    paths = []
    for k in range(nz):
        ds = base.copy()
        ds.SOPClassUID = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[*entropy, "sop", str(k)])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = int(instance[k])
        ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in iop]
        ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
        ds.SliceLocation = _ds(positions[k] @ np.cross(iop[:3], iop[3:]))
        if pairs[k] is not None:
            ds.RescaleSlope, ds.RescaleIntercept = _ds(pairs[k][0]), _ds(pairs[k][1])
            ds.RescaleType = "HU" if modality == "CT" else "US"
        path = out / names[k]
        _save(ds, stored[k], transfer_syntax, path, file_meta)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- geometry


def _geometry(affine_ras: np.ndarray, nz: int) -> tuple[np.ndarray, list[float], np.ndarray, float]:
    """IOP, PixelSpacing, per-slice IPP and slice spacing reproducing the affine."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    i_step, j_step, k_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dx, dy = np.linalg.norm(i_step), np.linalg.norm(j_step)
    if abs(i_step @ j_step) > 1e-6 * dx * dy:
        raise ValueError("DICOM needs orthogonal in-plane axes: affine columns 0 and 1 are not")
    # IOP: first the direction along a row (i), then down a column (j).
    iop = np.concatenate([i_step / dx, j_step / dy])
    positions = lps[:3, 3] + np.outer(np.arange(nz), k_step)
    # PixelSpacing is (between rows, between columns) = (j step, i step).
    return iop, [float(dy), float(dx)], positions, float(np.linalg.norm(k_step))


def _rescale_pairs(
    rescale: tuple[float, float] | Sequence[tuple[float, float]] | None, nz: int
) -> list[tuple[float, float] | None]:
    if rescale is None:
        return [None] * nz
    if len(rescale) == 2 and np.isscalar(rescale[0]):
        return [(float(rescale[0]), float(rescale[1]))] * nz  # type: ignore[arg-type]
    pairs = [(float(s), float(i)) for s, i in rescale]  # type: ignore[misc]
    if len(pairs) != nz:
        raise ValueError(f"rescale has {len(pairs)} pairs for {nz} slices")
    return pairs


def _to_stored(plane: np.ndarray, pair: tuple[float, float] | None) -> np.ndarray:
    slope, intercept = pair if pair is not None else (1.0, 0.0)
    return np.rint((plane.astype(np.float64) - intercept) / slope).astype(np.int64)


def _ds(value: float) -> str:
    """A DS string (max 16 chars) that keeps as much precision as fits."""
    for digits in range(12, 4, -1):
        text = f"{float(value):.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot write {value} as a DICOM decimal string")


# ---------------------------------------------------------------- datasets


def _base_dataset(
    ids: dict[str, str], modality: str, study_uid: str, series_uid: str, frame_of_ref: str
) -> Dataset:
    ds = Dataset()
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LT", ids["PrivateText"])
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality = modality
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_ref
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.SeriesNumber = 1
    ds.PatientSex = "O"
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "medssl-synth"
    ds.ManufacturerModelName = "Synthetic Scanner"
    ds.BodyPartExamined = "CHEST" if modality == "CT" else "HEAD"
    if modality == "CT":
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
    else:
        ds.MagneticFieldStrength = "3"
        ds.RepetitionTime = "2000"
        ds.EchoTime = "30"
        ds.FlipAngle = "90"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
    for keyword, value in ids.items():  # last, so a caller can plant values in technical fields too
        if keyword != "PrivateText":
            setattr(ds, keyword, value)
    return ds


def _enhanced(
    base: Dataset,
    modality: str,
    iop: np.ndarray,
    pixel_spacing: list[float],
    positions: np.ndarray,
    pairs: list[tuple[float, float] | None],
    thickness: float,
    order: np.ndarray,
) -> Dataset:
    """One multi-frame object; frames stored in ``order`` (spatial index per frame)."""
    ds = base.copy()
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE if modality == "CT" else ENHANCED_MR_IMAGE_STORAGE
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.NumberOfFrames = len(order)
    ds.InstanceNumber = 1
    del ds.SliceThickness  # lives in the PixelMeasuresSequence here

    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [_ds(v) for v in iop]
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    measures = Dataset()
    measures.PixelSpacing = [_ds(v) for v in pixel_spacing]
    measures.SliceThickness = _ds(thickness)
    shared.PixelMeasuresSequence = DicomSequence([measures])
    same_rescale = len(set(pairs)) == 1
    if same_rescale and pairs[0] is not None:
        shared.PixelValueTransformationSequence = DicomSequence([_transform(pairs[0], modality)])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    for n, k in enumerate(order):
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [_ds(v) for v in positions[k]]
        item.PlanePositionSequence = DicomSequence([position])
        content = Dataset()
        content.InStackPositionNumber = int(k) + 1
        content.StackID = "1"
        content.FrameAcquisitionNumber = n + 1
        item.FrameContentSequence = DicomSequence([content])
        if not same_rescale and pairs[k] is not None:
            item.PixelValueTransformationSequence = DicomSequence([_transform(pairs[k], modality)])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    return ds


def _transform(pair: tuple[float, float], modality: str) -> Dataset:
    item = Dataset()
    item.RescaleSlope, item.RescaleIntercept = _ds(pair[0]), _ds(pair[1])
    item.RescaleType = "HU" if modality == "CT" else "US"
    return item


def _save(ds: Dataset, pixels: np.ndarray, transfer_syntax: str, path: Path, file_meta: bool = True) -> None:
    if not file_meta:  # ACR-NEMA-era layout: the data set alone, implicit VR little endian
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
        return
    ts = UID(transfer_syntax)
    if not ts.is_little_endian:
        raise ValueError(f"big endian transfer syntaxes are not written: {ts.name}")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if ts.is_compressed:
        if ts.name.startswith("JPEG 2000") and min(pixels.shape[-2:]) < 32:
            # openjpeg's default 6 resolution levels need 32 pixels a side.
            raise ValueError("JPEG 2000 encoding needs at least 32 rows and 32 columns")
        ds.compress(ts, np.ascontiguousarray(pixels), generate_instance_uid=False)
    elif ts != ExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True, implicit_vr=ts.is_implicit_VR, little_endian=True)


# ---------------------------------------------------------------- scrambling


def _scramble(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation that is neither the spatial order nor its reverse (n >= 3)."""
    ident = np.arange(n)
    for _ in range(100):
        perm = rng.permutation(n)
        if n < 3 or not (np.array_equal(perm, ident) or np.array_equal(perm, ident[::-1])):
            return perm
    return np.roll(ident, 1)


def _names(n: int, rng: np.random.Generator, prefix: str, shuffle: bool) -> list[str]:
    if not shuffle:
        return [f"{prefix}{k + 1:04d}.dcm" for k in range(n)]
    tokens = sorted({f"{int(t):08x}" for t in rng.integers(0, 16**8, size=4 * n)})[:n]
    # Name rank follows a scrambled permutation, so sorting names scrambles space.
    rank = _scramble(n, rng)
    return [f"{prefix}_{tokens[rank[k]]}.dcm" for k in range(n)]
