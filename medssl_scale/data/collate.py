"""Batches handed from loader workers through shared memory allocated once, not once per batch.

PyTorch's DataLoader moves every batch a worker makes into a new shared-memory
segment, and the pages of a new segment fault on first touch in the worker and
again in the main process: for a batch of 96^3 float32 crops that costs more
than cutting the crops from cached chunks (measured: bench/loader.py,
docs/benchmarks.md). So the big tensors of a batch are stacked into a *ring*
of batch slots allocated before the workers start; the batch that crosses
the process boundary carries only the slot number, and the main process
copies the slot out (into pinned memory when there is a GPU).

Slot reuse is safe without any signal back from the main process: worker w
writes its j-th batch into slot ``w * per_worker + j % per_worker``, and
DataLoader asks a worker for a batch only after the main process took that
worker's batch ``j - prefetch``; ``per_worker = prefetch + 2`` keeps the slot
of a batch being copied out untouched. That holds while every worker stays
busy to the end of the epoch (a worker that stops early hands its share of
requests to the others), which is why the shard stream never starts more
workers than it has shards for. Epochs alternate between two halves of the
ring, since a new epoch's workers count from 0 again while the consumer may
still hold the last batch of the previous one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

RING_KEY = "_ring_slot"


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor allocated by numpy, which asks for huge pages: one page fault per 2 MiB, not per 4 KiB."""
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


class Ring:
    def __init__(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]], batch_size: int, workers: int, prefetch: int):
        self.spec, self.batch_size = spec, batch_size
        self.per_worker = prefetch + 2
        self.half = max(1, workers) * self.per_worker
        slots = 2 * self.half
        self.tensors = {k: torch.empty((slots, batch_size, *shape), dtype=dtype).share_memory_() for k, (shape, dtype) in spec.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def take(self, batch: dict[str, Any], copy: bool, pin: bool) -> dict[str, Any]:
        """Main process: the batch with its ring tensors filled in (copied out unless ``copy`` is False)."""
        slot, n, small = batch.pop(RING_KEY)
        for k in small:
            batch[k] = torch.from_numpy(batch[k])
        for k, t in self.tensors.items():
            view = t[int(slot), : int(n)]
            if pin:
                batch[k] = view.pin_memory()
            elif copy:
                batch[k] = empty(tuple(view.shape), view.dtype).copy_(view)
            else:
                batch[k] = view
        return batch


class Collate:
    """``collate_fn``: default_collate, except that the ring's keys are stacked into a ring slot in workers."""

    def __init__(self, ring: Ring | None = None, epoch: int = 0):
        self.ring = ring
        self.base = (epoch % 2) * ring.half if ring is not None else 0
        self.count = 0  # batches this worker process has made (each worker holds its own copy)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        info = get_worker_info()
        ring = self.ring if info is not None else None
        big: dict[str, torch.Tensor] = {}
        keys = set(ring.tensors) if ring else set()
        if ring and not all(
            k in s and tuple(s[k].shape) == ring.spec[k][0] and s[k].dtype == ring.spec[k][1] for s in samples for k in keys
        ):
            ring, keys = None, set()  # a sample unlike the spec (a shape-changing augmentation): the ordinary path
        if ring is not None:
            assert info is not None
            slot = self.base + info.id * ring.per_worker + self.count % ring.per_worker
            self.count += 1
            for k in keys:
                torch.stack([s[k] for s in samples], out=ring.tensors[k][slot, : len(samples)])
        elif info is None:
            # In the main process: allocate the big stacks through numpy (huge pages) too.
            for k, v in samples[0].items():
                if isinstance(v, torch.Tensor) and v.numel() >= 1 << 16 and all(tuple(s[k].shape) == tuple(v.shape) for s in samples):
                    big[k] = torch.stack([s[k] for s in samples], out=empty((len(samples), *v.shape), v.dtype))
                    keys.add(k)
        out = default_collate([{k: v for k, v in s.items() if k not in keys} for s in samples])
        out.update(big)
        if ring is not None:
            # Small tensors (boxes, ids) cross as numpy arrays, pickled by value: as tensors each
            # would get a shared-memory segment of its own, which costs more than the data.
            small = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
            for k in small:
                out[k] = out[k].numpy()
            out[RING_KEY] = (slot, len(samples), small)
        return out
