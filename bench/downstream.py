"""Does pre-training help? Each objective pre-trained for the same budget, fine-tuned with few and all labels, against scratch.

    python bench/downstream.py [--objectives dae,pcrlv2,lrc,mixcl,reprec] [--pretrain-steps 200]
                               [--finetune-steps 200] [--fractions 0.1,1.0] [--seeds 2] [--nproc 1]
                               [--workdir bench-work/downstream] [--out bench/results/downstream.json]
    python bench/downstream.py --from-json bench/results/downstream.json [--out ...]

On the demo collection (generated CT phantoms with six organ labels, plus
the rest of the demo's scans for pre-training): every objective's ``tiny``
config is pre-trained for ``--pretrain-steps`` with ``--nproc`` ranks, its
encoder published to the local registry, then fine-tuned for each label
fraction and seed against the same architecture from scratch with the same
budget (``medssl finetune``'s code path). Prints one JSON object (test Dice,
mean over classes: per seed, mean and sample standard deviation over seeds,
and the paired difference, pre-trained minus scratch per seed, with a
two-sided 95% Student t interval), and logs it with a plot to MLflow
(experiment ``medssl-bench-downstream``). Pre-training that read label maps
(MixCL) is marked: its downstream test labels were seen in pre-training.

Seed ``s`` fine-tunes both arms from ``torch.manual_seed(s)`` on the same
split with the same crops, so the two runs of a seed are a pair. The
pre-trained arm starts every seed from the one published encoder (only the
decoder's initialisation and the crops change), the scratch arm from a new
random encoder: part of the pre-trained arm's lower spread is by
construction. ``--from-json`` recomputes these statistics from an earlier
run's per-seed values without rerunning it.

The GPU recipe for the papers' setting (BTCV-style multi-organ CT, 5-15% of
the labels) is the ``base`` configs with ``medssl finetune`` on that dataset;
see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the project: bench/ingest.py must not shadow the ingest package
from _emit import emit  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench/downstream] {msg}", file=sys.stderr, flush=True)


def pretrain(objective: str, dataset: Path, runs: Path, steps: int, nproc: int) -> str:
    """Pre-train ``configs/<objective>/tiny.yaml``; returns its MLflow run id."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cfg = ROOT / "configs" / objective / "tiny.yaml"
    overrides = [f"data.dataset={dataset}", f"workdir={runs}", f"steps={steps}", f"checkpoint.every={steps}",
                 f"tracking.plot_every={steps}", f"name={objective}-bench", "tracking.experiment=medssl-bench-pretrain"]
    cmd = [sys.executable, "-m", "medssl_scale.cli", "launch", "local", "--nproc", str(nproc), "--config", str(cfg), "--no-progress", *overrides]
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"pre-training {objective} failed:\n{p.stdout[-4000:]}")
    return (runs / f"{objective}-bench" / "mlflow_run_id").read_text().strip()


def seed_stats(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; none with one seed) of per-seed values."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else None, "seeds": [float(v) for v in a]}


def paired_difference(pretrained: list[float], scratch: list[float], level: float = 0.95) -> dict:
    """Pre-trained minus scratch per seed, its mean and a two-sided Student t interval (n - 1 degrees of freedom)."""
    import numpy as np
    from scipy import stats

    d = np.asarray(pretrained, dtype=np.float64) - np.asarray(scratch, dtype=np.float64)
    out = {"per_seed": [round(float(v), 4) for v in d], "mean": round(float(d.mean()), 4), "ci": None,
           "interval": f"two-sided {level:.0%} Student t on the per-seed paired differences, {d.size - 1} degree(s) of freedom"}
    if d.size > 1:
        half = float(stats.t.ppf((1 + level) / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
        out.update(std=round(float(d.std(ddof=1)), 4), ci=[round(float(d.mean()) - half, 4), round(float(d.mean()) + half, 4)])
    return out


def with_statistics(result: dict) -> dict:
    """The result with every fraction's statistics (re)computed from its per-seed values."""
    for row in result["objectives"].values():
        for frac in row["fractions"].values():
            pre, scr = frac["pretrained"]["seeds"], frac["scratch"]["seeds"]
            frac["pretrained"], frac["scratch"] = seed_stats(pre), seed_stats(scr)
            frac["difference"] = paired_difference(pre, scr)
    result["metric"] = ("test Dice, mean over 6 organs; per seed, mean and sample std (ddof=1) over seeds, "
                        "paired difference pre-trained - scratch per seed with a 95% t interval")
    result["pairing"] = ("seed s: both arms from torch.manual_seed(s), same split, same crops; the pre-trained arm reuses one "
                         "published encoder for every seed, so its spread is partly lower by construction")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objectives", default="dae,pcrlv2,lrc,mixcl,reprec")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--fractions", default="0.1,1.0")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=1, help="pre-training ranks")
    ap.add_argument("--workdir", type=Path, default=Path("bench-work/downstream"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--from-json", type=Path, help="recompute the statistics of an earlier run's JSON (its per-seed values); runs nothing")
    args = ap.parse_args()
    if args.from_json:
        import json

        result = with_statistics(json.loads(args.from_json.read_text()))
        result["statistics_from"] = f"per-seed values of {args.from_json.name} ({result.get('date', 'an earlier run')}), recomputed"
        emit(result, args.out)
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    import numpy as np
    from rich.console import Console

    from medssl_scale.demo import demo_dataset
    from medssl_scale.downstream.finetune import FinetuneConfig
    from medssl_scale.downstream.finetune import run as finetune
    from medssl_scale.registry.publish import publish
    from medssl_scale.synth.phantoms import CT_CLASSES

    console = Console(stderr=True)
    work = args.workdir.absolute()
    dataset, code = demo_dataset(work, 2, console)
    if code != 0:
        raise SystemExit(f"ingest of the demo collection failed (exit {code})")
    runs = work / "runs"
    uri = f"sqlite:///{runs / 'mlruns.db'}"
    fractions = [float(f) for f in args.fractions.split(",")]
    rows = {}
    t_all = time.perf_counter()
    for objective in args.objectives.split(","):
        t0 = time.perf_counter()
        log(f"{objective}: pre-training {args.pretrain_steps} steps on {args.nproc} rank(s)")
        run_id = pretrain(objective, dataset, runs, args.pretrain_steps, args.nproc)
        mv = publish(run_id, f"bench-{objective}", tracking_uri=uri)
        seen = mv.tags.get("medssl.pretraining_labels") == "yes"
        rows[objective] = {"pretrain_seconds": round(time.perf_counter() - t0, 1), "labels_seen_in_pretraining": seen,
                           "architecture": mv.tags["medssl.architecture"], "fractions": {}}
        for fraction in fractions:
            log(f"{objective}: fine-tuning with {fraction:.0%} of the labels, {args.seeds} seed(s), against scratch")
            cfg = FinetuneConfig(dataset=str(dataset), encoder=f"models:/bench-{objective}/{mv.version}", label_fraction=fraction,
                                 seeds=args.seeds, steps=args.finetune_steps, eval_every=max(args.finetune_steps // 4, 1), crop=32,
                                 modalities=["CT"], class_names=list(CT_CLASSES.values()), tracking_uri=uri,
                                 workdir=str(work / "finetune" / f"{objective}-{fraction:g}"), experiment="medssl-bench-downstream")
            table = finetune(cfg, console)
            mean = next(r for r in table["rows"] if r["class"] == "mean")
            rows[objective]["fractions"][f"{fraction:g}"] = {
                "pretrained": mean["pretrained"], "scratch": mean["scratch"],
                "per_class": {r["class"]: {i: round(r[i]["mean"], 4) for i in ("pretrained", "scratch")} for r in table["rows"][:-1]},
                "training_patients": table["split"]["train_patients"]}
    import torch

    result = {"bench": "downstream", "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps, "seeds": args.seeds, "nproc": args.nproc,
              "objectives": rows, "seconds": round(time.perf_counter() - t_all, 1), "date": time.strftime("%Y-%m-%d")}
    with_statistics(result)
    _log_to_mlflow(result, uri, work, np)
    emit(result, args.out)


def _log_to_mlflow(result: dict, uri: str, work: Path, np) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    objs = list(result["objectives"])
    fractions = list(next(iter(result["objectives"].values()))["fractions"])
    fig, axes = plt.subplots(1, len(fractions), figsize=(4.5 * len(fractions), 3.6), squeeze=False)
    for ax, frac in zip(axes[0], fractions):
        x = np.arange(len(objs))
        for j, init in enumerate(("pretrained", "scratch")):
            vals = [result["objectives"][o]["fractions"][frac][init] for o in objs]
            ax.bar(x + (j - 0.5) * 0.38, [v["mean"] for v in vals], 0.38, yerr=[v["std"] or 0.0 for v in vals], capsize=3, label=init)
        ax.set_xticks(x, [o + ("*" if result["objectives"][o]["labels_seen_in_pretraining"] else "") for o in objs])
        ax.set_title(f"{float(frac):.0%} of the labels")
        ax.set_ylim(0, 1)
        ax.set_ylabel("test Dice (mean over organs)")
    axes[0][0].legend()
    fig.suptitle(f"pre-trained vs scratch, {result['pretrain_steps']} pre-training steps (* labels seen in pre-training)")
    fig.tight_layout()
    plot = work / "downstream.png"
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("medssl-bench-downstream")
    with mlflow.start_run(run_name="objectives vs scratch"):
        mlflow.log_dict(result, "downstream.json")
        mlflow.log_artifact(str(plot))
    result["plot"] = str(plot)


if __name__ == "__main__":
    main()
