"""What a training run can sample: the ok volumes of a dataset directory, from its manifest.

Everything the sampler plans with (shape, modality, patient, label) comes
from the manifest, so building a plan over tens of thousands of volumes opens
no array; the per-volume attributes a worker needs (intensity statistics,
the foreground map) are read when the worker first visits the volume.

The manifest is checked as it is read (:func:`read_manifest` validates every
record; a torn last line, left by an interrupted ingest, is refused rather
than trained around), and an ok record without the fields a plan needs is an
error naming the record. Readers compare the arrays they open against it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from medssl_scale.store.layout import DatasetDir
from medssl_scale.store.manifest import latest, read_manifest

MODALITIES = ("CT", "MR")


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
    volume_id: str
    modality: str
    shape_zyx: tuple[int, int, int]  # as stored and as training tensors are laid out (D, H, W)
    spacing_zyx: tuple[float, float, float]
    patient: str | None
    has_label: bool
    dtype: str | None = None  # the stored voxel type, as the manifest records it (None: not recorded)


@dataclasses.dataclass(frozen=True)
class Catalog:
    dataset: DatasetDir
    volumes: tuple[VolumeInfo, ...]

    @classmethod
    def load(cls, root: str | Path, modalities: tuple[str, ...] | None = None, labelled_only: bool = False) -> Catalog:
        ds = DatasetDir(Path(root))
        if not ds.manifest.exists():
            raise FileNotFoundError(f"{ds.root} is not a dataset directory (no manifest.jsonl): run `medssl ingest` first")
        seen: set[str] = set()
        vols = []
        for rec in latest(read_manifest(ds.manifest, torn_tail="refuse")).values():
            if rec.kind != "image" or rec.status != "ok":
                continue
            missing = [f for f in ("volume_id", "shape", "spacing", "modality") if getattr(rec, f) is None]
            if missing:
                raise ValueError(f"{ds.manifest}: the ok record of {rec.source} has no {', '.join(missing)}")
            if rec.volume_id in seen:
                continue
            if modalities and rec.modality not in modalities:
                continue
            if labelled_only and not rec.has_label:
                continue
            seen.add(rec.volume_id)
            x, y, z = rec.shape
            sx, sy, sz = rec.spacing
            vols.append(VolumeInfo(rec.volume_id, rec.modality, (z, y, x), (sz, sy, sx), rec.patient, bool(rec.has_label), rec.dtype))
        if not vols:
            raise ValueError(f"{ds.root}: no usable volumes (status ok{', modality ' + '/'.join(modalities) if modalities else ''}"
                             f"{', with labels' if labelled_only else ''}) in the manifest")
        # Sorted by id: the plan depends on the set of volumes, not on the order they were ingested.
        return cls(ds, tuple(sorted(vols, key=lambda v: v.volume_id)))

    def __len__(self) -> int:
        return len(self.volumes)

    def index(self, volume_id: str) -> int:
        for i, v in enumerate(self.volumes):
            if v.volume_id == volume_id:
                return i
        raise KeyError(volume_id)

    def patients(self) -> list[str]:
        """Pseudonymous patient ids, sorted: a patient's position is its integer ``subject`` id."""
        return sorted({v.patient for v in self.volumes if v.patient})

    def paired(self) -> list[tuple[str, list[int], list[int]]]:
        """(patient, CT volume indices, MR volume indices) for every patient with both modalities."""
        by: dict[str, dict[str, list[int]]] = {}
        for i, v in enumerate(self.volumes):
            if v.patient:
                by.setdefault(v.patient, {"CT": [], "MR": []})[v.modality].append(i)
        return [(p, by[p]["CT"], by[p]["MR"]) for p in sorted(by) if by[p]["CT"] and by[p]["MR"]]
