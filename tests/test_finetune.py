"""Fine-tuning: the split by patient, the segmentation network around an encoder, and a real fine-tuning run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sample_data import training_dataset

from medssl_scale.data.catalog import Catalog
from medssl_scale.downstream.model import SegmentationNet
from medssl_scale.downstream.split import split_by_patient
from medssl_scale.models import build_encoder
from medssl_scale.registry import format as fmt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return training_dataset(tmp_path_factory.mktemp("finetune"))


def test_split_is_by_patient_and_nested_across_label_fractions(dataset):
    cat = Catalog.load(dataset, labelled_only=True)
    patient = {v.volume_id: v.patient for v in cat.volumes}
    full = split_by_patient(cat, 0.25, 0.25, 1.0)
    few = split_by_patient(cat, 0.25, 0.25, 0.1)
    assert few.test == full.test and few.val == full.val  # evaluation never depends on the label budget
    assert set(few.train) <= set(full.train) and few.train_patients == 1 and full.train_patients == full.train_pool == 2
    parts = [{patient[v] for v in part} for part in (full.train, full.val, full.test)]
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:])  # no patient in two parts
    assert split_by_patient(cat, 0.25, 0.25, 1.0) == full
    with pytest.raises(ValueError, match="at least 3 are needed"):
        split_by_patient(Catalog(cat.dataset, cat.volumes[:2]), 0.25, 0.25)


def test_split_keeps_every_patient_in_its_part_as_the_dataset_grows(dataset):
    from medssl_scale.data.catalog import VolumeInfo

    def catalog(n: int) -> Catalog:
        vols = tuple(VolumeInfo(f"v{i:04d}", "CT", (8, 8, 8), (1.0, 1.0, 1.0), f"pat-{i}", True) for i in range(n))
        return Catalog(Catalog.load(dataset).dataset, vols)

    def parts(n: int) -> dict[str, str]:
        sp = split_by_patient(catalog(n), 0.2, 0.2)
        return {v: name for name in ("train", "val", "test") for v in getattr(sp, name)}

    small, large = parts(60), parts(400)
    assert all(large[v] == part for v, part in small.items())  # nobody moves between test and training
    share = {name: sum(p == name for p in large.values()) / 400 for name in ("train", "val", "test")}
    assert 0.14 < share["test"] < 0.26 and 0.14 < share["val"] < 0.26
    for n in range(3, 12):  # tiny sets still get every part
        sp = split_by_patient(catalog(n), 0.2, 0.2)
        assert sp.train and sp.val and sp.test and len(sp.train) + len(sp.val) + len(sp.test) == n


def test_label_fractions_round_up_and_fixed_counts_give_exact_parts(dataset):
    from medssl_scale.data.catalog import VolumeInfo
    from medssl_scale.downstream.split import labelled_count

    assert [labelled_count(f, 24) for f in (0.1, 0.2, 0.5, 0.7, 1.0)] == [3, 5, 12, 17, 24]  # the papers' folds of 24
    assert labelled_count(0.1, 6) == 1 and labelled_count(0.1, 21) == 3 and labelled_count(0.3, 21) == 7
    vols = tuple(VolumeInfo(f"v{i:04d}", "CT", (8, 8, 8), (1.0, 1.0, 1.0), f"pat-{i}", True) for i in range(30))
    cat = Catalog(Catalog.load(dataset).dataset, vols)
    sp = split_by_patient(cat, label_fraction=0.1, val_count=3, test_count=6)
    assert (len(sp.test), len(sp.val), sp.train_pool, sp.train_patients) == (6, 3, 21, 3)
    for seedless in (0.2, 1.0):  # the evaluation sets do not depend on the label budget
        other = split_by_patient(cat, label_fraction=seedless, val_count=3, test_count=6)
        assert other.test == sp.test and other.val == sp.val and set(sp.train) <= set(other.train)
    with pytest.raises(ValueError, match="at least 10 are needed"):
        split_by_patient(Catalog(cat.dataset, vols[:9]), val_count=3, test_count=6)


def test_training_batches_mix_volumes_and_augment_each_crop(dataset):
    from medssl_scale.downstream.finetune import FinetuneConfig, _crops, _Volumes

    cat = Catalog.load(dataset, labelled_only=True)
    flip = [{"name": "RandFlipd", "args": {"keys": ["image", "label"], "prob": 1.0, "spatial_axis": 2}}]
    base = {"dataset": str(dataset), "architecture": {"name": "conv_ae"}, "crop": 16, "batch_size": 4, "crops_per_volume": 2}
    ids = tuple(v.volume_id for v in cat.volumes)
    volumes = _Volumes(FinetuneConfig(**base), cat)
    plain = next(_crops(FinetuneConfig(**base, augment=[]), volumes, ids, 3, seed=0))
    flipped = next(_crops(FinetuneConfig(**base, augment=flip), volumes, ids, 3, seed=0))
    assert plain[0].shape == (4, 1, 16, 16, 16) and plain[1].shape == (4, 1, 16, 16, 16)
    torch.testing.assert_close(flipped[0], plain[0].flip(-1))  # the same crops, each flipped, image and label alike
    assert torch.equal(flipped[1], plain[1].flip(-1))
    with pytest.raises(ValueError, match="multiple of crops_per_volume"):
        FinetuneConfig(**{**base, "crops_per_volume": 3})
    assert FinetuneConfig(**base).augment[0].name == "RandFlipd"  # the released augmentation by default
    assert FinetuneConfig(**base, lr_by_architecture={"conv_ae": 5e-4}).lr_for("conv_ae") == 5e-4


@pytest.mark.parametrize("encoder", [{"name": "conv_ae", "channels": [4, 8, 16]},
                                     {"name": "swin_unetr", "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 3]}])
def test_segmentation_net_takes_the_encoder_as_it_is(encoder):
    enc = build_encoder(**encoder)
    net = SegmentationNet(enc, num_classes=3)
    names = {k.removeprefix("encoder.") for k in net.state_dict() if k.startswith("encoder.")}
    assert names == set(enc.state_dict())  # no key surgery: the encoder's own names under encoder.
    x = torch.randn(2, 1, 64, 64, 64)
    assert net(x).shape == (2, 3, 64, 64, 64)


def test_an_encoder_published_with_its_decoder_fine_tunes_from_both(tmp_path):
    """DAE publishes SwinUNETR's decoder stages with the encoder; the segmentation network decodes with those weights."""
    from medssl_scale.objectives import build_objective

    torch.manual_seed(0)
    swin = {"name": "swin_unetr", "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 3], "patch_embed": "conv_block"}
    obj = build_objective("dae", model=swin, cmcl_weight=0.0)
    fmt.write(obj.encoder(), tmp_path / "enc")
    blobs = {name: (tmp_path / "enc" / name).read_bytes() for name in fmt.FILES}
    pulled = fmt.read(blobs, "test")
    net = SegmentationNet(pulled, num_classes=4)
    assert net.pretrained_decoder and net.up is None
    for stage in ("decoder5", "decoder1"):  # the decoder starts from the pre-trained weights, not a fresh init
        for k, v in getattr(obj.net.net, stage).state_dict().items():
            torch.testing.assert_close(net.state_dict()[f"encoder.{stage}.{k}"], v, rtol=0, atol=0)
    assert net(torch.randn(1, 1, 64, 64, 64)).shape == (1, 4, 64, 64, 64)
    # The decoder's parameters train at the decoder's rate: the stages and the new head, nothing of the encoder proper.
    dec = {id(p) for p in net.decoder_parameters()}
    assert {id(p) for p in net.head.parameters()} <= dec and not dec & {id(p) for p in pulled.swinViT.parameters()}
    scratch = SegmentationNet(build_encoder(**pulled.config), num_classes=4)  # the scratch arm: the same architecture
    assert scratch.pretrained_decoder and set(scratch.state_dict()) == set(net.state_dict())
    without = fmt.read({**blobs}, "test").config | {"decoder": False}  # an encoder published alone keeps the fresh decoder
    assert not SegmentationNet(build_encoder(**without), num_classes=4).pretrained_decoder


def _chance_dice(label: np.ndarray, k: int) -> np.ndarray:
    """Expected Dice per foreground class of a uniformly random labelling."""
    p = np.bincount(label.ravel(), minlength=k)[1:] / label.size
    return 2 * p / k / (p + 1 / k)


def test_finetune_beats_chance_and_is_tracked(dataset, tmp_path):
    import mlflow

    enc_dir = tmp_path / "encoder"
    torch.manual_seed(0)
    fmt.write(build_encoder("conv_ae", channels=[8, 16, 32]), enc_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-m", "medssl_scale.cli", "finetune", "--encoder", str(enc_dir), "--data", str(dataset),
                        "--label-fraction", "0.5", "--steps", "150", "--crop", "32", "--workdir", str(tmp_path / "ft"),
                        "--class-names", "liver,spleen,kidney_left,kidney_right,spine,lungs", "eval_every=50", "val_fraction=0.25",
                        "test_fraction=0.25"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "test Dice" in p.stdout and "pretrained" in p.stdout and "scratch" in p.stdout
    table = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert table["inits"] == ["pretrained", "scratch"]
    assert [r["class"] for r in table["rows"]] == ["liver", "spleen", "kidney_left", "kidney_right", "spine", "lungs", "mean"]

    from medssl_scale.store.layout import DatasetDir
    from medssl_scale.store.volumes import label_store

    labels = label_store(DatasetDir(dataset))
    chance = np.mean([_chance_dice(np.asarray(labels.read(v)), 7) for v in table["split"]["test"]], axis=0)
    for init in table["inits"]:
        dice = np.array([r[init]["mean"] for r in table["rows"][:-1]])
        assert np.nanmean(dice) > 2 * chance.mean(), (init, dice, chance)
        assert max(dice) > 0.5, (init, dice)  # the large structures (lungs, spine) are found

    # With no URI given, the same local store as pretrain and registry use: ./runs/mlruns.db.
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlruns.db'}")
    exp = client.get_experiment_by_name("medssl-finetune")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3  # the comparison and one run per (initialisation, seed)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.json", "results.md", "split.json", "plots"}
    child = next(r for r in runs if r.data.tags.get("medssl.init") == "pretrained")
    assert "test_dice.mean" in child.data.metrics and len(client.get_metric_history(child.info.run_id, "loss")) == 150
