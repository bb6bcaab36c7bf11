"""Single-file readers (nibabel, SimpleITK) and the suffix dispatch, on real files."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nibabel.testing import data_path as NIB_DATA

from medssl_scale.io.canonical import spacing_of, to_canonical
from medssl_scale.io.files import (
    companions,
    image_format,
    is_companion_suffix,
    read_image_file,
)
from medssl_scale.io.types import FailedInput, Limits, SkippedInput

NIB = Path(NIB_DATA)
SHAPE_XYZ = (32, 28, 20)
SECRET = "Doe^John 1970-01-01 MRN12345"  # free text that must never reach meta or reasons


# ---------------------------------------------------------------- fixtures

def _rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


@pytest.fixture(scope="module")
def oblique():
    """An int16 volume with an oblique LPS geometry, as SimpleITK holds it."""
    rng = np.random.default_rng(0)
    zyx = rng.integers(-1024, 2000, size=SHAPE_XYZ[::-1]).astype(np.int16)
    img = sitk.GetImageFromArray(zyx)
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetOrigin((12.5, -30.0, 41.0))
    img.SetDirection(_rotation((1, 2, 3), 25).ravel().tolist())
    ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = ras @ np.asarray(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    affine[:3, 3] = ras @ np.asarray(img.GetOrigin())
    return img, zyx.transpose(2, 1, 0), affine


def _write_sitk(img, path: Path, compress=False, secret=False) -> Path:
    if secret:
        img = sitk.Image(img)
        img.SetMetaData("PatientName", SECRET)
    sitk.WriteImage(img, str(path), useCompression=compress)
    return path


def _nifti(path: Path, arr, affine=None, cls=nib.Nifti1Image, **header) -> Path:
    img = cls(arr, np.diag([1.5, 1.5, 2.5, 1]) if affine is None else affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


def _assert_clean(exc_or_vol) -> None:
    text = json.dumps(getattr(exc_or_vol, "meta", None)) + str(getattr(exc_or_vol, "reason", ""))
    assert "Doe" not in text and "MRN" not in text


# ---------------------------------------------------------------- dispatch

@pytest.mark.parametrize("name, fmt", [
    ("a.nii", "nifti"), ("B.NII.GZ", "nifti"), ("x.y.nii.gz", "nifti"), ("a.hdr", "analyze"),
    ("a.mgz", "mgh"), ("a.MGH", "mgh"), ("a.mnc", "minc"), ("scan.PAR", "parrec"),
    ("e+orig.HEAD", "afni"), ("a.nrrd", "nrrd"), ("a.nhdr", "nrrd"), ("a.mha", "metaimage"),
    ("a.MHD", "metaimage"), ("a.img", None), ("a.raw", None), ("a.gz", None), ("a.tar.gz", None),
    ("a.dcm", None), ("notes.txt", None), (".nii", None), ("nii", None),
])
def test_image_format_by_suffix(name, fmt):
    assert image_format(name) == fmt
    assert image_format(Path("/some/dir") / name) == fmt


def test_is_companion_suffix():
    for name in ("a.img", "a.IMG", "a.rec", "e+orig.BRIK", "e+orig.BRIK.gz", "a.raw", "a.raw.gz", "a.zraw"):
        assert is_companion_suffix(name), name
    for name in ("a.nii", "a.hdr", "a.nii.gz", "a.txt", "a.gz"):
        assert not is_companion_suffix(name), name


def test_companions(tmp_path, oblique):
    img, _, _ = oblique
    assert companions(_write_sitk(img, tmp_path / "v.mhd")) == [tmp_path / "v.raw"]
    assert companions(_write_sitk(img, tmp_path / "z.mhd", compress=True)) == [tmp_path / "z.zraw"]
    assert companions(_write_sitk(img, tmp_path / "v.nhdr")) == [tmp_path / "v.raw"]
    assert companions(_write_sitk(img, tmp_path / "z.nhdr", compress=True)) == [tmp_path / "z.raw.gz"]
    assert companions(_write_sitk(img, tmp_path / "v.mha")) == []
    assert companions(_write_sitk(img, tmp_path / "v.nrrd")) == []
    pair = _nifti(tmp_path / "p.hdr", np.zeros((4, 5, 6), np.int16), cls=nib.Nifti1Pair)
    assert companions(pair) == [tmp_path / "p.img"]
    assert companions(NIB / "phantom_varscale.PAR") == [NIB / "phantom_varscale.REC"]
    assert companions(NIB / "example4d+orig.HEAD") == [NIB / "example4d+orig.BRIK.gz"]
    assert companions(NIB / "anatomical.nii") == []
    assert companions(NIB / "analyze.hdr") == []          # its .img is not shipped
    assert companions(tmp_path / "missing.mhd") == []     # never raises

    # Multi-file data: a printf pattern and a LIST; references outside the folder are ignored.
    for n in range(3):
        (tmp_path / f"s{n:02d}.raw").write_bytes(b"\0" * 10)
    head = "NRRD0004\ntype: short\ndimension: 3\nsizes: 5 1 3\nencoding: raw\n"
    (tmp_path / "pat.nhdr").write_text(head + "data file: s%02d.raw 0 2 1 2\n")
    assert companions(tmp_path / "pat.nhdr") == [tmp_path / f"s{n:02d}.raw" for n in range(3)]
    meta = "ObjectType = Image\nNDims = 3\nDimSize = 5 1 3\nElementType = MET_SHORT\n"
    (tmp_path / "lst.mhd").write_text(meta + "ElementDataFile = LIST 2D\ns00.raw\n../s01.raw\ns02.raw\n")
    assert companions(tmp_path / "lst.mhd") == [tmp_path / "s00.raw", tmp_path / "s02.raw"]


def test_unknown_and_companion_paths_are_skipped(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SkippedInput, match="not an image format"):
        read_image_file(tmp_path / "notes.txt")
    with pytest.raises(SkippedInput, match="read through its header"):
        read_image_file(tmp_path / "x.img")
    with pytest.raises(FailedInput, match="not found"):
        read_image_file(tmp_path / "gone.nii.gz")


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("suffix, compress, fmt", [
    (".nii.gz", False, "nifti1"), (".nii", False, "nifti1"),
    (".nrrd", False, "nrrd"), (".nrrd", True, "nrrd"), (".nhdr", False, "nrrd"), (".nhdr", True, "nrrd"),
    (".mha", False, "metaimage"), (".mha", True, "metaimage"),
    (".mhd", False, "metaimage"), (".mhd", True, "metaimage"),
])
def test_sitk_written_files_agree(tmp_path, oblique, suffix, compress, fmt):
    img, xyz, affine = oblique
    path = _write_sitk(img, tmp_path / f"vol{suffix}", compress=compress, secret=True)
    vol = read_image_file(path)
    assert vol.format == fmt and vol.modality is None
    assert vol.array.dtype == np.int16 and vol.array.shape == SHAPE_XYZ
    assert np.array_equal(vol.array, xyz)
    assert np.allclose(vol.affine, affine, atol=1e-4)  # NIfTI stores float32
    # voxel -> world matches ITK's own index -> physical point (LPS -> RAS)
    for ijk in [(0, 0, 0), (31, 0, 19), (5, 27, 3)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
        assert np.allclose(vol.affine @ [*ijk, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-3)
    _assert_clean(vol)

    canon, canon_affine = to_canonical(vol.array, vol.affine)
    ref, ref_affine = to_canonical(xyz, affine)
    assert nib.aff2axcodes(canon_affine) == ("R", "A", "S")
    assert np.array_equal(canon, ref) and np.allclose(canon_affine, ref_affine, atol=1e-4)


def test_metaimage_modality_tag(tmp_path):
    arr = np.zeros((6, 7, 8), np.int16)
    path = tmp_path / "ct.mha"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    path.write_bytes(path.read_bytes().replace(b"ElementType", b"Modality = MET_MOD_CT\nElementType", 1))
    vol = read_image_file(path)
    assert vol.modality == "CT" and vol.meta["file_modality"] == "CT"


def test_nibabel_written_files(tmp_path):
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 3000, size=(12, 10, 8)).astype(np.uint16)
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    affine[:3, 3] = (-5, 6, 7)

    # CT stored unsigned with an integer intercept stays integer (int16 HU).
    img = nib.Nifti1Image(raw, affine)
    img.header.set_slope_inter(1.0, -1024.0)
    img.header["descrip"] = SECRET.encode()
    img.header["aux_file"] = b"MRN12345"
    nib.save(img, str(tmp_path / "ct.nii"))
    vol = read_image_file(tmp_path / "ct.nii")
    assert vol.array.dtype == np.int16 and np.array_equal(vol.array, raw.astype(np.int32) - 1024)
    assert vol.meta["scaled"] is True and np.allclose(vol.affine, affine)
    _assert_clean(vol)

    # Non-integer scaling -> float32, never float64.
    img = nib.Nifti1Image(raw.astype(np.int16), affine)
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, str(tmp_path / "mr.nii.gz"))
    vol = read_image_file(tmp_path / "mr.nii.gz")
    assert vol.array.dtype == np.float32 and np.allclose(vol.array, raw * 0.5 + 10.0)

    # Big-endian on disk comes back native; NIfTI-2; header+image pairs; Analyze; MGZ.
    _nifti(tmp_path / "be.nii", raw.astype(">i2"), affine)
    vol = read_image_file(tmp_path / "be.nii")
    assert vol.array.dtype == np.dtype("=i2") and np.array_equal(vol.array, raw)
    for name, cls, fmt in [("n2.nii.gz", nib.Nifti2Image, "nifti2"), ("pair.hdr", nib.Nifti1Pair, "nifti1-pair"),
                           ("ana.hdr", nib.AnalyzeImage, "analyze"), ("fs.mgz", nib.MGHImage, "mgh")]:
        _nifti(tmp_path / name, raw.astype(np.float32), affine, cls=cls)
        vol = read_image_file(tmp_path / name)
        assert vol.format == fmt and vol.array.dtype == np.float32, name
        assert np.array_equal(vol.array, raw.astype(np.float32)), name
        if fmt == "analyze":  # plain Analyze stores voxel sizes only, with its own origin and x flip
            assert spacing_of(vol.affine) == pytest.approx((0.7, 0.7, 3.0)), name
        else:
            assert np.allclose(vol.affine, affine, atol=1e-4), name

    # NIfTI spatial units in metres become millimetres.
    img = nib.Nifti1Image(raw, affine / np.array([[1000], [1000], [1000], [1]]))
    img.header.set_xyzt_units("meter")
    nib.save(img, str(tmp_path / "metres.nii"))
    assert np.allclose(read_image_file(tmp_path / "metres.nii").affine, affine)


def test_bundled_nibabel_data():
    vol = read_image_file(NIB / "anatomical.nii")
    ref = nib.load(NIB / "anatomical.nii")
    assert vol.format == "nifti1" and vol.array.dtype == np.int16
    assert np.array_equal(vol.array, np.asarray(ref.dataobj)) and np.allclose(vol.affine, ref.affine)

    vol = read_image_file(NIB / "standard.nii.gz")
    assert vol.array.shape == (4, 5, 7) and vol.array.dtype == np.uint8

    for name in ("tiny.mnc", "minc1_1_scale.mnc"):
        vol = read_image_file(NIB / name)
        ref = nib.load(NIB / name)
        assert vol.format == "minc1" and vol.array.dtype == np.float32
        assert np.allclose(vol.array, ref.get_fdata(), rtol=1e-5) and np.allclose(vol.affine, ref.affine)

    vol = read_image_file(NIB / "scaled+tlrc.HEAD")  # (47, 54, 43, 1) with a brick scale factor
    ref = nib.load(NIB / "scaled+tlrc.HEAD")
    assert vol.format == "afni" and vol.array.shape == (47, 54, 43)
    assert np.allclose(vol.array, ref.get_fdata()[..., 0], rtol=1e-5)

    try:
        import h5py  # noqa: F401
    except ImportError:
        with pytest.raises(FailedInput, match="h5py"):
            read_image_file(NIB / "minc2_1_scale.mnc")
    else:
        assert read_image_file(NIB / "minc2_1_scale.mnc").format == "minc2"


@pytest.mark.parametrize("name, volumes", [
    ("example4d.nii.gz", 2), ("example_nifti2.nii.gz", 2), ("test.mgz", 2), ("functional.nii", 20),
    ("example4d+orig.HEAD", 3), ("phantom_varscale.PAR", 3), ("minc1_4d.mnc", 2),
])
def test_bundled_4d_files_are_skipped(name, volumes):
    with pytest.raises(SkippedInput, match=f"4D image with {volumes} volumes"):
        read_image_file(NIB / name)


def test_bundled_header_without_data_fails():
    with pytest.raises(FailedInput, match="data file missing"):
        read_image_file(NIB / "analyze.hdr")


def test_parrec_is_mr(tmp_path):
    # A single-volume PAR/REC: the first dynamic of the bundled phantom.
    par = (NIB / "phantom_EPI_asc_CLEAR_2_1.PAR").read_text()
    keep = []
    for line in par.splitlines(keepends=True):
        tokens = line.split()
        if tokens and tokens[0].isdigit() and tokens[2] != "1":  # image lines of dynamics 2 and 3
            continue
        keep.append(re.sub(r"(Max. number of dynamics\s*:\s*)3", r"\g<1>1", line))
    (tmp_path / "one.PAR").write_text("".join(keep))
    shutil.copy(NIB / "phantom_EPI_asc_CLEAR_2_1.REC", tmp_path / "one.REC")  # slices found by their index
    vol = read_image_file(tmp_path / "one.PAR")
    assert vol.modality == "MR" and vol.format == "parrec" and vol.array.shape == (64, 64, 9)
    assert companions(tmp_path / "one.PAR") == [tmp_path / "one.REC"]


# ---------------------------------------------------------------- broken and hostile inputs

def test_truncated_gzip_nifti(tmp_path):
    path = _nifti(tmp_path / "t.nii.gz", np.arange(32 * 28 * 20, dtype=np.int16).reshape(SHAPE_XYZ))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FailedInput, match="truncated gzip stream: the file ends before the compressed data does"):
        read_image_file(path)
    path.write_bytes(data[:200])  # cut inside the header
    with pytest.raises(FailedInput, match="truncated gzip"):
        read_image_file(path)


def test_short_data_nifti(tmp_path):
    path = _nifti(tmp_path / "s.nii", np.zeros(SHAPE_XYZ, np.int16))
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(FailedInput, match=r"expected 36,192 bytes .* holds 35,192"):
        read_image_file(path)


def _measure(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(FailedInput) as info:
            fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return info.value, time.perf_counter() - t0, peak


def test_absurd_dimensions_fail_fast_without_allocating(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_dtype(np.int16)
    (tmp_path / "big.nii").write_bytes(hdr.binaryblock + b"\0" * 700)
    (tmp_path / "big.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 30000 30000 30000\n"
                                      "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    (tmp_path / "big.nrrd").write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 30000 30000 30000\nendian: little\nencoding: raw\n\n")
    for name in ("big.nii", "big.mha", "big.nrrd"):
        err, seconds, peak = _measure(lambda: read_image_file(tmp_path / name))
        assert "27,000,000,000,000 voxels" in err.reason and "--max-voxels" in err.reason
        assert seconds < 1.0 and peak < 5_000_000, name
    # A 4D header is skipped as 4D whatever its size: the cap is per 3D volume.
    hdr.set_data_shape((300, 300, 300, 1000))
    (tmp_path / "big4d.nii").write_bytes(hdr.binaryblock + b"\0" * 700)
    with pytest.raises(SkippedInput, match="4D image with 1000 volumes"):
        read_image_file(tmp_path / "big4d.nii")
    # Under the cap but far more than the file holds: the size check stops it before any read.
    hdr.set_data_shape((900, 900, 900))
    (tmp_path / "lie.nii").write_bytes(hdr.binaryblock + b"\0" * 700)
    err, seconds, peak = _measure(lambda: read_image_file(tmp_path / "lie.nii"))
    assert "data shorter than the header declares" in err.reason and peak < 5_000_000
    (tmp_path / "lie.mha").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 900 900 900\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    with pytest.raises(FailedInput, match="expected 1,458,000,000 bytes"):
        read_image_file(tmp_path / "lie.mha")
    with pytest.raises(FailedInput, match="cap of 1,000"):
        read_image_file(tmp_path / "lie.nii", Limits(max_voxels=1000))


@pytest.mark.parametrize("name", ["garbage.nii", "garbage.nii.gz", "garbage.nrrd", "garbage.mha",
                                  "garbage.mgz", "garbage.hdr", "garbage.mnc", "garbage.nhdr"])
def test_garbage_bytes_fail_cleanly(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(3).bytes(1500))
    with pytest.raises(FailedInput) as info:
        read_image_file(path)
    assert "corrupt" in info.value.reason or "gzip" in info.value.reason


def test_plain_file_named_gz(tmp_path):
    path = _nifti(tmp_path / "plain.nii", np.zeros((4, 5, 6), np.int16))
    shutil.copy(path, tmp_path / "plain.nii.gz")
    with pytest.raises(FailedInput, match="not a gzip stream"):
        read_image_file(tmp_path / "plain.nii.gz")


@pytest.mark.parametrize("shape, exc, pattern", [
    ((10, 12), SkippedInput, "2D image"),
    ((10, 12, 1), SkippedInput, "2D image"),
    ((8, 9, 10, 3), SkippedInput, "4D image with 3 volumes"),
    ((8, 9, 10, 1, 3), SkippedInput, "multi-component"),
])
def test_nifti_dimensionality(tmp_path, shape, exc, pattern):
    path = _nifti(tmp_path / "d.nii.gz", np.zeros(shape, np.int16))
    with pytest.raises(exc, match=pattern):
        read_image_file(path)


def test_singleton_trailing_dims_are_squeezed(tmp_path):
    arr = np.arange(8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10, 1, 1)
    vol = read_image_file(_nifti(tmp_path / "s.nii", arr))
    assert vol.array.shape == (8, 9, 10) and np.array_equal(vol.array, arr[..., 0, 0])
    img = sitk.Image([7, 6, 5, 1], sitk.sitkInt16)
    sitk.WriteImage(img, str(tmp_path / "s.nrrd"))
    assert read_image_file(tmp_path / "s.nrrd").array.shape == (7, 6, 5)


def test_nifti_rgb_and_complex(tmp_path):
    rgb = np.zeros((5, 6, 7), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(SkippedInput, match="RGB"):
        read_image_file(_nifti(tmp_path / "rgb.nii", rgb))
    with pytest.raises(FailedInput, match="unsupported datatype complex64"):
        read_image_file(_nifti(tmp_path / "c.nii", np.zeros((5, 6, 7), np.complex64)))


def test_itk_dimensionality_and_types(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(tmp_path / "2d.mha"))
    with pytest.raises(SkippedInput, match="2D image"):
        read_image_file(tmp_path / "2d.mha")
    sitk.WriteImage(sitk.Image([7, 6, 5, 3], sitk.sitkInt16), str(tmp_path / "4d.nrrd"))
    with pytest.raises(SkippedInput, match="4D image with 3 volumes"):
        read_image_file(tmp_path / "4d.nrrd")
    rgb = sitk.GetImageFromArray(np.zeros((5, 6, 7, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    with pytest.raises(SkippedInput, match="multi-component"):
        read_image_file(tmp_path / "rgb.mha")
    sitk.WriteImage(sitk.Image([7, 6, 5], sitk.sitkComplexFloat32), str(tmp_path / "c.nrrd"))
    with pytest.raises(FailedInput, match="unsupported datatype"):
        read_image_file(tmp_path / "c.nrrd")


def test_truncated_itk_files(tmp_path, oblique):
    img, _, _ = oblique
    nbytes = int(np.prod(SHAPE_XYZ)) * 2
    for name, compress in [("t.mha", False), ("t.nrrd", False)]:
        path = _write_sitk(img, tmp_path / name, compress)
        path.write_bytes(path.read_bytes()[:-3000])
        expected = f"expected {nbytes:,} bytes of voxel data, the file holds {nbytes - 3000:,}"
        with pytest.raises(FailedInput, match=expected):
            read_image_file(path)
    path = _write_sitk(img, tmp_path / "tz.mha", True)
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(FailedInput, match="truncated compressed data"):
        read_image_file(path)
    path = _write_sitk(img, tmp_path / "tz.nrrd", True)
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(FailedInput, match="truncated gzip stream: the file ends before the compressed data does"):
        read_image_file(path)
    path = _write_sitk(img, tmp_path / "d.mhd")
    raw = tmp_path / "d.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(FailedInput, match=f"expected {nbytes:,} bytes of voxel data, the file holds 100"):
        read_image_file(path)


def test_detached_data_file_missing_or_outside(tmp_path, oblique):
    img, _, _ = oblique
    path = _write_sitk(img, tmp_path / "m.mhd")
    os.remove(tmp_path / "m.raw")
    with pytest.raises(FailedInput, match="data file missing"):
        read_image_file(path)
    (tmp_path / "sub").mkdir()
    text = _write_sitk(img, tmp_path / "out.mhd").read_text()
    (tmp_path / "sub" / "esc.mhd").write_text(text.replace("= out.raw", "= ../out.raw"))
    with pytest.raises(FailedInput, match="outside its own folder"):
        read_image_file(tmp_path / "sub" / "esc.mhd")
    nhdr = _write_sitk(img, tmp_path / "abs.nhdr")
    nhdr.write_text(nhdr.read_text().replace("data file: abs.raw", f"data file: {tmp_path / 'abs.raw'}"))
    with pytest.raises(FailedInput, match="outside its own folder"):
        read_image_file(nhdr)


def test_corrupt_deflate_stream(tmp_path):
    path = _nifti(tmp_path / "c.nii.gz", np.zeros(SHAPE_XYZ, np.int16))
    data = bytearray(path.read_bytes())
    data[10:74] = b"\xff" * 64  # right after the gzip header: an invalid deflate block
    path.write_bytes(bytes(data))
    with pytest.raises(FailedInput, match="corrupt gzip stream"):
        read_image_file(path)
