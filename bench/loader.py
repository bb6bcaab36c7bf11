"""Training-loader throughput: crops/s of our loader against the storage ceiling and its peers (MONAI, nnU-Net v2).

    python bench/loader.py [--src DIR] [--data DATASET] [--crop 96] [--workers 2] [--batch 2]
                           [--seconds 8] [--min-crops 32] [--repeat 1] [--make 6] [--methods a,b] [--out results.json]

Ways to get random float32 crops of the same volumes, same crop size, same
number of workers, each in its own fresh process (independent caches, its
own peak memory):

- ``memmap_raw``: the storage ceiling. Crops cut from uncompressed ``.npy``
  copies of the volumes opened with ``np.load(mmap_mode="r")``, normalised
  and batched in the benchmark process itself: no worker, no hand-off,
  nothing decoded. It is one process on one thread (every method's process
  runs torch on one intra-op thread, as DataLoader workers do), so it is
  the ceiling of one worker;
  for W workers the ceiling is min(W, cores) times it
  (``memmap_raw_ceiling_crops_per_s``). ``copy_only_crops_per_s`` is the
  copy without the CT window, in the same process.
- ``zarr``: ``medssl_scale.data.Loader`` on the Zarr store, default
  ``crops_per_visit`` (8) and ``cache_mb`` (512), with ``cache_scope:
  visit``: each worker forgets a volume's chunks after its visit, so no
  visit reuses what an earlier one decoded. That is what a dataset many
  times larger than the cache gets, and the benchmark's six volumes would
  otherwise sit whole in the cache. Its hit rate (reuse within visits) is
  reported. ``zarr_cache_all`` is the default ``lru`` cache, which holds
  this whole dataset (the figure of a dataset smaller than the cache);
  ``zarr_k1`` one crop per visit and no cache, so no decoded chunk is ever
  reused; ``zarr_worker`` is ``zarr`` with ``handoff: worker`` (normalised
  in the workers, float32 across the hand-off: the hand-off before raw
  crops).
- ``shards``: the same Loader streaming the dataset's WebDataset shards.
- ``memmap``: the memory-mapped crops through our hand-off (int16 through
  the shared batch ring, normalised after it); ``memmap_pytorch`` normalised
  in workers and through PyTorch's own hand-off (a new shared-memory
  segment per batch), what a plain DataLoader reaches.
- ``monai``: ``LoadImaged`` of the ``.nii.gz`` sources, ``RandSpatialCropd``,
  batch size 1: one crop per decoded volume. ``monai_samples``,
  ``monai_persistent`` and ``nnunetv2`` are in bench/loader_peers.py.

Every method normalises its crops with the same CT window ([-1000, 1000] HU
-> [0, 1]) to float32, as our loader does; augmentation is off. Crops (not
batches) are counted after a warm-up batch, for at least ``--seconds`` and
``--min-crops``, with the page cache warm for every method alike.
``peak_rss_mb`` is ru_maxrss of a method's process plus that of its largest
worker (RUSAGE_CHILDREN), the most over the methods. ``aims`` says whether
zarr reaches half the ceiling, 10x the best MONAI variant and 1.5x nnU-Net's
loader.

Without --src/--data, phantoms and their dataset are made (once) under
/tmp/medssl-bench-loader. Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The repository first: bench/ingest.py (this folder is sys.path[0]) must not shadow the ingest package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _emit import emit  # noqa: E402

os.environ.setdefault("MEDSSL_SITE_SECRET", "benchmark-secret-not-for-real-data")

import numpy as np
import torch

METHODS = ("monai", "monai_samples", "monai_persistent", "nnunetv2", "zarr", "zarr_k1", "zarr_worker", "zarr_cache_all", "shards",
           "memmap_raw", "memmap", "memmap_pytorch")
DEFAULT_ROOT = Path(tempfile.gettempdir()) / "medssl-bench-loader"
PEERS = {"monai_samples": "run_monai_samples", "monai_persistent": "run_monai_persistent", "nnunetv2": "run_nnunet"}
CT_WINDOW = (-1000.0, 1000.0)  # DataConfig's default normalisation, applied by every method


def log(msg: str) -> None:
    print(f"[bench/loader] {msg}", file=sys.stderr, flush=True)


# -- inputs ---------------------------------------------------------------------------------


def source_files(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*") if p.name.endswith((".nii", ".nii.gz")))


def make_sources(src: Path, n: int) -> None:
    import nibabel as nib

    from medssl_scale.synth.phantoms import ct_phantom

    src.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = ct_phantom(shape=(256, 256, 128), seed=i)
        nib.save(nib.Nifti1Image(p.image, p.affine), src / f"ct_{i:03d}.nii.gz")
        log(f"wrote {src / f'ct_{i:03d}.nii.gz'}")


def make_dataset(src: Path, data: Path, shard_mb: int) -> None:
    from ingest.runner import IngestConfig, run_ingest

    # Shards of a few volumes each, so that every worker gets shards of its own: a single
    # 1 GB shard would leave all but one worker idle and understate the shard stream.
    summary, stats = run_ingest(IngestConfig(sources=[src], out=data, workers=1, shard_size=shard_mb << 20))
    log(f"ingested {stats.processed} volume(s) into {data}: {summary.get('by_status')}")


def write_npy(data: Path, out: Path) -> list[Path]:
    """The store's volumes as (z, y, x) C-contiguous .npy files: what the memmap method reads."""
    from medssl_scale.data.catalog import Catalog
    from medssl_scale.store.layout import DatasetDir
    from medssl_scale.store.volumes import volume_store

    store = volume_store(DatasetDir(data))
    paths = []
    for v in Catalog.load(data).volumes:
        p = out / f"{v.volume_id}.npy"
        np.save(p, np.ascontiguousarray(store.read(v.volume_id).T))
        paths.append(p)
    return paths


def warm_page_cache(*roots: Path) -> int:
    """Read every file once so no method pays for the disk and the first one is not penalised."""
    total = 0
    for root in roots:
        for f in (p for p in root.rglob("*") if p.is_file()):
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    total += len(chunk)
    return total


# -- timing ---------------------------------------------------------------------------------


def time_crops(batches: Iterator[dict[str, Any]], seconds: float, min_crops: int) -> dict[str, Any]:
    """Crops per second after the first batch (worker start-up and first reads are not throughput)."""
    first = next(batches)
    assert first["image"].dtype == torch.float32, first["image"].dtype
    crops, t0 = 0, time.perf_counter()
    for batch in batches:
        image = batch["image"]
        crops += image.shape[0]
        dt = time.perf_counter() - t0
        if dt >= seconds and crops >= min_crops:
            break
    dt = time.perf_counter() - t0
    return {"crops": crops, "seconds": round(dt, 3), "crops_per_s": round(crops / dt, 2), "crop_shape": list(first["image"].shape[1:])}


def peak_rss_mb() -> float:
    """This process's peak plus its largest reaped child's (ru_maxrss is KiB on Linux)."""
    gc.collect()  # drop DataLoader iterators, so their workers are joined and counted
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(kib / 1024, 1)


# -- the methods, one process each ----------------------------------------------------------


def run_monai(args: argparse.Namespace) -> dict[str, Any]:
    import monai.transforms as mt
    from monai.data import DataLoader, Dataset

    files = source_files(args.src)
    roi = tuple(reversed(args.crop))  # NIfTI arrays are (x, y, z); our crops are (z, y, x)
    transform = mt.Compose([
        mt.LoadImaged(keys="image"),  # float32, as users load it
        mt.EnsureChannelFirstd(keys="image"),
        mt.RandSpatialCropd(keys="image", roi_size=roi, random_size=False),
        mt.ScaleIntensityRanged(keys="image", a_min=CT_WINDOW[0], a_max=CT_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
    ])
    # A cycled list long enough that the run never reaches its end (a DataLoader epoch
    # boundary would add worker start-up to the timed part).
    items = [{"image": str(f)} for f in files] * math.ceil(args.max_items / len(files))
    loader = DataLoader(Dataset(items, transform), batch_size=1, num_workers=args.workers, shuffle=False)

    def batches() -> Iterator[dict[str, Any]]:
        for b in loader:
            yield {"image": b["image"].as_tensor()}  # a plain float32 tensor, like the others

    it = batches()
    result = time_crops(it, args.seconds, args.min_crops)
    it.close()
    return {**result, "settings": {"batch_size": 1, "crops_per_volume_read": 1, "files": len(files)}}


def _data_config(args: argparse.Namespace, source: str, **kw: Any):
    from medssl_scale.data.config import DataConfig

    settings: dict[str, Any] = {
        "dataset": str(args.data), "source": source, "crop": tuple(args.crop), "workers": args.workers,
        "batch_size": args.batch, "augment": [], "sampling": "uniform",
        # An epoch longer than the run: a tiny benchmark dataset would otherwise end an epoch
        # (and restart the workers) every few dozen crops, which a real dataset never does.
        "samples_per_epoch": args.max_items,
    }
    return DataConfig(**{**settings, **kw})


def run_loader(args: argparse.Namespace, source: str, **kw: Any) -> dict[str, Any]:
    from medssl_scale.data.loader import Loader

    cfg = _data_config(args, source, **kw)
    loader = Loader(cfg)
    it = iter(loader)
    result = time_crops(it, args.seconds, args.min_crops)
    it.close()
    settings = {k: getattr(cfg, k) for k in ("batch_size", "crops_per_visit", "cache_mb", "cache_scope", "samples_per_epoch", "prefetch",
                                             "handoff")}
    settings["interleave"] = cfg.interleave or cfg.batch_size
    if source == "shards":
        stream = loader.dataset
        settings.update(shuffle_buffer=cfg.shuffle_buffer, shards=len(stream.urls), workers_used=stream.workers_used(cfg.workers))
    return {**result, "settings": settings}


def zarr_cache_stats(args: argparse.Namespace, crops: int, scope: str) -> dict[str, Any]:
    """Chunk-cache hits over one worker's share of the timed crops, replayed in this process.

    Workers keep their caches to themselves; the same plan run without workers visits the
    same kind of sequence (visits of ``crops_per_visit`` crops, ``interleave`` at a time).
    """
    from medssl_scale.data.loader import Loader

    loader = Loader(_data_config(args, "zarr", workers=0, cache_scope=scope))
    n = 0
    for batch in loader:
        n += batch["image"].shape[0]
        if n >= crops:
            break
    cache = loader.dataset.access.cache
    total = cache.hits + cache.misses
    return {"crops": n, "hits": cache.hits, "misses": cache.misses, "hit_rate": round(cache.hits / max(1, total), 4),
            "cache_mb": loader.cfg.cache_mb, "cache_scope": scope, "cached_mb_at_end": round(cache.nbytes / 2**20, 1)}


class MemmapCrops(torch.utils.data.Dataset):
    """Random crops copied out of memory-mapped (z, y, x) arrays; endless (the timer stops it).

    ``raw``: the int16 crop and its normalisation parameters, normalised after the hand-off as
    our loader does; otherwise normalised float32 here. ``normalised=False``: the copy only.
    """

    def __init__(self, paths: list[Path], crop: tuple[int, int, int], seed: int = 0, raw: bool = False, normalised: bool = True):
        self.paths, self.crop, self.seed, self.raw, self.normalised = paths, crop, seed, raw, normalised
        self._arrays: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from medssl_scale.data.config import Normalize
        from medssl_scale.data.transforms import norm_params, normalize

        if self._arrays is None:  # opened in the worker: mappings are per process
            self._arrays = [np.load(p, mmap_mode="r") for p in self.paths]
        a = self._arrays[i % len(self._arrays)]
        rng = np.random.default_rng([self.seed, i])
        start = [int(rng.integers(0, n - c + 1)) for n, c in zip(a.shape, self.crop)]
        x = np.array(a[tuple(slice(s, s + c) for s, c in zip(start, self.crop))])
        if self.raw:
            return {"image": torch.from_numpy(x)[None], "norm": torch.from_numpy(norm_params(x, "CT", None, Normalize()))}
        if not self.normalised:
            return {"image": torch.from_numpy(x)[None]}
        return {"image": torch.from_numpy(normalize(x, "CT", None, Normalize()))[None]}


def run_memmap_raw(args: argparse.Namespace) -> dict[str, Any]:
    """The storage ceiling: crops cut from the memory-mapped arrays and normalised in this process (no worker, no hand-off)."""
    paths = sorted(args.npy.glob("*.npy"))

    def batches(ds: MemmapCrops) -> Iterator[dict[str, Any]]:
        i = 0
        while True:
            yield {"image": torch.stack([ds[i + j]["image"] for j in range(args.batch)])}
            i += args.batch

    result = time_crops(batches(MemmapCrops(paths, tuple(args.crop))), args.seconds, args.min_crops)
    # The copy alone (int16, no window), in the same process: what the window costs on top.
    copy = time_crops(({"image": b["image"].float()} for b in batches(MemmapCrops(paths, tuple(args.crop), normalised=False))),
                      max(1.0, args.seconds / 3), args.min_crops)
    return {**result, "copy_only_crops_per_s": copy["crops_per_s"],
            "settings": {"batch_size": args.batch, "files": len(paths), "handoff": "none (one process)"}}


def run_memmap(args: argparse.Namespace, ring: bool = True) -> dict[str, Any]:
    """Memory-mapped crops through the same hand-off as our loader (int16 through the ring, normalised
    after it), or normalised in the workers and through PyTorch's own hand-off."""
    from medssl_scale.data.collate import Collate, Ring
    from medssl_scale.data.transforms import finish

    paths = sorted(args.npy.glob("*.npy"))
    kw: dict[str, Any] = {}
    r = None
    if ring and args.workers:
        r = Ring({"image": ((1, *args.crop), torch.int16)}, args.batch, args.workers, 2)
        kw = {"collate_fn": Collate(r), "prefetch_factor": 2}
    dataset = MemmapCrops(paths, tuple(args.crop), raw=ring)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, num_workers=args.workers, **kw)

    def batches() -> Iterator[dict[str, Any]]:
        for b in loader:
            if r is not None:
                b = r.take(b, copy=False, pin=False)  # the view is normalised into a new tensor at once
            yield finish(b, ["image"]) if "norm" in b else b

    it = batches()
    result = time_crops(it, args.seconds, args.min_crops)
    it.close()
    handoff = "ring, int16, normalised after" if r is not None else ("pytorch, float32" if not ring else "none (workers 0)")
    return {**result, "settings": {"batch_size": args.batch, "files": len(paths), "handoff": handoff}}


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    if args.only == "monai":
        out = run_monai(args)
    elif args.only in PEERS:  # bench/loader_peers.py: MONAI's faster setups and nnU-Net v2
        import loader_peers

        out = getattr(loader_peers, PEERS[args.only])(args)
    elif args.only == "zarr":
        out = run_loader(args, "zarr", cache_scope="visit")
    elif args.only == "zarr_worker":  # the hand-off before: normalised in the workers, float32 across
        out = run_loader(args, "zarr", cache_scope="visit", handoff="worker")
    elif args.only == "zarr_cache_all":
        out = run_loader(args, "zarr", cache_scope="lru")
    elif args.only == "zarr_k1":
        out = run_loader(args, "zarr", crops_per_visit=1, cache_mb=0)
    elif args.only == "shards":
        out = run_loader(args, "shards")
    elif args.only == "memmap_raw":
        out = run_memmap_raw(args)
    elif args.only == "memmap_pytorch":
        out = run_memmap(args, ring=False)
    else:
        out = run_memmap(args)
    out["peak_rss_mb"] = peak_rss_mb()  # before the replay below, which is not part of the method
    if args.only in ("zarr", "zarr_cache_all"):
        scope = "visit" if args.only == "zarr" else "lru"
        out["cache"] = zarr_cache_stats(args, min(out["crops"] // max(1, args.workers), 4000), scope)
    return out


# -- the whole run --------------------------------------------------------------------------


MONAI = ("monai", "monai_samples", "monai_persistent")
AIMS = {"zarr_vs_memmap_raw_ceiling": 0.5, "zarr_vs_best_monai": 10.0, "zarr_vs_nnunetv2": 1.5}


def comparisons(rate: dict[str, float], workers: int, cores: int) -> dict[str, Any]:
    """Ratios against the storage ceiling and the fairest peers, and whether the aims are met.

    ``memmap_raw`` runs in one process, so it is the ceiling of one worker; for W workers the
    ceiling is min(W, cores) times it (the main process shares those cores, so this is generous).
    """
    out: dict[str, Any] = {}
    if "memmap_raw" in rate:
        ceiling = rate["memmap_raw"] * min(max(1, workers), cores)
        out["memmap_raw_ceiling_crops_per_s"] = round(ceiling, 2)
        for m in ("zarr", "zarr_k1", "zarr_worker", "zarr_cache_all", "shards", "memmap", "memmap_pytorch", "nnunetv2", *MONAI):
            if m in rate:
                out[f"{m}_vs_memmap_raw_ceiling"] = round(rate[m] / ceiling, 3)
    monai = [m for m in MONAI if m in rate]
    if "zarr" in rate:
        if monai:
            best = max(monai, key=lambda m: rate[m])
            out["best_monai"] = best
            out["zarr_vs_best_monai"] = round(rate["zarr"] / rate[best], 2)
        for peer in ("nnunetv2", "zarr_worker", "memmap"):
            if peer in rate:
                out[f"zarr_vs_{peer}"] = round(rate["zarr"] / rate[peer], 3)
        if "shards" in rate and monai:
            out["shards_vs_best_monai"] = round(rate["shards"] / rate[out["best_monai"]], 2)
    out["aims"] = {k: {"aim": f">= {v}", "value": out.get(k), "met": None if k not in out else out[k] >= v} for k, v in AIMS.items()}
    return out


def child_command(args: argparse.Namespace, method: str) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "--only", method, "--src", str(args.src), "--data", str(args.data),
        "--npy", str(args.npy), "--crop", ",".join(map(str, args.crop)), "--workers", str(args.workers), "--batch", str(args.batch),
        "--seconds", str(args.seconds), "--min-crops", str(args.min_crops), "--max-items", str(args.max_items),
    ]


def prepare(args: argparse.Namespace) -> None:
    from medssl_scale.store.layout import DatasetDir

    if not args.src.exists() or not source_files(args.src):
        if args.make < 1:
            raise SystemExit(f"{args.src}: no .nii/.nii.gz sources (and --make 0)")
        log(f"generating {args.make} CT phantoms of 256x256x128 in {args.src}")
        make_sources(args.src, args.make)
    if not DatasetDir(args.data).manifest.exists():
        log(f"ingesting {args.src} into {args.data}")
        make_dataset(args.src, args.data, args.shard_mb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=DEFAULT_ROOT / "src", help="folder of .nii.gz volumes (the MONAI baseline's input)")
    ap.add_argument("--data", type=Path, default=DEFAULT_ROOT / "data", help="dataset directory ingested from --src")
    ap.add_argument("--crop", default="96", help="crop edge, or D,H,W (z, y, x)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="batch size of the zarr, shards and memmap loaders (MONAI: 1)")
    ap.add_argument("--seconds", type=float, default=8.0, help="least timed seconds per method")
    ap.add_argument("--min-crops", type=int, default=32, help="least timed crops per method")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all methods; each method reports its best")
    ap.add_argument("--make", type=int, default=6, help="phantoms to generate when --src is missing or empty")
    ap.add_argument("--shard-mb", type=int, default=40, help="shard size when this script ingests --data")
    ap.add_argument("--methods", default=",".join(METHODS), help="a subset of " + ",".join(METHODS))
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    # Internal: one method in this process (the parent runs each method in a fresh child).
    ap.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--npy", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--max-items", type=int, default=200_000, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.crop = [int(c) for c in args.crop.split(",")] * (3 if "," not in args.crop else 1)
    if args.workers < 0 or args.batch < 1 or len(args.crop) != 3:
        ap.error("--workers >= 0, --batch >= 1 and --crop N or D,H,W")

    if args.only:
        # One intra-op thread in every method's process, as in a DataLoader worker: memmap_raw is then
        # one core's ceiling, and no consuming process takes its workers' cores for elementwise ops
        # (it stands for a training process that hands each batch to a GPU).
        torch.set_num_threads(1)
        print(json.dumps(run_one(args)))
        return

    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        ap.error(f"unknown method(s) {sorted(unknown)}")
    prepare(args)
    from medssl_scale.data.catalog import Catalog

    catalog = Catalog.load(args.data)
    shapes = sorted({v.shape_zyx for v in catalog.volumes})
    if any(s < c for shape in shapes for s, c in zip(shape, args.crop)):
        raise SystemExit(f"crop {args.crop} is larger than a volume {shapes}: padding would make the methods incomparable")
    n_src = len(source_files(args.src))
    if n_src != len(catalog):
        log(f"warning: {n_src} source files but {len(catalog)} volumes in {args.data}")

    scratch = Path(tempfile.mkdtemp(prefix="medssl-bench-loader-npy-"))
    try:
        args.npy = scratch
        npy_mb = sum(p.stat().st_size for p in write_npy(args.data, scratch)) / 2**20
        warmed = warm_page_cache(args.src, args.data / "volumes.zarr", args.data / "shards", scratch)
        log(f"page cache warmed: {warmed / 2**20:.0f} MiB read")
        runs: dict[str, dict[str, Any]] = {}
        # Rounds over all methods rather than repeats of one, so a slow spell of a shared
        # machine does not land on one method only; each method keeps its best round.
        for r in range(args.repeat):
            for m in methods:
                log(f"{m} (round {r + 1}/{args.repeat}): {args.workers} worker(s), crop {args.crop}, >= {args.seconds:g}s")
                proc = subprocess.run(child_command(args, m), stdout=subprocess.PIPE, text=True, check=True)
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                log(f"{m}: {run['crops_per_s']} crops/s ({run['crops']} crops in {run['seconds']}s), peak RSS {run['peak_rss_mb']} MB")
                rounds = runs.get(m, {}).get("rounds_crops_per_s", []) + [run["crops_per_s"]]
                if m not in runs or run["crops_per_s"] > runs[m]["crops_per_s"]:
                    runs[m] = run
                runs[m]["rounds_crops_per_s"] = rounds
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    import monai
    import zarr

    rate = {m: r["crops_per_s"] for m, r in runs.items()}
    result: dict[str, Any] = {"bench": "loader"}
    for m in methods:
        result[f"{m}_crops_per_s"] = rate[m]
    result["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs.values())
    result["peak_rss_mb_by_method"] = {m: r["peak_rss_mb"] for m, r in runs.items()}
    result.update(comparisons(rate, args.workers, os.cpu_count() or 1))
    if "zarr" in runs:
        c = runs["zarr"]["cache"]
        result["zarr_cache"] = {"cache_mb_per_worker": c["cache_mb"], "cache_scope": c["cache_scope"], "hit_rate": c["hit_rate"],
                                "cached_mb_at_end": c["cached_mb_at_end"], "dataset_decoded_mb": round(npy_mb, 1)}
    if "zarr_cache_all" in runs:
        result["zarr_cache_all_hit_rate"] = runs["zarr_cache_all"]["cache"]["hit_rate"]
    result.update(
        crop=args.crop,
        workers=args.workers,
        batch_size=args.batch,
        volumes=len(catalog),
        volume_shapes_zyx=[list(s) for s in shapes],
        volumes_decoded_mb=round(npy_mb, 1),
        seconds_min=args.seconds,
        min_crops=args.min_crops,
        normalisation=f"CT window {list(CT_WINDOW)} HU -> [0, 1], float32, in every method; no augmentation",
        runs=runs,
        machine={
            "platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "zarr": zarr.__version__,
        },
        peak_rss_note="per method, in its own process: ru_maxrss of that process + the largest of its reaped "
                      "workers (RUSAGE_CHILDREN is a maximum, not a sum; pages shared after fork count in both)",
    )
    emit(result, args.out)


if __name__ == "__main__":
    main()
