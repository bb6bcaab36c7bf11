"""DICOM reader: discovery helpers and one series -> :class:`RawVolume`.

The ingest runner calls, in this order:

1. :func:`looks_like_dicom` on every file it discovers (cheap, no parsing);
2. :func:`scan_header` in worker processes (header only, small picklable result);
3. :func:`group_series` to turn headers into series (lists of paths);
4. :func:`read_series` once per series.

Hospital series arrive with shuffled file names, scrambled InstanceNumbers,
oblique orientations, per-slice rescale, compressed pixels and the odd broken
file; everything here is written against those. Slices are ordered by
ImagePositionPatient along the slice normal and the affine is built from the
geometry tags (never from file names or InstanceNumber).

Reasons given in :class:`SkippedInput` / :class:`FailedInput` never contain
header values other than UIDs, SOP class / transfer syntax names and numbers
(spacings, sizes): they end up in manifests and logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import PersonName

from medssl_scale.io.containment import SourceRoot, check_openable
from medssl_scale.io.types import (
    MODALITIES,
    FailedInput,
    Limits,
    RawVolume,
    SkippedInput,
)

__all__ = [
    "IDENTIFYING_KEYWORDS",
    "DicomFileHeader",
    "group_series",
    "identifying_values",
    "looks_like_dicom",
    "identifying_tokens",
    "quiet_pydicom",
    "read_series",
    "redact",
    "scan_header",
    "transfer_syntax_guessed",
]

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

# Direct identifiers (and free text that often carries them). Values of these
# fields, plus every private text value, are what `identifying_values` returns.
IDENTIFYING_KEYWORDS: tuple[str, ...] = (
    # patient
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames",
    "OtherPatientIDsSequence", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "PatientComments",
    "MedicalRecordLocator", "MilitaryRank", "BranchOfService", "Occupation",
    "AdditionalPatientHistory", "PatientInsurancePlanCodeSequence", "ResponsiblePerson",
    "ResponsibleOrganization", "PersonName", "PersonAddress", "PersonTelephoneNumbers",
    "CountryOfResidence", "RegionOfResidence", "AdmissionID", "IssuerOfAdmissionID",
    # study / visit
    "AccessionNumber", "StudyID", "StudyDescription", "SeriesDescription", "ImageComments",
    "RequestedProcedureDescription", "RequestedProcedureID", "PerformedProcedureStepDescription",
    "PerformedProcedureStepID", "ScheduledProcedureStepDescription", "ScheduledProcedureStepID",
    "ProtocolName", "DerivationDescription", "AcquisitionComments", "StudyComments",
    "ReasonForStudy", "RequestedContrastAgent", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequest", "ContentCreatorName", "TextValue",
    # people and places
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord",
    "RequestingPhysician", "ScheduledPerformingPhysicianName", "OperatorsName",
    "StationName", "DeviceSerialNumber",
)

# Non-identifying technical fields copied to RawVolume.meta (a whitelist).
META_KEYWORDS: tuple[str, ...] = (
    "Manufacturer", "ManufacturerModelName", "BodyPartExamined", "KVP", "XRayTubeCurrent",
    "ExposureTime", "SliceThickness", "ConvolutionKernel", "ReconstructionDiameter",
    "MagneticFieldStrength", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
    "ScanningSequence", "SequenceVariant", "MRAcquisitionType", "EchoTrainLength",
    "ImagingFrequency", "ImagedNucleus", "PixelBandwidth",
)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CODE_RE = re.compile(r"^[A-Z0-9_ ]{1,16}$")
_LOCALIZER_TYPES = {"LOCALIZER", "SCOUT"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Tolerances. DICOM stores geometry as decimal strings, so exact equality is
# never expected; these are loose enough for print rounding, tight enough to
# catch real inconsistencies.
_ORIENTATION_TOL = 1e-3  # on direction cosines (about 0.06 degrees)
_SAME_POSITION_MM = 1e-2
_GRID_RESIDUAL = 0.1  # max distance of a slice from the uniform grid, in slice spacings


@dataclass(frozen=True)
class DicomFileHeader:
    """What grouping needs from one file; no identifying value besides UIDs."""

    path: str
    series_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    modality: str | None
    number_of_frames: int = 1
    has_pixel_data: bool = True


# ---------------------------------------------------------------- discovery


def looks_like_dicom(path: str | os.PathLike[str]) -> bool:
    """'DICM' at offset 128, or a DICOM file suffix (files without a preamble)."""
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def scan_header(path: str | os.PathLike[str], limits: Limits = Limits()) -> DicomFileHeader:
    """The header fields grouping needs; reading stops before the pixel data.

    The whole header is parsed (not only these tags) so that a file cut short
    inside its header is caught here, once, rather than at read time. A
    deflated header inflates to ``limits.max_header_bytes`` at most.
    A FIFO, device or system pseudo-file is refused from its ``stat``, unopened.
    """
    check_openable(path)
    with quiet_pydicom():
        ds, has_pixels = _read(path, header_only=True, max_inflated=limits.max_header_bytes)
        return DicomFileHeader(
            path=str(path),
            series_uid=_uid(ds, "SeriesInstanceUID"),
            sop_instance_uid=_uid(ds, "SOPInstanceUID"),
            sop_class_uid=_sop_class(ds),
            modality=_text(ds, "Modality"),
            number_of_frames=_int(ds, "NumberOfFrames", 1),
            has_pixel_data=has_pixels,
        )


def group_series(headers: Sequence[DicomFileHeader]) -> list[list[str]]:
    """Paths grouped by SeriesInstanceUID; a file without one is its own series.

    Each series is sorted; series are ordered by their first path, so the
    result does not depend on discovery or worker order.
    """
    by_uid: dict[str, list[str]] = {}
    singles: list[list[str]] = []
    for h in headers:
        if h.series_uid:
            by_uid.setdefault(h.series_uid, []).append(h.path)
        else:
            singles.append([h.path])
    groups = [sorted(set(paths)) for paths in by_uid.values()] + singles
    return sorted(groups, key=lambda g: g[0])


# ---------------------------------------------------------------- identifiers


def identifying_values(paths_or_dataset: Any) -> set[str]:
    """String values of identifying fields and private text tags.

    Accepts a path, an iterable of paths or a pydicom Dataset; a file that is
    not readable raises FailedInput. The caller scrubs these from any text it
    writes (reasons, logs), as defence in depth. Person names also contribute
    their components, since text may quote them reformatted.
    """
    wanted = set(IDENTIFYING_KEYWORDS)
    found: set[str] = set()
    with quiet_pydicom():
        if isinstance(paths_or_dataset, Dataset):
            datasets = [paths_or_dataset]
        else:
            single = isinstance(paths_or_dataset, (str, os.PathLike))
            paths = [paths_or_dataset] if single else paths_or_dataset
            datasets = [_read(p, header_only=True)[0] for p in paths]
        for ds in datasets:
            for elem in ds.iterall():  # sequences included
                private_text = elem.tag.is_private and elem.tag.element >= 0x100  # not creator ids
                if elem.keyword in wanted or private_text:
                    found.update(_strings(elem.value))
    return {v for v in found if v}


# The item's own direct identifiers: what a kept free-text field (BodyPartExamined,
# a description) may quote, so what is redacted from it. Narrower than
# IDENTIFYING_KEYWORDS on purpose: descriptions themselves ("HEAD", "CHEST")
# would redact the technical values they share words with.
SELF_IDENTIFYING_KEYWORDS: tuple[str, ...] = (
    "PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientID",
    "OtherPatientIDs", "MedicalRecordLocator", "AdmissionID", "AccessionNumber", "StudyID",
    "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers", "ResponsiblePerson",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord", "RequestingPhysician", "InstitutionName", "InstitutionAddress",
    "DeviceSerialNumber",
)
REDACTED = "[redacted]"


def identifying_tokens(datasets: Sequence[Dataset]) -> set[str]:
    """The datasets' own names (and their parts), ids and birth dates (in the usual written forms).

    Sequences are searched too (OtherPatientIDsSequence holds ids in items).
    Names give their components and the words of those (``van der Berg^Anna-Lena``
    gives ``Berg``, ``Anna``, ``Lena``, ...); words under three letters (``de``,
    ``van`` stays) only as whole components. Ids also give their letters and digits
    alone (``AB-1234`` gives ``AB1234``).
    """
    wanted = set(SELF_IDENTIFYING_KEYWORDS)
    tokens: set[str] = set()
    for ds in datasets:
        for elem in ds.iterall():
            if elem.keyword not in wanted:
                continue
            values = _strings(elem.value)
            if elem.keyword == "PatientBirthDate":
                values = set().union(*(_date_forms(v) for v in values)) if values else set()
            elif elem.VR == "PN":
                values = set().union(*(_name_parts(v) for v in values)) if values else set()
            elif elem.keyword in _ID_KEYWORDS:
                values = values | {"".join(_WORD.findall(v)) for v in values}
            tokens.update(values)
    return {t for t in tokens if len("".join(_WORD.findall(t))) >= 2}


_ID_KEYWORDS = frozenset({
    "PatientID", "OtherPatientIDs", "MedicalRecordLocator", "AdmissionID", "AccessionNumber", "StudyID",
    "DeviceSerialNumber",
})
_WORD = re.compile(r"[^\W_]+")  # a run of letters and digits, any script
_MONTHS = (
    "january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
    "november", "december",
)


def _name_parts(value: str) -> set[str]:
    """A person name, its ^/= components and their words (whitespace, hyphens, commas, apostrophes, dots)."""
    parts = {value}
    for component in re.split(r"[\^=]", value):
        parts.add(component.strip())
        parts.update(w for w in re.split(r"[\s,.'\u2019-]+", component) if len(w) >= 3)
    return parts


def _date_forms(value: str) -> set[str]:
    """A DICOM date (YYYYMMDD) as people write it: day, month, year in any usual order, with or
    without leading zeros, four- or two-digit years, month names; a separator in a form stands
    for any separator (see :func:`redact`)."""
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", value.strip())
    if not m:
        return {value}
    y, mo, d = m.groups()
    forms = {value, f"{d}{mo}{y}", f"{mo}{d}{y}", f"{d}{mo}{y[2:]}", f"{mo}{d}{y[2:]}"}
    name = _MONTHS[int(mo) - 1] if 1 <= int(mo) <= 12 else None
    for day in {d, d.lstrip("0") or "0"}:
        for year in (y, y[2:]):
            for month in {mo, mo.lstrip("0") or "0"}:
                forms.update({f"{year}.{month}.{day}", f"{day}.{month}.{year}", f"{month}.{day}.{year}"})
            if name:
                for month in (name, name[:3]):
                    forms.update({f"{day} {month} {year}", f"{month} {day} {year}"})
    return forms


def redact(text: Any, tokens: set[str]) -> Any:
    """``text`` with every token replaced by [redacted], case-insensitively, as whole words; non-text as it is.

    Only letters and digits are compared: where a token has a separator, or
    turns from letters to digits, the text may have any separator or none
    (``AB-1234`` also hides ``AB1234`` and ``ab 1234``), except between two
    numbers, which must stay apart (``7.9.1931`` is not ``791931``).
    Whole words only, so that a name "Li" or "Men" leaves "LIVER" and "ABDOMEN" alone.
    """
    if not isinstance(text, str) or not tokens:
        return text
    patterns = [p for p in (_token_pattern(t) for t in tokens) if p]
    for pattern in sorted(patterns, key=len, reverse=True):
        text = re.sub(pattern, REDACTED, text, flags=re.IGNORECASE)
    return text


def _token_pattern(token: str) -> str | None:
    runs = [r for w in _WORD.findall(token) for r in re.findall(r"\d+|\D+", w)]
    if len("".join(runs)) < 2:
        return None
    pattern = re.escape(runs[0])
    for before, after in zip(runs, runs[1:]):
        pattern += r"[\W_]+" if before.isdigit() and after.isdigit() else r"[\W_]*"
        pattern += re.escape(after)
    return rf"(?<![^\W_]){pattern}(?![^\W_])"


def _strings(value: Any) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple, MultiValue)):
        return set().union(*(_strings(v) for v in value)) if value else set()
    if isinstance(value, PersonName):
        parts = {str(value).strip()}
        parts.update(c.strip() for c in str(value).replace("=", "^").split("^") if len(c.strip()) > 1)
        return parts
    if isinstance(value, (bytes, bytearray)):
        # Private tags read without a dictionary come back as raw bytes (VR UN).
        text = bytes(value).rstrip(b"\x00 ").decode("latin-1")
        return {text.strip()} if text.isprintable() and 0 < len(text) <= 1024 else set()
    if isinstance(value, str):
        return {value.strip()}
    return set()


# ---------------------------------------------------------------- read_series


@dataclass
class _Frame:
    """One 2D plane: a single-frame file, or one frame of a multi-frame file."""

    file: int  # index into the de-duplicated file list
    frame: int | None  # frame index inside a multi-frame object
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient (row cosine, column cosine)
    spacing: np.ndarray  # PixelSpacing: (between rows, between columns)
    slope: float
    intercept: float


def read_series(
    paths: Sequence[str | os.PathLike[str]],
    limits: Limits,
    root: SourceRoot | Sequence[SourceRoot] | None = None,
) -> RawVolume:
    """Read one series (single-frame files or enhanced multi-frame objects).

    Pixels are decoded only after every header check passed, the size checked
    against ``limits`` included.

    ``root``: where every file must resolve before it is opened (discovery's
    source root), one for all paths or one per path (a series found under
    several sources). None: the paths are the caller's own choice, only
    FIFOs, devices and system pseudo-files are refused.
    """
    if not paths:
        raise FailedInput("empty series (no files)")
    roots = [root] * len(paths) if root is None or isinstance(root, SourceRoot) else list(root)
    if len(roots) != len(paths):
        raise ValueError("read_series: give one root, or one per path")
    for p, r in zip(paths, roots):
        if r is None:
            check_openable(p, "a file of the series")
        else:
            r.check(p, "a file of the series")
    linked = next((w for r in dict.fromkeys(r for r in roots if r is not None)
                   if (w := r.hard_link_warning([p for p, q in zip(paths, roots) if q == r]))), None)
    with quiet_pydicom():
        files = sorted({str(p) for p in paths})
        files, dss, has_pixels, duplicates = _dedupe(
            files, [_read(p, header_only=True, max_inflated=limits.max_header_bytes) for p in files], limits
        )
        _check_kind(dss, has_pixels)
        _check_one_patient(dss)
        dss, files, n_localizers = _drop_localizers(dss, files)
        rows, cols = _check_same_size(dss)
        n_frames = sum(_int(ds, "NumberOfFrames", 1) for ds in dss)
        limits.check_shape((cols, rows, n_frames), "DICOM header")
        if n_frames == 1:
            raise SkippedInput("2D image (1 slice)")
        ts = _check_transfer_syntaxes(dss)
        enhanced = any(_is_multiframe(ds) for ds in dss)
        frames = [f for i, ds in enumerate(dss) for f in _frames_of(i, ds)]
        frames, affine = _sort_and_check_geometry(frames)
        array = _decode(files, dss, frames, rows, cols, limits)
        meta = _meta(dss[0], ts, len(frames), identifying_tokens(dss))
        if n_localizers:
            meta["LocalizersDropped"] = n_localizers
        warnings = [linked] if linked else []
        guessed = sum(transfer_syntax_guessed(ds) for ds in dss)
        if guessed:
            warnings.append(
                f"{guessed} file(s) without DICOM file meta (no transfer syntax): decoded as {ts}, "
                "the encoding their header parsed as"
            )
        return RawVolume(
            array=array,
            affine=affine,
            modality=_text(dss[0], "Modality"),
            format="dicom-enhanced" if enhanced else "dicom",
            identity=_identity(dss[0]),
            meta=meta,
            warnings=warnings,
            duplicates=duplicates,
        )


def _dedupe(
    files: list[str], headers: list[tuple[Dataset, bool]], limits: Limits
) -> tuple[list[str], list[Dataset], list[bool], list[tuple[str, str]]]:
    """Files that share a SOPInstanceUID: exact copies are left out, different content fails the series.

    Copies are compared by content, not by UID: patient, geometry and the
    decoded pixels (so one instance stored in two transfer syntaxes is a
    copy). The first path is kept; returns (dropped, kept) pairs as well.
    """
    by_uid: dict[str, list[int]] = {}
    for i, (ds, _) in enumerate(headers):
        uid = _uid(ds, "SOPInstanceUID")
        if uid is not None:
            by_uid.setdefault(uid, []).append(i)
    kept_for: dict[int, int] = {}
    for uid, group in by_uid.items():
        first = group[0]
        for other in group[1:]:
            what = _difference(files[first], headers[first], files[other], headers[other], limits)
            if what:
                raise FailedInput(
                    f"{len(group)} files share SOPInstanceUID {uid} but differ in {what}: different images "
                    "under one instance UID (a reused or copied UID); the series is not ingested"
                )
            kept_for[other] = first
    keep = [i for i in range(len(files)) if i not in kept_for]
    duplicates = [(files[i], files[k]) for i, k in sorted(kept_for.items())]
    return [files[i] for i in keep], [headers[i][0] for i in keep], [headers[i][1] for i in keep], duplicates


def _difference(
    path_a: str, head_a: tuple[Dataset, bool], path_b: str, head_b: tuple[Dataset, bool], limits: Limits
) -> str | None:
    """What differs between two files of one SOPInstanceUID (patient, geometry, pixel data), or None."""
    (a, pixels_a), (b, pixels_b) = head_a, head_b
    if _identity(a).get("patient") != _identity(b).get("patient"):
        return "patient"
    keys = ("Modality", "SOPClassUID", "Rows", "Columns", "NumberOfFrames", "BitsStored", "PixelRepresentation")
    if any(_values(a, k) != _values(b, k) for k in keys):
        return "image type or size"
    try:
        frames_a, frames_b = _frames_of(0, a), _frames_of(0, b)
    except FailedInput:
        return "geometry"  # decided only when the copies agree; a broken header fails later anyway
    for fa, fb in zip(frames_a, frames_b):
        same = (
            np.allclose(fa.position, fb.position, atol=_SAME_POSITION_MM)
            and np.allclose(fa.orientation, fb.orientation, atol=_ORIENTATION_TOL)
            and np.allclose(fa.spacing, fb.spacing, rtol=1e-4)
            and (fa.slope, fa.intercept) == (fb.slope, fb.intercept)
        )
        if not same:
            return "geometry or rescale"
    if pixels_a != pixels_b:
        return "pixel data"
    if not pixels_a:
        return None
    rows, cols = _int(a, "Rows", 0), _int(a, "Columns", 0)
    limits.check_shape((cols, rows, _int(a, "NumberOfFrames", 1)), "DICOM header")
    if not np.array_equal(_pixels(path_a, rows, cols, a, limits), _pixels(path_b, rows, cols, b, limits)):
        return "pixel data"
    return None


def _check_one_patient(dss: list[Dataset]) -> None:
    """A series belongs to one patient: files naming several are not ingested, so none is misattributed."""
    patients = {_identity(ds).get("patient") for ds in dss}
    if len(patients) > 1:
        raise FailedInput(
            f"series mixes {len(patients)} patients: its files name different patients "
            "under one SeriesInstanceUID; not ingested, so that no image is attributed to the wrong patient"
        )


def _check_kind(dss: list[Dataset], has_pixels: list[bool]) -> None:
    """Skip what we do not ingest: non-images, colour, other modalities."""
    for ds, pixels in zip(dss, has_pixels):
        if pixels and ("Rows" in ds and "Columns" in ds):
            continue
        name = _sop_class_name(ds)
        if name.endswith("Image Storage"):
            # An image object without pixels (or its size) was cut short on disk.
            raise FailedInput(f"{name} object without pixel data or image size (file truncated?)")
        raise SkippedInput(f"not an image ({name})")
    samples = max(_int(ds, "SamplesPerPixel", 1) for ds in dss)
    if samples > 1:
        raise SkippedInput(f"colour image (SamplesPerPixel {samples})")
    modalities = {_text(ds, "Modality") for ds in dss}
    if len(modalities) > 1:
        listed = ", ".join(sorted(_safe_code(m) for m in modalities))
        raise FailedInput(f"series mixes modalities ({listed})")
    (modality,) = modalities
    if modality not in MODALITIES:
        raise SkippedInput(f"unsupported modality {_safe_code(modality)}")


def _drop_localizers(dss: list[Dataset], files: list[str]) -> tuple[list[Dataset], list[str], int]:
    """Localizers (scouts) are not volumes; a series of only those is skipped."""
    keep = [i for i, ds in enumerate(dss) if not _LOCALIZER_TYPES & set(_values(ds, "ImageType"))]
    if not keep:
        raise SkippedInput("localizer (scout) image")
    return [dss[i] for i in keep], [files[i] for i in keep], len(dss) - len(keep)


def _check_same_size(dss: list[Dataset]) -> tuple[int, int]:
    sizes = {(_int(ds, "Rows", 0), _int(ds, "Columns", 0)) for ds in dss}
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise FailedInput(f"slices have different rows x columns ({listed})")
    ((rows, cols),) = sizes
    if rows <= 0 or cols <= 0:
        raise FailedInput(f"image has no pixels (rows x columns {rows}x{cols})")
    return rows, cols


def _check_transfer_syntaxes(dss: list[Dataset]) -> str:
    """The transfer syntax name(s); fail before decoding if we cannot decode one."""
    names = []
    for ds in dss:
        uid = _transfer_syntax(ds)
        if uid is None:
            continue  # no file meta: pydicom guessed an uncompressed syntax while parsing
        if not _UID_RE.match(uid):
            raise FailedInput("unsupported transfer syntax (not a valid UID)")
        name = UID(uid).name + (" (guessed: no file meta)" if transfer_syntax_guessed(ds) else "")
        try:
            available = get_decoder(uid).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise FailedInput(f"unsupported transfer syntax {uid} ({name})")
        names.append(name)
    return ", ".join(sorted(set(names))) or "unknown (no file meta)"


def _is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or _int(ds, "NumberOfFrames", 1) > 1


def _frames_of(index: int, ds: Dataset) -> list[_Frame]:
    if not _is_multiframe(ds):
        return [
            _Frame(
                file=index,
                frame=None,
                position=_vector(ds, "ImagePositionPatient", 3),
                orientation=_vector(ds, "ImageOrientationPatient", 6),
                spacing=_vector(ds, "PixelSpacing", 2),
                slope=_float(ds, "RescaleSlope", 1.0),
                intercept=_float(ds, "RescaleIntercept", 0.0),
            )
        ]
    n = _int(ds, "NumberOfFrames", 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        raise FailedInput(f"multi-frame object ({_sop_class_name(ds)}) has no per-frame functional groups")
    if len(per_frame) != n:
        raise FailedInput(
            f"multi-frame object declares {n} frames but has {len(per_frame)} per-frame groups"
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else Dataset()
    frames = []
    for k, item in enumerate(per_frame):

        def group(seq: str, _item: Dataset = item) -> Dataset:
            # Per-frame groups override shared ones (PS3.3 C.7.6.16).
            for source in (_item, shared):
                if source.get(seq):
                    return source[seq][0]
            return Dataset()

        transform = group("PixelValueTransformationSequence")
        frames.append(
            _Frame(
                file=index,
                frame=k,
                position=_vector(group("PlanePositionSequence"), "ImagePositionPatient", 3),
                orientation=_vector(group("PlaneOrientationSequence"), "ImageOrientationPatient", 6),
                spacing=_vector(group("PixelMeasuresSequence"), "PixelSpacing", 2),
                slope=_float(transform, "RescaleSlope", 1.0),
                intercept=_float(transform, "RescaleIntercept", 0.0),
            )
        )
    return frames


def _sort_and_check_geometry(frames: list[_Frame]) -> tuple[list[_Frame], np.ndarray]:
    """Order frames along the slice normal, validate spacing, build the RAS affine."""
    orientation = frames[0].orientation
    if any(np.abs(f.orientation - orientation).max() > _ORIENTATION_TOL for f in frames):
        raise FailedInput("slices have different orientations (ImageOrientationPatient)")
    spacing = frames[0].spacing
    if any(np.abs(f.spacing - spacing).max() > 1e-3 * spacing.max() for f in frames):
        raise FailedInput("slices have different pixel spacings")
    if spacing.min() <= 0:
        raise FailedInput("pixel spacing is not positive")
    row_cos, col_cos = orientation[:3], orientation[3:]
    if not (
        abs(np.linalg.norm(row_cos) - 1) < 1e-2
        and abs(np.linalg.norm(col_cos) - 1) < 1e-2
        and abs(row_cos @ col_cos) < 1e-2
    ):
        raise FailedInput("ImageOrientationPatient is not two orthogonal unit vectors")
    row_cos = row_cos / np.linalg.norm(row_cos)
    col_cos = col_cos / np.linalg.norm(col_cos)
    normal = np.cross(row_cos, col_cos)

    proj = np.array([f.position @ normal for f in frames])
    order = np.argsort(proj, kind="stable")
    frames = [frames[i] for i in order]
    proj = proj[order]
    n = len(frames)
    gaps = np.diff(proj)

    n_positions = 1 + int(np.sum(gaps > _SAME_POSITION_MM))
    if n_positions < n:
        raise FailedInput(
            f"{n} slices at only {n_positions} distinct positions "
            "(several slices share a position: multi-echo, multi-phase or 4D series?)"
        )
    median = float(np.median(gaps))
    ratios = gaps / median
    missing = np.rint(ratios).astype(int) - 1
    is_gap = (ratios > 1.5) & (np.abs(ratios - np.rint(ratios)) < 0.15)
    if is_gap.any():
        first = int(np.argmax(is_gap))
        raise FailedInput(
            f"missing slices: about {int(missing[is_gap].sum())} slice(s) missing in "
            f"{int(is_gap.sum())} gap(s); first gap after slice {first + 1} of {n} "
            f"({gaps[first]:.4g} mm where the median spacing is {median:.4g} mm)"
        )

    # Uniform grid from the first to the last slice (averages out the decimal
    # rounding of positions); every slice must sit close to its grid point.
    positions = np.array([f.position for f in frames])
    step = (positions[-1] - positions[0]) / (n - 1)
    residual = np.linalg.norm(positions - (positions[0] + np.outer(np.arange(n), step)), axis=1)
    if residual.max() > _GRID_RESIDUAL * np.linalg.norm(step):
        raise FailedInput(
            f"inconsistent slice spacing (min {gaps.min():.4g} mm, max {gaps.max():.4g} mm)"
        )

    # Voxel (i, j, k) -> LPS: i walks along a row (row cosine, column spacing
    # PixelSpacing[1]); j walks down the columns (column cosine, PixelSpacing[0]).
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]
    lps[:3, 1] = col_cos * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return frames, _LPS_TO_RAS @ lps


def _decode(
    files: list[str], headers: list[Dataset], frames: list[_Frame], rows: int, cols: int, limits: Limits
) -> np.ndarray:
    """Decode pixels into (k, j, i) order, apply rescale, return as (i, j, k)."""
    integral = all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in frames)
    if integral:
        lo, hi = _output_range(headers, frames)
        dtype = next(
            (np.dtype(t) for t in (np.int16, np.uint16, np.int32, np.int64)
             if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max),
            np.dtype(np.int64),
        )
    else:
        dtype = np.dtype(np.float32)
    out = np.empty((len(frames), rows, cols), dtype=dtype)

    by_file: dict[int, list[tuple[int, _Frame]]] = {}
    for k, f in enumerate(frames):
        by_file.setdefault(f.file, []).append((k, f))
    for index, members in by_file.items():
        pixels = _pixels(files[index], rows, cols, headers[index], limits)
        for k, f in members:
            plane = pixels[f.frame] if f.frame is not None else pixels[0]
            if integral:
                out[k] = plane.astype(np.int64) * int(f.slope) + int(f.intercept)
            else:
                out[k] = plane.astype(np.float64) * f.slope + f.intercept
    # (k, j, i) C-order transposed is (i, j, k) without a copy.
    return out.transpose(2, 1, 0)


def _output_range(headers: list[Dataset], frames: list[_Frame]) -> tuple[int, int]:
    """Range of rescaled values the stored bits allow (chooses an integer dtype)."""
    lo, hi = 0, 0
    for f in frames:
        ds = headers[f.file]
        bits = _int(ds, "BitsStored", _int(ds, "BitsAllocated", 16))
        if _int(ds, "PixelRepresentation", 0) == 1:
            raw = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        else:
            raw = (0, 2**bits - 1)
        values = [int(r) * int(f.slope) + int(f.intercept) for r in raw]
        lo, hi = min(lo, *values), max(hi, *values)
    return lo, hi


def _pixels(path: str, rows: int, cols: int, header: Dataset, limits: Limits) -> np.ndarray:
    """All frames of one file as (frames, rows, cols), after length checks.

    ``header`` (the file's header, already checked against the limits) bounds
    what a deflated file may inflate to: its header and the pixels it declares.
    """
    declared = rows * cols * _int(header, "NumberOfFrames", 1) * max(_int(header, "BitsAllocated", 16), 1) // 8
    ds, _ = _read(path, header_only=False, max_inflated=limits.max_header_bytes + declared + 16)
    if "PixelData" not in ds:
        raise SkippedInput(f"not an image ({_sop_class_name(ds)}; no pixel data)")
    n = _int(ds, "NumberOfFrames", 1)
    ts = _transfer_syntax(ds)
    if ts is None or not UID(ts).is_compressed:
        bits = _int(ds, "BitsAllocated", 16)
        if bits not in (8, 16, 32, 64):
            raise FailedInput(f"unsupported BitsAllocated {bits}")
        expected = rows * cols * n * bits // 8
        got = len(ds.PixelData)
        # One trailing pad byte keeps odd-length values even (PS3.5 7.1.1).
        if got not in (expected, expected + (expected % 2)):
            hint = " (file truncated?)" if got < expected else ""
            raise FailedInput(
                f"pixel data length does not match the header (expected {expected} bytes, got {got}){hint}"
            )
    try:
        arr = ds.pixel_array
    except Exception as e:  # decoders raise many types; the reason names the syntax
        name = UID(ts).name if ts and _UID_RE.match(ts) else "unknown transfer syntax"
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise FailedInput(f"cannot decode pixel data ({name}): {type(e).__name__}: {detail}") from None
    arr = arr.reshape((n, rows, cols)) if arr.size == n * rows * cols else None
    if arr is None:
        raise FailedInput("decoded pixel data does not match rows x columns x frames")
    return arr


# ---------------------------------------------------------------- metadata


def _meta(ds: Dataset, transfer_syntax: str, n_slices: int, tokens: set[str]) -> dict[str, Any]:
    """The whitelisted fields, with any of the item's own identifying ``tokens`` they quote redacted."""
    # Enhanced objects keep technique fields in the shared functional group macros.
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    sources = [ds] + [
        e.value[0] for e in (shared_seq[0] if shared_seq else []) if e.VR == "SQ" and e.value
    ]
    meta: dict[str, Any] = {}
    for kw in META_KEYWORDS:
        for source in sources:
            value = _plain(source, kw)
            if value is not None:
                meta[kw] = [redact(v, tokens) for v in value] if isinstance(value, list) else redact(value, tokens)
                break
    meta["TransferSyntax"] = transfer_syntax
    meta["SOPClass"] = _sop_class_name(ds)
    meta["NumberOfSlices"] = n_slices
    return meta


def _plain(ds: Dataset, keyword: str) -> Any:
    """A JSON-able copy of a whitelisted value, or None when absent or malformed."""
    try:
        elem = ds[keyword] if keyword in ds else None
        value = elem.value if elem is not None else None
    except Exception:  # malformed value that pydicom cannot convert
        return None
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    out: list[Any] = []
    for v in items:
        if elem is not None and elem.VR in ("DS", "IS", "FL", "FD", "US", "SS", "UL", "SL"):
            # Numeric fields: a string here is a malformed value pydicom kept raw.
            if isinstance(v, (int, float)) and np.isfinite(v):
                out.append(int(v) if isinstance(v, int) else float(v))
        elif isinstance(v, str) and v.strip():
            out.append(v.strip()[:64])  # capped: hostile headers
    if not out:
        return None
    return out[0] if len(out) == 1 else out


def _identity(ds: Dataset) -> dict[str, str]:
    identity: dict[str, str] = {}
    patient = _text(ds, "PatientID")
    if not patient:
        name, birth = _text(ds, "PatientName"), _text(ds, "PatientBirthDate")
        patient = f"{name or ''}|{birth or ''}" if (name or birth) else None
    for key, value in (
        ("patient", patient),
        ("study", _uid(ds, "StudyInstanceUID")),
        ("series", _uid(ds, "SeriesInstanceUID")),
    ):
        if value:
            identity[key] = value
    return identity


# ---------------------------------------------------------------- low level


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records: they can echo header values.

    Records of pydicom's child loggers (the pixel decoders log failures with
    tracebacks) stop at the "pydicom" logger, whose only handler is a NullHandler.
    """
    logger = logging.getLogger("pydicom")
    saved = logger.disabled, logger.propagate
    logger.disabled, logger.propagate = True, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled, logger.propagate = saved


def _read(
    path: str | os.PathLike[str], *, header_only: bool, max_inflated: int = Limits().max_header_bytes
) -> tuple[Dataset, bool]:
    """dcmread with library errors turned into FailedInput; also says if pixels follow.

    Files without the 128-byte preamble (older or hand-made files) are retried
    with ``force``; then the parse must have found a plausible header, and the
    transfer syntax pydicom guessed is written into the file meta so that the
    pixels decode. pydicom silently ends a dataset where the file ends, so
    truncation is checked here. A deflated data set is inflated here, never
    beyond ``max_inflated`` bytes (pydicom would inflate all of it at once).
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            deflated = _deflated_meta(f)
            if deflated is not None:
                ds, size, at_pixels = _read_deflated(f, path, deflated, header_only, max_inflated)
            else:
                f.seek(0)
                try:
                    ds = pydicom.dcmread(f, stop_before_pixels=header_only)
                except InvalidDicomError:
                    f.seek(0)
                    ds = pydicom.dcmread(f, stop_before_pixels=header_only, force=True)
                    if _sop_class(ds) is None and _uid(ds, "SOPInstanceUID") is None:
                        raise FailedInput("not readable as DICOM: no DICOM header found") from None
                    # force also "parses" garbage; converting every value flushes nonsense out.
                    for _ in ds.iterall():
                        pass
                # stop_before_pixels leaves the file at the pixel data element.
                at_pixels = f.tell() < size
    except FailedInput:
        raise
    except OSError as e:
        detail = e.strerror or "I/O error"
        raise FailedInput(f"not readable as DICOM: {type(e).__name__} ({detail})") from None
    except Exception as e:  # pydicom raises many types for damaged files
        raise FailedInput(f"not readable as DICOM: {_describe(e)}") from None
    if len(ds) == 0:
        raise FailedInput("not readable as DICOM: no data elements after the file meta (truncated?)")
    if _transfer_syntax(ds) is None:
        _set_guessed_transfer_syntax(ds)
    last = ds.get_item(max(ds.keys()))
    if (
        isinstance(last, RawDataElement)
        and last.length != 0xFFFFFFFF
        and last.value_tell + last.length > size
    ):
        raise FailedInput("not readable as DICOM: file is truncated (ends inside an element)")
    has_pixels = at_pixels if header_only else "PixelData" in ds
    return ds, has_pixels


def _set_guessed_transfer_syntax(ds: Dataset) -> None:
    """A file without a transfer syntax in its meta (legacy, no preamble): record what pydicom parsed it as.

    Without it pydicom refuses to decode the pixels; with it they decode as the
    parse read the header (implicit VR little endian for ACR-NEMA era files).
    """
    implicit, little = ds.original_encoding
    if implicit is None:
        return
    uid = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    ds.file_meta.medssl_guessed_syntax = True  # read by transfer_syntax_guessed


def transfer_syntax_guessed(ds: Dataset) -> bool:
    """Whether the file named no transfer syntax and the one in its meta is the parser's guess."""
    meta = getattr(ds, "file_meta", None)
    return bool(getattr(meta, "medssl_guessed_syntax", False))


def _deflated_meta(f: Any) -> tuple[bytes | None, FileMetaDataset] | None:
    """(preamble, file meta) when the file is Deflated Explicit VR Little Endian, else None.

    The file meta is looked for where pydicom finds it: after the preamble and
    'DICM', or at the first byte of a file without them (which pydicom, forced,
    would inflate whole). Leaves ``f`` at the first byte of the deflated data set.
    """
    preamble: bytes | None = f.read(128)
    if len(preamble) < 128 or f.read(4) != b"DICM":
        preamble = None
        f.seek(0)
    try:
        meta = FileMetaDataset(
            read_dataset(f, is_implicit_VR=False, is_little_endian=True, stop_when=_not_file_meta)
        )
        uid = meta.get("TransferSyntaxUID")
    except Exception:
        return None  # dcmread will say what is wrong
    if uid is None or str(uid).strip("\x00 ") != DeflatedExplicitVRLittleEndian:
        return None
    return preamble, meta


def _not_file_meta(tag: Any, vr: Any, length: int) -> bool:
    return tag >> 16 != 2


def _at_pixel_data(tag: Any, vr: Any, length: int) -> bool:
    return tag in (0x7FE00010, 0x7FE00009, 0x7FE00008)


def _read_deflated(
    f: Any, path: str | os.PathLike[str], head: tuple[bytes, FileMetaDataset], header_only: bool, limit: int
) -> tuple[Dataset, int, bool]:
    """Inflate and parse a deflated data set: (dataset, inflated size, whether it stopped at the pixels).

    Headers are inflated in growing steps until the parse reaches the pixel
    data, so a small file that inflates to gigabytes costs at most ``limit``.
    """
    preamble, meta = head
    inflater = _BoundedInflater(f)
    cap = min(1 << 20, limit) if header_only else limit
    while True:
        data = inflater.fill(cap + 1)  # one byte more than allowed tells "more than cap" from "exactly cap"
        try:
            buf = DicomBytesIO(data)
            dataset = read_dataset(
                buf, is_implicit_VR=False, is_little_endian=True, stop_when=_at_pixel_data if header_only else None
            )
            at_pixels = header_only and buf.tell() < len(data)
        except Exception:
            if inflater.ended:
                raise
            dataset, at_pixels = None, False  # cut inside an element: inflate more
        if dataset is not None and (at_pixels or inflater.ended):
            break
        if cap >= limit:
            what = "header" if header_only else "data set"
            raise FailedInput(
                f"deflated {what} inflates to more than {limit:,} bytes "
                f"({'beyond the header size allowed' if header_only else 'more than its header declares'})"
            )
        cap = min(cap * 8, limit)
    ds = FileDataset(str(path), dataset, preamble=preamble, file_meta=meta, is_implicit_VR=False, is_little_endian=True)
    return ds, len(data), at_pixels


class _BoundedInflater:
    """Streams a raw deflate stream from a file, never holding more output than asked for."""

    def __init__(self, f: Any):
        self._f = f
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._out = bytearray()
        self._pending = b""
        self.ended = False

    def fill(self, cap: int) -> bytes:
        """All output so far, inflating until it holds ``cap`` bytes or the stream ends."""
        while len(self._out) < cap and not self.ended:
            if not self._pending:
                self._pending = self._f.read(1 << 16)
                if not self._pending:
                    raise FailedInput("not readable as DICOM: the deflated data set is truncated")
            self._out += self._z.decompress(self._pending, cap - len(self._out))
            self._pending = self._z.unconsumed_tail
            self.ended = self._z.eof
        return bytes(self._out)


def _describe(e: Exception) -> str:
    if isinstance(e, EOFError):
        return "file ends unexpectedly (truncated)"
    if isinstance(e, InvalidDicomError):
        return "no DICOM preamble or file meta"
    return f"damaged header ({type(e).__name__})"


def _transfer_syntax(ds: Dataset) -> str | None:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(uid).strip("\x00 ") if uid else None


def _sop_class(ds: Dataset) -> str | None:
    uid = _uid(ds, "SOPClassUID")
    meta = getattr(ds, "file_meta", None)
    if uid is None and meta is not None:
        uid = _uid(meta, "MediaStorageSOPClassUID")
    return uid


def _sop_class_name(ds: Dataset) -> str:
    uid = _sop_class(ds)
    return UID(uid).name if uid else "no SOP class"


def _uid(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip("\x00 ") if value else ""
    return text if text and len(text) <= 64 and _UID_RE.match(text) else None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or isinstance(value, (bytes, bytearray)):
        return None
    text = str(value).strip("\x00 ")
    return text or None


def _safe_code(value: str | None) -> str:
    """A code string (like a modality) fit for a reason, or a neutral word."""
    if not value:
        return "(none)"
    return value if _CODE_RE.match(value) else "(unrecognised value)"


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(v).strip().upper() for v in items]


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword)
        return default if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        raise FailedInput(f"malformed {keyword} (not an integer)") from None


def _float(ds: Dataset, keyword: str, default: float) -> float:
    try:
        value = ds.get(keyword)
        out = default if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        raise FailedInput(f"malformed {keyword} (not a number)") from None
    if not np.isfinite(out):
        raise FailedInput(f"malformed {keyword} (not finite)")
    return out


def _vector(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise FailedInput(f"missing geometry: no {keyword}")
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise FailedInput(f"malformed {keyword} (not numbers)") from None
    if out.shape != (n,) or not np.isfinite(out).all():
        raise FailedInput(f"malformed {keyword} (expected {n} finite numbers)")
    return out
