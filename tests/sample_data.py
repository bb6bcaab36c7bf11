"""Small real collections on disk for ingest tests: phantoms, bundled scans, DICOM series."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import nibabel.testing
import numpy as np

from medssl_scale.store.layout import DatasetDir
from medssl_scale.store.manifest import latest, read_manifest
from medssl_scale.store.volumes import label_store, volume_store
from medssl_scale.synth.dicom import write_series
from medssl_scale.synth.phantoms import ct_phantom, mr_phantom

NIB_DATA = Path(nibabel.testing.data_path)


def oblique(affine: np.ndarray, degrees: float = 17.0) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    out = affine.copy()
    out[:3, :3] = rot @ affine[:3, :3]
    return out


def phantom_collection(root: Path, n_ct: int = 3, n_mr: int = 1, shape=(40, 36, 24)) -> Path:
    """imagesTr/labelsTr phantoms in NIfTI with a dataset.json, plus an MR as NRRD."""
    images, labels = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    for i in range(n_ct):
        p = ct_phantom(shape=shape, seed=i)
        nib.save(nib.Nifti1Image(p.image, p.affine), images / f"ct_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(p.label, p.affine), labels / f"ct_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "spleen"}}))
    for i in range(n_mr):
        p = mr_phantom(shape=shape, seed=50 + i)
        nib.save(nib.Nifti1Image(p.image, p.affine), root / f"mr_{i:03d}.nii.gz")
    return root


def dicom_series(root: Path, n: int = 2, shape=(32, 28, 12), identifiers: dict | None = None, **kw) -> list[Path]:
    """``n`` CT series of distinct patients in one folder, oblique, files shuffled."""
    out = []
    for i in range(n):
        p = ct_phantom(shape=shape, seed=200 + i)
        ids = dict(identifiers or {})
        ids.setdefault("PatientID", f"PID-{i}")
        out += write_series(root, p.image, oblique(p.affine, 10 + 7 * i), modality="CT", identifiers=ids, seed=i, file_prefix=f"S{i}", **kw)
    return out


def mixed_collection(root: Path) -> Path:
    """Every kind of input the ingest meets, small: what the end-to-end tests run on."""
    phantom_collection(root / "phantoms")
    dicom_series(root / "dicom")
    bundled = root / "bundled"
    bundled.mkdir(parents=True)
    for name in ("anatomical.nii", "example4d.nii.gz", "test.mgz"):
        shutil.copy(NIB_DATA / name, bundled / name)
    (bundled / "notes.txt").write_text("not an image")
    return root


def run_cli(*args: str, check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "medssl_scale.cli", *args]
    full_env = {**os.environ, **(env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=full_env, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


def dataset_state(path: Path) -> dict:
    """What must be equal between two ingests of the same inputs."""
    ds = DatasetDir(path)
    recs = latest(read_manifest(ds.manifest)).values()
    vols, labs = volume_store(ds), label_store(ds)
    arrays = {vid: vols.read(vid) for vid in vols.ids()}
    labels = {vid: labs.read(vid) for vid in labs.ids()}
    manifest = sorted((r.kind, r.source, r.status, r.volume_id, r.reason if r.status != "ok" else None) for r in recs)
    return {"manifest": manifest, "arrays": arrays, "labels": labels}


def assert_same_dataset(a: Path, b: Path) -> None:
    sa, sb = dataset_state(a), dataset_state(b)
    assert sa["manifest"] == sb["manifest"]
    assert sa["arrays"].keys() == sb["arrays"].keys()
    for vid in sa["arrays"]:
        np.testing.assert_array_equal(sa["arrays"][vid], sb["arrays"][vid])
    assert sa["labels"].keys() == sb["labels"].keys()
    for vid in sa["labels"]:
        np.testing.assert_array_equal(sa["labels"][vid], sb["labels"][vid])


def training_dataset(root: Path, n_patients: int = 4, n_mr: int = 2, ct_shape=(48, 40, 32), mr_shape=(40, 48, 36)) -> Path:
    """An ingested dataset for the data tests: labelled CTs, MRs of the first patients, one volume per shard."""
    from ingest.runner import IngestConfig, run_ingest

    src = root / "src"
    (src / "labels").mkdir(parents=True)
    for i in range(n_patients):
        p = ct_phantom(shape=ct_shape, seed=i)
        nib.save(nib.Nifti1Image(p.image, p.affine), src / f"p{i}_ct.nii.gz")
        nib.save(nib.Nifti1Image(p.label, p.affine), src / "labels" / f"p{i}_ct.nii.gz")
        if i < n_mr:
            p = mr_phantom(shape=mr_shape, seed=10 + i)
            nib.save(nib.Nifti1Image(p.image, p.affine), src / f"p{i}_mr.nii.gz")
    out = root / "dataset"
    run_ingest(IngestConfig(sources=[src], out=out, subject_pattern=r"p(\d+)_", shard_size=1))
    return out


def reshard(dataset: Path, groups: list[int]) -> list[str]:
    """Rewrite the dataset's shards with ``groups[i]`` volumes in shard i (unequal shards); returns the volume ids in order."""
    from ingest.pipeline import sample_meta
    from medssl_scale.store.shards import ShardWriter

    ds = DatasetDir(dataset)
    vols, labs = volume_store(ds), label_store(ds)
    ids = vols.ids()
    assert sum(groups) == len(ids), (groups, len(ids))
    shutil.rmtree(ds.shards)
    writer = ShardWriter(ds, target_bytes=1 << 40)
    it = iter(ids)
    for n in groups:
        for _ in range(n):
            vid = next(it)
            image, attrs = vols.read(vid), vols.attrs(vid)
            label = labs.read(vid) if labs.exists(vid) else None
            writer.add_sample(vid, image, sample_meta(attrs, image, None), label)
        writer.seal()
    writer.close()
    return ids
