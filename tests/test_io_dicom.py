"""DICOM reader and synthetic series writer.

Geometry is cross-checked against SimpleITK/GDCM (an independent reader), so a
row/column or LPS/RAS mix-up shared by our writer and reader still shows up.
Real files come from pydicom's bundled test data (only those installed).
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from needs import missing
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid
from scipy.spatial.transform import Rotation

from medssl_scale.io.dicom import (
    IDENTIFYING_KEYWORDS,
    group_series,
    identifying_values,
    looks_like_dicom,
    read_series,
    scan_header,
)
from medssl_scale.io.types import (
    FailedInput,
    InputError,
    Limits,
    RawVolume,
    SkippedInput,
)
from medssl_scale.synth.dicom import (
    DEFAULT_IDENTIFIERS,
    available_transfer_syntaxes,
    write_series,
)

SHAPE = (24, 20, 8)  # i (columns), j (rows), k (slices): deliberately all different
AXIAL = np.diag([-0.7, -0.8, 2.5, 1.0])  # the usual DICOM axial: rows along L, columns along P
# Turns a bundled secondary capture into something the reader accepts as CT.
CT_GEOMETRY = {"Modality": "CT", "ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "ImagePositionPatient": [0, 0, 0]}


def oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    rotation = Rotation.from_euler("xyz", [17.0, -23.0, 31.0], degrees=True).as_matrix()
    affine[:3, :3] = rotation @ np.diag([0.7, 0.8, 2.5])
    affine[:3, 3] = [12.5, -40.25, 73.0]
    return affine


def ct_volume(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 2000, size=shape).astype(np.int16)


def read(paths, limits: Limits | None = None) -> RawVolume:
    return read_series([str(p) for p in paths], limits or Limits())


def reason_of(paths, limits: Limits | None = None) -> InputError:
    with pytest.raises(InputError) as info:
        read(paths, limits)
    return info.value


def edit(path: Path, **fields) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in fields.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def bundled(name: str) -> Path:
    """A file from pydicom's installed test data (never a download)."""
    path = Path(pydicom.data.__file__).parent / "test_files" / name
    if not path.exists():
        missing(f"pydicom's test file {name}", "install pydicom>=3 from a wheel (its test_files are bundled)")
    return path


def stack_of(src: Path, out: Path, order=(2, 0, 1), spacing: float = 3.0, **fields) -> list[Path]:
    """A 3-slice series from copies of one file, positions shifted along the normal.

    Copies are written in scrambled spatial order; pixel data (compressed or
    not) is kept byte for byte.
    """
    out.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    paths = []
    for n, k in enumerate(order):
        ds = pydicom.dcmread(src)
        for keyword, value in fields.items():
            setattr(ds, keyword, value)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + k * spacing]
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        path = out / f"copy{n}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def sitk_read(folder: Path, series_uid: str) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK/GDCM's view: array as (i, j, k), affine in RAS."""
    try:
        import SimpleITK as sitk
    except ImportError:
        missing("SimpleITK (the independent DICOM reader)", "pip install SimpleITK (a dependency of medssl-scale)")
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (i, j, k)
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


# ---------------------------------------------------------------- discovery


def test_looks_like_dicom(tmp_path: Path) -> None:
    (path,) = write_series(tmp_path / "s", ct_volume((4, 4, 1)), AXIAL)
    no_suffix = tmp_path / "IM0001"
    shutil.copy(path, no_suffix)
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n" * 20)
    assert looks_like_dicom(path) and looks_like_dicom(no_suffix)  # 'DICM' at 128
    assert looks_like_dicom(bundled("rtstruct.dcm"))  # no preamble: found by suffix
    assert not looks_like_dicom(text)


def test_scan_header_and_group_series(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    ct = write_series(folder, ct_volume(), AXIAL, seed=1, file_prefix="A")
    mr = write_series(
        folder, ct_volume(seed=2), oblique_affine(), modality="MR", rescale=None, seed=2, file_prefix="B"
    )
    loner = folder / "loner.dcm"
    shutil.copy(ct[0], loner)
    edit(loner, SeriesInstanceUID=None, SOPInstanceUID=generate_uid())

    headers = [scan_header(p) for p in sorted(folder.iterdir())]
    assert {h.modality for h in headers} == {"CT", "MR"}
    assert all(h.has_pixel_data and h.number_of_frames == 1 for h in headers)
    pickle.loads(pickle.dumps(headers))  # crosses process boundaries
    groups = group_series(headers)
    assert groups == group_series(headers[::-1])  # independent of discovery order
    assert sorted(groups) == sorted([sorted(map(str, ct)), sorted(map(str, mr)), [str(loner)]])


def test_scan_header_rejects_garbage_and_truncated_headers(tmp_path: Path) -> None:
    (good,) = write_series(tmp_path / "s", ct_volume((4, 4, 1)), AXIAL)
    data = good.read_bytes()
    cases = {
        "random.dcm": np.random.default_rng(0).bytes(3000),
        "preamble_then_garbage.dcm": b"\0" * 128 + b"DICM" + b"\xff" * 500,
        "cut_in_file_meta.dcm": data[:150],
        "cut_in_header.dcm": data[:700],
    }
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(FailedInput, match="not readable as DICOM"):
            scan_header(path)


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("affine", [AXIAL, oblique_affine()], ids=["axial", "oblique"])
def test_geometry_matches_written_affine_and_simpleitk(tmp_path: Path, affine: np.ndarray) -> None:
    volume = ct_volume()
    paths = write_series(tmp_path, volume, affine, seed=3, file_prefix="A")
    write_series(tmp_path, ct_volume(seed=9), affine, seed=4, file_prefix="B")  # a neighbour series

    # The test means something only if neither names nor InstanceNumbers give the order.
    by_name = sorted(paths)
    assert by_name != paths and by_name != paths[::-1]
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths]
    assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)

    rv = read(by_name)
    assert rv.format == "dicom" and rv.modality == "CT" and rv.array.dtype == np.int16
    np.testing.assert_array_equal(rv.array, volume)
    np.testing.assert_allclose(rv.affine, affine, atol=1e-6)

    series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    sitk_array, sitk_affine = sitk_read(tmp_path, series_uid)
    np.testing.assert_array_equal(rv.array, sitk_array)
    np.testing.assert_allclose(rv.affine, sitk_affine, atol=1e-4)


def test_identity_meta_and_identifying_values(tmp_path: Path) -> None:
    # Markers are not valid values for most VRs (a date, 64-char limits): the
    # writer plants them anyway, and neither side lets a warning echo them.
    markers = {key: f"MARK{n:02d}X {key} " + "x" * 60 for n, key in enumerate(DEFAULT_IDENTIFIERS)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_series(tmp_path, ct_volume(), AXIAL, identifiers=markers)
        rv = read(paths)
    assert rv.identity["patient"] == markers["PatientID"]
    assert set(rv.identity) == {"patient", "study", "series"}
    text = json.dumps(rv.meta)  # JSON-able, and free of every planted value
    assert not any(m in text for m in markers.values())
    assert rv.meta["NumberOfSlices"] == SHAPE[2] and rv.meta["Manufacturer"] == "medssl-synth"

    found = identifying_values(paths[0])
    assert set(markers.values()) <= found  # the private free text included
    assert identifying_values(pydicom.dcmread(paths[0])) == found
    assert set(DEFAULT_IDENTIFIERS) - {"PrivateText"} <= set(IDENTIFYING_KEYWORDS)

    for p in paths:
        edit(p, PatientID=None)
    assert read(paths).identity["patient"] == f"{markers['PatientName']}|{markers['PatientBirthDate']}"


def test_reader_silences_pydicom_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = write_series(tmp_path, ct_volume(), AXIAL)
    for p in paths:  # a malformed DS value, patched in bytes (pydicom refuses to write it)
        data = p.read_bytes()
        kvp = b"\x18\x00\x60\x00DS\x04\x00120 "
        assert kvp in data
        p.write_bytes(data.replace(kvp, b"\x18\x00\x60\x00DS\x04\x00ab^c"))
    caplog.set_level(logging.DEBUG, logger="pydicom")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rv = read(paths)
    assert "KVP" not in rv.meta  # malformed numbers are dropped, not echoed
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]


# ---------------------------------------------------------------- rescale, enhanced, compression


def test_rescale_applied_per_slice(tmp_path: Path) -> None:
    volume = ct_volume()
    integer = [(1.0, -1024.0), (1.0, -1000.0), (2.0, -1024.0), (1.0, 0.0)] * 2
    fractional = [(0.5, -1024.25), (1.0, -1024.0), (0.25, -1000.5), (1.5, 10.0)] * 2
    for pairs, dtype in ((integer, np.int16), (fractional, np.float32)):
        folder = tmp_path / str(dtype.__name__)
        rv = read(write_series(folder, volume, AXIAL, rescale=pairs))
        expected = np.stack(
            [np.rint((volume[:, :, k] - b) / a) * a + b for k, (a, b) in enumerate(pairs)], axis=-1
        )
        assert rv.array.dtype == dtype
        np.testing.assert_allclose(rv.array, expected, atol=1e-3)


@pytest.mark.parametrize("per_frame_rescale", [False, True])
def test_enhanced_multiframe(tmp_path: Path, per_frame_rescale: bool) -> None:
    volume = ct_volume()
    rescale = [(1.0, -1024.0 + k) for k in range(SHAPE[2])] if per_frame_rescale else (1.0, -1024.0)
    (path,) = write_series(tmp_path, volume, oblique_affine(), enhanced=True, rescale=rescale)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames = ds.PerFrameFunctionalGroupsSequence
    in_stack = [int(f.FrameContentSequence[0].InStackPositionNumber) for f in frames]
    assert in_stack != sorted(in_stack)  # frames stored out of spatial order

    rv = read([path])
    assert rv.format == "dicom-enhanced" and rv.modality == "CT"
    np.testing.assert_array_equal(rv.array, volume)
    np.testing.assert_allclose(rv.affine, oblique_affine(), atol=1e-6)
    assert rv.meta["NumberOfSlices"] == SHAPE[2] and rv.meta["SOPClass"] == "Enhanced CT Image Storage"


def test_enhanced_mr(tmp_path: Path) -> None:
    volume = np.random.default_rng(5).integers(0, 3000, size=SHAPE).astype(np.uint16)
    paths = write_series(
        tmp_path, volume, AXIAL, modality="MR", rescale=None, enhanced=True, transfer_syntax=RLELossless
    )
    rv = read(paths)
    assert rv.modality == "MR" and rv.format == "dicom-enhanced"
    np.testing.assert_array_equal(rv.array, volume)


def _encoder_or_skip(uid: str) -> None:
    if not available_transfer_syntaxes().get(uid):
        missing(f"a pydicom encoder for {pydicom.uid.UID(uid).name}",
                "pip install -e '.[dev]' (pyjpegls for JPEG-LS, pylibjpeg-openjpeg for JPEG 2000)")


@pytest.mark.parametrize(
    "uid", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=["rle", "j2k", "jpegls"]
)
def test_compressed_series_round_trip(tmp_path: Path, uid: str) -> None:
    _encoder_or_skip(uid)
    volume = ct_volume((40, 36, 5))  # openjpeg needs >= 32 pixels a side
    paths = write_series(tmp_path, volume, oblique_affine(), transfer_syntax=uid)
    assert str(pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID) == uid
    rv = read(paths)
    np.testing.assert_array_equal(rv.array, volume)
    assert rv.meta["TransferSyntax"] == pydicom.uid.UID(uid).name


# ---------------------------------------------------------------- pydicom's bundled files


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_truncated.dcm",
    ],
)
def test_bundled_single_slices_are_2d(name: str) -> None:
    path = bundled(name)
    assert looks_like_dicom(path) and scan_header(path).modality in ("CT", "MR")
    with pytest.raises(SkippedInput, match=r"^2D image \(1 slice\)$"):
        read([path])


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_bundled_encodings_decode_like_uncompressed(tmp_path: Path, name: str) -> None:
    reference = pydicom.dcmread(bundled("MR_small.dcm")).pixel_array  # (rows, columns)
    rv = read(stack_of(bundled(name), tmp_path))
    assert rv.array.shape == (reference.shape[1], reference.shape[0], 3)
    for k in range(3):
        np.testing.assert_array_equal(rv.array[:, :, k], reference.T)
    np.testing.assert_allclose(rv.affine[:3, 2], [0, 0, 3.0], atol=1e-6)  # ordered by position


def test_bundled_other_encodings_decode(tmp_path: Path) -> None:
    # JPEG extended 12-bit (an NM secondary capture, given CT geometry here).
    src = bundled("JPGExtended.dcm")
    with pytest.raises(SkippedInput, match="unsupported modality NM"):
        read([src])
    rv = read(stack_of(src, tmp_path / "jpeg", **CT_GEOMETRY))
    np.testing.assert_array_equal(rv.array[:, :, 1], pydicom.dcmread(src).pixel_array.T)

    # Lossy JPEG 2000 CT with RescaleIntercept -1024: comes out in HU.
    src = bundled("693_J2KI.dcm")
    rv = read(stack_of(src, tmp_path / "j2k"))
    ds = pydicom.dcmread(src)
    np.testing.assert_array_equal(rv.array[:, :, 0], ds.pixel_array.T.astype(np.int32) - 1024)
    assert rv.modality == "CT" and rv.array.min() < -500

    # Deflated explicit VR: pydicom inflates the dataset before parsing it.
    src = bundled("image_dfl.dcm")
    rv = read(stack_of(src, tmp_path / "deflate", PixelSpacing=[1, 1], **CT_GEOMETRY))
    np.testing.assert_array_equal(rv.array[:, :, 2], pydicom.dcmread(src).pixel_array.T)


def test_undecodable_pixel_data_fails(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # pydicom's JPEG-lossy.dcm holds a stream libjpeg rejects (pydicom tests it with GDCM).
    src = bundled("JPEG-lossy.dcm")
    error = reason_of(stack_of(src, tmp_path / "jpeg", **CT_GEOMETRY))
    assert isinstance(error, FailedInput)
    assert error.reason.startswith("cannot decode pixel data (JPEG Extended (Process 2 and 4)): ")
    assert "\n" not in error.reason

    paths = write_series(tmp_path / "rle", ct_volume(), AXIAL, transfer_syntax=RLELossless)
    ds = pydicom.dcmread(paths[3])
    ds.PixelData = encapsulate([b"\x07" * 64])
    ds.save_as(paths[3])
    assert reason_of(paths).reason.startswith("cannot decode pixel data (RLE Lossless): ")
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]  # tracebacks stay quiet


def test_bundled_truncated_pixel_data_fails(tmp_path: Path) -> None:
    error = reason_of(stack_of(bundled("MR_truncated.dcm"), tmp_path))
    assert isinstance(error, FailedInput)
    assert "pixel data length does not match the header (expected 8192 bytes" in error.reason


@pytest.mark.parametrize(
    "name, sop_class",
    [
        ("rtstruct.dcm", "RT Structure Set Storage"),
        ("rtplan.dcm", "RT Plan Storage"),
        ("test-SR.dcm", "Comprehensive SR Storage"),
    ],
)
def test_bundled_non_images_skipped(name: str, sop_class: str) -> None:
    path = bundled(name)
    assert not scan_header(path).has_pixel_data
    with pytest.raises(SkippedInput, match=rf"^not an image \({sop_class}\)$"):
        read([path])


def test_bundled_colour_skipped() -> None:
    with pytest.raises(SkippedInput, match=r"colour image \(SamplesPerPixel 3\)"):
        read([bundled("SC_rgb_small_odd.dcm")])


# ---------------------------------------------------------------- skipped with a reason


def test_skips_localizers_and_other_modalities(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "pt", ct_volume(), AXIAL)
    for p in paths:
        edit(p, Modality="PT")
    assert reason_of(paths).reason == "unsupported modality PT"

    (scout,) = write_series(tmp_path / "scout", ct_volume((24, 20, 1)), AXIAL)
    edit(scout, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    error = reason_of([scout])
    assert isinstance(error, SkippedInput) and error.reason == "localizer (scout) image"

    # A scout inside an axial series (another orientation) is dropped, not fatal.
    volume = ct_volume()
    paths = write_series(tmp_path / "mixed", volume, AXIAL)
    extra = tmp_path / "mixed" / "scout.dcm"
    shutil.copy(paths[0], extra)
    edit(extra, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SOPInstanceUID=generate_uid(),
         ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    rv = read([*paths, extra])
    np.testing.assert_array_equal(rv.array, volume)
    assert rv.meta["LocalizersDropped"] == 1

    (single,) = write_series(tmp_path / "single", ct_volume((24, 20, 1)), AXIAL)
    assert reason_of([single]).reason == "2D image (1 slice)"


# ---------------------------------------------------------------- failed with a reason


def test_fails_on_missing_slices(tmp_path: Path) -> None:
    paths = write_series(tmp_path, ct_volume(), AXIAL)  # spatial order, 2.5 mm apart
    error = reason_of(paths[:3] + paths[4:])
    assert isinstance(error, FailedInput)
    assert error.reason.startswith("missing slices: about 1 slice(s) missing in 1 gap(s)")
    assert "after slice 3 of 7 (5 mm where the median spacing is 2.5 mm)" in error.reason


def test_fails_on_inconsistent_spacing(tmp_path: Path) -> None:
    paths = write_series(tmp_path, ct_volume(), AXIAL)
    x, y, z = (float(v) for v in pydicom.dcmread(paths[4]).ImagePositionPatient)
    edit(paths[4], ImagePositionPatient=[x, y, z + 0.9])
    assert reason_of(paths).reason == "inconsistent slice spacing (min 1.6 mm, max 3.4 mm)"


def test_fails_on_mixed_orientation_or_size(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "o", ct_volume(), AXIAL)
    tilted = Rotation.from_euler("z", 10, degrees=True).as_matrix()
    edit(paths[2], ImageOrientationPatient=[*(tilted @ [1, 0, 0]), *(tilted @ [0, 1, 0])])
    assert reason_of(paths).reason == "slices have different orientations (ImageOrientationPatient)"

    folder = tmp_path / "s"
    first = write_series(folder, ct_volume(), AXIAL, file_prefix="A")
    shifted = AXIAL.copy()
    shifted[2, 3] += SHAPE[2] * 2.5
    uid = str(pydicom.dcmread(first[0]).SeriesInstanceUID)
    second = write_series(folder, ct_volume((20, 20, 8)), shifted, series_uid=uid, seed=1, file_prefix="B")
    assert reason_of(first + second).reason == "slices have different rows x columns (20x20, 20x24)"


def test_fails_on_shared_positions_but_drops_exact_duplicates(tmp_path: Path) -> None:
    volume = ct_volume()
    first = write_series(tmp_path, volume, AXIAL, seed=1, file_prefix="A")
    copy = tmp_path / "copy_of_first.dcm"
    shutil.copy(first[3], copy)  # same SOPInstanceUID: silently the same slice
    np.testing.assert_array_equal(read([*first, copy]).array, volume)

    uid = str(pydicom.dcmread(first[0]).SeriesInstanceUID)
    echo2 = write_series(tmp_path, volume, AXIAL, series_uid=uid, seed=2, file_prefix="B")
    error = reason_of(first + echo2)
    assert isinstance(error, FailedInput)
    assert error.reason.startswith("16 slices at only 8 distinct positions")


def test_fails_on_bad_pixel_data_and_truncation(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "len", ct_volume(), AXIAL)
    ds = pydicom.dcmread(paths[5])
    ds.PixelData = ds.PixelData[:-40]
    ds.save_as(paths[5])
    error = reason_of(paths)
    expected = "pixel data length does not match the header (expected 960 bytes, got 920)"
    assert error.reason.startswith(expected)

    paths = write_series(tmp_path / "cut", ct_volume(), AXIAL)
    paths[2].write_bytes(paths[2].read_bytes()[:-100])
    error = reason_of(paths)
    assert isinstance(error, FailedInput) and "truncated" in error.reason


def test_fails_on_missing_geometry(tmp_path: Path) -> None:
    paths = write_series(tmp_path, ct_volume(), AXIAL)
    edit(paths[1], ImagePositionPatient=None)
    assert reason_of(paths).reason == "missing geometry: no ImagePositionPatient"


def test_fails_on_unsupported_transfer_syntax(tmp_path: Path) -> None:
    paths = write_series(tmp_path, ct_volume(), AXIAL)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.PixelData = encapsulate([b"\0" * 16])
        ds["PixelData"].VR = "OB"
        ds.save_as(p)
    error = reason_of(paths)
    assert isinstance(error, FailedInput)
    mpeg2 = "1.2.840.10008.1.2.4.100 (MPEG2 Main Profile / Main Level)"
    assert error.reason == f"unsupported transfer syntax {mpeg2}"


def test_limits_checked_before_decoding(tmp_path: Path) -> None:
    paths = write_series(tmp_path, ct_volume(), AXIAL)
    with pytest.raises(FailedInput, match="over the per-volume cap of 1,000"):
        read(paths, Limits(max_voxels=1000))
    # A hostile header: huge rows x columns over a few bytes of pixels. The cap
    # must answer, not the pixel data length check that decoding would hit.
    for p in paths:
        edit(p, Rows=60000, Columns=60000)
    error = reason_of(paths)
    assert "60000x60000x8" in error.reason and "over the per-volume cap" in error.reason
