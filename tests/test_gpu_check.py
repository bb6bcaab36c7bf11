"""The GPU check's dry run: its wheel set is complete and small, and every step runs, in an interpreter that sees only
the GPU image's distributions, those wheels and the repository (bench/gpu/check.py --dry-run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))
import wheels  # noqa: E402

STEPS = ["setup", "kernel_tests", "kernel_bench", "pretrain", "monai_anchor", "finetune"]


@pytest.mark.slow
def test_dry_run_proves_the_wheel_set_and_runs_every_step_in_isolation(tmp_path):
    out = tmp_path / "gpu-check"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "check.py"), "--dry-run", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    report = json.loads((out / "summary.json").read_text())
    assert report["summary"]["steps"] == {s: "ok" for s in STEPS}, report["summary"]
    assert "GPU check on cpu (dry run, CPU)" in p.stdout

    setup = report["setup"]
    assert 0 < setup["wheels_mb"] <= 48
    carried = set(setup["wheel_set"])
    assert not {d for d in carried if wheels.MACHINE_OWN.match(d)}, carried  # the machine's torch and Triton stay
    assert {"deepspeed", "monai", "mlflow-skinny", "zarr", "numcodecs", "nibabel"} <= carried
    assert not carried & wheels.image_packages()
    assert "simpleitk" not in carried  # imported only by the NRRD/MHA reader, which the steps never reach

    # The isolation is real: what is neither on the image nor carried cannot be imported there.
    env_python = out / "env" / "bin" / "python"
    for module in ("SimpleITK", "kubernetes", "pylibjpeg"):
        r = subprocess.run([str(env_python), "-c", f"import {module}"], capture_output=True, text=True)
        assert r.returncode != 0 and "No module named" in r.stderr, (module, r.stderr[-500:])
    r = subprocess.run([str(env_python), "-c", "import deepspeed, medssl_scale, torch; print(torch.__file__)"], capture_output=True, text=True)
    assert r.returncode == 0 and "image-site" in r.stdout, r.stderr[-1000:]

    for name in ("dae", "pcrlv2", "lrc", "reprec"):
        run = report["pretrain"][name]
        assert run["steps"] >= 2 and run["loss_finite"] and run["samples_per_s"] > 0 and 0 <= run["data_wait"] < 1, run
    anchor = report["monai_anchor"]
    assert anchor["loss_finite"] and anchor["crops_per_s"] > 0 and anchor["settings"]["feature_size"] == 12
    assert anchor["ours_vs_monai"] > 0  # the ratio the GPU run reports against its aim
    assert report["finetune"]["results"]
    assert report["kernel_tests"]["tests"] == 1 and report["kernel_tests"]["failures"] == 0
    assert json.loads((out / "kernels.json").read_text())["rows"]


def test_the_carried_set_leaves_out_the_image_the_optional_and_the_machine_own():
    found = {"torch": "2.13.0", "triton": "3.9.0", "nvidia-nccl-cu13": "2.0", "numpy": "2.4", "monai": "1.6.1",
             "simpleitk": "2.5.7", "deepspeed": "0.19.8"}
    assert wheels.wanted(found, {"numpy", "torch", "triton"}) == {"deepspeed": "0.19.8", "monai": "1.6.1"}


def test_slimming_a_wheel_drops_the_files_and_their_record_lines(tmp_path):
    import zipfile

    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg/__init__.py", "x = 1\n")
        z.writestr("pkg/server/js/app.js", "a" * 10_000)
        z.writestr("pkg-1.0.dist-info/RECORD", "pkg/__init__.py,sha256=x,6\npkg/server/js/app.js,sha256=y,10000\npkg-1.0.dist-info/RECORD,,\n")
    assert wheels.slim(whl, ("pkg/server/js/",)) > 0
    with zipfile.ZipFile(whl) as z:
        assert z.namelist() == ["pkg/__init__.py", "pkg-1.0.dist-info/RECORD"]
        assert "app.js" not in z.read("pkg-1.0.dist-info/RECORD").decode()
    assert wheels.slim(whl, ("pkg/server/js/",)) == 0  # nothing left to drop
