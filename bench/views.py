"""What a sample of each objective's views costs a loader worker: PCRLv2's against PCRLv2 + LRC's super-pixels.

    python bench/views.py [--shape 256,256,160] [--samples 10] [--repeat 3] [--out bench/results/views.json]

One generated CT phantom (``ct_phantom``, int16, (z, y, x) as the store
holds it) in memory; each config's ``data`` section cuts ``--samples``
samples through the loader's own ``Cropper`` in this process, one thread,
the same sample seeds for every config; each figure is the best of
``--repeat`` rounds, the configs alternating within a round. The baseline
is ``configs/pcrlv2/base.yaml``'s views, which read the same volume without
super-pixels: the ratio is what LRC's region maps add to a worker's time.
Also reports the regions per view slice inside the body.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))
from _emit import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="256,256,160", help="phantom (x, y, z)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import numpy as np
    import torch

    from medssl_scale.data.crops import ArrayAccess, Cropper
    from medssl_scale.synth.phantoms import ct_phantom
    from medssl_scale.train.config import load_run_config

    torch.set_num_threads(1)  # as in a DataLoader worker
    shape = tuple(int(s) for s in args.shape.split(","))
    phantom = ct_phantom(shape=shape, seed=0)
    access = ArrayAccess(np.ascontiguousarray(phantom.image.transpose(2, 1, 0)).astype(np.int16), {"modality": "CT"})
    data = {name: load_run_config(ROOT / "configs" / name / "base.yaml", ["data.dataset=unused"]).data for name in ("pcrlv2", "lrc")}
    croppers = {name: Cropper(d) for name, d in data.items()}
    rounds: dict[str, list[float]] = {name: [] for name in croppers}
    regions_per_slice: list[int] = []
    for r in range(args.repeat):
        for name, cropper in croppers.items():
            t0 = time.perf_counter()
            for i in range(args.samples):
                out = cropper(access, 0, np.random.default_rng(i))
                if name == "lrc" and r == 0:
                    ids = out["regions1"][0]
                    regions_per_slice += [int((ids[z].unique() >= 0).sum()) for z in range(ids.shape[0])]
            rounds[name].append((time.perf_counter() - t0) / args.samples)
    best = {name: min(v) for name, v in rounds.items()}
    emit({
        "bench": "views", "phantom_xyz": list(shape), "samples": args.samples, "repeat": args.repeat,
        "seconds_per_sample": {k: round(v, 4) for k, v in best.items()},
        "rounds_seconds_per_sample": {k: [round(x, 4) for x in v] for k, v in rounds.items()},
        "lrc_vs_pcrlv2": round(best["lrc"] / best["pcrlv2"], 2),
        "lrc_regions_per_view_slice_inside_body": {"median": statistics.median(regions_per_slice), "min": min(regions_per_slice),
                                                   "max": max(regions_per_slice)},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "command": "python bench/views.py " + " ".join(sys.argv[1:]),
    }, args.out)


if __name__ == "__main__":
    main()
