"""Store format choices: compression ratio, write and read speed, random crop time, per codec, chunking and pipeline.

    python bench/store_formats.py [--shape 384,384,192] [--repeat 3] [--crops 20] [--out bench/results/store_formats.json]

One generated CT-like volume (``medssl_scale.synth.phantoms.ct_phantom``,
int16, stored (z, y, x) as the store does) is written and read back in each
row's format, in one run, files in a temporary directory with the page cache
warm for every row alike:
- ``ratio``: raw bytes / bytes on disk;
- ``write MB/s``, ``full read MB/s``: raw MB over the best of ``--repeat`` rounds;
- ``crop ms``: median over ``--crops`` random 96^3 boxes (the same boxes
  for every row) read into a new array, each box's best of the rounds.
Each round runs every row once, writing its files afresh, so a load change
on a shared machine hits all rows alike.

Zarr rows end every chunk in a crc32c, as the store does. ``zarr`` is
zarr-python's codec pipeline, ``zarrs`` the Rust one the store writes with;
``medssl store`` is the store's own path (``ArrayStore.write``, sealing
included; crops through ``VolumeReader`` with no chunk cache, so every crop
decodes its chunks). The ceiling is an uncompressed ``.npy`` (``np.load``;
crops from a memory map); ``.nii.gz`` (nibabel, gzip level 1) is what most
public collections ship. zarrs and Blosc use their default threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the project: bench/ingest.py must not shadow the ingest package
from _emit import emit  # noqa: E402

CROP = 96
PIPELINES = {"zarr": "zarr.core.codec_pipeline.BatchedCodecPipeline", "zarrs": "zarrs.ZarrsCodecPipeline"}


def _du(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _crop_ms(read_box: Callable[[tuple[int, int, int]], np.ndarray], starts: list[tuple[int, int, int]]) -> list[float]:
    times = []
    for s in starts:
        t0 = time.perf_counter()
        box = read_box(s)
        times.append((time.perf_counter() - t0) * 1e3)
        assert box.shape == (CROP,) * 3
    return times


def zarr_row(vol: np.ndarray, path: Path, compressor, chunk: int, shard: int | None, pipeline: str, starts) -> dict:
    import zarr
    from zarr.codecs import Crc32cCodec

    compressors = (compressor, Crc32cCodec()) if compressor is not None else (Crc32cCodec(),)
    shards = tuple(min(s, -(-n // chunk) * chunk) for s, n in zip((shard,) * 3, vol.shape)) if shard else None

    def write() -> None:
        shutil.rmtree(path, ignore_errors=True)
        z = zarr.create_array(store=str(path), shape=vol.shape, dtype=vol.dtype, chunks=(chunk,) * 3, shards=shards,
                              compressors=compressors, fill_value=0, zarr_format=3)
        z[...] = vol

    with zarr.config.set({"codec_pipeline.path": PIPELINES[pipeline]}):
        w = _seconds(write)
        z = zarr.open_array(str(path), mode="r")
        assert np.array_equal(z[...], vol)
        r = _seconds(lambda: z[...])
        crop = _crop_ms(lambda s: z[s[0]:s[0] + CROP, s[1]:s[1] + CROP, s[2]:s[2] + CROP], starts)
    return {"write_s": w, "read_s": r, "crop_ms": crop, "stored_bytes": _du(path), "files": sum(1 for f in path.rglob("*") if f.is_file())}


def store_row(vol: np.ndarray, root: Path, starts) -> dict:
    from medssl_scale.store.chunks import ChunkCache
    from medssl_scale.store.volumes import ArrayStore

    xyz = vol.T  # ArrayStore.write takes (x, y, z); its (z, y, x) view of this is vol itself
    store = ArrayStore(root / "volumes.zarr", root / ".tmp")
    vid = f"v{0:019x}"
    w = _seconds(lambda: store.write(vid, xyz, {}))
    reader = store.reader(vid)
    reader.cache = ChunkCache(0)  # every crop decodes what it touches, as the first crop of a volume does
    full = lambda: reader.box((0, 0, 0), vol.shape)  # noqa: E731
    assert np.array_equal(full(), vol)
    r = _seconds(full)
    crop = _crop_ms(lambda s: reader.box(s, (CROP,) * 3), starts)
    path = store.dir(vid)
    return {"write_s": w, "read_s": r, "crop_ms": crop, "stored_bytes": _du(path), "files": sum(1 for f in path.rglob("*") if f.is_file())}


def npy_row(vol: np.ndarray, path: Path, starts) -> dict:
    w = _seconds(lambda: np.save(path, vol))
    r = _seconds(lambda: np.load(path))
    m = np.load(path, mmap_mode="r")
    crop = _crop_ms(lambda s: np.array(m[s[0]:s[0] + CROP, s[1]:s[1] + CROP, s[2]:s[2] + CROP]), starts)
    return {"write_s": w, "read_s": r, "crop_ms": crop, "stored_bytes": _du(path), "files": 1}


def nifti_gz_row(vol: np.ndarray, path: Path, starts) -> dict:
    import nibabel as nib

    img = nib.Nifti1Image(vol.T, np.eye(4))  # NIfTI is (x, y, z)
    w = _seconds(lambda: nib.save(img, path))
    r = _seconds(lambda: np.asanyarray(nib.load(path).dataobj))
    # a crop of a .nii.gz decompresses the file up to the crop's end; a few crops tell the cost
    crop = _crop_ms(lambda s: np.asanyarray(nib.load(path).dataobj[s[2]:s[2] + CROP, s[1]:s[1] + CROP, s[0]:s[0] + CROP]).T,
                    starts[:3])
    return {"write_s": w, "read_s": r, "crop_ms": crop, "stored_bytes": _du(path), "files": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="384,384,192", help="x,y,z of the generated volume")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--crops", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

    from medssl_scale.synth.phantoms import ct_phantom

    shape = tuple(int(s) for s in args.shape.split(","))
    vol = np.ascontiguousarray(ct_phantom(shape=shape, spacing=(0.8, 0.8, 1.5), seed=0).image.astype(np.int16).T)  # (z, y, x)
    rng = np.random.default_rng(0)
    starts = [tuple(int(rng.integers(0, n - CROP + 1)) for n in vol.shape) for _ in range(args.crops)]
    zstd = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)
    lz4 = BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)
    rows: list[tuple[str, str, Callable[[Path], dict]]] = [
        ("uncompressed .npy (the ceiling)", "numpy", lambda d: npy_row(vol, d / "v.npy", starts)),
        ("no compression, 64³ in 256³ shards", "zarrs", lambda d: zarr_row(vol, d / "z", None, 64, 256, "zarrs", starts)),
        ("Blosc-zstd 3 + shuffle, 64³ chunks", "zarr", lambda d: zarr_row(vol, d / "z", zstd, 64, None, "zarr", starts)),
        ("Blosc-zstd 3 + shuffle, 64³ chunks", "zarrs", lambda d: zarr_row(vol, d / "z", zstd, 64, None, "zarrs", starts)),
        ("Blosc-lz4 5 + shuffle, 64³ chunks", "zarrs", lambda d: zarr_row(vol, d / "z", lz4, 64, None, "zarrs", starts)),
        ("Zstd 3, 64³ chunks", "zarrs", lambda d: zarr_row(vol, d / "z", ZstdCodec(level=3), 64, None, "zarrs", starts)),
        ("Blosc-zstd 3 + shuffle, 64³ in 256³ shards", "zarrs", lambda d: zarr_row(vol, d / "z", zstd, 64, 256, "zarrs", starts)),
        ("Blosc-lz4 5 + shuffle, 64³ in 256³ shards", "zarrs", lambda d: zarr_row(vol, d / "z", lz4, 64, 256, "zarrs", starts)),
        ("Blosc-lz4 5 + shuffle, 64³ in 256³ shards (the default)", "medssl store",
         lambda d: store_row(vol, d, starts)),
        (".nii.gz (gzip 1)", "nibabel", lambda d: nifti_gz_row(vol, d / "v.nii.gz", starts)),
    ]
    mb = vol.nbytes / 1e6
    load_at_start = round(os.getloadavg()[0], 1)  # a shared machine: how busy it was
    runs: list[list[dict]] = [[] for _ in rows]
    for r in range(args.repeat):
        for i, (fmt, pipeline, run) in enumerate(rows):
            scratch = Path(tempfile.mkdtemp(prefix="medssl-bench-store-"))
            try:
                runs[i].append(run(scratch))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        print(f"[bench/store_formats] round {r + 1}/{args.repeat} done", file=sys.stderr, flush=True)
    out = []
    for (fmt, pipeline, _), ms in zip(rows, runs):
        crops = [min(c) for c in zip(*(m["crop_ms"] for m in ms))]  # each box's best round
        out.append({"format": fmt, "pipeline": pipeline, "ratio": round(vol.nbytes / ms[0]["stored_bytes"], 2),
                    "write_mb_per_s": round(mb / min(m["write_s"] for m in ms), 1),
                    "full_read_mb_per_s": round(mb / min(m["read_s"] for m in ms), 1),
                    "crop_96_ms": round(statistics.median(crops), 2), "files": ms[0]["files"]})
        print(f"[bench/store_formats] {fmt} / {pipeline}: {out[-1]}", file=sys.stderr, flush=True)
    emit({"bench": "store_formats", "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
          "volume": {"shape_xyz": list(shape), "dtype": "int16", "mb": round(mb, 1)}, "repeat": args.repeat, "crops": args.crops,
          "load_average_1min": [load_at_start, round(os.getloadavg()[0], 1)],
          "command": "python bench/store_formats.py " + " ".join(sys.argv[1:]), "rows": out}, args.out)


if __name__ == "__main__":
    main()
