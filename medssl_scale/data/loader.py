"""The training loader: one object for both sources, with a state that resumes exactly.

``Loader(cfg, rank, world)`` iterates batches forever, epoch after epoch.
``state_dict()`` records the epoch and the batches consumed in it;
``load_state_dict()`` makes the next iteration start with the batch that
would have come next. Only batches handed to the caller count, not the
ones the workers had prefetched.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from medssl_scale.data.catalog import Catalog
from medssl_scale.data.collate import RING_KEY, Collate, Ring
from medssl_scale.data.config import DataConfig
from medssl_scale.data.crops import CropDataset
from medssl_scale.data.plan import EpochPlan, PlanSampler
from medssl_scale.data.transforms import finish
from medssl_scale.data.stream import (
    ShardStream,
    batches_per_worker,
    consumed_per_worker,
)

STATE_VERSION = 1


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _ignore_sigterm(worker_id: int) -> None:
    """Workers leave SIGTERM to their rank: torchrun signals the whole process group, and a rank whose
    workers died cannot finish the step and write the checkpoint SIGTERM asks for."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Loader:
    """Batches of one rank, forever, resumable.

    ``copy=False`` hands out views of the shared batch ring instead of copies
    (one copy less per batch); a view stays valid until the consumer has
    drawn two more batches, which suits a training step that uses each batch
    before asking for the next. With a GPU, batches come in pinned memory.

    Image crops are normalised float32 whatever crossed from the workers
    (``DataConfig.handoff``): raw crops are normalised here, on ``device``
    when one is given (the training step's GPU), so the batch's images are
    already there; everything else stays on the host.
    """

    def __init__(self, cfg: DataConfig, rank: int | None = None, world: int | None = None, copy: bool = True,
                 workers_ignore_sigterm: bool = False, device: torch.device | str | None = None):
        r, w = _dist()
        self.cfg = cfg
        self.rank = r if rank is None else rank
        self.world = w if world is None else world
        self.epoch = 0
        self.position = 0  # batches consumed in this epoch
        self.copy = copy
        # The training engine sets this and stops the workers itself (closing its iterator): a SIGTERM
        # to the process group must leave the workers to the rank, which finishes its step first.
        self.workers_ignore_sigterm = workers_ignore_sigterm
        self.pin = torch.cuda.is_available()
        self.device = None if device is None or torch.device(device).type == "cpu" else torch.device(device)
        self.ring: Ring | None = None
        if cfg.source == "zarr":
            modalities = tuple(cfg.modalities) if cfg.modalities else None
            self.catalog = Catalog.load(cfg.dataset, modalities)
            self.plan = EpochPlan(
                self.catalog, cfg.seed, cfg.crops_per_visit, cfg.samples_per_epoch, cfg.modality_weights, cfg.pairs, self.world, cfg.batch_size
            )
            self.sampler = PlanSampler(self.plan, self.rank, cfg.workers, cfg.interleave)
            self.dataset: CropDataset | ShardStream = CropDataset(self.catalog, cfg)
        else:
            self.dataset = ShardStream(cfg, self.rank, self.world)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return len(self.sampler) if self.cfg.source == "zarr" else self.dataset.batches  # type: ignore[union-attr]

    def _dataloader(self) -> DataLoader:
        kw: dict[str, Any] = {"num_workers": self.cfg.workers}
        if self.cfg.workers:
            if self.ring is None:  # allocated once, before the first workers fork
                cropper = self.dataset.cropper
                self.ring = Ring(cropper.spec(), self.cfg.batch_size, self.cfg.workers, self.cfg.prefetch)
            kw.update(prefetch_factor=self.cfg.prefetch, collate_fn=Collate(self.ring, self.epoch),
                      worker_init_fn=_ignore_sigterm if self.workers_ignore_sigterm else None)
        else:
            kw.update(collate_fn=Collate(None), pin_memory=self.pin)
        if self.cfg.source == "zarr":
            self.sampler.epoch, self.sampler.start = self.epoch, self.position
            return DataLoader(self.dataset, batch_sampler=self.sampler, **kw)
        stream = self.dataset
        assert isinstance(stream, ShardStream)
        stream.epoch = self.epoch
        used = stream.workers_used(self.cfg.workers)
        stream.skip = consumed_per_worker(self.position, batches_per_worker(stream.batches, used))
        stream.offset = self.position % used
        if self.cfg.workers:
            kw["num_workers"] = used  # a worker without shards would stop early and unbalance the ring
        return DataLoader(stream, batch_size=self.cfg.batch_size, **kw)

    def epoch_batches(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch."""
        if self.position >= len(self):  # a state saved right after an epoch's last batch
            self.epoch, self.position = self.epoch + 1, 0
        for batch in self._dataloader():
            if RING_KEY in batch:
                assert self.ring is not None
                batch = self.ring.take(batch, copy=self.copy, pin=self.pin)
            self.position += 1
            yield self.finish(batch)
        if self.position != len(self):
            raise RuntimeError(f"rank {self.rank}: epoch {self.epoch} ended after {self.position} of {len(self)} batches")
        self.epoch += 1
        self.position = 0

    def finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A batch as it crossed from the workers, with its image crops normalised to float32."""
        cropper = self.dataset.cropper
        return finish(batch, cropper.image_keys, self.device) if "norm" in batch else batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.epoch_batches()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            # What the sample order depends on: a resume with other values would see other samples.
            "order": self._order(),
        }

    def _order(self) -> dict[str, Any]:
        """What the sample order and content depend on; a resume must match it."""
        c = self.cfg.model_dump(mode="json", exclude={"dataset", "shard_url", "cache_mb", "cache_scope", "prefetch", "handoff"})
        if self.cfg.source == "zarr":
            pool = [v.volume_id for v in self.catalog.volumes]
        else:
            stream = self.dataset
            assert isinstance(stream, ShardStream)
            pool = [f"{u.rsplit('/', 1)[-1]}:{n}" for u, n in zip(stream.urls, stream.counts)]
        return {**c, "world": self.world, "rank": self.rank, "batches_per_epoch": len(self),
                "pool": hashlib.sha256("\n".join(pool).encode()).hexdigest()[:16]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        saved = state["order"]
        diff = {k: (saved.get(k), v) for k, v in self._order().items() if saved.get(k) != v}
        if diff:
            what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in diff.items())
            if "pool" in diff:
                what = what.replace("pool", "the dataset's volumes (or shards)", 1)
            raise ValueError(f"cannot resume the data order exactly: {what} changed since the checkpoint")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
