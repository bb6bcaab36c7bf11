"""Format faults: NIfTI vox_offset, legacy and deflated DICOM, instances sharing a SOPInstanceUID,
identifying values planted in the DICOM fields the reader keeps."""

from __future__ import annotations

import gzip
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from medssl_scale.io.dicom import read_series, scan_header
from medssl_scale.io.types import FailedInput, Limits
from medssl_scale.synth.dicom import write_series

SHAPE = (24, 20, 8)
AXIAL = np.diag([-0.7, -0.8, 2.5, 1.0])


def ct_volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 2000, size=SHAPE).astype(np.int16)


def read(paths, limits: Limits | None = None):
    return read_series([str(p) for p in paths], limits or Limits())


# ---------------------------------------------------------------- NIfTI vox_offset


def _nifti_with_offset(path: Path, offset: float, cls=nib.Nifti1Image, volume=None, extender: bool = True) -> np.ndarray:
    """A single-file NIfTI whose header says ``offset``; returns the voxels it holds."""
    volume = ct_volume() if volume is None else volume
    img = cls(volume, AXIAL)
    img.header.set_slope_inter(2.0, -1024.0)
    data = bytearray(img.to_bytes())
    size = img.header.sizeof_hdr
    field, dtype = (108, "<f4") if cls is nib.Nifti1Image else (168, "<i8")
    data[field:field + np.dtype(dtype).itemsize] = np.array(offset, dtype).tobytes()
    if not extender:
        del data[size:size + 4]
    path.write_bytes(gzip.compress(bytes(data)) if path.name.endswith(".gz") else bytes(data))
    return volume.astype(np.int32) * 2 - 1024


@pytest.mark.parametrize("cls", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("name, extender", [("v.nii", True), ("v.nii", False), ("v.nii.gz", True), ("v.nii.gz", False)])
def test_vox_offset_inside_the_header_is_read_after_it_with_a_warning(tmp_path: Path, cls, name, extender) -> None:
    from medssl_scale.io.nibabel_io import read_nibabel

    volume = ct_volume()
    volume[0, 0, 0] = 0  # without the extension flag, the first voxel's bytes are read as that flag
    expected = _nifti_with_offset(tmp_path / name, 0, cls, volume, extender=extender)
    rv = read_nibabel(tmp_path / name)
    np.testing.assert_array_equal(rv.array, expected)  # not header bytes as voxels
    np.testing.assert_allclose(rv.affine, AXIAL)
    (warning,) = rv.warnings
    assert f"vox_offset 0 lies inside the {cls(expected, AXIAL).header.sizeof_hdr}-byte header" in warning


@pytest.mark.parametrize("cls", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_vox_offset_zero_without_a_flag_reads_a_nonzero_first_voxel(tmp_path: Path, cls, name) -> None:
    """Voxels right after the header, no extension flag: the first voxel's bytes are not a flag."""
    from medssl_scale.io.nibabel_io import read_nibabel

    volume = ct_volume()
    volume[0, 0, 0] = -1000  # bytes that nibabel would take for a set extension flag
    expected = _nifti_with_offset(tmp_path / name, 0, cls, volume, extender=False)
    rv = read_nibabel(tmp_path / name)
    np.testing.assert_array_equal(rv.array, expected)
    np.testing.assert_allclose(rv.affine, AXIAL)
    (warning,) = rv.warnings
    assert "no extension flag" in warning


def test_vox_offset_beyond_the_file_or_too_deep_in_a_gzip_fails_fast(tmp_path: Path) -> None:
    import time

    from medssl_scale.io.nibabel_io import read_nibabel

    small = Limits(max_header_bytes=1 << 20)  # keeps the test small

    _nifti_with_offset(tmp_path / "far.nii", 4e9)
    with pytest.raises(FailedInput, match=r"vox_offset \(4,000,000,000\) lies beyond the end of the file"):
        read_nibabel(tmp_path / "far.nii")
    # A real, readable file whose voxels lie 4 MiB deep: refused before decompressing up to them.
    volume = ct_volume()
    img = nib.Nifti1Image(volume, AXIAL)
    raw = bytearray(img.to_bytes())
    offset = 4 << 20
    raw[108:112] = np.array(offset, "<f4").tobytes()
    raw[352:352] = bytes(offset - 352)
    (tmp_path / "deep.nii.gz").write_bytes(gzip.compress(bytes(raw), compresslevel=1))
    start = time.perf_counter()
    with pytest.raises(FailedInput, match="bytes to decompress, over the 1,048,576 bytes allowed"):
        read_nibabel(tmp_path / "deep.nii.gz", small)
    assert time.perf_counter() - start < 0.5
    _nifti_with_offset(tmp_path / "neg.nii", -400)
    with pytest.raises(FailedInput, match="vox_offset is negative"):
        read_nibabel(tmp_path / "neg.nii")


def _extended_nifti(path: Path, offset: float, extensions: list[tuple[int, int]], tail: int = 0) -> None:
    """A NIfTI-1 file (``.nii.gz`` or ``.hdr.gz``) with the extension flag set and ``extensions``:
    (declared esize, bytes of content written) each; then ``tail`` zero bytes."""
    single = ".nii" in path.name
    img = (nib.Nifti1Image if single else nib.Nifti1Pair)(ct_volume(), AXIAL)
    raw = bytearray(img.header.binaryblock)
    raw[108:112] = np.array(offset, "<f4").tobytes()
    with gzip.open(path, "wb", compresslevel=1) as g:
        g.write(bytes(raw) + b"\x01\0\0\0")
        for esize, content in extensions:
            g.write(np.array([esize, 6], "<i4").tobytes() + b"A" * content)
        g.write(bytes(tail))
    if not single:
        (path.parent / path.name.replace(".hdr.gz", ".img")).write_bytes(ct_volume().tobytes("F"))


MiB = 1 << 20


@pytest.mark.parametrize(
    "name, offset, extensions, reason",
    [
        # One extension claiming 400 MiB in a header room of 16 bytes: nibabel trusts the claim.
        ("room.nii.gz", 368, [(400 * MiB, 8 * MiB)], r"extension 1 \(419,430,400 bytes\) runs past the vox_offset"),
        # vox_offset inside the header: nibabel reads extensions to the end of the decompressed file.
        ("zero.nii.gz", 0, [(8 * MiB, 8 * MiB - 8)], "extension flag is set but its vox_offset"),
        # A pair's header is read to its end: the cap holds there.
        ("pair.hdr.gz", 0, [(8 * MiB, 8 * MiB - 8)], r"runs past the 1,048,576 bytes allowed"),
        # A size under 8 makes nibabel read "the rest of the file" for the content.
        ("neg.hdr.gz", 0, [(0, 8 * MiB)], "declares a size of 0 bytes"),
        ("many.hdr.gz", 0, [(16, 8)] * 1100, "more than 1,024 extensions"),
    ],
)
def test_nifti_extensions_cannot_make_nibabel_decompress_past_the_header_cap(
    tmp_path: Path, name, offset, extensions, reason
) -> None:
    import time

    from medssl_scale.io.nibabel_io import read_nibabel

    path = tmp_path / name
    _extended_nifti(path, offset, extensions, tail=4096)
    assert path.stat().st_size < MiB
    start = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(FailedInput, match=reason):
            read_nibabel(path, Limits(max_header_bytes=MiB))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * MiB  # nibabel alone holds every declared extension: 8 MiB and more
    assert time.perf_counter() - start < 1.0


def test_nifti_with_a_real_extension_reads(tmp_path: Path) -> None:
    from medssl_scale.io.nibabel_io import read_nibabel

    volume = ct_volume()
    for name, cls in (("e.nii.gz", nib.Nifti1Image), ("e.hdr.gz", nib.Nifti1Pair), ("e2.nii", nib.Nifti2Image)):
        img = cls(volume, AXIAL)
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment" * 100))
        nib.save(img, tmp_path / name)
        np.testing.assert_array_equal(read_nibabel(tmp_path / name).array, volume)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes((tmp_path / "e.nii.gz").read_bytes()[:200])  # cut short
    with pytest.raises(FailedInput, match="truncated gzip stream"):
        read_nibabel(cut)


# ---------------------------------------------------------------- legacy and deflated DICOM


def test_legacy_dicom_without_file_meta_decodes(tmp_path: Path) -> None:
    volume = ct_volume()
    paths = write_series(tmp_path, volume, AXIAL, file_meta=False)
    assert paths[0].read_bytes()[128:132] != b"DICM" and b"\x02\x00\x10\x00" not in paths[0].read_bytes()[:512]
    header = scan_header(paths[0])
    assert header.series_uid and header.has_pixel_data
    rv = read(paths)
    np.testing.assert_array_equal(rv.array, volume)
    assert rv.meta["TransferSyntax"].startswith(pydicom.uid.UID(ImplicitVRLittleEndian).name)
    assert any("no file meta" in w for w in rv.warnings)


def _deflate_bomb(tmp_path: Path, rows: int, cols: int, pixel_bytes: int) -> Path:
    """A deflated CT slice whose pixel data is ``pixel_bytes`` of zeros (a few kB on disk)."""
    (src,) = write_series(tmp_path / "src", ct_volume()[:, :, :1], AXIAL, transfer_syntax=DeflatedExplicitVRLittleEndian)
    ds = pydicom.dcmread(src)
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = bytes(pixel_bytes)
    path = tmp_path / "bomb.dcm"
    ds.save_as(path)
    return path


def test_deflated_header_scan_inflates_only_the_header(tmp_path: Path) -> None:
    bomb = _deflate_bomb(tmp_path, 8192, 8192, 8192 * 8192 * 2)  # 128 MiB of pixels
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        header = scan_header(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert header.has_pixel_data and header.series_uid
    assert peak < 16 << 20  # pydicom alone inflates all 128 MiB


def test_deflated_pixels_never_inflate_beyond_what_the_header_declares(tmp_path: Path) -> None:
    small = Limits(max_header_bytes=1 << 20)  # keeps the test small
    volume = ct_volume()
    paths = write_series(tmp_path / "ok", volume, AXIAL, transfer_syntax=DeflatedExplicitVRLittleEndian)
    np.testing.assert_array_equal(read(paths).array, volume)
    # 24x20 pixels declared, 64 MiB of pixel data inflated: refused before it is all in memory.
    ds = pydicom.dcmread(paths[3])
    ds.PixelData = bytes(64 << 20)
    ds.save_as(paths[3])
    tracemalloc.start()
    try:
        with pytest.raises(FailedInput, match="deflated data set inflates to more than"):
            read(paths, small)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def _without_preamble(path: Path) -> Path:
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    out = path.with_name("np-" + path.name)
    out.write_bytes(data[132:])  # the group-0002 file meta now starts at byte 0
    return out


def test_deflated_file_without_a_preamble_is_inflated_within_the_cap(tmp_path: Path) -> None:
    volume = ct_volume()
    paths = write_series(tmp_path / "ok", volume, AXIAL, transfer_syntax=DeflatedExplicitVRLittleEndian)
    bare = [_without_preamble(p) for p in paths]
    for p in paths:
        p.unlink()
    assert scan_header(bare[0]).has_pixel_data
    np.testing.assert_array_equal(read(bare).array, volume)
    # A header element of 64 MiB of zeros: a few kB on disk; pydicom, forced, inflates it whole.
    ds = pydicom.dcmread(bare[0], force=True)
    ds.ImageComments = "A" * (64 << 20)
    ds.save_as(paths[0], enforce_file_format=True)
    bomb = _without_preamble(paths[0])
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(FailedInput, match="deflated header inflates to more than 1,048,576 bytes"):
            scan_header(bomb, Limits(max_header_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


# ---------------------------------------------------------------- instances sharing a SOPInstanceUID


def _sop_uids(paths) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_identical_copies_are_reported_as_duplicates_of_the_kept_file(tmp_path: Path) -> None:
    volume = ct_volume()
    first = write_series(tmp_path / "a", volume, AXIAL, seed=4)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = [tmp_path / "b" / p.name for p in first]
    rle = write_series(tmp_path / "c", volume, AXIAL, seed=4, transfer_syntax=pydicom.uid.RLELossless)
    assert _sop_uids(first) == _sop_uids(copy) == _sop_uids(rle)  # one series, three copies of each instance
    rv = read(first + copy + rle)
    np.testing.assert_array_equal(rv.array, volume)
    kept = {str(p) for p in first}
    assert len(rv.duplicates) == 2 * len(first)
    assert {d for d, _ in rv.duplicates} == {str(p) for p in copy + rle}
    assert all(k in kept for _, k in rv.duplicates)
    by_name = {Path(d).name: Path(k).name for d, k in rv.duplicates if Path(d).parent.name == "b"}
    assert by_name == {p.name: p.name for p in first}  # each copy points at the file it copies


def test_different_content_under_one_sop_uid_fails_and_names_the_uid(tmp_path: Path) -> None:
    first = write_series(tmp_path / "a", ct_volume(), AXIAL, seed=4)
    # Same Series and SOP UIDs, other pixels, another patient.
    other = write_series(tmp_path / "b", ct_volume(seed=9), AXIAL, seed=4, identifiers={"PatientID": "OTHER-77"})
    assert _sop_uids(first) == _sop_uids(other)
    with pytest.raises(FailedInput) as info:
        read(first + other)
    reason = info.value.reason
    assert "share SOPInstanceUID" in reason and "differ in patient" in reason
    assert any(uid in reason for uid in _sop_uids(first)) and "OTHER-77" not in reason
    # Same patient, other pixels: the pixels are compared, not only the headers.
    pixels = write_series(tmp_path / "c", ct_volume(seed=9), AXIAL, seed=4)
    with pytest.raises(FailedInput, match="differ in pixel data"):
        read(first + pixels)


def test_a_series_never_mixes_patients(tmp_path: Path) -> None:
    first = write_series(tmp_path / "a", ct_volume(), AXIAL, seed=4)
    series_uid = str(pydicom.dcmread(first[0]).SeriesInstanceUID)
    shifted = AXIAL.copy()
    shifted[2, 3] += SHAPE[2] * 2.5  # continues the stack: geometry alone would accept it
    more = write_series(tmp_path / "b", ct_volume(seed=2), shifted, seed=5, series_uid=series_uid,
                        identifiers={"PatientID": "OTHER-77"})
    assert not _sop_uids(first) & _sop_uids(more)
    with pytest.raises(FailedInput, match="series mixes 2 patients"):
        read(first + more)


# ---------------------------------------------------------------- kept text fields


@pytest.mark.parametrize(
    "planted, kept, expected",
    [
        # Name parts split on spaces and hyphens, not only on '^'.
        ({"PatientName": "van der Berg^Anna-Lena"}, "Anna Berg, Lena", "[redacted] [redacted], [redacted]"),
        ({"PatientName": "O'Neill^Mary"}, "ONEILL o'neill", "[redacted] [redacted]"),
        # Birth dates without leading zeros, with two-digit years, with month names.
        ({"PatientBirthDate": "19310907"}, "7.9.1931 07.09.31 9/7/31 07SEP1931 1931-9-7", " ".join(["[redacted]"] * 5)),
        # Ids written without their separator, or with another.
        ({"PatientID": "AB-1234"}, "ab1234 AB 1234", "[redacted] [redacted]"),
        ({"PatientID": "123-456"}, "123456 123/456", "[redacted] [redacted]"),
        # Whole words only: a short or common name leaves the anatomy alone.
        ({"PatientName": "Li^Men"}, "LIVER ABDOMEN li", "LIVER ABDOMEN [redacted]"),
        ({"PatientName": "Liver^Ann"}, "LIVERS ANNEX", "LIVERS ANNEX"),
        ({"PatientBirthDate": "19310907"}, "791931 19310", "791931 19310"),
    ],
)
def test_kept_text_fields_are_scrubbed_of_the_items_identifying_values(tmp_path: Path, planted, kept, expected) -> None:
    paths = write_series(tmp_path, ct_volume(), AXIAL, identifiers={**planted, "BodyPartExamined": kept})
    assert read(paths).meta["BodyPartExamined"] == expected


# ---------------------------------------------------------------- through a real ingest

PLANTED = {
    "PatientName": "ZQXDOE^ZQXJANE",
    "PatientID": "ZQXMRN4711",
    "PatientBirthDate": "19310917",
    # Kept fields quoting them, in other letter cases and date forms:
    "BodyPartExamined": "chest zqxdoe Zqxjane zqxmrn4711 17.09.1931",
    "ManufacturerModelName": "scanner of zqxjane",
    "SeriesDescription": "ZQXDOE ZQXMRN4711 1931-09-17",
}
NEEDLES = [b"zqxdoe", b"zqxjane", b"zqxmrn4711", b"19310917", b"17.09.1931", b"1931-09-17", b"other-77"]


def _every_output(root: Path):
    """Every file under the dataset, tar members included."""
    import tarfile

    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        yield str(path.relative_to(root)), path.read_bytes()
        if path.suffix == ".tar":
            with tarfile.open(path) as tf:
                for m in tf.getmembers():
                    data = tf.extractfile(m).read()
                    yield f"{path.name}:{m.name}", gzip.decompress(data) if m.name.endswith(".gz") else data


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    from sample_data import run_cli

    root = tmp_path_factory.mktemp("coll") / "site"
    volume = ct_volume()
    # One series, planted identifiers; an exact copy in another folder; a copy in another transfer syntax.
    first = write_series(root / "a", volume, AXIAL, seed=4, identifiers=PLANTED)
    shutil.copytree(root / "a", root / "b")
    write_series(root / "c", volume, AXIAL, seed=4, identifiers=PLANTED, transfer_syntax=pydicom.uid.RLELossless)
    # Another series, and under its UIDs other pixels of another patient.
    write_series(root / "d", volume, AXIAL, seed=6)
    write_series(root / "e", ct_volume(seed=9), AXIAL, seed=6, identifiers={"PatientID": "OTHER-77"})
    _nifti_with_offset(root / "vox0.nii", 0)
    secret = tmp_path_factory.mktemp("secret") / "secret"
    secret.write_text("a-site-secret-of-enough-bytes-0123")
    out = tmp_path_factory.mktemp("out") / "ds"
    res = run_cli("ingest", str(root), "--out", str(out), "--no-progress", "--secret-file", str(secret))
    return root, out, res, secret, [p.name for p in first]


def _records(out: Path):
    from medssl_scale.store.layout import DatasetDir
    from medssl_scale.store.manifest import latest, read_manifest

    return list(latest(read_manifest(DatasetDir(out).manifest)).values())


def test_ingest_records_copies_as_duplicates_and_fails_a_uid_conflict(ingested) -> None:
    root, out, _, secret, names = ingested
    recs = _records(out)
    assert sum(len(r.files or [r.source]) for r in recs) == sum(1 for p in root.rglob("*") if p.is_file())
    ok = [r for r in recs if r.status == "ok" and r.format == "dicom"]
    failed = [r for r in recs if r.status == "failed"]
    assert len(ok) == 1 and len(failed) == 1, [(r.source, r.status, r.reason) for r in recs]
    dups = [w for w in ok[0].warnings or [] if w.startswith("duplicate file")]
    assert len(dups) == 2 * len(names)
    for name in names:  # each copy is findable, with the file it copies
        assert f"duplicate file site/b/{name} left out: same SOPInstanceUID and content as site/a/{name}" in dups
    assert "share SOPInstanceUID" in failed[0].reason and "differ in patient" in failed[0].reason
    from ingest.deid import Pseudonymizer

    other = Pseudonymizer(secret.read_bytes().strip())("patient", "OTHER-77")
    assert all(r.patient != other for r in recs)


def test_kept_text_fields_lose_the_items_own_identifiers_everywhere(ingested) -> None:
    from medssl_scale.store.layout import DatasetDir
    from medssl_scale.store.volumes import volume_store

    _, out, res, _, _ = ingested
    (vid,) = [r.volume_id for r in _records(out) if r.status == "ok" and r.format == "dicom"]
    meta = volume_store(DatasetDir(out)).attrs(vid)["meta"]
    assert meta["BodyPartExamined"] == "chest [redacted] [redacted] [redacted]"  # the name's two words as one
    assert meta["ManufacturerModelName"] == "scanner of [redacted]"
    found = [(name, n) for name, data in _every_output(out) for n in NEEDLES if n in data.lower()]
    found += [("console", n) for n in NEEDLES if n in (res.stdout + res.stderr).lower().encode()]
    assert found == []


def test_ingest_records_the_vox_offset_repair(ingested) -> None:
    _, out, _, _, _ = ingested
    (rec,) = [r for r in _records(out) if r.source.endswith("vox0.nii")]
    assert rec.status == "ok" and any("vox_offset 0 lies inside the 348-byte header" in w for w in rec.warnings)
