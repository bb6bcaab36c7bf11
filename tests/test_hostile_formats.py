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


def test_deflated_pixels_never_inflate_beyond_what_the_header_declares(tmp_path: Path, monkeypatch) -> None:
    import medssl_scale.io.dicom as dicom

    monkeypatch.setattr(dicom, "HEADER_INFLATE_LIMIT", 1 << 20)  # keeps the test small
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
            read(paths)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
