"""Peak memory of one ingest worker per item, as a multiple of the stored volume's bytes.

    python bench/ingest_memory.py [--shape 384,384,192] [--kinds ct,ct_slope,ct_float64,mr,mr_lps]

For each kind, writes a compressible ``.nii.gz`` (about 1 MB), then runs the
worker path (``ingest.pipeline.process_item``, the shard fragment written as
a pool worker does) in a fresh process and reports the growth of its peak
resident set (``ru_maxrss``) over the same process just before the item,
divided by the stored volume's bytes (int16 for CT, float32 for MR). Prints
one JSON object per kind.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = {  # kind: (disk dtype, slope, inter, flip x/y (LPS), stored bytes per voxel)
    "ct": ("int16", 1.0, -1024.0, False, 2),
    "ct_slope": ("int16", 0.5, -1024.0, False, 2),
    "ct_float64": ("float64", 1.0, -1024.0, False, 2),
    "mr": ("float32", 1.0, 0.0, False, 4),
    "mr_lps": ("float32", 1.0, 0.0, True, 4),
}

_MEASURE = r"""
import json, resource, sys, tempfile
from pathlib import Path
from ingest.discover import Item
from ingest.pipeline import Options, process_item
path, stored = Path(sys.argv[1]), int(sys.argv[2])
opts = Options(out=Path(tempfile.mkdtemp()) / "ds", secret=b"bench" * 8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rec = process_item(Item("file", path.name, [str(path)], [path.name]), opts).records[0]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"status": rec.status, "reason": rec.reason, "peak_multiple": round((after - before) * 1024 / stored, 2)}))
"""


def write_volume(path: Path, kind: str, shape: tuple[int, int, int]) -> int:
    """A body-like block in air, saved as ``kind``; returns the stored volume's bytes."""
    import nibabel as nib
    import numpy as np

    dtype, slope, inter, lps, stored = KINDS[kind]
    a = np.zeros(shape, dtype)
    x, y, _ = shape
    a[x // 4: 3 * x // 4, y // 4: 3 * y // 4, :] = 1064 if kind.startswith("ct") else 300
    sign = -1 if lps else 1
    img = nib.Nifti1Image(a, np.diag([sign * 0.8, sign * 0.8, 2.0, 1.0]))
    img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return a.size * stored


def measure(path: Path, stored: int) -> dict:
    """The worker path on ``path`` in a fresh interpreter: {status, reason, peak_multiple}."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(stored)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="384,384,192")
    ap.add_argument("--kinds", default=",".join(KINDS))
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            path = Path(tmp) / f"{kind}.nii.gz"
            stored = write_volume(path, kind, shape)  # type: ignore[arg-type]
            res = measure(path, stored)
            print(json.dumps({"kind": kind, "shape": list(shape), "file_mb": round(path.stat().st_size / 1e6, 2),
                              "stored_mb": round(stored / 1e6, 1), **res}))


if __name__ == "__main__":
    main()
