"""Bounded resources: a worker's peak memory per item, the --max-worker-memory cap, and --spacing against the caps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sample_data import run_cli

from ingest.discover import Item
from ingest.pipeline import Options, process_item
from ingest.pool import memory_cap
from medssl_scale.io import Limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import ingest_memory  # noqa: E402

# What docs/ingest.md states: a worker's peak growth over one item, as a multiple of the stored volume's bytes
# (int16 CT, float32 MR), measured by bench/ingest_memory.py at MEASURED_SHAPE, per source kind.
STATED_MULTIPLE = {"ct": 3.4, "ct_slope": 4.1, "ct_uint16": 3.4, "ct_uint16_slope": 4.1, "mr": 2.8, "dicom_ct": 2.9, "dicom_ct_slope": 4.1,
                   "nrrd_ct": 4.9, "mha_mr": 2.5}
MEASURED_SHAPE = (256, 256, 128)


def _nifti(path: Path, shape: tuple[int, int, int], dtype: str = "int16", spacing: float = 1.0) -> Path:
    a = np.zeros(shape, dtype)
    a[shape[0] // 4: 3 * shape[0] // 4, ...] = 1064
    img = nib.Nifti1Image(a, np.diag([spacing, spacing, spacing, 1.0]))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, path)
    return path


def _records(ds: Path) -> dict[str, dict]:
    recs = [json.loads(line) for line in (ds / "manifest.jsonl").read_text().splitlines()]
    return {r["source"]: r for r in recs}


@pytest.mark.parametrize("kind", sorted(STATED_MULTIPLE))
def test_worker_peak_memory_stays_within_the_stated_multiple(tmp_path, kind):
    # Measured inside the child, from a reset peak (VmHWM after clear_refs), so the test process's own
    # history (torch imported, earlier tests) cannot hide a copy of the volume.
    res = ingest_memory.measure(kind, MEASURED_SHAPE, tmp_path)
    assert res["status"] == "ok", res
    if ingest_memory.KINDS[kind][0] == "nifti":
        assert res["source_mb"] < 1.0, res  # the "1 MB .nii.gz"
    assert res["peak_multiple"] <= STATED_MULTIPLE[kind], res


def test_memory_cap_fails_items_cleanly_and_the_run_goes_on(tmp_path):
    # The cap counts the worker's whole heap: leave it the libraries' share plus 100 MB.
    base = subprocess.run([sys.executable, "-c", "import ingest.pool\n"
                           "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmData')))"],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    cap = int(base.stdout) * 1024 + 100_000_000
    src = tmp_path / "src"
    src.mkdir()
    _nifti(src / "small.nii.gz", (64, 64, 32))
    # Passes the up-front estimate (18M voxels x 12 B < cap) but its float64 voxels alone are 144 MB.
    _nifti(src / "wide.nii.gz", (300, 300, 200), dtype="float64")
    # Refused from its header: 60M voxels need ~720 MB.
    _nifti(src / "huge.nii.gz", (400, 400, 375))
    assert 18_000_000 * 12 < cap < 60_000_000 * 12
    out = tmp_path / "ds"
    run_cli("ingest", str(src), "--out", str(out), "--no-progress", "--workers", "2", "--max-worker-memory", str(cap))
    recs = _records(out)
    assert recs["src/small.nii.gz"]["status"] == "ok"
    for name in ("src/wide.nii.gz", "src/huge.nii.gz"):
        assert recs[name]["status"] == "failed", recs[name]
        assert recs[name]["reason"].startswith("not enough memory"), recs[name]
    assert "--max-worker-memory" in recs["src/huge.nii.gz"]["reason"] and "400x400x375" in recs["src/huge.nii.gz"]["reason"]
    # No worker died for it: a dead worker's item reads "the reader process died".
    assert not any("process died" in (r.get("reason") or "") for r in recs.values())


def test_resampling_is_checked_against_the_voxel_cap_before_allocating(tmp_path):
    src = _nifti(tmp_path / "coarse.nii.gz", (64, 64, 64), spacing=25.0)
    item = Item("file", "coarse.nii.gz", [str(src)], ["coarse.nii.gz"])
    opts = Options(out=tmp_path / "ds", secret=b"s" * 32, spacing=(1.5, 1.5, 1.5))
    # The old path allocated the 1067^3 float32 grid (4.9 GB): under a 1 GB cap that is a MemoryError.
    with memory_cap(1 << 30):
        rec = process_item(item, opts).records[0]
    assert rec.status == "failed"
    assert rec.reason.startswith("resampling to 1.5x1.5x1.5 mm makes 1067x1067x1067 = 1,214,767,763 voxels"), rec.reason
    assert "--max-voxels" in rec.reason

    # Within the voxel cap but over the memory cap: 160^3 at 10 mm needs ~49 MB.
    opts = Options(out=tmp_path / "ds", secret=b"s" * 32, spacing=(10.0, 10.0, 10.0), limits=Limits(max_memory=40_000_000))
    rec = process_item(item, opts).records[0]
    assert rec.status == "failed" and rec.reason.startswith("not enough memory (resampling to 10x10x10 mm makes 160x160x160"), rec.reason


def test_read_bounded_refuses_what_is_over_its_cap_or_not_a_file(tmp_path):
    import os
    import threading

    from medssl_scale.io.bounded import FileTooLarge, NotARegularFile, read_bounded

    p = tmp_path / "small.json"
    p.write_bytes(b"x" * 10)
    assert read_bounded(p, 10, "a test file") == b"x" * 10
    with pytest.raises(FileTooLarge, match=r"small.json: larger than 9 bytes, the most a test file may have"):
        read_bounded(p, 9, "a test file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = threading.Event()
    def refuse():
        with pytest.raises(NotARegularFile, match="fifo: a test file is not a regular file"):
            read_bounded(fifo, 10, "a test file")
        done.set()
    t = threading.Thread(target=refuse, daemon=True)
    t.start()
    t.join(5)
    assert done.is_set()  # refused at once: no writer ever opens the FIFO
    for special in ("/dev/zero", tmp_path):
        with pytest.raises(NotARegularFile):
            read_bounded(special, 10, "a test file")


def test_disk_full_fails_items_naming_the_dataset_and_resume_equals_a_clean_run(tmp_path):
    import resource
    import signal

    from sample_data import assert_same_dataset

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # small chunks once compressed: these fit under the file size limit
        _nifti(src / f"smooth{i}.nii.gz", (40, 36, 24 + i))
    for i in range(2):  # noise does not compress: each volume's chunk files are over the limit
        a = rng.integers(-1000, 2000, (64, 64, 40 + i), dtype=np.int16)
        nib.save(nib.Nifti1Image(a, np.eye(4)), src / f"noise{i}.nii.gz")
    args = ["--no-progress", "--workers", "1", "--chunk", "64"]
    limit = 150_000

    def small_files():  # a disk that takes no file over 150 kB: writes past it fail with EFBIG, as a full disk fails with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "ds"
    res = subprocess.run([sys.executable, "-m", "medssl_scale.cli", "ingest", str(src), "--out", str(out), *args],
                         capture_output=True, text=True, preexec_fn=small_files, cwd=ROOT)
    recs = _records(out)
    failed = {k: r for k, r in recs.items() if r["status"] == "failed"}
    assert set(failed) == {"src/noise0.nii.gz", "src/noise1.nii.gz"}, (res.stderr[-2000:], recs)
    for r in failed.values():
        assert r["reason"] == (f"could not write the dataset {out}: file too large for this file system or process "
                               "(file size limit) (EFBIG); free space and rerun with --resume"), r
    assert recs["src/smooth0.nii.gz"]["status"] == "ok"

    run_cli("ingest", str(src), "--out", str(out), "--resume", *args)
    clean = tmp_path / "clean"
    run_cli("ingest", str(src), "--out", str(clean), *args)
    assert_same_dataset(clean, out)
    # Nothing half-written is left behind: no temporary names anywhere in the resumed dataset.
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".")], sorted(out.rglob("*"))

    # A disk too full for the manifest itself: the run stops saying so (no traceback), and --resume finishes it.
    limit = 300
    out = tmp_path / "ds2"
    res = subprocess.run([sys.executable, "-m", "medssl_scale.cli", "ingest", str(src), "--out", str(out), *args],
                         capture_output=True, text=True, preexec_fn=small_files, cwd=ROOT)
    assert res.returncode == 2, res.stderr[-2000:]
    said = " ".join(res.stderr.split())
    assert f"medssl ingest: could not write the dataset {out}: file too large" in said and "Traceback" not in said, said
    run_cli("ingest", str(src), "--out", str(out), "--resume", *args)
    assert_same_dataset(clean, out)
