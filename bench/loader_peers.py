"""The loader benchmark's peers: MONAI as its fastest users run it, and nnU-Net v2's blosc2 loader.

Each ``run_*(args)`` is one method of ``bench/loader.py`` (which runs it in a fresh process):
same volumes, same 96³ crops, same CT window to float32, same workers, counted by
``time_crops``. Preparation (MONAI's persistent cache, nnU-Net's ``.b2nd`` files) is made
once under ``DEFAULT_ROOT/peers-cache`` and is never part of the timed run.

- ``monai_samples``: ``RandSpatialCropSamplesd`` with ``num_samples`` = our ``crops_per_visit``
  (8): one decode of the ``.nii.gz`` per 8 crops, batched with ``list_data_collate``.
- ``monai_persistent``: ``monai.data.PersistentDataset`` caching ``LoadImaged`` +
  ``EnsureChannelFirstd`` + ``ScaleIntensityRanged`` (the deterministic prefix, so the cache
  holds already-normalised float32 volumes), then ``RandSpatialCropSamplesd`` (8 samples).
- ``nnunetv2``: nnU-Net v2's ``nnUNetDatasetBlosc2`` files written with its ``save_case`` and
  ``comp_blosc2_params`` for a 96³ patch, read by its ``nnUNetDataLoader`` (no transforms,
  no foreground oversampling) through ``NonDetMultiThreadedAugmenter`` as its trainer does.
  As in nnU-Net, the files hold normalised float32 (here the CT window), so crops need none.

``nnunetv2`` needs ``pip install '.[bench]'``; the test suite does not.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loader import CT_WINDOW, DEFAULT_ROOT, log, source_files, time_crops, warm_page_cache

CROPS_PER_VISIT = 8  # DataConfig's default crops_per_visit: MONAI's samples per decoded volume
CACHE_ROOT = DEFAULT_ROOT / "peers-cache"


def _cache_dir(kind: str, files: list[Path], *extra: Any) -> Path:
    """A folder keyed by the inputs (paths, sizes, times) and settings, so a changed input is never served stale."""
    h = hashlib.sha256(repr([kind, *extra]).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return CACHE_ROOT / f"{kind}-{h.hexdigest()[:16]}"


def _monai_items(files: list[Path], n: int) -> list[dict[str, str]]:
    # A cycled list long enough that the run never reaches its end (an epoch boundary would
    # add worker start-up to the timed part), as in bench/loader.py's run_monai.
    return [{"image": str(f)} for f in files] * math.ceil(n / len(files))


def _monai_timed(dataset: Any, args: argparse.Namespace) -> dict[str, Any]:
    from monai.data import DataLoader, list_data_collate

    # One item is one volume visit; list_data_collate flattens its 8 samples into one batch.
    loader = DataLoader(dataset, batch_size=1, num_workers=args.workers, shuffle=False, collate_fn=list_data_collate)

    def batches() -> Iterator[dict[str, Any]]:
        for b in loader:
            yield {"image": b["image"].as_tensor()}

    it = batches()
    result = time_crops(it, args.seconds, args.min_crops)
    it.close()
    return result


def _window(mt: Any) -> Any:
    return mt.ScaleIntensityRanged(keys="image", a_min=CT_WINDOW[0], a_max=CT_WINDOW[1], b_min=0.0, b_max=1.0, clip=True)


def run_monai_samples(args: argparse.Namespace) -> dict[str, Any]:
    import monai.transforms as mt
    from monai.data import Dataset

    files = source_files(args.src)
    roi = tuple(reversed(args.crop))  # NIfTI arrays are (x, y, z); our crops are (z, y, x)
    transform = mt.Compose([
        mt.LoadImaged(keys="image"),
        mt.EnsureChannelFirstd(keys="image"),
        mt.RandSpatialCropSamplesd(keys="image", roi_size=roi, num_samples=CROPS_PER_VISIT, random_size=False),
        _window(mt),  # applied to each sample: 8 crops are fewer voxels than one volume
    ])
    result = _monai_timed(Dataset(_monai_items(files, args.max_items), transform), args)
    return {**result, "settings": {"batch_size": CROPS_PER_VISIT, "crops_per_volume_read": CROPS_PER_VISIT,
                                   "collate": "list_data_collate", "files": len(files)}}


def run_monai_persistent(args: argparse.Namespace, samples: int = CROPS_PER_VISIT) -> dict[str, Any]:
    """``samples`` 1 (RandSpatialCropd's one crop per cached volume read) measured slower; 8 is the method."""
    import monai.transforms as mt
    from monai.data import PersistentDataset

    files = source_files(args.src)
    roi = tuple(reversed(args.crop))
    # Everything up to the first random transform is cached, so the cache holds windowed float32.
    transform = mt.Compose([
        mt.LoadImaged(keys="image"),
        mt.EnsureChannelFirstd(keys="image"),
        _window(mt),
        mt.RandSpatialCropSamplesd(keys="image", roi_size=roi, num_samples=samples, random_size=False),
    ])
    cache = _cache_dir("monai_persistent", files, CT_WINDOW)
    if not cache.exists():
        log(f"monai_persistent: caching {len(files)} volume(s) in {cache} (not timed)")
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        warm = PersistentDataset([{"image": str(f)} for f in files], transform, cache_dir=tmp)
        for i in range(len(files)):
            warm[i]
        tmp.rename(cache)
    warm_page_cache(cache)  # like every other method's inputs
    dataset = PersistentDataset(_monai_items(files, args.max_items), transform, cache_dir=cache)
    result = _monai_timed(dataset, args)
    return {**result, "settings": {"batch_size": samples, "crops_per_volume_read": samples,
                                   "cached": "LoadImaged+EnsureChannelFirstd+ScaleIntensityRanged (float32)",
                                   "cache_mb": round(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20, 1),
                                   "collate": "list_data_collate", "files": len(files)}}


# -- nnU-Net v2 -------------------------------------------------------------------------------


def _import_nnunet() -> Any:
    # nnU-Net reads these at import for its own folders; the benchmark uses none of them.
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(var, str(CACHE_ROOT / "nnunet-unused"))
    try:
        import nnunetv2
        from nnunetv2.training.dataloading import data_loader, nnunet_dataset
    except ImportError as e:
        raise SystemExit(f"the nnunetv2 method needs nnU-Net v2: pip install '.[bench]' ({e})") from e
    return nnunetv2, nnunet_dataset, data_loader


def _write_b2nd(args: argparse.Namespace, out: Path, nnunet_dataset: Any) -> None:
    """Our store's volumes, windowed to float32, written the way nnU-Net's preprocessing writes a case."""
    from medssl_scale.data.catalog import Catalog
    from medssl_scale.data.config import Normalize
    from medssl_scale.data.transforms import normalize
    from medssl_scale.store.layout import DatasetDir
    from medssl_scale.store.volumes import volume_store

    ds = nnunet_dataset.nnUNetDatasetBlosc2
    store = volume_store(DatasetDir(args.data))
    for v in Catalog.load(args.data).volumes:
        data = normalize(np.ascontiguousarray(store.read(v.volume_id).T), "CT", None, Normalize())[None]  # (1, z, y, x)
        data = data.astype(np.float32, copy=False)
        seg = np.zeros(data.shape, np.int16)  # nnU-Net always reads a label map; an empty one costs least
        blocks, chunks = nnunet_dataset.comp_blosc2_params(data.shape, tuple(args.crop), data.itemsize)
        blocks_seg, chunks_seg = nnunet_dataset.comp_blosc2_params(seg.shape, tuple(args.crop), seg.itemsize)
        props = {"class_locations": {1: np.zeros((0, 4), np.int64)}, "shape_after_cropping_and_before_resampling": data.shape[1:]}
        ds.save_case(data, seg, props, str(out / v.volume_id), chunks=chunks, blocks=blocks,
                     chunks_seg=chunks_seg, blocks_seg=blocks_seg)
        log(f"nnunetv2: wrote {v.volume_id}.b2nd {data.shape} chunks {chunks} blocks {blocks}")


def run_nnunet(args: argparse.Namespace) -> dict[str, Any]:
    _, nnunet_dataset, data_loader = _import_nnunet()
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from medssl_scale.store.layout import DatasetDir

    arrays = sorted(p for p in DatasetDir(args.data).volumes.rglob("*") if p.is_file())
    cache = _cache_dir("nnunetv2", arrays, CT_WINDOW, tuple(args.crop))
    if not cache.exists():
        log(f"nnunetv2: writing .b2nd cases to {cache} (not timed)")
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_b2nd(args, tmp, nnunet_dataset)
        tmp.rename(cache)
    warm_page_cache(cache)

    dataset = nnunet_dataset.nnUNetDatasetBlosc2(str(cache))
    labels = LabelManager({"background": 0, "foreground": 1}, regions_class_order=None)
    patch = tuple(args.crop)
    dl = data_loader.nnUNetDataLoader(dataset, args.batch, patch, patch, labels, oversample_foreground_percent=0.0,
                                      sampling_probabilities=None, pad_sides=None, transforms=None)
    if args.workers == 0:
        gen = SingleThreadedAugmenter(dl, None)
    else:  # nnUNetTrainer.get_dataloaders' training wrapper, without a GPU to pin for
        gen = NonDetMultiThreadedAugmenter(data_loader=dl, transform=None, num_processes=args.workers,
                                           num_cached=max(6, args.workers // 2), seeds=None, pin_memory=False, wait_time=0.002)

    def batches() -> Iterator[dict[str, Any]]:
        while True:
            b = next(gen)
            yield {"image": torch.as_tensor(b["data"], dtype=torch.float32)}

    it = batches()
    try:
        result = time_crops(it, args.seconds, args.min_crops)
    finally:
        it.close()
        if isinstance(gen, NonDetMultiThreadedAugmenter):
            with contextlib.redirect_stdout(sys.stderr):  # it reports on stdout, which carries our JSON
                gen._finish()  # joins the workers, as nnUNetTrainer does at the end, so their peak RSS is counted
    return {**result, "settings": {"batch_size": args.batch, "files": len(dataset.identifiers), "nnunetv2": _version("nnunetv2"),
                                   "blosc2": _version("blosc2"), "wrapper": type(gen).__name__,
                                   "stored": "float32, CT window applied when the .b2nd files were written"}}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
