"""Streaming crops from ``shards/*.tar`` with plain webdataset: split by rank and worker, a fixed count per rank.

Each epoch the shards are dealt to ranks, then to each rank's data-loader
workers, by sample count (largest first, to the emptiest bin), in an order
seeded by the epoch. Every rank yields the same number of batches however
uneven the shards are: a bin short of samples reads its own shards again,
a bin with too many stops early. So DDP ranks never wait at the end of an
epoch for one that has more data (the hang webdataset's docs warn about),
and no shard is read by two ranks in one epoch.

A worker's pipeline is webdataset's own stages: its shard URLs (local paths
or ``pipe:`` commands) -> tar members -> whole volumes -> several
crops per volume (``crops_per_visit``) -> ``shuffle`` -> our normalisation
and augmentation. Everything random is seeded by (seed, epoch, rank, worker),
so a resumed run replays the same stream and skips what it had consumed.
"""

from __future__ import annotations

import itertools
import math
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import url_opener

from medssl_scale.data.catalog import MODALITIES, Catalog
from medssl_scale.data.config import DataConfig
from medssl_scale.data.crops import ArrayAccess, Cropper, handoff_dtype
from medssl_scale.store.layout import DatasetDir, check_shard_name, open_dataset_file
from medssl_scale.store.shards import decode_sample, read_index, verified_samples

_STREAM = 0x73747265
_TAR_READ = 4 << 20


def deal(counts: list[int], items: list[int], bins: int) -> list[list[int]]:
    """``items`` (indices into ``counts``, in a seeded order) dealt to ``bins`` balanced by count.

    Longest-processing-time first: the largest item goes to the emptiest bin;
    ties keep the seeded order, so equal shards move between bins per epoch.
    """
    out: list[list[int]] = [[] for _ in range(bins)]
    load = [0] * bins
    for i in sorted(items, key=lambda i: -counts[i]):  # sorted() is stable
        b = min(range(bins), key=lambda b: (load[b], len(out[b]), b))
        out[b].append(i)
        load[b] += counts[i]
    return out


def batches_per_worker(total: int, workers: int) -> list[int]:
    return [total // workers + (w < total % workers) for w in range(workers)]


class ShardStream(IterableDataset):
    def __init__(self, cfg: DataConfig, rank: int = 0, world: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world
        ds = DatasetDir(cfg.dataset)
        index = read_index(ds)
        if not index["shards"]:
            raise ValueError(f"{ds.root}: no shards in {ds.shard_index}: ingest writes them; source: zarr reads volumes.zarr instead")
        self.entries = index["shards"]
        self.urls = [shard_url(cfg.shard_url, ds, s["name"]) for s in self.entries]
        # The dataset's own shards are opened by the store's opener (no links, no waiting on a FIFO);
        # a configured shard_url is the config's to trust.
        self.below = None if cfg.shard_url else ds.shards.resolve()
        self.counts = [int(s["samples"]) for s in index["shards"]]
        total = sum(self.counts)
        per_rank = (cfg.samples_per_epoch or total * cfg.crops_per_visit) // world
        self.batches = per_rank // cfg.batch_size
        if self.batches < 1:
            raise ValueError(
                f"{total} volumes x {cfg.crops_per_visit} crops over {world} rank(s) is less than one batch of {cfg.batch_size} per rank"
            )
        catalog = Catalog.load(ds.root)
        self.cropper = Cropper(cfg, handoff_dtype([v.dtype for v in catalog.volumes]))
        self.patients = {p: i for i, p in enumerate(catalog.patients())}
        self.epoch = 0
        self.skip: list[int] = []  # batches each (logical) worker already delivered this epoch (resume)
        self.offset = 0  # the logical worker whose batch comes next

    def workers_used(self, workers: int) -> int:
        """Workers that get shards: never more than the rank's shards."""
        mine = self.assignment(self.epoch)[self.rank]
        return max(1, min(max(1, workers), len(mine)))

    def assignment(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.cfg.seed, epoch, _STREAM]).permutation(len(self.urls)).tolist()
        if len(order) < self.world:
            raise ValueError(f"{len(order)} shard(s) cannot feed {self.world} ranks disjointly: ingest with a smaller --shard-size")
        return deal(self.counts, order, self.world)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.assignment(self.epoch)[self.rank]
        used = self.workers_used(workers)
        if w >= used:
            return
        # DataLoader asks workers in turn from worker 0; after a resume the next batch belongs to
        # logical worker (position % used), so physical worker 0 plays that one.
        w = (w + self.offset) % used
        shards = deal(self.counts, mine, used)[w]
        n_batches = batches_per_worker(self.batches, used)[w]
        b = self.cfg.batch_size
        need = n_batches * b
        skip = (self.skip[w] if w < len(self.skip) else 0) * b
        seed = [self.cfg.seed, self.epoch, self.rank, w, _STREAM]
        volumes = math.ceil(need / self.cfg.crops_per_visit)
        held = sum(self.counts[i] for i in shards)
        # A bin holding more volumes than its quota starts at a seeded volume, so the ones it
        # leaves out change from epoch to epoch (skipped volumes are read, not decoded).
        start = int(np.random.default_rng(seed).integers(held)) if held > volumes else 0
        pipeline = wds.DataPipeline(
            _cycle([{"url": self.urls[i], "entry": self.entries[i]} for i in shards]),
            _opened(self.below),
            _tar_samples,
            _drop(start),
            _take(volumes),
            _crops(self.cropper, self.cfg.crops_per_visit, seed, self.patients),
            wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, seed=int(np.random.default_rng(seed).integers(2**63))),
            _take(need),
            _drop(skip),
        )
        yield from pipeline


def shard_url(template: str | None, ds: DatasetDir, name: str) -> str:
    """Where shard ``name`` is read from: the dataset's own file, or ``template`` with ``{name}`` filled in.

    ``name`` comes from the dataset, so it is checked against the store's
    pattern and, in a ``pipe:`` command, shell-quoted as well.
    """
    check_shard_name(name, f"{ds.shard_index}: shard name")
    if not template:
        return str(ds.shards.resolve() / name)  # absolute: a dataset path is never taken for a URL scheme
    if "{name}" not in template:
        raise ValueError(f"data.shard_url {template!r} has no {{name}} for the shard's file name")
    return template.replace("{name}", shlex.quote(name) if template.startswith("pipe:") else name)


def _tar_samples(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Verified samples of each shard URL in turn (4 MiB tar reads), grouped per shard.

    Opening URLs (local paths, ``pipe:``) stays webdataset's; the members go
    through the store's ``verified_samples``, so a sample arrives only once
    its members matched their digests, and a shard that differs from its
    index entry is an error naming it before its last sample is used.
    """

    found = True
    for source in src:
        url = source["url"]
        if source.get("__pass_start__"):
            if not found:  # a whole pass over the bin's shards without a sample: never loop forever
                raise ValueError(f"{url} and the other shards of this worker hold no samples, though shards/index.json counts some")
            found = False
        try:
            for sample in verified_samples(source["stream"], source["entry"], url, read_size=_TAR_READ):
                found = True
                yield {**sample, "__url__": url}
        except OSError as e:
            raise ValueError(f"{url}: unreadable shard ({e})") from e
        finally:
            source["stream"].close()


def _opened(below: Path | None):
    """Each URL with its open ``stream``: a file of the dataset's ``shards/`` through the store's
    opener, anything else (a configured ``shard_url``) through webdataset's."""

    def stage(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in src:
            if below is None:
                yield from url_opener([item])
                continue
            try:
                fd = open_dataset_file(Path(item["url"]), below)
            except OSError as e:
                raise ValueError(f"{item['url']}: unreadable shard ({e})") from e
            yield {**item, "stream": os.fdopen(fd, "rb")}

    return stage


def _cycle(items: list[dict[str, Any]]):
    """The URLs over and over; marks each pass so a pass that yields nothing can be caught."""

    def stage() -> Iterator[dict[str, Any]]:
        while True:
            for i, item in enumerate(items):
                yield {**item, "__pass_start__": i == 0}

    return stage


def _take(n: int):
    def stage(src: Iterator[Any]) -> Iterator[Any]:
        yield from itertools.islice(src, n)

    return stage


def _drop(n: int):
    def stage(src: Iterator[Any]) -> Iterator[Any]:
        yield from itertools.islice(src, n, None)

    return stage


def _crops(cropper: Cropper, per_volume: int, seed: list[int], patients: dict[str, int]):
    """Whole-volume samples -> ``per_volume`` finished crops each, before the shuffle buffer.

    Crops are cut here so the buffer holds crops, never whole volumes.
    """

    def stage(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for ordinal, sample in enumerate(src):
            image, meta, label = decode_sample(sample, sample.get("__url__", "?"))  # ShardError naming shard and sample
            access = ArrayAccess(image, meta, label)
            info = {
                "volume": sample["__key__"],
                "modality": MODALITIES.index(meta.get("modality", "CT")),
                "subject": patients.get(meta.get("patient") or "", -1),
            }
            for j in range(per_volume):
                out = cropper(access, 0, np.random.default_rng([*seed, ordinal, j]))
                out.update(info)
                yield out

    return stage


def consumed_per_worker(batches: int, per_worker: list[int]) -> list[int]:
    """Batches each worker had delivered once the rank consumed ``batches``: DataLoader takes them in turn."""
    done = [0] * len(per_worker)
    w = 0
    for _ in range(batches):
        while done[w] >= per_worker[w]:
            w = (w + 1) % len(per_worker)
        done[w] += 1
        w = (w + 1) % len(per_worker)
    return done
