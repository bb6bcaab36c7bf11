"""Training-step time and memory per rank of the project's own train(), under ZeRO stages 0, 1, 2 and 3.

    python bench/train_step.py [--nproc 2] [--once-nproc 1] [--rounds 3] [--steps 10] [--warmup 3] [--crop 48] [--batch 2]
                               [--channels 32,64,128] [--modes zero0,zero1,zero2,zero3] [--out results.json]

Each run is ``medssl launch local --nproc N`` (torchrun, launchers/rank.py,
train()) on a small generated dataset, with the Disruptive Autoencoder's
``tiny`` config at a fixed model size; MLflow tracks to a local SQLite store
in the scratch directory (no network). The step time of a step is read from
its metrics.jsonl record (samples per step / samples_per_s) and the data wait
taken out (x (1 - data_wait)); the loader runs in the rank's own process
(``data.workers=0``) so that no loader process competes for the CPU, and its
time is the data wait. Per run: the median over the timed steps (after the
warm-up steps). The modes alternate over ``--rounds`` rounds, in a rotated
order, and each mode's figure is the median over the rounds with its min and
max; the ratio to stage 0 is taken within each round first. ``--once-nproc``
rank counts run each mode once, in the first round (for their memory per
rank: the 1/N of ZeRO), and their times are one pass, not a spread.

Stage 0 is DeepSpeed without ZeRO: data parallel with a full copy of
everything per rank, the engine's DDP equivalent (train() has no separate
PyTorch DDP mode). Memory per rank comes from the rank itself
(``MEDSSL_MEMORY_REPORT``, medssl_scale/train/memory_report.py): bytes of
parameters, gradients, fp32 master copy, optimizer state and other DeepSpeed
buffers at the optimizer step, and the peak RSS, beside the RSS of a process
that only imports what a rank imports.
Prints one JSON object; progress on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before this folder (sys.path[0]): bench/ingest.py must not shadow the ingest package
from _emit import emit  # noqa: E402

MODES = ("zero0", "zero1", "zero2", "zero3")
BASELINE = "zero0"
TINY = ROOT / "configs" / "dae" / "tiny.yaml"


def log(msg: str) -> None:
    print(f"[bench/train_step] {msg}", file=sys.stderr, flush=True)


def make_dataset(root: Path, n: int, shape: tuple[int, int, int]) -> Path:
    import nibabel as nib

    from ingest.runner import IngestConfig, run_ingest
    from medssl_scale.synth.phantoms import ct_phantom

    src, data = root / "src", root / "dataset"
    src.mkdir(parents=True)
    for i in range(n):
        p = ct_phantom(shape=shape, seed=i)
        nib.save(nib.Nifti1Image(p.image, p.affine), src / f"ct_{i:03d}.nii.gz")
    run_ingest(IngestConfig(sources=[src], out=data, workers=1))
    return data


def overrides(args: argparse.Namespace, data: Path, workdir: Path, name: str, stage: int) -> list[str]:
    return [f"data.dataset={data}", f"data.crop={args.crop}", f"data.batch_size={args.batch}", "data.workers=0",
            f"objectives.dae.model.channels=[{args.channels}]", f"steps={args.warmup + args.steps}",
            f"deepspeed.zero_stage={stage}", "deepspeed.precision=fp32", "deepspeed.grad_accum=1",
            f"workdir={workdir}", f"name={name}", "checkpoint.every=100000", "checkpoint.keep=1",
            "tracking.log_every=1", "tracking.plot_every=100000", "tracking.experiment=bench-train-step"]


def run_once(args: argparse.Namespace, data: Path, scratch: Path, mode: str, nproc: int, rnd: int) -> dict:
    name = f"{mode}-n{nproc}-r{rnd}"
    report = scratch / "memory" / name
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the local SQLite store
    env.update(MEDSSL_MEMORY_REPORT=str(report), PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    cmd = [sys.executable, "-m", "medssl_scale.cli", "launch", "local", "--nproc", str(nproc), "--config", str(TINY),
           "--resume", "never", "--no-progress", *overrides(args, data, scratch / "runs", name, int(mode[-1]))]
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    wall = time.perf_counter() - t
    records = [json.loads(ln) for ln in (scratch / "runs" / name / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    timed = [r for r in records if r["step"] > args.warmup]
    samples_per_step = args.batch * nproc
    step_s = [samples_per_step / r["samples_per_s"] for r in timed]
    compute_s = [s * (1 - r["data_wait"]) for s, r in zip(step_s, timed)]
    ranks = [json.loads((report / f"rank-{i}.json").read_text()) for i in range(nproc)]
    shutil.rmtree(scratch / "runs" / name, ignore_errors=True)  # the disk of a shared VM
    return {"step_ms": 1000 * statistics.median(compute_s), "step_ms_with_data_wait": 1000 * statistics.median(step_s),
            "data_wait": statistics.median(r["data_wait"] for r in timed), "timed_steps": len(timed), "wall_s": round(wall, 1),
            "ranks": ranks}


def spread(values: list[float], digits: int) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits), "max": round(max(values), digits)}


def import_rss_mb() -> float:
    """RSS of a process that only imports what a rank imports: the part of the peak that is not the run."""
    code = ("import os, resource; os.environ.setdefault('DS_ACCELERATOR', 'cpu'); import torch, deepspeed, mlflow; "
            "import medssl_scale.train.engine, medssl_scale.objectives.compose, medssl_scale.data.loader; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return float(out.stdout.strip().splitlines()[-1])


def summarise(args: argparse.Namespace, runs: dict, nproc: int, modes: list[str]) -> dict:
    out: dict = {}
    for mode in modes:
        rs = runs[(mode, nproc)]
        rank_bytes = [r["bytes"] for r in rs[-1]["ranks"]]  # the same in every round: the last one's
        out[mode] = {
            "passes": len(rs),
            "step_ms": spread([r["step_ms"] for r in rs], 1),
            "step_ms_with_data_wait": spread([r["step_ms_with_data_wait"] for r in rs], 1),
            "data_wait": spread([r["data_wait"] for r in rs], 4),
            "peak_rss_mb_per_rank": spread([max(x["peak_rss_mb"] for x in r["ranks"]) for r in rs], 1),
            "mb_per_rank": [{k: round(v / 2**20, 3) for k, v in b.items()} for b in rank_bytes],
            "rounds": [{k: v for k, v in r.items() if k != "ranks"} for r in rs],
        }
        if BASELINE in modes and mode != BASELINE:
            ratios = [a["step_ms"] / b["step_ms"] for a, b in zip(rs, runs[(BASELINE, nproc)])]
            out[mode]["step_time_vs_zero0"] = spread(ratios, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", default="2", help="rank counts timed in every round, comma-separated")
    ap.add_argument("--once-nproc", default="1", help="rank counts run in the first round only (memory per rank); '' for none")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="steps not timed, first in each run")
    ap.add_argument("--crop", type=int, default=48)
    ap.add_argument("--batch", type=int, default=2, help="per rank")
    ap.add_argument("--channels", default="32,64,128", help="conv_ae channels")
    ap.add_argument("--volumes", type=int, default=4, help="generated CT volumes of 64^3 in the dataset")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    modes = args.modes.split(",")
    nprocs = [int(n) for n in args.nproc.split(",")]
    once = [int(n) for n in args.once_nproc.split(",") if n]
    scratch = Path(tempfile.mkdtemp(prefix="medssl-bench-step-"))
    started = time.perf_counter()
    log(f"generating {args.volumes} volumes in {scratch}")
    data = make_dataset(scratch / "data", args.volumes, (64, 64, 64))
    runs: dict = {}
    for rnd in range(args.rounds):
        order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]  # rotated: drift does not always favour one mode
        for nproc in (once if rnd == 0 else []) + nprocs:
            for mode in order:
                r = run_once(args, data, scratch, mode, nproc, rnd)
                runs.setdefault((mode, nproc), []).append(r)
                log(f"round {rnd} {mode} N={nproc}: {r['step_ms']:.1f} ms/step without data wait "
                    f"(data wait {r['data_wait']:.1%}), peak RSS {max(x['peak_rss_mb'] for x in r['ranks']):.0f} MB, run {r['wall_s']} s")
    first = runs[(modes[0], nprocs[0])][0]["ranks"][0]
    out_nprocs = sorted(set(once + nprocs))
    out: dict = {"bench": "train_step",
                 "what": "train() through `medssl launch local`, step time without data wait; stage 0 is DeepSpeed without ZeRO (the DDP equivalent)",
                 "model": {"objective": "dae", "network": "conv_ae", "channels": [int(c) for c in args.channels.split(",")],
                           "params": first["model_params"], "param_mb_fp32": round(first["model_params"] * 4 / 2**20, 3)},
                 "crop": args.crop, "batch_per_rank": args.batch, "steps_timed": args.steps, "warmup_steps": args.warmup,
                 "rounds": args.rounds, "optimizer": "AdamW (torch), gradient clipping 1.0, fp32",
                 "import_only_rss_mb": round(import_rss_mb(), 1)}
    for nproc in out_nprocs:
        out[f"n{nproc}"] = summarise(args, runs, nproc, modes)
    if 2 in nprocs and "zero2" in modes and BASELINE in modes:
        ratio = out["n2"]["zero2"]["step_time_vs_zero0"]
        out["aim"] = {"what": "ZeRO-2 step time at most 1.15x stage 0 at N=2", "ratio": ratio, "met": ratio["median"] <= 1.15,
                      "met_in_every_round": ratio["max"] <= 1.15}
    out.update(date=datetime.date.today().isoformat(), total_s=round(time.perf_counter() - started, 1),
               command="python bench/train_step.py " + " ".join(sys.argv[1:]),
               device="cpu (gloo, DS_ACCELERATOR=cpu)" if not torch.cuda.is_available() else "cuda",
               machine={"cpu_count": os.cpu_count(), "platform": platform.machine(), "python": platform.python_version(),
                        "torch": torch.__version__, "deepspeed": __import__("importlib.metadata").metadata.version("deepspeed"),
                        "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    shutil.rmtree(scratch, ignore_errors=True)
    emit(out, args.out)


if __name__ == "__main__":
    main()
