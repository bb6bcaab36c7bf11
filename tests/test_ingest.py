"""The ingest tool end to end on real files: statuses, geometry, labels, idempotence, parallelism."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import webdataset as wds
from sample_data import (
    NIB_DATA,
    assert_same_dataset,
    dicom_series,
    mixed_collection,
    phantom_collection,
    run_cli,
)

from ingest.runner import IngestConfig, OutputError, run_ingest
from medssl_scale.inspect import check_dataset
from medssl_scale.store.layout import DatasetDir
from medssl_scale.store.manifest import latest, read_manifest
from medssl_scale.store.shards import read_index, shard_urls
from medssl_scale.store.volumes import label_store, volume_store
from medssl_scale.synth.phantoms import ct_phantom


def ingest(src, out, **kw):
    cfg = IngestConfig(sources=src if isinstance(src, list) else [src], out=out, **kw)
    return run_ingest(cfg)


def records(out):
    return {r.source: r for r in latest(read_manifest(DatasetDir(out).manifest)).values()}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = mixed_collection(tmp_path_factory.mktemp("coll") / "hosp")
    out = tmp_path_factory.mktemp("out") / "ds"
    summary, stats = ingest(root, out, workers=2, shard_size=200_000)
    return root, out, summary, stats


def test_every_input_is_accounted_for(mixed):
    root, out, summary, _ = mixed
    recs = records(out)
    files = {str(p.relative_to(root.parent)) for p in root.rglob("*") if p.is_file()}
    covered = set()
    for r in recs.values():
        covered.update(r.files or [r.source])
    assert files == covered
    by = {s: r for s, r in recs.items()}
    assert by["hosp/bundled/example4d.nii.gz"].status == "skipped" and "4D" in by["hosp/bundled/example4d.nii.gz"].reason
    assert by["hosp/bundled/notes.txt"].status == "skipped"
    assert by["hosp/bundled/anatomical.nii"].status == "ok" and by["hosp/bundled/anatomical.nii"].modality == "MR"
    series = [r for r in recs.values() if "#series-" in r.source]
    assert len(series) == 2 and all(r.status == "ok" and r.format == "dicom" and r.modality == "CT" for r in series)
    assert all(r.modality_from == "header" for r in series)
    assert summary["by_status"]["ok"] == 3 + 1 + 2 + 1  # CT phantoms, MR phantom, DICOM series, anatomical
    assert by["hosp/bundled/test.mgz"].status == "skipped"  # nibabel's test.mgz is 4D
    assert check_dataset(DatasetDir(out)) == []


def test_volumes_are_canonical_ras_with_contract_attributes(mixed):
    root, out, _, _ = mixed
    recs = records(out)
    ds = DatasetDir(out)
    vols = volume_store(ds)
    r = recs["hosp/phantoms/imagesTr/ct_001_0000.nii.gz"]
    attrs = vols.attrs(r.volume_id)
    for key in ("spacing", "origin", "direction", "modality", "source_sha256", "volume_id", "stats"):
        assert key in attrs
    assert attrs["orientation"] == "RAS" and attrs["units"] == "HU"
    assert vols.open(r.volume_id).dtype == np.int16
    # the stored array is the source image, reoriented to RAS with world coordinates kept
    img = nib.as_closest_canonical(nib.load(root / "phantoms/imagesTr/ct_001_0000.nii.gz"))
    np.testing.assert_array_equal(vols.read(r.volume_id), np.asarray(img.dataobj))
    np.testing.assert_allclose(attrs["origin"], img.affine[:3, 3], atol=1e-3)
    # an MR keeps float scanner intensities
    mr = recs["hosp/phantoms/mr_000.nii.gz"]
    assert vols.open(mr.volume_id).dtype == np.float32 and mr.modality == "MR"


def test_oblique_dicom_series_geometry_survives(mixed):
    _, out, _, _ = mixed
    vols = volume_store(DatasetDir(out))
    series = sorted((r for r in records(out).values() if "#series-" in r.source), key=lambda r: r.source)
    for r in series:
        attrs = vols.attrs(r.volume_id)
        d = np.array(attrs["direction"])
        np.testing.assert_allclose(np.linalg.norm(d, axis=0), 1.0, atol=1e-6)
        # closest canonical: each array axis is still nearest to its RAS axis
        assert np.all(np.argmax(np.abs(d), axis=0) == [0, 1, 2]) and np.all(np.diag(d) > 0)
        assert not np.allclose(d, np.eye(3), atol=1e-3)  # the oblique tilt is kept, not resampled away
        assert r.patient and r.patient.startswith("pat-") and r.study


def test_labels_are_stored_with_class_names_and_shards_carry_them(mixed):
    _, out, _, _ = mixed
    ds = DatasetDir(out)
    recs = records(out)
    img = recs["hosp/phantoms/imagesTr/ct_000_0000.nii.gz"]
    assert img.has_label and img.label_source == "hosp/phantoms/labelsTr/ct_000.nii.gz"
    assert recs["hosp/phantoms/labelsTr/ct_000.nii.gz"].status == "ok"
    labs = label_store(ds)
    lab = labs.read(img.volume_id)
    assert lab.shape == tuple(img.shape) and lab.dtype == np.uint8
    classes = labs.attrs(img.volume_id)["classes"]
    assert classes["1"] == "liver" and classes["2"] == "spleen"
    samples = {s["__key__"]: s for s in wds.WebDataset(shard_urls(ds), shardshuffle=False).decode()}
    assert set(samples) == {r.volume_id for r in recs.values() if r.status == "ok" and r.kind == "image"}
    s = samples[img.volume_id]
    np.testing.assert_array_equal(s["label.npy"], lab)
    np.testing.assert_array_equal(s["image.npy"], volume_store(ds).read(img.volume_id))
    assert s["meta.json"]["modality"] == "CT" and s["meta.json"]["classes"]["1"] == "liver"
    assert len(read_index(ds)["shards"]) > 1  # small target size: several shards


def test_rerun_adds_nothing(mixed, tmp_path):
    root, out, _, _ = mixed
    copy = tmp_path / "ds"
    shutil.copytree(out, copy)
    before = (copy / "manifest.jsonl").read_bytes(), (copy / "shards" / "index.json").read_bytes()
    _, stats = ingest(root, copy, workers=1)
    assert stats.processed == 0 and stats.unchanged > 0 and stats.new == {}
    assert ((copy / "manifest.jsonl").read_bytes(), (copy / "shards" / "index.json").read_bytes()) == before


def test_one_worker_and_two_workers_agree(mixed, tmp_path):
    root, out, _, _ = mixed
    ingest(root, tmp_path / "one", workers=1, shard_size=200_000)
    assert_same_dataset(out, tmp_path / "one")


def test_duplicates_are_skipped_and_new_inputs_extend_the_dataset(tmp_path):
    src = phantom_collection(tmp_path / "a", n_ct=2, n_mr=0)
    ingest(src, tmp_path / "ds")
    more = tmp_path / "b"
    more.mkdir()
    shutil.copy(src / "imagesTr/ct_000_0000.nii.gz", more / "copy.nii.gz")
    p = ct_phantom(shape=(30, 30, 20), seed=9)
    nib.save(nib.Nifti1Image(p.image, p.affine), more / "new.nii.gz")
    _, stats = ingest([src, more], tmp_path / "ds")
    recs = records(tmp_path / "ds")
    dup = recs["b/copy.nii.gz"]
    assert dup.status == "skipped" and dup.duplicate_of == recs["a/imagesTr/ct_000_0000.nii.gz"].volume_id
    assert recs["b/new.nii.gz"].status == "ok"
    assert stats.processed == 2
    assert read_index(DatasetDir(tmp_path / "ds"))["samples"] == 3
    assert check_dataset(DatasetDir(tmp_path / "ds")) == []


def test_resampling_to_a_target_spacing(tmp_path):
    src = phantom_collection(tmp_path / "src", n_ct=1, n_mr=0, shape=(40, 36, 24))
    ingest(src, tmp_path / "ds", spacing=(3.0, 3.0, 3.0))
    r = records(tmp_path / "ds")["src/imagesTr/ct_000_0000.nii.gz"]
    assert r.spacing == [3.0, 3.0, 3.0]
    ds = DatasetDir(tmp_path / "ds")
    lab = label_store(ds).read(r.volume_id)
    img = volume_store(ds).read(r.volume_id)
    assert lab.shape == img.shape == tuple(r.shape) and img.dtype == np.int16
    original = nib.load(src / "labelsTr/ct_000.nii.gz").get_fdata()
    assert set(np.unique(lab)) <= set(np.unique(original))  # nearest neighbour: no new label values
    np.testing.assert_allclose(volume_store(ds).attrs(r.volume_id)["spacing"], [3.0, 3.0, 3.0])


def test_modality_override_by_source_prefix(tmp_path):
    src = tmp_path / "scans"
    src.mkdir()
    shutil.copy(NIB_DATA / "anatomical.nii", src / "a.nii")
    ingest(src, tmp_path / "ds", modality=["scans=CT"])
    r = records(tmp_path / "ds")["scans/a.nii"]
    assert r.modality == "CT" and r.modality_from == "override" and r.dtype == "int16"


def test_labels_that_do_not_match_their_image_fail_alone(tmp_path):
    src = phantom_collection(tmp_path / "src", n_ct=1, n_mr=0)
    lab = src / "labelsTr/ct_000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), lab)
    (src / "labelsTr/orphan.nii.gz").write_bytes(lab.read_bytes())
    ingest(src, tmp_path / "ds")
    recs = records(tmp_path / "ds")
    assert recs["src/imagesTr/ct_000_0000.nii.gz"].status == "ok"
    bad = recs["src/labelsTr/ct_000.nii.gz"]
    assert bad.status == "failed" and "shape" in bad.reason
    assert recs["src/labelsTr/orphan.nii.gz"].status == "skipped"
    assert "without a matching image" in recs["src/labelsTr/orphan.nii.gz"].reason


def test_hostile_and_broken_inputs_are_reported_not_fatal(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    p = ct_phantom(shape=(24, 24, 16), seed=3)
    nib.save(nib.Nifti1Image(p.image, p.affine), src / "good.nii.gz")
    data = (src / "good.nii.gz").read_bytes()
    (src / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), src / "nan.nii")
    part = np.random.default_rng(0).normal(100, 10, (8, 8, 8)).astype(np.float32)
    part[0, 0, :3] = np.nan
    part[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(part, np.eye(4)), src / "partnan.nii")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_dtype(np.int16)
    (src / "absurd.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + b"\1" * 100)
    (src / "garbage.nii").write_bytes(os.urandom(600))
    (src / "loop").symlink_to(src)
    (src / "dangling.nii.gz").symlink_to(src / "nowhere.nii.gz")
    (src / "unreadable.nii").symlink_to("/proc/self/mem")  # a "regular" pseudo-file: refused before anything reads it
    series = dicom_series(src / "dicom", n=1)
    (src / "dicom" / "gap").mkdir()
    for f in series:  # the same series with one slice missing from the middle
        (src / "dicom" / "gap" / f.name).write_bytes(f.read_bytes())
        f.unlink()
    middle = sorted((src / "dicom" / "gap").iterdir(), key=_slice_z)[len(series) // 2]
    middle.unlink()
    summary, _ = ingest(src, tmp_path / "ds", max_voxels=10_000_000)
    recs = records(tmp_path / "ds")
    assert recs["bad/good.nii.gz"].status == "ok"
    assert recs["bad/truncated.nii.gz"].status == "failed" and "truncated" in recs["bad/truncated.nii.gz"].reason
    assert recs["bad/nan.nii"].status == "failed" and "NaN" in recs["bad/nan.nii"].reason
    pn = recs["bad/partnan.nii"]
    assert pn.status == "ok" and any("NaN" in w and "4 of 512" in w for w in pn.warnings)
    assert np.isfinite(volume_store(DatasetDir(tmp_path / "ds")).read(pn.volume_id)).all()
    assert recs["bad/absurd.nii"].status == "failed" and "cap" in recs["bad/absurd.nii"].reason
    assert recs["bad/garbage.nii"].status == "failed"
    assert recs["bad/loop"].status == "failed" and "loop" in recs["bad/loop"].reason
    assert recs["bad/dangling.nii.gz"].status == "failed" and "broken symlink" in recs["bad/dangling.nii.gz"].reason
    assert recs["bad/unreadable.nii"].status == "skipped" and "system pseudo-file" in recs["bad/unreadable.nii"].reason
    gap = next(r for s, r in recs.items() if s.startswith("bad/dicom/gap#series-"))
    assert gap.status == "failed" and "missing" in gap.reason and len(gap.files) == len(series) - 1
    assert summary["failed_total"] == 7


def _slice_z(path):
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    normal = np.cross(np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float))
    return float(np.dot(normal, np.array(ds.ImagePositionPatient, float)))


def test_cli_exit_codes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    p = ct_phantom(shape=(20, 20, 12), seed=1)
    nib.save(nib.Nifti1Image(p.image, p.affine), src / "ok.nii.gz")
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    res = run_cli("ingest", str(src), "--out", str(tmp_path / "ds"), "--no-progress")
    assert res.returncode == 0 and "broken.nii.gz" in res.stdout
    res = run_cli("ingest", str(src), "--out", str(tmp_path / "ds2"), "--no-progress", "--strict", check=False)
    assert res.returncode == 1
    (tmp_path / "file").write_text("x")
    res = run_cli("ingest", str(src), "--out", str(tmp_path / "file" / "ds"), "--no-progress", check=False)
    assert res.returncode == 2 and "cannot write the dataset directory" in res.stderr
    res = run_cli("inspect", str(tmp_path / "ds"), "--json")
    report = json.loads(res.stdout)
    assert report["problems"] == [] and report["by_status"] == {"ok": 1, "failed": 1}


def test_an_interrupted_dataset_needs_resume(tmp_path):
    src = phantom_collection(tmp_path / "src", n_ct=1, n_mr=0)
    ds = DatasetDir(tmp_path / "ds")
    ds.root.mkdir()
    ds.lock.write_text(json.dumps({"pid": 999_999_999}))  # what a killed run leaves
    with pytest.raises(OutputError, match="--resume"):
        ingest(src, ds.root)
    ingest(src, ds.root, resume=True)
    assert not ds.lock.exists() and check_dataset(ds) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_damaged_dicom_header_fails_alone(tmp_path, workers):
    """pydicom converts some values lazily: a bad VR byte raises late, and must not stop the run."""
    src = tmp_path / "src"
    files = dicom_series(src / "dicom", n=2)
    victim = files[0]
    data = bytearray(victim.read_bytes())
    i = data.find(b"\x08\x00\x60\x00CS")  # Modality (0008,0060) with an unknown VR
    data[i + 4 : i + 6] = b"Q!"
    victim.write_bytes(bytes(data))
    hdr = src / "weird.nhdr"  # an NRRD header naming a data file longer than any file name may be
    hdr.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: " + "a" * 300 + ".raw\n")
    summary, _ = ingest(src, tmp_path / "ds", workers=workers)
    recs = records(tmp_path / "ds")
    assert recs[f"src/dicom/{victim.name}"].status == "failed" and "malformed header" in recs[f"src/dicom/{victim.name}"].reason
    assert recs["src/weird.nhdr"].status == "failed"
    # the damaged file was an end slice (paths come in spatial order): its series is one slice shorter
    series = sorted(r.shape[2] for s, r in recs.items() if "#series-" in s and r.status == "ok")
    assert summary["by_status"]["ok"] == 2 and series == [11, 12]


def test_a_label_added_or_edited_later(tmp_path):
    src = phantom_collection(tmp_path / "src", n_ct=1, n_mr=0)
    lab = src / "labelsTr/ct_000.nii.gz"
    moved = tmp_path / "later.nii.gz"
    lab.rename(moved)
    ingest(src, tmp_path / "ds")
    r = records(tmp_path / "ds")["src/imagesTr/ct_000_0000.nii.gz"]
    assert r.has_label is False
    moved.rename(lab)  # the label map arrives later
    _, stats = ingest(src, tmp_path / "ds")
    assert stats.processed == 1
    recs = records(tmp_path / "ds")
    r = recs["src/imagesTr/ct_000_0000.nii.gz"]
    assert r.has_label and any("added after" in w for w in r.warnings)
    ds = DatasetDir(tmp_path / "ds")
    np.testing.assert_array_equal(label_store(ds).read(r.volume_id), nib.as_closest_canonical(nib.load(lab)).get_fdata())
    assert check_dataset(ds) == []
    _, stats = ingest(src, tmp_path / "ds")
    assert stats.processed == 0  # unchanged now
    edited = nib.load(lab)
    arr = np.asarray(edited.dataobj).copy()
    arr[arr == 1] = 2
    nib.save(nib.Nifti1Image(arr, edited.affine), lab)  # an edit: stored labels are never replaced
    ingest(src, tmp_path / "ds")
    recs = records(tmp_path / "ds")
    assert recs["src/labelsTr/ct_000.nii.gz"].status == "failed" and "differs" in recs["src/labelsTr/ct_000.nii.gz"].reason
    assert recs["src/imagesTr/ct_000_0000.nii.gz"].status == "ok"


def test_out_must_be_new_empty_or_a_dataset(tmp_path):
    src = phantom_collection(tmp_path / "src", n_ct=1, n_mr=0)
    mine = tmp_path / "my-folder"
    (mine / ".tmp").mkdir(parents=True)
    (mine / ".tmp" / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty and not a medssl dataset"):
        ingest(src, mine)
    assert (mine / ".tmp" / "precious.txt").read_text() == "keep me"


def test_settings_are_pinned_and_one_writer_at_a_time(tmp_path):
    from medssl_scale.store.layout import WriterLock

    src = phantom_collection(tmp_path / "src", n_ct=1, n_mr=0)
    ingest(src, tmp_path / "ds")
    with pytest.raises(OutputError, match="other settings: spacing"):
        ingest(src, tmp_path / "ds", spacing=(2.0, 2.0, 2.0))
    settings = DatasetDir(tmp_path / "ds").settings
    pinned = json.loads(settings.read_text())
    settings.write_text(json.dumps({**pinned, "format_version": pinned["format_version"] - 1}))
    with pytest.raises(OutputError, match="older than this version writes .*re-ingest into a new directory"):
        ingest(src, tmp_path / "ds")
    settings.write_text(json.dumps(pinned))
    held = WriterLock(DatasetDir(tmp_path / "ds").lock).acquire()  # another ingest, running
    try:
        with pytest.raises(OutputError, match="another ingest is writing"):
            ingest(src, tmp_path / "ds")
    finally:
        held.release(finished=True)
    ingest(src, tmp_path / "ds")  # free again, and not "interrupted"


def test_a_crashed_items_label_still_gets_a_record(tmp_path):
    from ingest.discover import Item
    from ingest.pipeline import Options, crashed

    item = Item("file", "s/img.nii.gz", ["/x/img.nii.gz"], ["s/img.nii.gz"], label_path="/x/labels/img.nii.gz", label_source="s/labels/img.nii.gz")
    res = crashed(item, Options(out=tmp_path, secret=b"s" * 32))
    assert [(r.kind, r.status) for r in res.records] == [("image", "failed"), ("label", "skipped")]
    assert "died" in res.records[0].reason
