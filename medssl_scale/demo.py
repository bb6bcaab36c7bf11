"""``medssl demo``: the main job end to end on embedded defaults (CPU, local files).

1. assemble a small mixed collection: real scans bundled with nibabel and
   pydicom, generated CT and MR phantoms (CT with organ label maps) written as
   NIfTI, DICOM series, NRRD and MHA, and a few broken files;
2. ingest it, inspect it (thumbnails), preview training crops;
3. pre-train a tiny Disruptive Autoencoder with 2 ranks through the real launcher;
4. publish its encoder as ``demo-encoder`` with alias ``champion``;
5. pull it by alias and fine-tune it with 10% of the labels, against the same
   network from scratch, and print the Dice table.

Everything (collection, dataset, runs, the SQLite MLflow store and its
artifacts) stays under ``--workdir``, so another process can pull
``models:/demo-encoder@champion`` from it afterwards.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

import numpy as np

CT_CASES, MR_CASES = 10, 2  # 10 labelled CT patients: 6 train (10% of them: 1), 2 validation, 2 test


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
    p.add_argument("--nproc", type=int, default=2, help="pre-training ranks")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning repeats per initialisation")
    p.add_argument("--small", action="store_true", help="the smallest setting (the test suite's): few steps, one seed")
    p.set_defaults(func=main)


def demo_dataset(work: Path, workers: int, console) -> tuple[Path, int]:
    """The sample collection, ingested into ``work/dataset`` (steps 1 and 2; kept when already done). Returns it and the ingest's exit code."""
    import os

    from ingest.cli import execute as ingest
    from ingest.runner import IngestConfig

    work.mkdir(parents=True, exist_ok=True)
    secret = work / "site-secret"
    if not secret.exists():  # a demo-local secret: the user's real one stays untouched
        import secrets

        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")

    console.rule("[b]1. sample collection")
    collection = build_collection(work / "collection")
    n_files = sum(1 for f in collection.rglob("*") if f.is_file())
    console.print(f"{n_files} files under {collection}: bundled real scans, CT/MR phantoms with labels, a DICOM series, broken files")

    console.rule("[b]2. ingest")
    dataset = work / "dataset"
    # --resume is harmless on a finished dataset and finishes one that a Ctrl-C interrupted.
    # Phantoms carry no patient id in their headers: --subject-pattern takes it from the file name.
    cfg = IngestConfig(sources=[collection], out=dataset, workers=workers, resume=True, shard_size=64_000_000,
                       secret_file=secret, subject_pattern=r"(ct_\d{3}|head_\d{3})")
    return dataset, ingest(cfg)


def main(args: argparse.Namespace) -> int:
    import os

    from rich.console import Console

    from medssl_scale.inspect import execute as inspect

    # The demo's own progress bars say enough; MLflow's per-download bars for three small files do not.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console = Console()
    work: Path = args.workdir
    dataset, code = demo_dataset(work, args.workers, console)
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

    if args.small:
        args.pretrain_steps, args.finetune_steps, args.seeds = 20, 40, 1
    runs = work / "runs"
    uri = f"sqlite:///{(runs / 'mlruns.db').absolute()}"

    console.rule(f"[b]5. pre-train (Disruptive Autoencoder, tiny, {args.nproc} ranks on CPU)")
    overrides = [f"data.dataset={dataset}", f"workdir={runs}", f"steps={args.pretrain_steps}",
                 f"checkpoint.every={args.pretrain_steps}", f"tracking.plot_every={max(args.pretrain_steps // 2, 1)}"]
    if not args.small:  # twice the width of the test model: enough to find organs from one labelled patient
        overrides.append("objectives.dae.model.channels=[16,32,64]")
    code = _pretrain(args.nproc, overrides, runs)
    if code != 0:
        return code
    run_id = (runs / "dae-tiny" / "mlflow_run_id").read_text().strip()

    console.rule("[b]6. publish the encoder")
    from medssl_scale.registry import load_encoder, publish

    mv = publish(run_id, "demo-encoder", alias="champion", tracking_uri=uri, description="medssl demo: tiny DAE encoder")
    console.print(f"demo-encoder version {mv.version} (alias champion) from run {run_id}; "
                  f"sha256 of encoder.safetensors {mv.tags['medssl.sha256.encoder.safetensors'][:16]}...")

    console.rule("[b]7. pull it by alias and fine-tune with 10% of the labels")
    encoder = load_encoder("models:/demo-encoder@champion", tracking_uri=uri)
    console.print(f"pulled models:/demo-encoder@champion: {type(encoder).__name__}, "
                  f"{sum(p.numel() for p in encoder.parameters()):,} parameters, features {encoder.feature_channels}")
    from medssl_scale.downstream.finetune import FinetuneConfig, print_table
    from medssl_scale.downstream.finetune import run as finetune
    from medssl_scale.synth.phantoms import CT_CLASSES

    ft = FinetuneConfig(dataset=str(dataset), encoder="models:/demo-encoder@champion", label_fraction=0.1, seeds=args.seeds,
                        steps=args.finetune_steps, eval_every=max(args.finetune_steps // 4, 1), crop=32, modalities=["CT"],
                        class_names=list(CT_CLASSES.values()), tracking_uri=uri, workdir=str(work / "finetune"))
    table = finetune(ft, console)
    print_table(table, console)

    console.rule("[b]done")
    pull = "import medssl_scale; print(medssl_scale.load_encoder('models:/demo-encoder@champion'))"
    for line in (f"dataset: {dataset}  (manifest.jsonl, volumes.zarr, labels.zarr, shards/)",
                 f"thumbnails: {work / 'thumbnails'};  training crops: {work / 'crops.png'}",
                 f"pre-training run: {runs / 'dae-tiny'};  fine-tuning results: {work / 'finetune' / 'results.json'}",
                 f"MLflow tracking URI: {uri}",
                 f"  open the UI:  mlflow ui --backend-store-uri {uri}",
                 f'  pull the encoder elsewhere:  MLFLOW_TRACKING_URI={uri} python -c "{pull}"'):
        console.print(line, soft_wrap=True, highlight=False, markup=False)  # whole lines: commands stay copyable
    return 0


def _pretrain(nproc: int, overrides: list[str], runs: Path) -> int:
    """The real launcher in a child process: torchrun, one process per rank."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("MLFLOW_TRACKING_URI", None)  # the demo's own local store, under the workdir
    cmd = [sys.executable, "-m", "medssl_scale.cli", "launch", "local", "--nproc", str(nproc), "--config", str(TINY_CONFIG), *overrides]
    return subprocess.run(cmd, env=env).returncode
