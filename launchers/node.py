"""The pod entry: one process per node, which becomes torchrun with this node's place in the job.

    python -m launchers.node --config FILE [--resume auto] [key=value ...]

The same container command runs in every flavour of multi-node job; only
where the node's rank and rank 0's address come from differs:

- ``MEDSSL_NODE_RANK``, else ``JOB_COMPLETION_INDEX`` (an Indexed Job), else
  ``RANK`` (the Kubeflow Training Operator's PyTorchJob sets the node's rank there);
- ``MEDSSL_MASTER_ADDR`` / ``MEDSSL_MASTER_PORT``, else ``MASTER_ADDR`` /
  ``MASTER_PORT`` (PyTorchJob), port 29500 by default;
- ``MEDSSL_NNODES`` (required), ``MEDSSL_NPROC_PER_NODE`` (1 by default: one per GPU);
- ``MEDSSL_SHUTDOWN_TIMEOUT``: how long torchrun waits for its ranks after a
  SIGTERM before it kills them (its default, 30 s, is shorter than a large
  checkpoint takes; the pod's grace period must be longer still).

torchrun runs with static rendezvous and no in-place restarts: when a node
dies the others fail (``deepspeed.timeout_s`` at the latest), the Job
replaces the pods, and every rank resumes from the newest complete
checkpoint (``--resume auto``). The process execs torchrun, so the
SIGTERM Kubernetes sends reaches it and, through it, the ranks (which then
checkpoint).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping


class NodeEnvError(ValueError):
    pass


def _first(env: Mapping[str, str], *names: str, default: str | None = None) -> tuple[str, str]:
    for n in names:
        if env.get(n, "") != "":
            return n, env[n]
    if default is None:
        raise NodeEnvError(f"none of {', '.join(names)} is set: the pod spec must give the node its place in the job")
    return "default", default


def _int(env: Mapping[str, str], *names: str, default: str | None = None, low: int = 0) -> int:
    name, value = _first(env, *names, default=default)
    try:
        n = int(value)
    except ValueError:
        raise NodeEnvError(f"{name}={value!r} is not an integer") from None
    if n < low:
        raise NodeEnvError(f"{name}={n} must be at least {low}")
    return n


def torchrun_args(env: Mapping[str, str], rank_args: list[str]) -> list[str]:
    """torchrun's command line for this node (after ``python -m torch.distributed.run``)."""
    nnodes = _int(env, "MEDSSL_NNODES", low=1)
    node_rank = _int(env, "MEDSSL_NODE_RANK", "JOB_COMPLETION_INDEX", "RANK")
    if node_rank >= nnodes:
        raise NodeEnvError(f"node rank {node_rank} is outside a job of {nnodes} node(s)")
    nproc = _int(env, "MEDSSL_NPROC_PER_NODE", default="1", low=1)
    _, addr = _first(env, "MEDSSL_MASTER_ADDR", "MASTER_ADDR")
    port = _int(env, "MEDSSL_MASTER_PORT", "MASTER_PORT", default="29500", low=1)
    shutdown = _int(env, "MEDSSL_SHUTDOWN_TIMEOUT", default="30", low=1)
    return [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--nproc-per-node={nproc}", f"--master-addr={addr}",
            f"--master-port={port}", "--max-restarts=0", f"--shutdown-timeout={shutdown}", "-m", "launchers.rank", *rank_args]


def main(argv: list[str]) -> int:
    import argparse

    from medssl_scale.store.layout import DatasetDir
    from medssl_scale.train.cli import pretrain_arguments
    from medssl_scale.train.config import load_run_config

    p = argparse.ArgumentParser(prog="python -m launchers.node")
    pretrain_arguments(p)
    run = p.parse_args(argv)
    try:
        # A bad config or a missing dataset fails the pod with exit code 2 before any rank starts: the Job's pod
        # failure policy then fails the job instead of retrying what cannot succeed (a rank's own exit 2 would
        # reach the Job as torchrun's 1).
        cfg = load_run_config(run.config, run.overrides)
        if not DatasetDir(cfg.data.dataset).manifest.exists():
            raise FileNotFoundError(f"data.dataset {cfg.data.dataset}: no dataset there (no manifest.jsonl)")
        args = torchrun_args(os.environ, argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"launchers.node: {e}", file=sys.stderr)
        return 2
    print(f"launchers.node: torchrun {' '.join(args)}", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *args])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
