"""Random crops, view pairs and PCRLv2 sub-crops, read from the Zarr store through the chunk cache.

A map-style dataset whose indices are :class:`~medssl_scale.data.plan.Sample`
entries of an epoch plan. Each worker process keeps its own chunk cache and
readers; every random choice of a sample comes from ``(seed, epoch, slot)``.

Tensors are channel-first in PyTorch's (D, H, W) = (z, y, x) order, the
store's on-disk order, so a crop is copied and never transposed. Samples
carry ``modality`` (0 CT, 1 MR), ``subject`` (the patient's position in
:meth:`Catalog.patients`, -1 if unknown), ``volume`` and the boxes they came
from, in volume voxels.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medssl_scale.data.boxes import (
    Box,
    ForegroundSampler,
    cut,
    iou,
    uniform_start,
    union_box,
)
from medssl_scale.data.catalog import MODALITIES, Catalog
from medssl_scale.data.config import DataConfig
from medssl_scale.data.plan import Sample
from medssl_scale.data.regions import superpixels
from medssl_scale.data.transforms import (
    as_tensor,
    build_augment,
    norm_params,
    normalize,
    pcrl_spatial,
    run_augment,
    run_pcrl_spatial,
)
from medssl_scale.store import foreground
from medssl_scale.store.chunks import ChunkCache, VolumeReader
from medssl_scale.store.integrity import VolumeError

CT_PAD_HU = -1024  # padding is air, not water (0 HU)
UNLABELLED = -1
INT16_EXACT = ("int8", "uint8", "int16")  # stored types whose every value int16 holds


def handoff_dtype(stored: list[str | None]) -> torch.dtype:
    """The type raw crops cross the hand-off in: int16 when every volume is stored in a type it holds exactly.

    float32 otherwise, which is still exact for what :func:`normalize` sees: it casts to float32 first.
    """
    return torch.int16 if stored and all(d in INT16_EXACT for d in stored) else torch.float32


class _Access:
    """What a :class:`Cropper` reads from: boxes of volumes (and labels) by index, with their attributes."""

    def shape(self, index: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def modality(self, index: int) -> str:
        raise NotImplementedError

    def attrs(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def read(self, index: int, box: Box) -> np.ndarray:
        raise NotImplementedError

    def read_label(self, index: int, box: Box) -> np.ndarray:
        raise NotImplementedError

    def pad_value(self, index: int) -> float:
        return CT_PAD_HU if self.modality(index) == "CT" else 0.0

    def _fg_cache(self) -> dict[Any, ForegroundSampler | None]:
        raise NotImplementedError

    def start(self, index: int, size: tuple[int, int, int], rng: np.random.Generator, min_fg: float | None) -> tuple[int, int, int]:
        """A crop start: uniform, or foreground-aware when ``min_fg`` is set and the volume has a map."""
        shape = self.shape(index)
        if min_fg is None:
            return uniform_start(rng, shape, size)
        cache = self._fg_cache()
        key = (index, size)
        if key not in cache:
            attr = self.attrs(index).get("foreground")
            if attr is None:
                cache[key] = None  # datasets ingested before the map existed: uniform
            else:
                grid, block = foreground.decode(attr)  # stored (x, y, z) like every attribute
                if grid.shape != tuple(-(-n // block) for n in reversed(shape)):
                    raise ValueError(f"volume {self.attrs(index).get('volume_id', index)}: foreground map of shape {list(grid.shape)} does not fit the volume "
                                     f"{list(reversed(shape))} in blocks of {block}")
                cache[key] = ForegroundSampler(np.ascontiguousarray(grid.transpose(2, 1, 0)), block, shape, size, min_fg)
        s = cache[key]
        return s.start(rng) if s is not None else uniform_start(rng, shape, size)


class ArrayAccess(_Access):
    """One volume held in memory (a shard sample): index 0."""

    def __init__(self, image: np.ndarray, meta: dict[str, Any], label: np.ndarray | None = None):
        self.image, self.meta, self.label = image, meta, label
        self._fg: dict[Any, ForegroundSampler | None] = {}

    def shape(self, index: int) -> tuple[int, int, int]:
        return self.image.shape  # type: ignore[return-value]

    def modality(self, index: int) -> str:
        return self.meta.get("modality", "CT")

    def attrs(self, index: int) -> dict[str, Any]:
        return self.meta

    def _fg_cache(self) -> dict[Any, ForegroundSampler | None]:
        return self._fg

    def read(self, index: int, box: Box) -> np.ndarray:
        return cut(self.image, box, self.pad_value(index))

    def read_label(self, index: int, box: Box) -> np.ndarray:
        if self.label is None:
            return np.full(box[1], UNLABELLED, dtype=np.int16)
        return cut(self.label, box, 0).astype(np.int16)


class VolumeAccess(_Access):
    """Per-process readers over a catalog's volumes and labels, sharing one chunk cache."""

    def __init__(self, catalog: Catalog, cache_mb: int):
        self.catalog = catalog
        self.cache_bytes = cache_mb << 20
        self._pid: int | None = None

    def _fresh(self) -> None:
        # A forked worker must not share the parent's cache or open readers.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self.cache = ChunkCache(self.cache_bytes)
            self._readers: dict[tuple[str, int], VolumeReader] = {}
            self._fg: dict[tuple[int, tuple[int, ...]], ForegroundSampler | None] = {}

    def reader(self, index: int, labels: bool = False) -> VolumeReader:
        self._fresh()
        key = ("labels" if labels else "volumes", index)
        r = self._readers.get(key)
        if r is None:
            ds = self.catalog.dataset
            root = ds.labels if labels else ds.volumes
            info = self.catalog.volumes[index]
            r = VolumeReader(root / info.volume_id, self.cache)  # raises VolumeError for anything it cannot verify
            if r.shape != info.shape_zyx:  # the plan's boxes come from the manifest: both must agree
                raise VolumeError(f"{r.path}: shape {list(reversed(r.shape))} but {ds.manifest.name} says {list(reversed(info.shape_zyx))}")
            self._readers[key] = r
        return r

    def attrs(self, index: int) -> dict[str, Any]:
        return self.reader(index).meta.get("attributes", {})

    def shape(self, index: int) -> tuple[int, int, int]:
        return self.catalog.volumes[index].shape_zyx

    def modality(self, index: int) -> str:
        return self.catalog.volumes[index].modality

    def _fg_cache(self) -> dict[Any, ForegroundSampler | None]:
        self._fresh()
        return self._fg

    def read(self, index: int, box: Box) -> np.ndarray:
        return self.reader(index).box(box[0], box[1], fill=self.pad_value(index))

    def read_label(self, index: int, box: Box) -> np.ndarray:
        if not self.catalog.volumes[index].has_label:
            return np.full(box[1], UNLABELLED, dtype=np.int16)
        return self.reader(index, labels=True).box(box[0], box[1], fill=0).astype(np.int16)

    def forget(self, index: int) -> None:
        """Drop the cached chunks of volume ``index`` (and of its label map)."""
        self._fresh()
        for labels in (False, True):
            r = self._readers.get(("labels" if labels else "volumes", index))
            if r is not None:
                self.cache.drop(r.path)

class Cropper:
    """Turns a volume (through an access) into one training sample: a crop, a view pair or PCRLv2 sub-crops."""

    def __init__(self, cfg: DataConfig, raw_dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        kind = cfg.views.kind
        self.image_keys = {"none": ["image"], "pair": ["view1", "view2"], "pcrl": ["global1", "global2", "local"]}[kind]
        self.augment = build_augment(cfg.augment, ["image"], geometric_ok=kind == "none")
        self.min_fg = cfg.min_foreground if cfg.sampling == "foreground" else None
        # Raw crops (and a ``norm`` field) when normalising is elementwise and nothing after it needs
        # float: augmentations expect normalised intensities, pcrl resizes normalised sub-crops.
        self.deferred = cfg.handoff == "raw" and self.augment is None and kind in ("none", "pair")
        self.raw_dtype = raw_dtype if self.deferred else torch.float32
        self._raw_np = torch.empty(0, dtype=self.raw_dtype).numpy().dtype
        sp = cfg.views.pcrl_spatial
        self.pcrl_spatial = pcrl_spatial(sp) if kind == "pcrl" and sp is not None else None

    def spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each large tensor of a sample (what the loader's shared ring holds)."""
        c, vc = self.cfg.crop, self.cfg.views
        one = (1, *c)
        image = self.raw_dtype  # float32 unless deferred
        if vc.kind == "none":
            out = {"image": (one, image)}
            if self.cfg.labels:
                out["label"] = (one, torch.int16)
        elif vc.kind == "pair":
            out = {"view1": (one, image), "view2": (one, image)}
            if self.cfg.labels:
                out.update(label1=(one, torch.int16), label2=(one, torch.int16))
        else:
            out = {"global1": ((1, *vc.global_out), torch.float32), "global2": ((1, *vc.global_out), torch.float32)}
            if vc.n_local:
                out["local"] = ((vc.n_local, *vc.local_out), torch.float32)
        if vc.superpixels is not None and vc.kind != "none":
            view = one if vc.kind == "pair" else (1, *vc.global_out)
            out.update(regions1=(view, torch.int32), regions2=(view, torch.int32))
        return out

    def _regions(self, region: np.ndarray, slices: set[int] | None = None) -> np.ndarray | None:
        sp = self.cfg.views.superpixels
        return None if sp is None else superpixels(region, sp.scale, sp.sigma, sp.min_size, slices, sp.body, sp.downsample)

    def __call__(self, access: _Access, v: int, rng: np.random.Generator) -> dict[str, Any]:
        d: dict[str, Any] = {"modality_name": access.modality(v), "stats": access.attrs(v).get("stats")}
        kind = self.cfg.views.kind
        if kind == "none":
            self._single(access, d, v, rng)
        elif kind == "pair":
            self._pair(access, d, v, rng)
        else:
            self._pcrl(access, d, v, rng)
        if self.augment is not None:
            # Each view (and each sub-crop) gets its own draw: MONAI's dictionary transforms draw
            # once per call and apply the same to every key.
            for key in self.image_keys:
                parts = [d[key]] if key != "local" else list(d[key][:, None])
                if not parts:
                    continue
                done = []
                for part in parts:
                    item = {"image": part, **({"label": d["label"]} if key == "image" and "label" in d else {})}
                    item = run_augment(self.augment, item, int(rng.integers(2**32)))
                    done.append(item["image"])
                    if "label" in item:
                        d["label"] = item["label"]
                d[key] = done[0] if key != "local" else torch.cat([torch.as_tensor(p) for p in done])
        keep = set(self.image_keys) | {"label", "regions1", "regions2", "norm"}
        if "norm" in d:
            d["norm"] = torch.from_numpy(d["norm"])
        return {k: as_tensor(val) if k in keep - {"norm"} else val for k, val in d.items() if k not in ("modality_name", "stats")}

    # -- one crop -------------------------------------------------------------------
    def _single(self, access: _Access, d: dict[str, Any], v: int, rng: np.random.Generator) -> None:
        size = self.cfg.crop
        box = (access.start(v, size, rng, self.min_fg), size)
        d["image"] = self._norm(d, access.read(v, box))[None]
        if self.cfg.labels:
            d["label"] = access.read_label(v, box)[None]
        d["box"] = torch.tensor(box)

    def _norm(self, d: dict[str, Any], x: np.ndarray) -> np.ndarray:
        """Normalised float32 ``x``, or when deferred ``x`` as it crosses, with the sample's ``norm`` parameters."""
        if not self.deferred:
            return normalize(x, d["modality_name"], d["stats"], self.cfg.normalize)
        d["norm"] = norm_params(x, d["modality_name"], d["stats"], self.cfg.normalize)
        if self.raw_dtype == torch.int16 and x.dtype.name not in INT16_EXACT:
            raise ValueError(f"a crop of {x.dtype.name} voxels where the manifest records only {', '.join(INT16_EXACT)}: it would not fit int16")
        return x.astype(self._raw_np, copy=False)

    # -- two overlapping views ------------------------------------------------------
    def _pair(self, access: _Access, d: dict[str, Any], v: int, rng: np.random.Generator) -> None:
        crop = self.cfg.crop
        region_size = tuple(max(c, math.ceil(c * self.cfg.views.region_scale)) for c in crop)
        start = access.start(v, region_size, rng, self.min_fg)
        region = self._norm(d, access.read(v, (start, region_size)))
        label = access.read_label(v, (start, region_size)) if self.cfg.labels else None
        offs = [tuple(int(rng.integers(0, r - c + 1)) for r, c in zip(region_size, crop)) for _ in range(2)]
        seen = {z for o in offs for z in range(o[0], o[0] + crop[0])}  # only the slices the views hold are segmented
        if self.deferred and self.cfg.views.superpixels is not None:  # superpixels follow normalised intensities
            regions = self._regions(normalize(region, d["modality_name"], d["stats"], self.cfg.normalize), seen)
        else:
            regions = self._regions(region, seen)
        flips = [tuple(bool(f) for f in (rng.random(3) < 0.5)) if self.cfg.views.flip else (False,) * 3 for _ in range(2)]
        lo = [max(a, b) for a, b in zip(*offs)]
        hi = [min(a, b) + c for a, b, c in zip(*offs, crop)]
        for i, (o, fl) in enumerate(zip(offs, flips), 1):
            sl = tuple(slice(a, a + c) for a, c in zip(o, crop))
            axes = [ax for ax in range(3) if fl[ax]]
            d[f"view{i}"] = np.flip(region[sl], axes).copy()[None]
            if label is not None:
                d[f"label{i}"] = torch.from_numpy(np.flip(label[sl], axes).copy()[None])
            if regions is not None:
                d[f"regions{i}"] = torch.from_numpy(np.flip(regions[sl], axes).copy()[None])
            ov_lo = [l - a for l, a in zip(lo, o)]
            ov_hi = [h - a for h, a in zip(hi, o)]
            ov = [(c - h, c - l) if f else (l, h) for l, h, c, f in zip(ov_lo, ov_hi, crop, fl)]
            d[f"overlap{i}"] = torch.tensor([[a for a, _ in ov], [b for _, b in ov]])  # (start, stop) in the view, after its flips
            d[f"flip{i}"] = torch.tensor(fl)
            d[f"box{i}"] = torch.tensor([[s + a for s, a in zip(start, o)], list(crop)])

    # -- PCRLv2 sub-crops -----------------------------------------------------------
    def _pcrl(self, access: _Access, d: dict[str, Any], v: int, rng: np.random.Generator) -> None:
        vc = self.cfg.views
        shape = access.shape(v)
        first = tuple(vc.global_sizes[rng.integers(len(vc.global_sizes))])
        # Only sizes that can overlap the first by min_iou at all (concentric is the best case).
        fits = [tuple(g) for g in vc.global_sizes if iou(((0, 0, 0), first), (tuple((a - b) // 2 for a, b in zip(first, g)), tuple(g))) > vc.min_iou]
        sizes = [first, fits[rng.integers(len(fits))] if fits else first]
        b1: Box = (access.start(v, sizes[0], rng, self.min_fg), sizes[0])
        b2: Box | None = None
        for _ in range(100):  # a second global crop overlapping the first by IoU > min_iou
            start = tuple(int(s + rng.integers(-z // 2, z // 2 + 1)) for s, z in zip(b1[0], sizes[0]))
            start = tuple(min(max(s, min(0, n - z)), max(0, n - z)) for s, n, z in zip(start, shape, sizes[1]))
            cand = (start, sizes[1])
            if iou(b1, cand) > vc.min_iou:
                b2 = cand
                break
        if b2 is None:  # fall back to a concentric box, the largest overlap there is
            b2 = (tuple(s + (a - b) // 2 for s, a, b in zip(b1[0], sizes[0], sizes[1])), sizes[1])
        u = union_box([b1, b2])
        region = torch.from_numpy(self._norm(d, access.read(v, u)))
        # Region ids are per axial slice: a view that averaged two slices would show an image half a slice
        # away from its ids. With region maps, a view takes whole source slices (the nearest to each of its
        # slices, image and ids alike) and resizes only in plane; only those slices are segmented.
        z_nearest = vc.superpixels is not None
        regions = None
        if z_nearest:
            need = {b[0][0] - u[0][0] + z for b in (b1, b2) for z in _nearest_slices(b[1][0], vc.global_out[0])}
            regions = self._regions(region.numpy(), need)
        locals_: list[Box] = []
        for _ in range(vc.n_local):
            size = tuple(vc.local_sizes[rng.integers(len(vc.local_sizes))])
            locals_.append((tuple(int(rng.integers(s, s + max(1, n - z + 1))) for s, n, z in zip(u[0], u[1], size)), size))

        def cut(box: Box, out: tuple[int, ...], source: torch.Tensor = region, mode: str = "trilinear", whole_slices: bool = False) -> torch.Tensor:
            sl = tuple(slice(a - o, a - o + z) for a, o, z in zip(box[0], u[0], box[1]))
            piece = source[sl]
            if piece.shape != box[1]:  # a local crop reaching past the union: pad as the volume would be
                piece = F.pad(piece, [0, box[1][2] - piece.shape[2], 0, box[1][1] - piece.shape[1], 0, box[1][0] - piece.shape[0]], value=float(piece.min()))
            if whole_slices:  # the nearest source slice to each output slice, then in plane only
                plane = "bilinear" if mode == "trilinear" else mode
                piece = piece[_nearest_slices(piece.shape[0], out[0])]
                return F.interpolate(piece[None], size=out[1:], mode=plane, **({"align_corners": False} if plane == "bilinear" else {}))[0]
            return F.interpolate(piece[None, None], size=out, mode=mode, **({"align_corners": False} if mode == "trilinear" else {}))[0, 0]

        d["global1"] = cut(b1, vc.global_out, whole_slices=z_nearest)[None]
        d["global2"] = cut(b2, vc.global_out, whole_slices=z_nearest)[None]
        if regions is not None:  # ids resized like the views, by nearest neighbour: exact below 2^24 regions
            ids = torch.from_numpy(regions).float()
            for i, b in enumerate((b1, b2), 1):
                d[f"regions{i}"] = cut(b, vc.global_out, ids, "nearest-exact", whole_slices=True).to(torch.int32)[None]
        d["local"] = torch.stack([cut(b, vc.local_out) for b in locals_]) if locals_ else torch.zeros((0, *vc.local_out))
        if self.pcrl_spatial is not None:  # each crop its own flip and affine; its region ids move with it
            for i in (1, 2):
                d[f"global{i}"], ids = run_pcrl_spatial(self.pcrl_spatial, d[f"global{i}"], d.get(f"regions{i}"), int(rng.integers(2**32)))
                if ids is not None:
                    d[f"regions{i}"] = ids
            if len(d["local"]):
                d["local"] = torch.cat([run_pcrl_spatial(self.pcrl_spatial, c[None], None, int(rng.integers(2**32)))[0] for c in d["local"]])
        # The boxes the crops were cut from, before their flips and affines.
        d["box_global"] = torch.tensor([[list(b[0]), list(b[1])] for b in (b1, b2)])
        d["box_local"] = torch.tensor([[list(b[0]), list(b[1])] for b in locals_]).reshape(-1, 2, 3)


def _nearest_slices(size: int, out: int) -> list[int]:
    """The source slice nearest each of ``out`` slices resampled from ``size`` (PyTorch's ``nearest-exact``)."""
    return [min(size - 1, int(math.floor((i + 0.5) * size / out))) for i in range(out)]


class CropDataset(Dataset):
    """Map-style: ``dataset[sample]`` for the :class:`Sample` entries of an epoch plan."""

    def __init__(self, catalog: Catalog, cfg: DataConfig):
        self.catalog, self.cfg = catalog, cfg
        self.access = VolumeAccess(catalog, cfg.cache_mb)
        self.cropper = Cropper(cfg, handoff_dtype([v.dtype for v in catalog.volumes]))
        self.patients = {p: i for i, p in enumerate(catalog.patients())}

    def __len__(self) -> int:  # the plan decides the epoch; this is the pool it draws from
        return len(self.catalog)

    def __getitem__(self, s: Sample) -> dict[str, Any]:
        if not isinstance(s, Sample):
            raise TypeError("CropDataset is indexed by plan samples: use it through medssl_scale.data.Loader or a PlanSampler")
        info = self.catalog.volumes[s.volume]
        out = self.cropper(self.access, s.volume, np.random.default_rng([self.cfg.seed, s.epoch, s.slot]))
        unit = 2 if self.cfg.pairs else 1  # a pair visit's slots alternate CT and MR (plan.PlanSampler)
        if self.cfg.cache_scope == "visit" and (s.slot // unit) % self.cfg.crops_per_visit == self.cfg.crops_per_visit - 1:
            self.access.forget(s.volume)  # the visit's last crop of this volume
        out.update(
            volume=info.volume_id,
            modality=MODALITIES.index(info.modality),
            subject=self.patients.get(info.patient, -1) if info.patient else -1,
            slot=s.slot,
            epoch=s.epoch,
        )
        return out
