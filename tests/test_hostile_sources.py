"""Hostile source trees through the real `medssl ingest`: nothing outside the source
folder reaches the dataset, special files never hang it, odd names are recorded
losslessly and never forge a log line."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import secrets
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from needs import missing
from sample_data import run_cli

from ingest.source_names import name_bytes, record_name
from medssl_scale.io.containment import SourceRoot
from medssl_scale.io.files import read_image_file
from medssl_scale.io.nibabel_io import read_nibabel
from medssl_scale.io.types import FailedInput, Limits
from medssl_scale.store.layout import DatasetDir
from medssl_scale.store.manifest import latest, read_manifest
from medssl_scale.store.volumes import volume_store
from medssl_scale.synth.phantoms import ct_phantom

SHAPE = (16, 16, 16)
TIMEOUT = 120  # a FIFO opened by mistake blocks for ever: fail instead


def _marker() -> np.ndarray:
    return np.frombuffer(secrets.token_bytes(16), np.int16).copy()


def _plant_secret(where: Path, marker: np.ndarray) -> Path:
    """A file outside the source folder whose bytes, read as int16 voxels, are the marker repeated."""
    where.mkdir(parents=True, exist_ok=True)
    secret = where / "site-secret"
    secret.write_bytes(np.tile(marker, 2 * np.prod(SHAPE) // marker.size).tobytes())
    return secret


def _mhd(path: Path, data_line: str) -> None:
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 16 16 16\nElementType = MET_SHORT\n"
                    "ElementSpacing = 1 1 1\n" + data_line + "\n")


def _nhdr(path: Path, data_line: str) -> None:
    path.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 16 16 16\nencoding: raw\nendian: little\n"
                    "spacings: 1 1 1\n" + data_line + "\n")


def _pair(path: Path) -> None:
    """A NIfTI .hdr/.img pair; the caller replaces the .img."""
    nib.save(nib.Nifti1Pair(np.zeros(SHAPE, np.int16), np.eye(4)), path)


def _good(path: Path, seed: int = 1) -> None:
    p = ct_phantom(shape=SHAPE, seed=seed)
    nib.save(nib.Nifti1Image(p.image, p.affine), path)


def _ingest(*args: str):
    return run_cli("ingest", *args, "--no-progress", timeout=TIMEOUT)


def _records(out: Path) -> dict:
    return {r.source: r for r in latest(read_manifest(DatasetDir(out).manifest)).values()}


def _forms(marker: np.ndarray) -> list[bytes]:
    # Canonical reorientation may reverse rows; MR is stored as float32.
    return [m.tobytes() for m in (marker, marker[::-1], marker.astype(np.float32), marker[::-1].astype(np.float32))]


def _leaks(out: Path, marker: np.ndarray) -> list[str]:
    """Where the marker appears: any output file's bytes, any decoded shard member, any decoded volume."""
    forms, found = _forms(marker), []
    for f in out.rglob("*"):
        if not f.is_file():
            continue
        data = f.read_bytes()
        if any(m in data for m in forms):
            found.append(str(f))
        if f.suffix == ".tar":
            with tarfile.open(f) as tar:
                for m in tar.getmembers():
                    raw = tar.extractfile(m).read()
                    if m.name.endswith(".gz"):
                        raw = gzip.decompress(raw)
                    if m.name.endswith((".npy", ".npy.gz")):
                        raw = np.load(io.BytesIO(raw)).tobytes()
                    if any(x in raw for x in forms):
                        found.append(f"{f}:{m.name}")
    vols = volume_store(DatasetDir(out))
    for vid in vols.ids():
        a = vols.read(vid)
        if any(m in np.ascontiguousarray(a).tobytes() or m in np.asfortranarray(a).tobytes(order="F") for m in forms):
            found.append(f"volumes.zarr/{vid}")
    return found


@pytest.fixture()
def hostile(tmp_path):
    """A source folder whose headers and links reach for a secret outside it."""
    marker = _marker()
    secret = _plant_secret(tmp_path / "elsewhere", marker)
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    nib.save(nib.Nifti1Image(np.tile(marker, np.prod(SHAPE) // marker.size).reshape(SHAPE), np.eye(4)), outside / "vol.nii")
    src = tmp_path / "src"
    src.mkdir()
    _good(src / "good.nii.gz")
    _pair(src / "pair.hdr")
    (src / "pair.img").unlink()
    (src / "pair.img").symlink_to(secret)                       # a pair's .img leaving the root
    _mhd(src / "single.mhd", "ElementDataFile = single.raw")
    (src / "single.raw").symlink_to(secret)                     # MetaImage data file
    _mhd(src / "listed.mhd", "ElementDataFile = LIST\nl0.raw")
    (src / "l0.raw").symlink_to(secret)                         # LIST form
    _mhd(src / "pattern.mhd", "ElementDataFile = p%02d.raw 0 0 1 3")
    (src / "p00.raw").symlink_to(secret)                        # pattern form
    _mhd(src / "spelled.mhd", "ELEMENTDATAFILE = good.raw\nElementDataFile = ../elsewhere/site-secret")
    _nhdr(src / "detached.nhdr", "data file: d.raw")
    (src / "d.raw").symlink_to(secret)                          # NRRD detached data file
    _nhdr(src / "nlist.nhdr", "data file: LIST\nn0.raw")
    (src / "n0.raw").symlink_to(secret)
    _nhdr(src / "dotdot.nhdr", "data file: ../elsewhere/site-secret")
    (src / "linked.nii").symlink_to(secret)                     # a main file leaving the root
    (src / "away").symlink_to(outside, target_is_directory=True)  # a folder leaving the root
    os.mkfifo(src / "pipe.nii.gz")
    _pair(src / "fifopair.hdr")
    (src / "fifopair.img").unlink()
    os.mkfifo(src / "fifopair.img")
    _mhd(src / "fifo.mhd", "ElementDataFile = fifo.raw")
    os.mkfifo(src / "fifo.raw")
    (src / "zero.nii").symlink_to("/dev/zero")
    _pair(src / "zeropair.hdr")
    (src / "zeropair.img").unlink()
    (src / "zeropair.img").symlink_to("/dev/zero")
    inside = src / "sub"
    inside.mkdir()
    _good(inside / "real.nii.gz", seed=2)
    (src / "alias.nii.gz").symlink_to(inside / "real.nii.gz")   # inside the root: fine
    return src, marker


def test_nothing_outside_the_source_reaches_the_dataset(hostile, tmp_path):
    src, marker = hostile
    out = tmp_path / "ds"
    _ingest(str(src), "--out", str(out))
    recs = _records(out)
    ok = {s for s, r in recs.items() if r.status == "ok" or (r.status == "skipped" and r.duplicate_of)}
    assert ok == {"src/good.nii.gz", "src/sub/real.nii.gz", "src/alias.nii.gz"}
    for name in ("pair.hdr", "single.mhd", "listed.mhd", "pattern.mhd", "detached.nhdr", "nlist.nhdr",
                 "fifopair.hdr", "fifo.mhd", "zeropair.hdr"):
        assert recs[f"src/{name}"].status == "failed", name
    assert "outside the source folder" in recs["src/pair.hdr"].reason
    assert "outside its own folder" in recs["src/spelled.mhd"].reason
    assert "outside its own folder" in recs["src/dotdot.nhdr"].reason
    assert "pipe" in recs["src/fifopair.hdr"].reason and "pipe" in recs["src/fifo.mhd"].reason
    assert re.search("device|/dev", recs["src/zeropair.hdr"].reason)
    assert recs["src/pipe.nii.gz"].status == "skipped" and "pipe" in recs["src/pipe.nii.gz"].reason
    assert recs["src/zero.nii"].status == "skipped" and re.search("device|/dev", recs["src/zero.nii"].reason)
    for name in ("linked.nii", "away", "pair.img", "single.raw"):
        assert recs[f"src/{name}"].status == "skipped" and "not followed" in recs[f"src/{name}"].reason, name
    assert _leaks(out, marker) == []


def test_follow_symlinks_follows_links_but_never_special_files(hostile, tmp_path):
    src, marker = hostile
    out = tmp_path / "ds"
    _ingest(str(src), "--out", str(out), "--follow-symlinks")
    recs = _records(out)
    assert recs["src/away/vol.nii"].status == "ok"
    assert recs["src/pair.hdr"].status == "ok"
    assert _leaks(out, marker)  # the detector sees what the option let in
    assert "pipe" in recs["src/fifo.mhd"].reason and re.search("device|/dev", recs["src/zeropair.hdr"].reason)
    assert recs["src/zero.nii"].status == "skipped" and re.search("device|/dev", recs["src/zero.nii"].reason)
    assert "outside its own folder" in recs["src/spelled.mhd"].reason


def test_special_files_given_as_sources_are_refused_at_once(tmp_path):
    fifo = tmp_path / "scan.nii.gz"
    os.mkfifo(fifo)
    out = tmp_path / "ds"
    _ingest(str(fifo), "/dev/zero", "--out", str(out))
    recs = _records(out)
    assert recs["scan.nii.gz"].status == "failed" and "pipe" in recs["scan.nii.gz"].reason
    assert recs["zero"].status == "failed" and re.search("device|/dev", recs["zero"].reason)


def test_readers_refuse_data_files_resolving_outside(tmp_path):
    """Called directly (no discovery), readers hold a header to its own folder."""
    marker = _marker()
    secret = _plant_secret(tmp_path / "elsewhere", marker)
    src = tmp_path / "src"
    src.mkdir()
    _mhd(src / "a.mhd", "ElementDataFile = a.raw")
    (src / "a.raw").symlink_to(secret)
    _pair(src / "b.hdr")
    (src / "b.img").unlink()
    (src / "b.img").symlink_to(secret)
    _nhdr(src / "c.nhdr", "data file: img%d.raw 1 3 1 extra %s")
    for path in (src / "a.mhd", src / "b.hdr"):
        with pytest.raises(FailedInput, match="outside the source folder"):
            read_image_file(path)
    with pytest.raises(FailedInput, match="cannot validate|not one we can validate"):
        read_image_file(src / "c.nhdr")
    root = SourceRoot.of(tmp_path)  # a wider root that holds the secret: allowed
    assert read_image_file(src / "b.hdr", root=root).array.shape == SHAPE


LATIN1_DIR, LATIN1_FILE = b"caf\xe9", b"sc\xe8ne.nii.gz"


def test_latin1_names_ingest_resume_and_hash(tmp_path):
    src = tmp_path / "src"
    folder = os.path.join(os.fsencode(src), LATIN1_DIR)
    os.makedirs(folder)
    _good(Path(os.fsdecode(os.path.join(folder, LATIN1_FILE))))
    out = tmp_path / "ds"
    _ingest(str(src), "--out", str(out))
    recs = _records(out)
    name = "src/" + record_name(LATIN1_DIR) + "/" + record_name(LATIN1_FILE)
    assert recs[name].status == "ok"
    assert name_bytes(name) == b"src/" + LATIN1_DIR + b"/" + LATIN1_FILE
    vols = volume_store(DatasetDir(out))
    assert vols.attrs(recs[name].volume_id)["source"] == name
    lines = DatasetDir(out).manifest.read_bytes()
    _ingest(str(src), "--out", str(out), "--resume")
    assert DatasetDir(out).manifest.read_bytes() == lines
    hashed = tmp_path / "hashed"
    _ingest(str(src), "--out", str(hashed), "--hash-paths")
    (rec,) = _records(hashed).values()
    assert rec.status == "ok" and rec.source.startswith("src-") and rec.source.endswith(".nii.gz")
    assert b"caf" not in b"".join(f.read_bytes() for f in hashed.rglob("*") if f.is_file() and f.suffix != ".tar")


def test_a_newline_in_a_name_cannot_forge_a_log_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    forged = "2030-01-01T00:00:00+00:00 ok image forged.nii.gz"
    (src / f"bad\n{forged}\r.nii.gz").write_bytes(b"not a nifti" * 50)
    (src / "x[").mkdir()
    (src / "x[" / "]y.nii.gz").write_bytes(b"junk")  # "src/x[/]y": a closing tag to Rich markup
    out = tmp_path / "ds"
    res = _ingest(str(src), "--out", str(out))
    assert "src/x[/]y.nii.gz" in res.stdout
    rec = _records(out)[record_name(f"src/bad\n{forged}\r.nii.gz")]
    assert rec.status == "failed" and name_bytes(rec.source) == f"src/bad\n{forged}\r.nii.gz".encode()
    log = b"".join(f.read_bytes() for f in (out / "logs").iterdir())
    lines = log.decode("utf-8").split("\n")[:-1]
    assert all(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 ", line) for line in lines), lines
    assert not any(line.startswith("2030") for line in lines) and b"\r" not in log
    assert any("bad\\x0a2030" in line for line in lines)
    assert json.loads(DatasetDir(out).manifest.read_text().splitlines()[0])["source"] == rec.source


def test_class_names_come_only_from_inside_the_source(tmp_path):
    word = "leak" + secrets.token_hex(8)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": word}}))
    src = tmp_path / "src"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    p = ct_phantom(shape=SHAPE, seed=4)
    nib.save(nib.Nifti1Image(p.image, p.affine), src / "imagesTr" / "ct_000_0000.nii.gz")
    nib.save(nib.Nifti1Image(p.label, p.affine), src / "labelsTr" / "ct_000.nii.gz")
    (src / "dataset.json").symlink_to(tmp_path / "elsewhere" / "dataset.json")
    out = tmp_path / "ds"
    _ingest(str(src), "--out", str(out))
    assert _records(out)["src/imagesTr/ct_000_0000.nii.gz"].has_label
    assert not [f for f in out.rglob("*") if f.is_file() and word.encode() in f.read_bytes()]


def _analyze(path: Path) -> None:
    """A plain Analyze .hdr/.img pair: nibabel loads it as SPM Analyze and reads a .mat beside it while loading."""
    nib.save(nib.AnalyzeImage(np.zeros(SHAPE, np.int16), np.eye(4)), path)


def test_an_analyze_mat_is_checked_before_nibabel_reads_it(tmp_path):
    """The SPM .mat is opened inside nib.load: a FIFO there hung ingest, /dev/zero filled memory,
    a link leaving the folder was read before the file map was checked."""
    marker = _marker()
    secret = _plant_secret(tmp_path / "elsewhere", marker)
    src = tmp_path / "src"
    src.mkdir()
    for stem in ("fifo", "zero", "away", "upper"):
        _analyze(src / f"{stem}.hdr")
    os.mkfifo(src / "fifo.mat")
    (src / "zero.mat").symlink_to("/dev/zero")
    (src / "away.mat").symlink_to(secret)
    (src / "upper.MAT").symlink_to(secret)  # another case spelling: one file on case-insensitive systems
    _analyze(src / "plain.hdr")
    (src / "matlab.mat").write_bytes(b"MATLAB 5.0 MAT-file")  # no header beside it: just some other file
    out = tmp_path / "ds"
    _ingest(str(src), "--out", str(out))
    recs = _records(out)
    assert recs["src/plain.hdr"].status in ("ok", "skipped")  # an all-zero volume is fine either way
    assert "pipe" in recs["src/fifo.hdr"].reason and recs["src/fifo.hdr"].status == "failed"
    assert re.search("device|/dev", recs["src/zero.hdr"].reason) and recs["src/zero.hdr"].status == "failed"
    for stem in ("away", "upper"):
        assert recs[f"src/{stem}.hdr"].status == "failed" and "outside the source folder" in recs[f"src/{stem}.hdr"].reason
    assert recs["src/matlab.mat"].status == "skipped" and "not a medical image" in recs["src/matlab.mat"].reason
    assert _leaks(out, marker) == []

    root = SourceRoot.of(src)  # the nibabel reader on its own, without discovery's companion list
    with pytest.raises(FailedInput, match="device|/dev"):
        read_nibabel(src / "zero.hdr", root=root)
    for stem in ("away", "upper"):
        with pytest.raises(FailedInput, match="outside the source folder"):
            read_nibabel(src / f"{stem}.hdr", root=root)


def test_par_rec_and_afni_data_links_are_refused(tmp_path):
    data = Path(nib.__file__).parent / "tests" / "data"
    if not (data / "phantom_EPI_asc_CLEAR_2_1.PAR").exists() or not (data / "scaled+tlrc.HEAD").exists():
        missing("nibabel's test data (tests/data)", "install nibabel from a wheel, which bundles it")
    marker = _marker()
    secret = _plant_secret(tmp_path / "elsewhere", marker)
    src = tmp_path / "src"
    src.mkdir()
    (src / "phantom.PAR").write_bytes((data / "phantom_EPI_asc_CLEAR_2_1.PAR").read_bytes())
    (src / "phantom.REC").symlink_to(secret)
    (src / "scaled+tlrc.HEAD").write_bytes((data / "scaled+tlrc.HEAD").read_bytes())
    (src / "scaled+tlrc.BRIK").symlink_to(secret)
    root = SourceRoot.of(src)
    for header in ("phantom.PAR", "scaled+tlrc.HEAD"):
        with pytest.raises(FailedInput, match="outside the source folder"):
            read_nibabel(src / header, root=root)
        with pytest.raises(FailedInput, match="outside the source folder"):
            read_image_file(src / header)


def test_a_dicom_file_linked_from_outside_never_reaches_the_dataset(tmp_path):
    """One file of a series folder is a link to another patient's DICOM outside the source."""
    from ingest.discover import Item
    from ingest.pipeline import Options, process_item
    from medssl_scale.io.dicom import read_series, scan_header
    from medssl_scale.synth.dicom import write_series

    marker = _marker()
    shape, affine = (24, 16, 6), np.diag([-0.7, -0.8, 2.5, 1.0])
    outsider = np.broadcast_to(np.tile(marker, 3)[:, None, None], shape).astype(np.int16)
    inside = np.random.default_rng(0).integers(-1000, 1000, size=shape).astype(np.int16)
    uid = "1.2.826.0.1.3680043.8.498.4242"
    theirs = write_series(tmp_path / "elsewhere", outsider, affine, series_uid=uid, shuffle=False, rescale=(1.0, 0.0),
                          identifiers={"PatientName": "OUTSIDER^EVE", "PatientID": "OUT-4242"})
    src = tmp_path / "src"
    ours = write_series(src / "series", inside, affine, series_uid=uid, shuffle=False)
    ours[3].unlink()
    ours[3].symlink_to(theirs[3])
    os.mkfifo(src / "series" / "pipe.dcm")

    out = tmp_path / "ds"
    _ingest(str(src), "--out", str(out))
    recs = _records(out)
    linked = f"src/series/{ours[3].name}"
    assert recs[linked].status == "skipped" and "not followed" in recs[linked].reason
    assert recs["src/series/pipe.dcm"].status == "skipped" and "pipe" in recs["src/series/pipe.dcm"].reason
    assert _leaks(out, marker) == []
    assert not [f for f in out.rglob("*") if f.is_file() and b"OUT-4242" in f.read_bytes()]

    # Read time holds the series to its root too (a file swapped for a link after discovery, an API caller).
    with pytest.raises(FailedInput, match="outside the source folder"):
        read_series([str(p) for p in ours], Limits(), SourceRoot.of(src))
    item = Item("dicom", "src/series", [str(p) for p in ours], [f"src/series/{p.name}" for p in ours],
                root=SourceRoot.of(src))
    (rec,) = process_item(item, Options(out=tmp_path / "direct", secret=b"s" * 32)).records
    assert rec.status == "failed" and "outside the source folder" in rec.reason
    with pytest.raises(FailedInput, match="pipe"):  # stat first: opening it would block
        scan_header(src / "series" / "pipe.dcm")


def test_follow_symlinks_is_pinned_with_the_dataset(tmp_path):
    """A resume without --follow-symlinks would turn the linked item's ok record into skipped
    and orphan its array: the setting is pinned and a change refused before anything is written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    _good(outside / "vol.nii.gz", seed=3)
    src = tmp_path / "src"
    src.mkdir()
    _good(src / "own.nii.gz")
    (src / "linked.nii.gz").symlink_to(outside / "vol.nii.gz")
    out = tmp_path / "ds"
    _ingest(str(src), "--out", str(out), "--follow-symlinks")
    ds = DatasetDir(out)
    assert json.loads(ds.settings.read_text())["follow_symlinks"] is True
    assert _records(out)["src/linked.nii.gz"].status == "ok"
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file() and "logs" not in f.parts}
    res = run_cli("ingest", str(src), "--out", str(out), "--resume", "--no-progress", check=False, timeout=TIMEOUT)
    assert res.returncode != 0 and "follow_symlinks True (now False)" in res.stderr + res.stdout
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file() and "logs" not in f.parts} == before
    _ingest(str(src), "--out", str(out), "--resume", "--follow-symlinks")  # the same setting: fine
    assert _records(out)["src/linked.nii.gz"].status == "ok"

    # A dataset pinned before the setting existed was ingested without it.
    settings = json.loads(ds.settings.read_text())
    del settings["follow_symlinks"]
    ds.settings.write_text(json.dumps(settings))
    res = run_cli("ingest", str(src), "--out", str(out), "--resume", "--follow-symlinks", "--no-progress",
                  check=False, timeout=TIMEOUT)
    assert res.returncode != 0 and "follow_symlinks False (now True)" in res.stderr + res.stdout

    settings["follow_symlinks"], settings["run"] = True, "rm -rf /"  # read back as untrusted input
    ds.settings.write_text(json.dumps(settings))
    res = run_cli("ingest", str(src), "--out", str(out), "--resume", "--follow-symlinks", "--no-progress",
                  check=False, timeout=TIMEOUT)
    assert res.returncode != 0 and "ingest.json" in res.stderr + res.stdout and "run" in res.stderr + res.stdout


def test_partitions_must_agree_on_follow_symlinks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for seed in (1, 2):
        _good(src / f"v{seed}.nii.gz", seed=seed)
    out = tmp_path / "ds"
    _ingest(str(src), "--out", str(out), "--partition", "0/2", "--follow-symlinks")
    _ingest(str(src), "--out", str(out), "--partition", "1/2")
    res = run_cli("ingest", "--out", str(out), "--finalize", "2", "--no-progress", check=False, timeout=TIMEOUT)
    assert res.returncode != 0 and "follow_symlinks" in res.stderr and "other settings" in res.stderr
    assert not DatasetDir(out).manifest.exists()  # nothing merged


@pytest.mark.parametrize("userblock", [0, 512])
def test_minc2_hdf5_is_read_only_when_it_names_no_other_file(tmp_path, userblock):
    """HDF5 can keep a dataset's bytes in other files (external storage, virtual datasets, external links).
    Without h5py nothing can check that, and the file is refused; with it, this is not HDF5 h5py reads."""
    path = tmp_path / "scan.mnc"
    path.write_bytes(b"\0" * userblock + b"\x89HDF\r\n\x1a\n" + secrets.token_bytes(200))
    with pytest.raises(FailedInput, match=r"MINC2 \(HDF5\)"):
        read_nibabel(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another owner needs root")
def test_a_hard_link_owned_by_someone_else_is_noted_in_the_record(tmp_path):
    """A hard link is the file itself, wherever its other names are: containment cannot refuse it, the record says so."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _good(elsewhere / "theirs.nii.gz", seed=5)
    os.chown(elsewhere / "theirs.nii.gz", 4242, 4242)
    src = tmp_path / "src"
    src.mkdir()
    _good(src / "own.nii.gz")
    os.link(elsewhere / "theirs.nii.gz", src / "linked.nii.gz")
    os.link(src / "own.nii.gz", src / "own-copy.nii.gz")  # a hard link of the folder owner's own: no note
    out = tmp_path / "ds"
    _ingest(str(src), "--out", str(out))
    recs = _records(out)
    assert any("hard links" in w and "uid 4242" in w for w in recs["src/linked.nii.gz"].warnings or [])
    assert not any("hard links" in w for s in ("src/own.nii.gz", "src/own-copy.nii.gz") for w in recs[s].warnings or [])


def test_an_spm_mat_too_large_for_its_two_matrices_is_refused_before_it_is_inflated(tmp_path):
    """scipy inflates a whole .mat while nibabel loads the header: 50 MB of zeros compress to ~50 KB."""
    import scipy.io
    import tracemalloc

    src = tmp_path / "src"
    src.mkdir()
    _analyze(src / "bomb.hdr")
    scipy.io.savemat(src / "bomb.mat", {"junk": np.zeros(50 << 17)}, do_compression=True)  # 50 MB of float64 zeros
    _analyze(src / "spm.hdr")
    scipy.io.savemat(src / "spm.mat", {"M": np.eye(4), "mat": np.eye(4)})  # what SPM writes: read as usual
    root = SourceRoot.of(src)
    tracemalloc.start()
    with pytest.raises(FailedInput, match="larger than"):
        read_nibabel(src / "bomb.hdr", root=root)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert read_nibabel(src / "spm.hdr", root=root).array.shape[:3] == tuple(SHAPE)
