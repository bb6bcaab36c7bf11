"""Checkpoints that are either complete or ignored.

A checkpoint is a DeepSpeed checkpoint directory ``RUN/checkpoints/step-NNNNNNNN``
(model, optimizer and scheduler, sharded as the ZeRO stage shards them; DeepSpeed's
``zero_to_fp32.py`` is written beside it), one ``rank-R.pt`` per rank with
that rank's loader position and RNG states, and a ``COMPLETE`` marker that
rank 0 writes only after every rank has finished writing. Resume takes the
newest directory with a marker, so a checkpoint cut short by a kill is never
picked; DeepSpeed's own ``latest`` file is not used.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from medssl_scale.store.layout import atomic_write_text

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def complete(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.exists():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and (p / MARKER).exists())


def latest(ckpt_dir: Path) -> Path | None:
    done = complete(ckpt_dir)
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, ckpt_dir: Path, step: int, rank_state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint from every rank (a collective call); returns its directory."""
    tag = tag_for(step)
    path = ckpt_dir / tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and path.exists():  # never a stale marker over files being rewritten
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path)
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save({**rank_state, "rng": rng_state()}, path / f"rank-{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        atomic_write_text(path / MARKER, json.dumps({"step": step, "time": time.time()}) + "\n")
        for old in complete(ckpt_dir)[:-keep]:
            (old / MARKER).unlink(missing_ok=True)  # unpicked from here on, even if the delete is cut short
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def load(engine: Any, path: Path) -> dict[str, Any]:
    """Restore the engine from ``path``; returns this rank's saved state (loader position, step)."""
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    engine.load_checkpoint(str(path.parent), tag=path.name)
    rank = dist.get_rank() if dist.is_initialized() else 0
    own = path / f"rank-{rank}.pt"
    if not own.exists():
        raise FileNotFoundError(f"{own}: the checkpoint has no state for rank {rank} (was it written by fewer ranks?)")
    state = torch.load(own, weights_only=False)
    set_rng_state(state.pop("rng"))
    return state


def fp32_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state of a complete checkpoint, whatever its ZeRO stage (0 included).

    Stages 1-3 go through DeepSpeed's own zero-to-fp32 conversion, which
    reassembles the sharded fp32 master weights; stage 0 keeps the whole
    model in ``mp_rank_00_model_states.pt``. These are our own pickles from a
    training run, read only when publishing, never when an encoder is pulled.
    """
    path = Path(path)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    if any(path.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
