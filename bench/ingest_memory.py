"""Peak memory of one ingest worker per item, as a multiple of the stored volume's bytes.

    python bench/ingest_memory.py [--shape 384,384,192] [--kinds ct,ct_slope,...]

For each kind, writes a source (a compressible ``.nii.gz`` of about 1 MB, a
DICOM series, an NRRD or MetaImage file), then, in a fresh process, runs the
worker path (``ingest.pipeline.process_item``: read, canonicalise, write the
volume and the shard fragment) once on a tiny source of the same kind, so that
imports and first-use buffers are not counted, resets the process's peak
resident set (``/proc/self/clear_refs``, Linux), runs the item and reads the
peak back (``VmHWM``). Prints one JSON object per kind: ``peak_multiple`` is
the peak's growth over the resident set at the reset, divided by the stored
volume's bytes (int16 for CT, float32 for MR); ``decoded_multiple`` divides
by the bytes of the source's own decoded voxels instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = {  # kind: (container, voxel dtype on disk, slope, inter, flip x/y (LPS), stored bytes per voxel)
    "ct": ("nifti", "int16", 1.0, -1024.0, False, 2),
    "ct_slope": ("nifti", "int16", 0.5, -1024.0, False, 2),
    "ct_uint16": ("nifti", "uint16", 1.0, -1024.0, False, 2),
    "ct_uint16_slope": ("nifti", "uint16", 0.5, -1024.0, False, 2),
    "ct_float64": ("nifti", "float64", 1.0, -1024.0, False, 2),
    "mr": ("nifti", "float32", 1.0, 0.0, False, 4),
    "mr_lps": ("nifti", "float32", 1.0, 0.0, True, 4),
    "mr_scaled": ("nifti", "float32", 2.0, 0.0, False, 4),
    "dicom_ct": ("dicom", "int16", 1.0, -1024.0, False, 2),
    "dicom_ct_slope": ("dicom", "int16", 0.5, -1024.0, False, 2),
    "nrrd_ct": ("nrrd", "int16", 1.0, 0.0, False, 2),
    "mha_mr": ("mha", "float32", 1.0, 0.0, False, 4),
}

_MEASURE = r"""
import gc, json, sys, tempfile
from pathlib import Path
from ingest.discover import Item
from ingest.pipeline import Options, process_item

def item(kind, paths):
    return Item(kind, "series" if kind == "dicom" else Path(paths[0]).name, paths, [Path(p).name for p in paths])

def status_kb(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

kind, warm, paths, stored = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
tmp = Path(tempfile.mkdtemp())
assert process_item(item(kind, warm), Options(out=tmp / "warm", secret=b"bench" * 8)).records[0].status == "ok"
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS: an exec'd child otherwise starts from its parent's peak
base = status_kb("VmRSS")
rec = process_item(item(kind, paths), Options(out=tmp / "ds", secret=b"bench" * 8)).records[0]
peak = status_kb("VmHWM")
print(json.dumps({"status": rec.status, "reason": rec.reason, "peak_mb": round((peak - base) / 1024, 1),
                  "peak_multiple": round((peak - base) * 1024 / stored, 2)}))
"""


def write_source(out: Path, kind: str, shape: tuple[int, int, int]) -> tuple[str, list[Path], int, int]:
    """A body-like block in air as ``kind`` under the new folder ``out``: (item kind, paths, stored bytes, decoded bytes)."""
    import numpy as np

    container, dtype, slope, inter, lps, stored = KINDS[kind]
    a = np.zeros(shape, dtype)
    x, y, _ = shape
    a[x // 4: 3 * x // 4, y // 4: 3 * y // 4, :] = 1064 if kind.startswith(("ct", "dicom", "nrrd")) else 300
    sign = -1 if lps else 1
    affine = np.diag([sign * 0.8, sign * 0.8, 2.0, 1.0])
    out.mkdir(parents=True)
    if container == "nifti":
        import nibabel as nib

        img = nib.Nifti1Image(a, affine)
        img.header.set_slope_inter(slope, inter)
        paths = [out / f"{kind}.nii.gz"]
        nib.save(img, paths[0])
    elif container == "dicom":
        from medssl_scale.synth.dicom import write_series

        paths = sorted(write_series(out / "series", a, affine, rescale=(slope, inter)))
    else:
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(a.transpose(2, 1, 0)))
        img.SetSpacing((0.8, 0.8, 2.0))
        paths = [out / f"{kind}.{container}"]
        sitk.WriteImage(img, str(paths[0]), True)
    return ("dicom" if container == "dicom" else "file"), paths, a.size * stored, a.nbytes


def measure(kind: str, shape: tuple[int, int, int], tmp: Path) -> dict:
    """The worker path on a ``kind`` source of ``shape`` in a fresh interpreter: {status, reason, peak_mb, peak_multiple, ...}."""
    item_kind, paths, stored, decoded = write_source(tmp / kind, kind, shape)
    _, warm, _, _ = write_source(tmp / f"{kind}-warm", kind, (16, 16, 8))
    out = subprocess.run([sys.executable, "-c", _MEASURE, item_kind, json.dumps([str(p) for p in warm]),
                          json.dumps([str(p) for p in paths]), str(stored)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["decoded_multiple"] = round(res["peak_multiple"] * stored / decoded, 2)
    res["source_mb"] = round(sum(p.stat().st_size for p in paths) / 1e6, 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="384,384,192")
    ap.add_argument("--kinds", default=",".join(KINDS))
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            res = measure(kind, shape, Path(tmp))  # type: ignore[arg-type]
            print(json.dumps({"kind": kind, "shape": list(shape), **res}), flush=True)


if __name__ == "__main__":
    main()
