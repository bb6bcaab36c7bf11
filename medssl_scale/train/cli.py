"""``medssl pretrain`` (this process is the run, or one rank of it) and ``medssl launch local`` (N ranks via torchrun)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_STOPPED = 143
LAUNCHER = Path(__file__).resolve().parents[2] / "launchers" / "rank.py"


def config_arguments(p: argparse.ArgumentParser) -> None:
    """A run config and its overrides (what ``medssl launch k8s`` ships to the cluster)."""
    p.add_argument("--config", type=Path, required=True, help="run config (YAML), e.g. configs/dae/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. steps=200 data.batch_size=4")


def pretrain_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of one run: shared by ``medssl pretrain``, the local launcher and the per-rank and per-node entries."""
    config_arguments(p)
    p.add_argument("--resume", default="auto", help="auto (the latest complete checkpoint of the run, if any), never, or a checkpoint directory")
    p.add_argument("--no-progress", action="store_true")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pre-train from a run config (one process, or one rank under a launcher)")
    pretrain_arguments(p)
    p.set_defaults(func=lambda a: _pretrain(a))
    launch = sub.add_parser("launch", help="run a config on several processes")
    where = launch.add_subparsers(dest="where", required=True, metavar="WHERE")
    local = where.add_parser("local", help="N ranks on this machine through torchrun")
    local.add_argument("--nproc", type=int, default=2)
    pretrain_arguments(local)
    local.set_defaults(func=_launch_local)
    from launchers.k8s.cli import add_parsers

    add_parsers(where)


def _pretrain(args: argparse.Namespace) -> int:
    from medssl_scale.train.config import load_run_config
    from medssl_scale.train.engine import train

    try:
        cfg = load_run_config(args.config, args.overrides)
    except ValueError as e:
        print(f"medssl pretrain: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:  # refusals and bad settings found once the run starts
        print(f"medssl pretrain: {e}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{result['status']} at step {result['step']} ({result['world_size']} rank(s)); run directory {result['run_dir']}")
    # Stopped early (SIGTERM) is not done: 128+15 tells torchrun and a Kubernetes Job to run it again, and
    # the next start resumes from the checkpoint just written. Exit 0 would mark the pod's index complete.
    return EXIT_STOPPED if result["step"] < cfg.steps else 0


def _close_process_group() -> None:
    # Left to interpreter exit, the communication backends' threads can abort the process ("terminate called
    # without an active exception", seen after a refusal), which turns our exit status into SIGABRT.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def pretrain_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="launchers/rank.py")
    pretrain_arguments(p)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return _pretrain(p.parse_args(argv))


def _launch_local(args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           str(LAUNCHER), "--config", str(args.config), "--resume", args.resume, *(["--no-progress"] if args.no_progress else []),
           *args.overrides]
    # Become torchrun rather than wait on it: a SIGTERM to this process then reaches the ranks.
    os.execv(sys.executable, cmd)
    return 0  # not reached
