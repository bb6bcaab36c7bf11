"""Training-step throughput and memory per rank: plain PyTorch DDP against DeepSpeed ZeRO 1, 2 and 3.

    python bench/train_step.py [--nproc 2] [--steps 20] [--warmup 3] [--crop 32] [--batch 2]
                               [--channels 16,32,64] [--out results.json]

The same objective (the Disruptive Autoencoder on the ``conv_ae`` network, or
``--model swin_unetr``), the same batch of synthetic crops and the same
optimizer (AdamW), launched with torchrun for each mode in turn; the data
loader is left out so only the step is measured. Per mode: samples/s over
all ranks (after warm-up steps), step time, peak RSS (or CUDA memory) per
rank, and the optimizer state each rank holds (the 1/N that ZeRO promises).
Prints one JSON object; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _emit import emit  # noqa: E402

MODES = ("ddp", "zero1", "zero2", "zero3")


def log(msg: str) -> None:
    print(f"[bench/train_step] {msg}", file=sys.stderr, flush=True)


def _objective(args: argparse.Namespace):
    from medssl_scale.objectives import build_objective

    if args.model == "swin_unetr":
        model = {"name": "swin_unetr", "feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (3, 3, 3, 3)}
    else:
        model = {"name": "conv_ae", "channels": tuple(int(c) for c in args.channels.split(","))}
    return build_objective("dae", model=model, projection_dim=32, cmcl_weight=0.0)


def _state_bytes(optimizer) -> int:
    seen, total = set(), 0
    for state in optimizer.state.values():
        for v in state.values():
            if hasattr(v, "untyped_storage") and v.numel() > 1 and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                total += v.numel() * v.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    """One rank of one mode (run under torchrun)."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    objective = _objective(args).to(device)
    params = sum(p.numel() for p in objective.parameters())
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    if args.mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if cuda else None)

        def step(batch, i):
            loss = model(batch, step=i, rank=rank)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        inner = optimizer
    else:
        stage = int(args.mode[-1])
        config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
                  "steps_per_print": 1 << 30, "zero_allow_untested_optimizer": True}
        engine, ds_opt, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=config)

        def step(batch, i):
            loss = engine(batch, step=i, rank=rank)["loss"]
            engine.backward(loss)
            engine.step()

        inner = getattr(ds_opt, "optimizer", ds_opt)
    g = torch.Generator().manual_seed(rank)
    batch = {"image": torch.rand(args.batch, 1, args.crop, args.crop, args.crop, generator=g).to(device),
             "modality": torch.zeros(args.batch, dtype=torch.long, device=device)}
    for i in range(args.warmup):
        step(batch, i)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(batch, args.warmup + i)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mine = {"rank": rank, "seconds": seconds, "peak_memory_mb": peak, "optimizer_state_mb": _state_bytes(inner) / 2**20, "params": params}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(args.result).write_text(json.dumps({"world_size": world, "ranks": gathered}))
    dist.barrier()
    dist.destroy_process_group()


def run_mode(args: argparse.Namespace, mode: str, scratch: Path) -> dict:
    result = scratch / f"{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", __file__, "--worker",
           "--mode", mode, "--result", str(result), "--steps", str(args.steps), "--warmup", str(args.warmup), "--crop", str(args.crop),
           "--batch", str(args.batch), "--channels", args.channels, "--model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    r = json.loads(result.read_text())
    slowest = max(x["seconds"] for x in r["ranks"])
    return {
        "samples_per_s": round(args.steps * args.batch * r["world_size"] / slowest, 2),
        "step_ms": round(1000 * slowest / args.steps, 1),
        "peak_memory_mb_per_rank": [round(x["peak_memory_mb"], 1) for x in r["ranks"]],
        "optimizer_state_mb_per_rank": [round(x["optimizer_state_mb"], 3) for x in r["ranks"]],
        "params": r["ranks"][0]["params"],
        "world_size": r["world_size"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", default="16,32,64", help="conv_ae channels")
    ap.add_argument("--model", choices=("conv_ae", "swin_unetr"), default="conv_ae")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    scratch = Path(tempfile.mkdtemp(prefix="medssl-bench-step-"))
    runs = {}
    for mode in args.modes.split(","):
        log(f"{mode}: {args.nproc} ranks, {args.steps} steps of batch {args.batch} x {args.crop}^3")
        runs[mode] = run_mode(args, mode, scratch)
        log(f"{mode}: {runs[mode]['samples_per_s']} samples/s, {runs[mode]['step_ms']} ms/step, "
            f"optimizer state {runs[mode]['optimizer_state_mb_per_rank']} MB per rank")
    out: dict = {"bench": "train_step", "world_size": args.nproc}
    for mode, r in runs.items():
        out[f"{mode}_samples_per_s"] = r["samples_per_s"]
    if "ddp" in runs:
        for mode in runs:
            if mode != "ddp":
                out[f"{mode}_step_time_vs_ddp"] = round(runs[mode]["step_ms"] / runs["ddp"]["step_ms"], 3)
                out[f"{mode}_optimizer_state_vs_ddp"] = round(
                    max(runs[mode]["optimizer_state_mb_per_rank"]) / max(1e-9, max(runs["ddp"]["optimizer_state_mb_per_rank"])), 3)
    out.update(runs=runs, model=args.model, crop=args.crop, batch_per_rank=args.batch, steps=args.steps,
               device="cuda" if torch.cuda.is_available() else "cpu (gloo, DS_ACCELERATOR=cpu)",
               machine={"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__})
    emit(out, args.out)


if __name__ == "__main__":
    main()
