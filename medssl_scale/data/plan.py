"""The sample order of an epoch: seeded, split across ranks, laid out for the chunk cache.

An epoch is a list of *visits* (a volume, or a CT/MR pair of one patient),
each expanded into ``crops_per_visit`` samples. Every sample has a *slot*, its
unique number in the epoch; a sample's crop is drawn from ``(seed, epoch,
slot)`` alone, so what a sample holds never depends on which rank or worker
computes it, or on whether the run was resumed.

Visits are dealt to ranks round-robin (each rank gets the same number, so
ranks never wait on one another), then to the rank's data-loader workers,
which is where the layout matters: PyTorch's DataLoader hands batch ``i`` to
worker ``i % W``, so the plan builds each worker's stream from a few visits
at a time (``interleave`` of them, their crops alternating so a batch mixes
volumes) and merges the streams batch by batch. A worker then cuts all the
crops of a visit while the volume's chunks are in its cache.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from medssl_scale.data.catalog import Catalog

_PLAN_STREAM = 0x706C616E  # separates the plan's random stream from the crops'


@dataclasses.dataclass(frozen=True)
class Sample:
    """One entry of the plan: what ``CropDataset[...]`` is asked for."""

    epoch: int
    slot: int  # unique within the epoch across all ranks
    volume: int  # catalog index
    partner: int = -1  # pairs: the catalog index of the other modality's volume (for the record)


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    catalog: Catalog
    seed: int = 0
    crops_per_visit: int = 8
    samples_per_epoch: int | None = None
    modality_weights: dict[str, float] | None = None
    pairs: bool = False
    world: int = 1
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.pairs and not self.catalog.paired():
            raise ValueError(f"{self.catalog.dataset.root}: pairs: true, but no pseudonymous patient has both a CT and an MR volume")
        if self.modality_weights:
            present = {v.modality for v in self.catalog.volumes}
            missing = [m for m, w in self.modality_weights.items() if w > 0 and m not in present]
            if missing:
                raise ValueError(f"modality_weights asks for {', '.join(missing)}, which the dataset does not hold")

    @property
    def unit(self) -> int:
        """Samples per unit: 2 for a CT/MR pair, else 1."""
        return 2 if self.pairs else 1

    def visits_per_rank(self) -> int:
        """Visits each rank makes per epoch: enough for ``samples_per_epoch``, whole batches on every rank."""
        per_visit = self.crops_per_visit * self.unit
        base = len(self.catalog.paired()) if self.pairs else len(self.catalog)
        target = self.samples_per_epoch or base * per_visit
        n = max(1, math.ceil(target / (self.world * per_visit)))
        while (n * per_visit) % self.batch_size:
            n += 1
        return n

    def samples_per_rank(self) -> int:
        return self.visits_per_rank() * self.crops_per_visit * self.unit

    def visits(self, epoch: int) -> list[tuple[int, ...]]:
        """The epoch's visits in global order (a tuple of catalog indices each)."""
        rng = np.random.default_rng([self.seed, epoch, _PLAN_STREAM])
        n = self.visits_per_rank() * self.world
        if self.pairs:
            pairs = self.catalog.paired()
            order = np.concatenate([rng.permutation(len(pairs)) for _ in range(math.ceil(n / len(pairs)))])[:n]
            return [(int(rng.choice(pairs[i][1])), int(rng.choice(pairs[i][2]))) for i in order]
        if self.modality_weights:
            mods = np.array([v.modality for v in self.catalog.volumes])
            p = np.array([self.modality_weights.get(m, 0.0) / np.count_nonzero(mods == m) for m in mods])
            return [(int(i),) for i in rng.choice(len(mods), size=n, p=p / p.sum())]
        m = len(self.catalog)
        order = np.concatenate([rng.permutation(m) for _ in range(math.ceil(n / m))])[:n]
        return [(int(i),) for i in order]


class PlanSampler:
    """A batch sampler over one rank's share of the plan, for ``DataLoader(batch_sampler=...)``."""

    def __init__(self, plan: EpochPlan, rank: int = 0, workers: int = 0, interleave: int | None = None):
        if not 0 <= rank < plan.world:
            raise ValueError(f"rank {rank} outside world size {plan.world}")
        self.plan, self.rank = plan, rank
        self.workers = max(1, workers)
        self.interleave = max(1, interleave or plan.batch_size)
        self.epoch = 0
        self.start = 0  # first batch to yield (resume)

    def __len__(self) -> int:
        return self.plan.samples_per_rank() // self.plan.batch_size

    def batches(self, epoch: int) -> list[list[Sample]]:
        plan, k, unit = self.plan, self.plan.crops_per_visit, self.plan.unit
        visits = plan.visits(epoch)
        mine = [(g, visits[g]) for g in range(self.rank, len(visits), plan.world)]
        streams: list[list[Sample]] = []
        for w in range(self.workers):
            theirs = mine[w :: self.workers]
            stream: list[Sample] = []
            for i in range(0, len(theirs), self.interleave):
                group = theirs[i : i + self.interleave]
                for j in range(k):
                    for g, vols in group:
                        for m, v in enumerate(vols):
                            partner = vols[1 - m] if unit == 2 else -1
                            stream.append(Sample(epoch, (g * k + j) * unit + m, v, partner))
            streams.append(stream)
        # Batch i goes to worker i % W: take the workers' batches in turn.
        b = plan.batch_size
        flat: list[Sample] = []
        for r in range(max(math.ceil(len(s) / b) for s in streams)):
            for s in streams:
                flat.extend(s[r * b : (r + 1) * b])
        return [flat[i : i + b] for i in range(0, len(flat), b)]

    def __iter__(self) -> Iterator[list[Sample]]:
        yield from self.batches(self.epoch)[self.start :]
