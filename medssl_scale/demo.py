"""``medssl demo``: the main job end to end on embedded defaults (CPU, local files).

Today: assemble a small mixed collection (real scans bundled with nibabel
and pydicom, generated CT and MR phantoms with organ label maps written as
NIfTI, DICOM series, NRRD and MHA, and a few broken files), ingest it and
inspect the result with thumbnails. Later stages (pre-train, register,
fine-tune) extend this command.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

import numpy as np

CT_CASES, MR_CASES = 4, 2


def build_collection(root: Path) -> Path:
    """Write the sample collection under ``root`` (idempotent: kept if complete)."""
    done = root.with_name(root.name + ".complete")
    if done.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    _bundled(root / "bundled")
    _phantoms(root / "phantoms")
    _broken(root / "broken")
    done.write_text("")
    return root


def _bundled(d: Path) -> None:
    """Real scans that ship with nibabel and pydicom (small, public test data)."""
    import nibabel.testing
    from pydicom.data import get_testdata_file

    d.mkdir(parents=True)
    src = Path(nibabel.testing.data_path)
    for name in ("anatomical.nii", "example_nifti2.nii.gz", "test.mgz", "example4d.nii.gz"):
        if (src / name).exists():
            shutil.copy(src / name, d / name)
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "rtstruct.dcm"):
        path = get_testdata_file(name)
        if path:
            shutil.copy(path, d / name)


def _phantoms(d: Path) -> None:
    import nibabel as nib
    import SimpleITK as sitk

    from medssl_scale.synth.dicom import write_series
    from medssl_scale.synth.phantoms import ct_phantom, mr_phantom

    images, labels = d / "imagesTr", d / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    classes: dict[str, str] = {}
    for i in range(CT_CASES):
        p = ct_phantom(seed=i)
        classes.update({str(k): v for k, v in p.classes.items()})
        nib.save(nib.Nifti1Image(p.image, p.affine), images / f"ct_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(p.label, p.affine), labels / f"ct_{i:03d}.nii.gz")
    (d / "dataset.json").write_text(json.dumps({"name": "medssl demo phantoms", "labels": {"0": "background", **classes}}, indent=1))

    mr = d / "mr"
    mr.mkdir()
    for i in range(MR_CASES):
        p = mr_phantom(seed=100 + i)
        img = sitk.GetImageFromArray(np.ascontiguousarray(p.image.transpose(2, 1, 0)))
        img.SetSpacing([float(s) for s in np.linalg.norm(p.affine[:3, :3], axis=0)])
        # RAS -> LPS for ITK: flip the first two world axes
        lps = np.diag([-1.0, -1.0, 1.0]) @ p.affine[:3, :3] / np.linalg.norm(p.affine[:3, :3], axis=0)
        img.SetDirection(lps.flatten().tolist())
        img.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ p.affine[:3, 3]).tolist())
        sitk.WriteImage(img, str(mr / (f"head_{i:03d}.nrrd" if i == 0 else f"head_{i:03d}.mha")))

    # One CT phantom as a DICOM series in an oblique orientation with shuffled files, as scanners export them.
    p = ct_phantom(seed=42, shape=(64, 64, 40))
    theta = np.deg2rad(12.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = p.affine.copy()
    affine[:3, :3] = rot @ p.affine[:3, :3]
    write_series(d / "dicom" / "patient_a", p.image, affine, modality="CT", seed=42)


def _broken(d: Path) -> None:
    """What every hospital export contains somewhere: the ingest must report, not stop."""
    import nibabel as nib

    from medssl_scale.synth.phantoms import ct_phantom

    d.mkdir(parents=True)
    p = ct_phantom(seed=7, shape=(48, 48, 32))
    nib.save(nib.Nifti1Image(p.image, p.affine), d / "whole.nii.gz")
    data = (d / "whole.nii.gz").read_bytes()
    (d / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    (d / "whole.nii.gz").unlink()
    nan = np.full((16, 16, 8), np.nan, dtype=np.float32)
    nib.save(nib.Nifti1Image(nan, np.eye(4)), d / "all_nan.nii")
    (d / "notes.txt").write_text("export notes: not an image\n")
    (d / "empty.nii.gz").write_bytes(gzip.compress(b""))


TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dae" / "tiny.yaml"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on a generated sample collection")
    p.add_argument("--workdir", type=Path, default=Path("demo-work"), help="where the collection, dataset and outputs go")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ingest.cli import execute as ingest
    from ingest.runner import IngestConfig
    from medssl_scale.inspect import execute as inspect

    console = Console()
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    secret = work / "site-secret"
    if not secret.exists():  # a demo-local secret: the user's real one stays untouched
        import secrets

        secret.write_text(secrets.token_hex(32) + "\n")
        secret.chmod(0o600)

    console.rule("[b]1. sample collection")
    collection = build_collection(work / "collection")
    n_files = sum(1 for f in collection.rglob("*") if f.is_file())
    console.print(f"{n_files} files under {collection}: bundled real scans, CT/MR phantoms with labels, a DICOM series, broken files")

    console.rule("[b]2. ingest")
    dataset = work / "dataset"
    # --resume is harmless on a finished dataset and finishes one that a Ctrl-C interrupted.
    # Phantoms carry no patient id in their headers: --subject-pattern takes it from the file name.
    cfg = IngestConfig(sources=[collection], out=dataset, workers=args.workers, resume=True, shard_size=64_000_000,
                       secret_file=secret, subject_pattern=r"(ct_\d{3}|head_\d{3})")
    code = ingest(cfg)
    if code != 0:
        return code

    console.rule("[b]3. inspect")
    code = inspect(dataset, thumbnails=work / "thumbnails")
    if code != 0:
        return code

    console.rule("[b]4. training crops")
    from medssl_scale.data import preview

    preview.main(argparse.Namespace(config=None, dataset=str(dataset), rows=6, out=work / "crops.png",
                                    overrides=["crop=32", "views.kind=pair", "labels=true"]))

    console.rule("[b]5. pre-train (Disruptive Autoencoder, tiny, CPU)")
    from medssl_scale.train.config import load_run_config
    from medssl_scale.train.engine import train

    run_cfg = load_run_config(TINY_CONFIG, [f"data.dataset={dataset}", f"workdir={work / 'runs'}"])
    result = train(run_cfg, resume="auto")
    console.print(f"{result['status']} at step {result['step']}: {result['run_dir']}")

    console.rule("[b]next")
    console.print(f"dataset: {dataset}  (manifest.jsonl, volumes.zarr, labels.zarr, shards/)")
    console.print(f"thumbnails: {work / 'thumbnails'};  training crops: {work / 'crops.png'}")
    console.print(f"run: {result['run_dir']} (checkpoints, metrics.jsonl);  MLflow: mlflow ui --backend-store-uri sqlite:///{(work / 'runs' / 'mlruns.db').absolute()}")
    return 0
