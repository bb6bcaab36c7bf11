"""The training loop: one process of a DeepSpeed ZeRO data-parallel run.

The same function runs a laptop run (one process, no launcher) and every
rank of a multi-process or multi-node run (torchrun, the deepspeed launcher,
Kubernetes pods: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
Without a GPU it uses gloo and DeepSpeed's CPU accelerator.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from medssl_scale.train.config import RunConfig


def _single_process_env() -> None:
    """A run started without a launcher is rank 0 of 1, on a free local port."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    # DeepSpeed reads this when it is first imported: CPU runs must say so before.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device("cpu")


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    ds = cfg.deepspeed
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 1 << 30,  # our own logging
        "zero_allow_untested_optimizer": True,  # a torch optimizer: DeepSpeed's fused Adam compiles for a minute on CPU
    }
    owned = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping", "bf16", "fp16"}
    if clash := owned & set(ds.extra):
        raise ValueError(f"deepspeed.extra sets {', '.join(sorted(clash))}: set them through data.batch_size, deepspeed.grad_accum, "
                         "optim.clip_grad and deepspeed.precision, which the training loop follows too")
    if "stage" in ds.extra.get("zero_optimization", {}):
        raise ValueError("deepspeed.extra.zero_optimization.stage: set deepspeed.zero_stage instead")
    return _merge(out, ds.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def step_data(cfg: RunConfig):
    """The data settings the loader runs with: by default a rank's micro-batches of one step mix the visits
    one batch of their combined size would (interleave = batch_size x grad_accum), so grad_accum=2 with
    batch 1 trains on the samples of grad_accum=1 with batch 2 (docs/training.md, "What is tested to be equivalent")."""
    if cfg.data.interleave is not None or cfg.deepspeed.grad_accum == 1:
        return cfg.data
    return cfg.data.model_copy(update={"interleave": cfg.data.batch_size * cfg.deepspeed.grad_accum})


def _optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def _to(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """To the device; floating tensors to the parameters' dtype (bf16 runs hold bf16 weights)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
        out[k] = v
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Stop:
    """SIGTERM (what Kubernetes sends before killing a pod) asks for a checkpoint at the next step."""

    def __init__(self) -> None:
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._old)


def train(cfg: RunConfig, resume: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Run (or resume) ``cfg``; returns a summary. ``resume``: auto (the latest complete checkpoint, if any), never, or a path."""
    _single_process_env()
    device = _device()
    import deepspeed  # after DS_ACCELERATOR is set
    import torch.distributed as dist

    from medssl_scale.data.loader import Loader
    from medssl_scale.objectives.compose import build_run_objective
    from medssl_scale.train import checkpoint
    from medssl_scale.train.memory_report import memory_report
    from medssl_scale.schedule import warmup_cosine
    from medssl_scale.train.tracking import Tracker

    # DeepSpeed's ZeRO calls a torch collective torch has renamed: one warning per step would bury a pod's log.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=cfg.deepspeed.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"

    source = _resume_source(resume, ckpt_dir, run_dir, rank)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    objective, weight = build_run_objective([(n, w, cfg.objective_args(n, s)) for n, w, s in cfg.objective_settings()])
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    # Only what trains: a momentum network (mocov2's keys) follows its own rule and takes no optimizer state.
    optimizer = _optimizer(cfg, [p for p in objective.parameters() if p.requires_grad])
    scheduler = warmup_cosine(optimizer, cfg.steps, cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.min_lr)
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg))
    memory = memory_report(engine, optimizer)  # None unless MEDSSL_MEMORY_REPORT names a directory (bench/train_step.py)
    loader = Loader(step_data(cfg), rank, world, copy=False, workers_ignore_sigterm=True, device=device)  # raw crops normalised on the device
    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32

    step = 0
    if source is not None:
        state = checkpoint.load(engine, source)
        _same_config(state.get("config"), cfg, source)
        loader.load_state_dict(state["loader"])
        step = int(state["step"])
        if rank == 0:
            _truncate_metrics(run_dir / "metrics.jsonl", step)
            print(f"resumed from {source} (step {step} of {cfg.steps})", flush=True)  # a restarted pod's log says where it took up

    tracker = Tracker(cfg, enabled=rank == 0)
    stop = _Stop()
    metrics_file = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    bar = _progress(progress and rank == 0, cfg.steps, step)
    batches = iter(loader)
    samples_per_step = cfg.data.batch_size * cfg.deepspeed.grad_accum * world
    status = "finished"
    last: Path | None = None
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            waited = 0.0
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it in engine.step)
            sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.deepspeed.grad_accum):
                t = time.perf_counter()
                batch = _to(next(batches), device, dtype)
                waited += time.perf_counter() - t
                losses = engine(batch, step=step, rank=rank, micro=micro)
                engine.backward(weight * losses["loss"])
                engine.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.deepspeed.grad_accum
            step += 1
            # Every rank's losses, averaged: the curve does not depend on which rank logs it.
            names = sorted(sums)
            packed = torch.stack([sums[k] for k in names])
            dist.all_reduce(packed)
            seconds = time.perf_counter() - t0
            record = {"step": step, **{k: float(v) / world for k, v in zip(names, packed)},
                      "lr": lr, "samples_per_s": samples_per_step / seconds,
                      "data_wait": waited / seconds, "peak_memory_mb": _peak_memory_mb(device)}
            if step % cfg.tracking.log_every == 0 or step == cfg.steps:
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                tracker.metrics(step, record)
            if step % cfg.tracking.plot_every == 0 or step == cfg.steps:
                # Every rank runs it: under ZeRO-3 a forward gathers parameters collectively.
                # Eval mode: a plot must not move BatchNorm's running statistics, which are published with the encoder.
                objective.eval()
                with deepspeed.zero.GatheredParameters(list(objective.parameters(recurse=False)), enabled=cfg.deepspeed.zero_stage == 3):
                    visuals = objective.visuals(batch, step) if hasattr(objective, "visuals") else None
                objective.train()
                tracker.plots(step, visuals)
            bar(step, record)
            stopping = _any(stop.requested, device)
            if step % cfg.checkpoint.every == 0 or step == cfg.steps or stopping:
                tracker.flush()  # what a resume will not redo must be on record
                state = {"step": step, "loader": loader.state_dict(), "config": cfg.model_dump(mode="json")}
                last = checkpoint.save(engine, ckpt_dir, step, state, cfg.checkpoint.keep)
            if stopping:
                status = "stopped by SIGTERM after a checkpoint"
                break
        if memory:
            memory.write(rank, world)
        tracker.finish(status, last if step == cfg.steps else None)
    except BaseException:
        try:
            tracker.finish("failed", None)
        except Exception:  # never hide the error that stopped the run
            pass
        raise
    finally:
        # Stop the loader's workers through their queues now: they ignore SIGTERM, which is how
        # multiprocessing would otherwise end them at interpreter exit.
        batches.close()
        bar(None, None)
        stop.restore()
        if metrics_file:
            metrics_file.close()
    return {"status": status, "step": step, "run_dir": str(run_dir), "world_size": world,
            "mlflow_run_id": getattr(tracker, "run_id", None)}


def _resume_source(resume: str, ckpt_dir: Path, run_dir: Path, rank: int) -> Path | None:
    """The checkpoint to resume from, chosen by rank 0 and broadcast: every rank must load the same one."""
    import torch.distributed as dist

    from medssl_scale.train import checkpoint

    choice: list[Any] = [None]
    if rank == 0:
        try:
            if resume == "auto":
                choice[0] = checkpoint.latest(ckpt_dir)
            elif resume == "never":
                if checkpoint.complete(ckpt_dir) or (run_dir / "metrics.jsonl").exists():
                    raise ValueError(f"{run_dir} holds a run already: --resume auto continues it; a new name= starts another")
            else:
                path = Path(resume)
                if not (path / checkpoint.MARKER).exists():
                    raise ValueError(f"--resume {path}: not a complete checkpoint (no {checkpoint.MARKER} marker)")
                newer = [c.name for c in checkpoint.complete(ckpt_dir) if c.name > path.name and c.resolve() != path.resolve()]
                if newer:
                    raise ValueError(f"--resume {path}: {ckpt_dir} holds newer checkpoints ({', '.join(newer)}); move them away to roll back")
                choice[0] = path
        except ValueError as e:
            choice[0] = e
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], ValueError):
        raise choice[0]
    return choice[0]


RESUMABLE_CHANGES = ("tracking", "checkpoint")


def _same_config(saved: dict[str, Any] | None, cfg: RunConfig, source: Path) -> None:
    """A resume continues the run it resumes: only tracking and checkpoint settings may differ."""
    if saved is None:
        return
    now = cfg.model_dump(mode="json")
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        raise ValueError(f"{source} was written with other settings for {', '.join(changed)}: "
                         "resume with the run's own config (RUN/config.yaml), or start a new run (name=...)")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of steps after the checkpoint: the resumed run writes them again."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def _any(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank got the signal: they must all stop at the same step."""
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _progress(enabled: bool, total: int, start: int):
    if not enabled:
        return lambda step, record: None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    p = Progress(TextColumn("pre-train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    task = p.add_task("train", total=total, completed=start, info="")
    p.start()

    def update(step: int | None, record: dict[str, Any] | None) -> None:
        if step is None:
            p.stop()
            return
        p.update(task, completed=step, info=f"loss {record['loss']:.4f}  {record['samples_per_s']:.1f} samples/s  data wait {record['data_wait']:.0%}")
        if step >= total:
            p.stop()

    return update
