"""Fine-tune a pulled encoder for segmentation with few labels, and compare it with the same network from scratch.

For every seed and every initialisation (the published encoder; a randomly
initialised one of the same architecture with ``baseline: scratch``): train
:class:`SegmentationNet` on label crops of the labelled training patients
(held in memory, every class equally likely at a crop's centre), keep the
weights with the best validation Dice, then report Dice per class on the
held-out test patients, with sliding-window inference over whole volumes.
Everything is logged to MLflow: one parent run, one nested run per
(initialisation, seed), the comparison table as JSON, Markdown and a plot.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medssl_scale.data.config import Augment, Normalize, Size3, _size3
from medssl_scale.downstream.split import Split, split_by_patient


RELEASED_AUGMENT: list[dict[str, Any]] = [
    *({"name": "RandFlipd", "args": {"keys": ["image", "label"], "prob": 0.2, "spatial_axis": axis}} for axis in (0, 1, 2)),
    {"name": "RandRotate90d", "args": {"keys": ["image", "label"], "prob": 0.2, "max_k": 3}},
    {"name": "RandScaleIntensityd", "args": {"keys": ["image"], "factors": 0.1, "prob": 0.1}},
    {"name": "RandShiftIntensityd", "args": {"keys": ["image"], "offsets": 0.1, "prob": 0.1}},
]


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # finite floats only

    dataset: str
    encoder: str | None = None  # models:/NAME@ALIAS, models:/NAME/VERSION or a directory
    architecture: dict[str, Any] | None = None  # with no encoder: the architecture trained from scratch
    baseline: Literal["scratch", "none"] = "scratch"
    label_fraction: float = Field(0.1, gt=0, le=1)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # Exact part sizes instead of fractions (a recipe's fixed validation and test sets; see downstream/split.py).
    val_count: int | None = Field(None, ge=0)
    test_count: int | None = Field(None, ge=1)
    seeds: int = Field(1, ge=1)
    steps: int = Field(300, ge=1)
    eval_every: int = Field(100, ge=1)
    crop: Size3 = (96, 96, 96)
    batch_size: int = Field(2, ge=1)  # crops per step
    crops_per_volume: int | None = Field(None, ge=1)  # crops cut from each volume of a batch; default batch_size (one volume)
    # Per crop, MONAI dictionary transforms by name; the default is DAE's released BTCV fine-tuning [code]: flips on
    # every axis and rot90 (p 0.2 each), intensity scale and shift by 0.1 (p 0.1).
    augment: list[Augment] = Field(default_factory=lambda: [Augment(**a) for a in RELEASED_AUGMENT])
    lr: float = Field(1e-3, gt=0)
    lr_by_architecture: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)  # e.g. {swin_unetr: 8e-4}: wins over lr
    encoder_lr_scale: float = Field(1.0, ge=0)  # 0 freezes the encoder
    weight_decay: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(0, ge=0)
    modalities: list[Literal["CT", "MR"]] | None = None
    num_classes: int | None = Field(None, ge=2)  # default: the largest label value in the split, plus one
    class_names: list[str] | None = None  # names of classes 1..K-1
    overlap: float = Field(0.25, ge=0, lt=1)
    sw_batch_size: int = Field(4, ge=1)
    normalize: Normalize = Normalize()
    experiment: str = "medssl-finetune"
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else runs/mlruns.db (where pretrain and registry default to)
    workdir: str = "finetune"

    _s3 = field_validator("crop", mode="before")(_size3)

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # Checked on load, names and types (see Registry.check), not when the first model is built.
        if v is not None:
            from medssl_scale.models import ENCODERS

            settings = dict(v)
            name = settings.pop("name", None)
            if not isinstance(name, str):
                raise ValueError("architecture needs a name, e.g. {name: swin_unetr, feature_size: 48}")
            ENCODERS.check(name, **settings)
        return v

    @model_validator(mode="after")
    def _something_to_train(self) -> FinetuneConfig:
        if self.encoder is None and (self.baseline != "scratch" or self.architecture is None):
            raise ValueError("give an encoder (models:/NAME@ALIAS, models:/NAME/VERSION or a directory), "
                             "or baseline: scratch with an architecture")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if self.crops_per_volume is not None and self.batch_size % self.crops_per_volume:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of crops_per_volume ({self.crops_per_volume})")
        return self

    def lr_for(self, architecture: str | None) -> float:
        """The learning rate for an encoder family: ``lr_by_architecture`` where it names it, else ``lr``."""
        return self.lr_by_architecture.get(architecture or "", self.lr)


def _inits(cfg: FinetuneConfig) -> list[str]:
    return (["pretrained"] if cfg.encoder else []) + (["scratch"] if cfg.baseline == "scratch" else [])


class _Volumes:
    """Whole normalised volumes and label maps of a dataset, for evaluation."""

    def __init__(self, cfg: FinetuneConfig, catalog):
        from medssl_scale.store.volumes import label_store, volume_store

        self.cfg, self.catalog = cfg, catalog
        self.images, self.labels = volume_store(catalog.dataset), label_store(catalog.dataset)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, vid: str) -> tuple[np.ndarray, np.ndarray]:
        from medssl_scale.data.transforms import normalize

        if vid not in self._cache:
            info = self.catalog.volumes[self.catalog.index(vid)]
            x = normalize(self.images.read(vid), info.modality, self.images.attrs(vid).get("stats"), self.cfg.normalize)
            self._cache[vid] = (x, np.asarray(self.labels.read(vid)).astype(np.int64))
        return self._cache[vid]

    def max_label(self, ids: tuple[str, ...]) -> int:
        return max(int(np.asarray(self.labels.read(v)).max()) for v in ids)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def evaluate(net: nn.Module, volumes: _Volumes, ids: tuple[str, ...], num_classes: int) -> np.ndarray:
    """Dice per foreground class and volume, [V, K-1]; NaN only where a class is absent from both prediction and truth.

    A class predicted where the truth has none scores 0 (MONAI's ``ignore_empty``
    would make it NaN, leaving false positives unpunished).
    """
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    net.eval()
    dev = next(net.parameters()).device
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False, num_classes=num_classes)
    rows = []
    for vid in ids:
        x, y = volumes.get(vid)
        # Windows run on the network's device; the whole-volume logits stay in host memory.
        logits = sliding_window_inference(torch.from_numpy(x)[None, None], volumes.cfg.crop, volumes.cfg.sw_batch_size, net,
                                          overlap=volumes.cfg.overlap, mode="gaussian", sw_device=dev, device="cpu")
        pred = one_hot(logits.argmax(1, keepdim=True), num_classes)
        truth = one_hot(torch.from_numpy(y)[None, None], num_classes)
        dice = metric(pred, truth)[0].numpy().astype(np.float64)
        both_empty = ((pred[0, 1:].sum(dim=(1, 2, 3)) == 0) & (truth[0, 1:].sum(dim=(1, 2, 3)) == 0)).numpy()
        dice[both_empty] = np.nan
        rows.append(dice)
    net.train()
    return np.stack(rows)


def _crops(cfg: FinetuneConfig, volumes: _Volumes, ids: tuple[str, ...], num_classes: int, seed: int):
    """Endless training batches: ``batch_size`` crops, ``crops_per_volume`` from each of several volumes, with every
    class equally likely at a crop's centre (MONAI's RandCropByLabelClassesd), each crop augmented on its own draws.

    Few labels mean few volumes: they are held in memory, with each class's
    voxel indices computed once, so a crop costs a slice.
    """
    import monai.transforms as mt

    from medssl_scale.data.transforms import build_augment

    per_volume = cfg.crops_per_volume or cfg.batch_size
    prepare = mt.Compose([mt.SpatialPadd(["image", "label"], cfg.crop),
                          mt.ClassesToIndicesd("label", num_classes=num_classes, indices_postfix="_cls_indices")])
    cases = [prepare({"image": x[None], "label": y[None]}) for x, y in map(volumes.get, ids)]
    crop = mt.RandCropByLabelClassesd(["image", "label"], "label", cfg.crop, num_classes=num_classes, num_samples=per_volume,
                                      indices_key="label_cls_indices")
    augment = build_augment(cfg.augment, ["image", "label"])
    crop.set_random_state(seed)
    if augment is not None:
        augment.set_random_state(seed + 1)
    rng = np.random.default_rng(seed)
    while True:
        samples = []
        for _ in range(cfg.batch_size // per_volume):
            for s in crop(cases[int(rng.integers(len(cases)))]):
                s = {"image": s["image"], "label": s["label"]}
                samples.append(augment(s) if augment is not None else s)
        yield (torch.stack([torch.as_tensor(s["image"]) for s in samples]).float(),
               torch.stack([torch.as_tensor(s["label"]) for s in samples]).long())


def train_one(cfg: FinetuneConfig, split: Split, volumes: _Volumes, encoder: nn.Module, num_classes: int, seed: int,
              log: Any = None, progress: Any = None) -> dict[str, Any]:
    """Fine-tune one network; returns test Dice per class (mean over test volumes) and its history."""
    from monai.losses import DiceCELoss

    from medssl_scale.downstream.model import SegmentationNet
    from medssl_scale.schedule import warmup_cosine

    torch.manual_seed(seed)
    dev = _device()
    net = SegmentationNet(encoder, num_classes).to(dev)
    # Pre-trained decoder stages travel inside the encoder, but train at the decoder's rate.
    dec_ids = {id(p) for p in net.decoder_parameters()}
    enc_params = [p for p in net.encoder.parameters() if id(p) not in dec_ids]
    if cfg.encoder_lr_scale == 0:
        for p in enc_params:
            p.requires_grad_(False)
    ids = {id(p) for p in enc_params}
    lr = cfg.lr_for(getattr(encoder, "config", {}).get("name"))
    groups = [{"params": [p for p in net.parameters() if id(p) not in ids], "lr": lr}]
    if cfg.encoder_lr_scale > 0:
        groups.append({"params": enc_params, "lr": lr * cfg.encoder_lr_scale})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, cfg.steps, cfg.warmup_steps, lr, lr * 0.01)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    batches = _crops(cfg, volumes, split.train, num_classes, seed)
    best, best_dice, history = None, -1.0, []
    net.train()
    for step in range(1, cfg.steps + 1):
        x, y = (t.to(dev, non_blocking=True) for t in next(batches))
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        record: dict[str, float] = {"loss": loss.item()}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if split.val:
                val = float(np.nanmean(evaluate(net, volumes, split.val, num_classes)))
                record["val_dice"] = val
                if val > best_dice:
                    best_dice, best = val, copy.deepcopy(net.state_dict())
        history.append({"step": step, **record})
        if log:
            log(step, record)
        if progress:
            progress()
    if best is not None:
        net.load_state_dict(best)
    per_volume = evaluate(net, volumes, split.test, num_classes)
    return {"test_dice": np.nanmean(per_volume, axis=0).tolist(), "best_val_dice": best_dice, "history": history}


def run(cfg: FinetuneConfig, console: Any = None) -> dict[str, Any]:
    """Every (initialisation, seed); returns the comparison table (also written to WORKDIR/results.json)."""
    import mlflow
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from medssl_scale.data.catalog import Catalog
    from medssl_scale.models import build_encoder
    from medssl_scale.registry import load_encoder
    from medssl_scale.mlflow_access import redact, tracking_uri

    console = console or Console()
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    uri = cfg.tracking_uri or tracking_uri(Path("runs"))
    catalog = Catalog.load(cfg.dataset, tuple(cfg.modalities) if cfg.modalities else None, labelled_only=True)
    split = split_by_patient(catalog, cfg.val_fraction, cfg.test_fraction, cfg.label_fraction,
                             val_count=cfg.val_count, test_count=cfg.test_count)
    volumes = _Volumes(cfg, catalog)
    num_classes = cfg.num_classes or volumes.max_label(split.train + split.val + split.test) + 1
    names = list(cfg.class_names or [])[: num_classes - 1]
    names += [f"class {k}" for k in range(len(names) + 1, num_classes)]
    pretrained = load_encoder(cfg.encoder, tracking_uri=uri) if cfg.encoder else None
    architecture = dict(pretrained.config) if pretrained is not None else dict(cfg.architecture or {})
    probe = pretrained if pretrained is not None else build_encoder(**architecture)
    multiple = probe.feature_strides[-1]
    if any(c % multiple for c in cfg.crop):
        raise ValueError(f"crop {tuple(cfg.crop)} must divide by {multiple}, the coarsest stride of the {architecture.get('name')} encoder")
    console.print(f"split by patient: {split.train_patients} of {split.train_pool} training patients labelled "
                  f"({len(split.train)} volume(s)), {len(split.val)} validation and {len(split.test)} test volumes; "
                  f"{num_classes - 1} classes")

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        local = uri.startswith("sqlite:")
        store = Path(uri.removeprefix("sqlite:///")).parent
        mlflow.create_experiment(cfg.experiment, artifact_location=(store / "mlartifacts").absolute().as_uri() if local else None)
    mlflow.set_experiment(cfg.experiment)
    results: dict[str, list[list[float]]] = {init: [] for init in _inits(cfg)}
    total = len(results) * cfg.seeds * cfg.steps
    with mlflow.start_run(run_name=f"finetune {cfg.encoder or architecture.get('name')} {cfg.label_fraction:g}") as parent, \
            Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                     console=console, transient=True) as bar:
        mlflow.log_params({k: str(v)[:500] for k, v in cfg.model_dump(mode="json", exclude={"tracking_uri"}).items()})
        mlflow.log_dict(split.as_dict(), "split.json")
        task = bar.add_task("fine-tuning", total=total)
        for seed in range(cfg.seeds):
            for init in results:
                torch.manual_seed(seed)
                encoder = copy.deepcopy(pretrained) if init == "pretrained" else build_encoder(**architecture)
                bar.update(task, description=f"{init}, seed {seed}")
                with mlflow.start_run(run_name=f"{init} seed {seed}", nested=True):
                    mlflow.set_tags({"medssl.init": init, "medssl.seed": str(seed)})
                    t0 = time.perf_counter()
                    out = train_one(cfg, split, volumes, encoder, num_classes, seed,
                                    log=lambda step, rec: mlflow.log_metrics(rec, step=step),
                                    progress=lambda: bar.advance(task))
                    mlflow.log_metrics({f"test_dice.{n}": d for n, d in zip(names, out["test_dice"]) if not math.isnan(d)})
                    mlflow.log_metric("test_dice.mean", float(np.nanmean(out["test_dice"])))
                    mlflow.log_metric("seconds", time.perf_counter() - t0)
                results[init].append(out["test_dice"])
        table = summarise(results, names)
        table.update({"split": split.as_dict(), "label_fraction": cfg.label_fraction, "seeds": cfg.seeds, "encoder": cfg.encoder,
                      "tracking_uri": redact(uri), "mlflow_run_id": parent.info.run_id})
        mlflow.log_dict(table, "results.json")
        mlflow.log_text(markdown(table), "results.md")
        _plot(table)
    (workdir / "results.json").write_text(json.dumps(table, indent=1) + "\n")
    return table


def summarise(results: dict[str, list[list[float]]], names: list[str]) -> dict[str, Any]:
    """Per class and overall: mean and standard deviation over seeds of the test Dice, per initialisation."""
    rows = []
    for k, name in enumerate([*names, "mean"]):
        row: dict[str, Any] = {"class": name}
        for init, runs in results.items():
            a = np.asarray(runs, dtype=np.float64)
            vals = np.nanmean(a, axis=1) if name == "mean" else a[:, k]
            row[init] = {"mean": float(np.nanmean(vals)), "std": float(np.nanstd(vals)), "seeds": [float(v) for v in vals]}
        rows.append(row)
    return {"rows": rows, "inits": list(results)}


def markdown(table: dict[str, Any]) -> str:
    inits = table["inits"]
    lines = ["| class | " + " | ".join(f"Dice, {i}" for i in inits) + (" | pre-trained - scratch |" if len(inits) == 2 else " |"),
             "|---" * (len(inits) + 1 + (len(inits) == 2)) + "|"]
    for r in table["rows"]:
        cells = [f"{r[i]['mean']:.3f} ± {r[i]['std']:.3f}" for i in inits]
        if len(inits) == 2:
            cells.append(f"{r[inits[0]]['mean'] - r[inits[1]]['mean']:+.3f}")
        lines.append(f"| {r['class']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(table: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    inits = table["inits"]
    t = Table(title=f"test Dice, {table['label_fraction']:.0%} of the labels, {table['seeds']} seed(s): mean ± std over seeds")
    t.add_column("class")
    for i in inits:
        t.add_column(i, justify="right")
    if len(inits) == 2:
        t.add_column("difference", justify="right")
    for r in table["rows"]:
        cells = [f"{r[i]['mean']:.3f} ± {r[i]['std']:.3f}" for i in inits]
        if len(inits) == 2:
            cells.append(f"{r[inits[0]]['mean'] - r[inits[1]]['mean']:+.3f}")
        t.add_row(r["class"], *cells, style="bold" if r["class"] == "mean" else None)
    console.print(t)


def _plot(table: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    rows, inits = table["rows"], table["inits"]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
    w = 0.8 / len(inits)
    for j, init in enumerate(inits):
        ax.bar([i + j * w for i in range(len(rows))], [r[init]["mean"] for r in rows], w,
               yerr=[r[init]["std"] for r in rows], label=init, capsize=3)
    ax.set_xticks([i + w * (len(inits) - 1) / 2 for i in range(len(rows))], [r["class"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("test Dice")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"fine-tuning with {table['label_fraction']:.0%} of the labels")
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/dice.png")
    plt.close(fig)
