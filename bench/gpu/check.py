"""The GPU path, proven in one command on a machine with one CUDA GPU; every result is JSON under one folder.

    make gpu-wheels        # on a CPU machine with the project installed: the wheels the GPU machine lacks (.gpu-wheels/)
    make gpu-check         # on the GPU machine: python3 bench/gpu/check.py --out gpu-check
    python bench/gpu/check.py --dry-run --out /tmp/gpu-check    # anywhere: the wheel set and every step, CPU-sized

Steps (``--steps`` picks some; each writes OUT/<step>.json, and a failed
step records its error while the others still run):

1. ``setup``: installs ``.gpu-wheels/*.whl`` into OUT/site with no index
   and no dependencies, so the machine's own torch and Triton stay (checked:
   the same version and file before and after), and imports every module
   the steps use. Records the device.
2. ``kernel_tests``: ``tests/test_kernels.py`` with compiled kernels on the
   GPU (``MEDSSL_KERNEL_TEST_DEVICE=cuda``): every fused op against its
   reference, forward and backward, fp32 and bf16, and the self-check.
3. ``kernel_bench``: ``bench/kernels.py`` at B=8, N=216..4096, C=768, bf16:
   fused against the best eager code and ``torch.compile``, GB/s, the
   fraction of the device's HBM peak.
4. ``pretrain``: generates CT (with organ labels) and MR phantoms, ingests
   them, and pre-trains through the real launcher, engine and loader: DAE on
   SwinUNETR (feature size 48), 96³ crops, bf16, DeepSpeed ZeRO-2 over NCCL
   on one rank, CT only; then PCRLv2 and RepRec (their ``base`` configs) for
   a few steps, and PCRLv2 + LRC, whose loader also computes super-pixels
   (aim: its data wait at most PCRLv2's). Records samples/s, the data-wait
   fraction, peak GPU memory, and whether the loss stayed finite and fell.
5. ``monai_anchor``: the same SwinUNETR and crop size through MONAI's
   SwinUNETR pre-training pipeline (``monai_anchor.py``) on the same CT
   files, timed the same way.
6. ``finetune``: publishes the DAE run's encoder to the run's registry,
   pulls it by alias and fine-tunes it on the labelled phantoms, on the GPU.
7. ``summary``: a table with the device name, and OUT/summary.json.

``--dry-run`` (no GPU needed, what CI runs): builds the wheel set for this
Python, checks its size, and runs every step at CPU size inside an
interpreter that sees only the GPU image's distributions (linked from this
environment), those wheels and the repository: a module the steps need
that neither provides fails the dry run.

Exits 0 when every step ran; aims missed are reported, not failures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import wheels  # noqa: E402

STEPS = ("setup", "kernel_tests", "kernel_bench", "pretrain", "monai_anchor", "finetune")
AIMS = {"kernel_vs_eager": 3.0, "kernel_vs_compile": 1.2, "kernel_hbm_fraction": 0.7, "ours_vs_monai": 1.5, "data_wait_max": 0.05}


class Check:
    """What every step shares: the output folder, the interpreter and environment children run with, the sizes."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out.resolve()
        self.dry = args.dry_run
        self.python = sys.executable
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
        self.env.pop("MLFLOW_TRACKING_URI", None)  # the runs' own SQLite store under OUT/work
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        if self.dry:
            self.env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        self.work = self.out / "work"
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, cmd: list[str], log: str, timeout: float, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        """A child process; its output goes to OUT/logs/<log>.log, and a non-zero exit raises with the log's tail."""
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{log}.log", "w") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            p = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env or self.env, cwd=cwd, timeout=timeout, text=True)
        if p.returncode != 0:
            tail = (logs / f"{log}.log").read_text()[-3000:]
            raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {p.returncode} (OUT/logs/{log}.log):\n{tail}")
        return p

    def python_json(self, code: str, log: str, timeout: float = 300) -> Any:
        """Run ``code`` (which prints one JSON object last) in the steps' interpreter."""
        self.run([self.python, "-c", code], log, timeout)
        return json.loads((self.out / "logs" / f"{log}.log").read_text().strip().splitlines()[-1])


# -- 1. setup ---------------------------------------------------------------------------------------

TORCH_INFO = """
import json, os, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "torch_file": os.path.realpath(torch.__file__), "triton": tv, "cuda": cuda,
                  "device": torch.cuda.get_device_name() if cuda else "cpu",
                  "capability": list(torch.cuda.get_device_capability()) if cuda else None,
                  "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None}))
"""


def setup(c: Check) -> dict[str, Any]:
    base = c.python_json(TORCH_INFO, "setup-torch-before")
    if c.dry:
        info = _isolated_environment(c)
    else:
        info = _install_wheels(c)
    after = c.python_json(TORCH_INFO, "setup-torch-after")
    if (after["torch"], after["torch_file"]) != (base["torch"], base["torch_file"]):
        raise RuntimeError(f"the wheels replaced torch: {base['torch']} at {base['torch_file']} became {after['torch']} at {after['torch_file']}")
    if not c.dry and not after["cuda"]:
        raise RuntimeError("no CUDA device: run with --dry-run on a machine without a GPU")
    imported = c.python_json(f"import runpy, sys; sys.argv = ['probe']; runpy.run_path({str(HERE / 'probe.py')!r}, run_name='__main__')",
                             "setup-imports")
    return {**info, "torch": after, "imported_distributions": len(imported), "python": platform.python_version()}


def _install_wheels(c: Check) -> dict[str, Any]:
    found = sorted(c.args.wheels.glob("*.whl")) if c.args.wheels.is_dir() else []
    if not found:
        return {"wheels": 0, "note": f"no wheels in {c.args.wheels}: everything must already be installed"}
    site = c.out / "site"
    stamp = site / ".installed"
    names = "\n".join(w.name for w in found)
    if not (stamp.exists() and stamp.read_text() == names):
        shutil.rmtree(site, ignore_errors=True)
        c.run([c.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(site),
               *map(str, found)], "setup-pip", 600)
        stamp.write_text(names)
    c.env["PYTHONPATH"] = os.pathsep.join([str(site), c.env["PYTHONPATH"]])
    return {"wheels": len(found), "wheels_mb": round(sum(w.stat().st_size for w in found) / 2**20, 1), "site": str(site)}


def _isolated_environment(c: Check) -> dict[str, Any]:
    """A venv that sees only the image's distributions (linked from here), the wheel set (installed) and the repository."""
    report = wheels.build_set(c.out / "wheels", f"{sys.version_info.major}.{sys.version_info.minor}", wheels.image_packages())
    if report["mb"] > c.args.max_wheel_mb:
        raise RuntimeError(f"the wheel set is {report['mb']} MB, over {c.args.max_wheel_mb}")
    site, image = c.out / "site", c.out / "image-site"
    for d in (site, image, c.out / "env"):
        shutil.rmtree(d, ignore_errors=True)
    c.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(site),
           *map(str, sorted((c.out / "wheels").glob("*.whl")))], "setup-pip", 600)
    linked = _link_image(image, wheels.image_side(wheels.image_packages(), set(report["wheels"])))
    c.run([sys.executable, "-m", "venv", "--without-pip", str(c.out / "env")], "setup-venv", 120)
    env_python = c.out / "env" / "bin" / "python"
    purelib = subprocess.run([str(env_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "medssl-gpu-check.pth").write_text(f"{site}\n{image}\n{ROOT}\n")
    c.python = str(env_python)
    c.env.pop("PYTHONPATH", None)  # the .pth file says it all
    return {"wheels": len(report["wheels"]), "wheels_mb": report["mb"], "wheel_set": report["wheels"],
            "image_distributions_linked": linked, "optional_not_carried": report["optional_not_carried"]}


def _link_image(dest: Path, image: set[str]) -> int:
    """Link this environment's files of each distribution the GPU image holds into ``dest``; namespace folders link per child."""
    from importlib.metadata import distributions

    dest.mkdir(parents=True)
    count = 0
    for dist in distributions():
        name = wheels.normalise(dist.metadata["Name"] or "")
        if name not in image or not dist.files:
            continue
        files = {f.parts for f in dist.files if not f.parts[0].startswith("..")}
        base = Path(dist.locate_file(""))
        for top in sorted({p[0] for p in files}):
            src = base / top
            if not src.exists():
                continue
            namespace = src.is_dir() and (top, "__init__.py") not in files and not top.endswith((".dist-info", ".libs", ".data"))
            if namespace:  # google/, nvidia/: several distributions share the folder
                (dest / top).mkdir(exist_ok=True)
                for child in sorted({p[1] for p in files if p[0] == top and len(p) > 1}):
                    if not (dest / top / child).exists() and (src / child).exists():
                        (dest / top / child).symlink_to(src / child)
            elif not (dest / top).exists():
                (dest / top).symlink_to(src)
        count += 1
    return count


# -- 2, 3. the kernels ------------------------------------------------------------------------------

def kernel_tests(c: Check) -> dict[str, Any]:
    xml = c.out / "kernel_tests.xml"
    cmd = [c.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py", f"--junitxml={xml}"]
    env = dict(c.env)
    if c.dry:  # the interpreter is slow and CI runs the whole file anyway: one test proves the plumbing
        cmd += ["-k", "philox_reference_matches_triton"]
    else:
        env["MEDSSL_KERNEL_TEST_DEVICE"] = "cuda"
    try:
        c.run(cmd, "kernel_tests", 1200, env=env)
    finally:
        counts = _junit_counts(xml)
    return {**counts, "device": "cuda, compiled" if not c.dry else "cpu, interpreted"}


def _junit_counts(xml: Path) -> dict[str, Any]:
    if not xml.exists():
        return {}
    import xml.etree.ElementTree as ET

    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{t.get('classname')}::{t.get('name')}" for t in suite.iter("testcase") if t.find("failure") is not None or t.find("error") is not None]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"failed": failed}


def kernel_bench(c: Check) -> dict[str, Any]:
    out = c.out / "kernels.json"
    if c.dry:
        args = ["--smoke", "--tokens", "8", "--channels", "16", "--batch", "2"]
    else:
        args = ["--tokens", "216,1728,4096", "--channels", "768", "--batch", "8", "--dtype", "bf16"]
    c.run([c.python, "bench/kernels.py", *args, "--out", str(out)], "kernel_bench", 1200)
    result = json.loads(out.read_text())
    rows = result.get("rows", [])
    summary = {"device": result.get("device"), "peak_gbs": result.get("peak_gbs"), "rows": len(rows)}
    if rows and not c.dry:
        summary["min_speedup_vs_eager"] = min(r["fused_vs_eager"] for r in rows)
        summary["min_speedup_vs_compile"] = min(r["fused_vs_compiled"] for r in rows)
        summary["min_speedup_vs_eager_fwd_bwd"] = min(r["fused_vs_eager_fwd_bwd"] for r in rows)
        summary["min_speedup_vs_compile_fwd_bwd"] = min(r["fused_vs_compiled_fwd_bwd"] for r in rows)
        fr = [r["fused_fraction_of_peak"] for r in rows if "fused_fraction_of_peak" in r]
        summary["max_fraction_of_peak"] = max(fr) if fr else None
    return summary


# -- 4. pre-training --------------------------------------------------------------------------------

MAKE_DATA = """
import json, sys
from pathlib import Path
import nibabel as nib
from medssl_scale.synth.phantoms import ct_phantom, mr_phantom
root, n_ct, n_mr, shape = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), tuple(int(s) for s in sys.argv[4].split(","))
images, labels, mr = root / "imagesTr", root / "labelsTr", root / "mr"
for d in (images, labels, mr):
    d.mkdir(parents=True, exist_ok=True)
classes = {}
for i in range(n_ct):
    p = ct_phantom(shape=shape, seed=i)
    classes.update({str(k): v for k, v in p.classes.items()})
    nib.save(nib.Nifti1Image(p.image, p.affine), images / f"ct_{i:03d}_0000.nii.gz")
    nib.save(nib.Nifti1Image(p.label, p.affine), labels / f"ct_{i:03d}.nii.gz")
(root / "dataset.json").write_text(json.dumps({"name": "gpu check phantoms", "labels": {"0": "background", **classes}}))
for i in range(n_mr):
    p = mr_phantom(shape=shape, seed=100 + i)
    nib.save(nib.Nifti1Image(p.image, p.affine), mr / f"mr_{i:03d}.nii.gz")
print(json.dumps({"ct": n_ct, "mr": n_mr, "shape": list(shape), "classes": len(classes)}))
"""


def _dataset(c: Check) -> tuple[Path, Path]:
    """The generated collection (made once) and its ingested dataset."""
    src, data = c.work / "src", c.work / "dataset"
    if not (data / "manifest.jsonl").exists():
        shutil.rmtree(src, ignore_errors=True)
        n_ct, n_mr, shape = (5, 1, "64,64,64") if c.dry else (10, 4, "256,256,160")
        t0 = time.perf_counter()
        c.run([c.python, "-c", MAKE_DATA, str(src), str(n_ct), str(n_mr), shape], "pretrain-make-data", 900)
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        c.run([c.python, "-m", "medssl_scale.cli", "ingest", str(src), "--out", str(data), "--workers", "1" if c.dry else "8",
               "--no-progress"], "pretrain-ingest", 1800)
        c.results.setdefault("_dataset", {}).update(generate_s=round(made, 1), ingest_s=round(time.perf_counter() - t0, 1))
    return src, data


def _runs(c: Check) -> list[tuple[str, str, list[str], int]]:
    """(label, config, overrides, steps) of the pre-training runs."""
    if c.dry:
        return [("dae", "configs/dae/tiny.yaml", ["data.modalities=[CT]"], 3),
                ("pcrlv2", "configs/pcrlv2/tiny.yaml", [], 2),
                ("lrc", "configs/lrc/tiny.yaml", [], 2),
                ("reprec", "configs/reprec/tiny.yaml", [], 2)]
    dae = ["deepspeed.precision=bf16", "data.modalities=[CT]", "data.workers=8"]
    return [("dae", "configs/dae/base.yaml", dae, c.args.dae_steps),
            ("pcrlv2", "configs/pcrlv2/base.yaml", ["data.workers=8"], 15),
            ("lrc", "configs/lrc/base.yaml", ["data.workers=8"], 15),  # super-pixels in the loader: its data wait against PCRLv2's
            ("reprec", "configs/reprec/base.yaml", ["data.workers=8"], 15)]


def pretrain(c: Check) -> dict[str, Any]:
    _, data = _dataset(c)
    runs = c.work / "runs"
    out: dict[str, Any] = {"dataset": c.results.get("_dataset", {})}
    for label, config, overrides, steps in _runs(c):
        common = [f"data.dataset={data}", f"workdir={runs}", f"steps={steps}", f"checkpoint.every={steps}", "tracking.log_every=1",
                  f"tracking.plot_every={steps}", f"optim.warmup_steps={max(1, steps // 5)}", "deepspeed.zero_stage=2"]
        t0 = time.perf_counter()
        try:
            c.run([c.python, "-m", "medssl_scale.cli", "launch", "local", "--nproc", "1", "--config", config, *common, *overrides,
                   "--no-progress", "--resume", "never"], f"pretrain-{label}", 1800)
        except Exception as e:  # the next objective still runs
            out[label] = {"error": str(e)[-1500:]}
            continue
        name = _run_name(config)
        out[label] = {**_curve_summary(runs / name / "metrics.jsonl", warmup=max(1, steps // 4)), "config": config,
                      "overrides": overrides, "wall_s": round(time.perf_counter() - t0, 1), "run_dir": str(runs / name)}
    failed = [k for k, v in out.items() if isinstance(v, dict) and "error" in v]
    if failed:
        raise RuntimeError(f"pre-training failed for {', '.join(failed)}: {json.dumps({k: out[k] for k in failed})[:3000]}")
    return out


def _run_name(config: str) -> str:
    for line in (ROOT / config).read_text().splitlines():
        if line.startswith("name:"):
            return line.split(":", 1)[1].split("#")[0].strip()
    raise ValueError(f"{config}: no name")


def _curve_summary(path: Path, warmup: int) -> dict[str, Any]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    timed = steps[warmup:] or steps
    losses = [r["loss"] for r in steps]
    third = max(1, len(losses) // 3)
    first, last = statistics.mean(losses[:third]), statistics.mean(losses[-third:])
    peak = [r.get("peak_memory_mb") for r in steps if r.get("peak_memory_mb") is not None]
    return {"steps": len(steps), "samples_per_s": round(statistics.median(r["samples_per_s"] for r in timed), 3),
            "samples_per_s_range": [round(min(r["samples_per_s"] for r in timed), 3), round(max(r["samples_per_s"] for r in timed), 3)],
            "data_wait": round(statistics.mean(r["data_wait"] for r in timed), 4),
            "peak_memory_mb": round(max(peak), 1) if peak else None,  # the GPU's allocations; on a CPU the process's peak RSS
            "loss_finite": all(math.isfinite(v) for v in losses), "loss_first_third": first, "loss_last_third": last,
            "loss_falling": last < first}


# -- 5. the MONAI anchor ----------------------------------------------------------------------------

def monai_anchor(c: Check) -> dict[str, Any]:
    src, _ = _dataset(c)
    out = c.out / "monai_anchor.json"
    if c.dry:
        args = ["--steps", "1", "--warmup", "1", "--roi", "64", "--feature-size", "12", "--batch", "1", "--workers", "0", "--precision", "fp32",
                "--device", "cpu"]
    else:
        args = ["--steps", str(c.args.dae_steps), "--warmup", str(max(1, c.args.dae_steps // 4)), "--roi", "96",
                "--feature-size", "48", "--workers", "4", "--precision", "bf16"]
    c.run([c.python, str(HERE / "monai_anchor.py"), "--src", str(src / "imagesTr"), *args, "--out", str(out)], "monai_anchor", 1800)
    result = json.loads(out.read_text())
    result.pop("steps", None)
    ours = c.results.get("pretrain", {}).get("dae", {})
    if ours.get("samples_per_s"):
        result["ours_dae_samples_per_s"] = ours["samples_per_s"]
        result["ours_vs_monai"] = round(ours["samples_per_s"] / result["crops_per_s"], 3)
    return result


# -- 6. fine-tuning ---------------------------------------------------------------------------------

def finetune(c: Check) -> dict[str, Any]:
    _, data = _dataset(c)
    runs = c.work / "runs"
    run_dir = runs / _run_name(_runs(c)[0][1])
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    uri = f"sqlite:///{runs / 'mlruns.db'}"
    c.run([c.python, "-m", "medssl_scale.cli", "registry", "publish", "--run", run_id, "--name", "gpu-check-dae", "--alias", "champion",
           "--tracking-uri", uri], "finetune-publish", 600)
    steps, crop = (2, 32) if c.dry else (c.args.finetune_steps, 96)
    work = c.work / "finetune"
    c.run([c.python, "-m", "medssl_scale.cli", "finetune", "--encoder", "models:/gpu-check-dae@champion", "--data", str(data),
           "--steps", str(steps), "--crop", str(crop), "--seeds", "1", "--baseline", "none", "--label-fraction", "1.0",
           "--tracking-uri", uri, "--workdir", str(work), f"eval_every={steps}", "modalities=[CT]"], "finetune", 1800)
    results = json.loads((work / "results.json").read_text())
    return {"steps": steps, "crop": crop, "results": results}


# -- 7. summary -------------------------------------------------------------------------------------

def summary(c: Check) -> dict[str, Any]:
    r = c.results
    device = r.get("setup", {}).get("torch", {}).get("device", "unknown")
    aims: dict[str, Any] = {}
    kb = r.get("kernel_bench", {})
    if "min_speedup_vs_eager" in kb:
        aims["kernels: >= 3x eager"] = kb["min_speedup_vs_eager"] >= AIMS["kernel_vs_eager"]
        aims["kernels: >= 1.2x torch.compile"] = kb["min_speedup_vs_compile"] >= AIMS["kernel_vs_compile"]
        if kb.get("max_fraction_of_peak") is not None:
            aims["kernels: >= 70% of HBM peak"] = kb["max_fraction_of_peak"] >= AIMS["kernel_hbm_fraction"]
    anchor = r.get("monai_anchor", {})
    if "ours_vs_monai" in anchor:
        aims["pre-training: >= 1.5x MONAI's samples/s"] = anchor["ours_vs_monai"] >= AIMS["ours_vs_monai"]
    runs = r.get("pretrain", {})
    dae = runs.get("dae", {})
    if "data_wait" in dae:
        aims["pre-training: data wait < 5%"] = dae["data_wait"] < AIMS["data_wait_max"]
    if "data_wait" in runs.get("lrc", {}) and "data_wait" in runs.get("pcrlv2", {}):
        aims["LRC: data wait at most PCRLv2's"] = runs["lrc"]["data_wait"] <= runs["pcrlv2"]["data_wait"] + 0.005
    rows = [(s, r[s].get("status", "?"), f"{r[s].get('seconds', 0):.0f} s", _headline(s, r[s])) for s in STEPS if s in r]
    width = max(len(x[0]) for x in rows) if rows else 10
    lines = [f"GPU check on {device} ({'dry run, CPU' if c.dry else 'compiled, CUDA'})", ""]
    lines += [f"  {s:<{width}}  {st:<6} {sec:>7}  {h}" for s, st, sec, h in rows]
    if aims:
        lines += ["", "  aims:"] + [f"    {'met    ' if ok else 'NOT met'}  {name}" for name, ok in aims.items()]
    print("\n".join(lines))
    return {"device": device, "dry_run": c.dry, "aims": aims, "steps": {s: r[s].get("status") for s in STEPS if s in r}}


def _headline(step: str, res: dict[str, Any]) -> str:
    if res.get("status") != "ok":
        return res.get("error", "").splitlines()[0][:100] if res.get("error") else ""
    if step == "setup":
        return f"torch {res['torch']['torch']}, triton {res['torch']['triton']}, {res.get('wheels', 0)} wheels"
    if step == "kernel_tests":
        return f"{res.get('tests', 0)} tests, {res.get('failures', 0) + res.get('errors', 0)} failed ({res.get('device')})"
    if step == "kernel_bench":
        if "min_speedup_vs_eager" in res:
            return f"min {res['min_speedup_vs_eager']}x eager, {res['min_speedup_vs_compile']}x compile, peak {res.get('max_fraction_of_peak')}"
        return f"{res.get('rows', 0)} rows"
    if step == "pretrain":
        return "; ".join(f"{k} {v['samples_per_s']} samples/s, wait {v['data_wait']:.1%}, peak {v['peak_memory_mb']} MB, "
                         f"loss {'falling' if v['loss_falling'] else 'NOT falling'}" for k, v in res.items() if isinstance(v, dict) and "samples_per_s" in v)
    if step == "monai_anchor":
        return f"{res['crops_per_s']} crops/s, wait {res['data_wait']:.1%}" + (f"; ours {res['ours_vs_monai']}x" if "ours_vs_monai" in res else "")
    if step == "finetune":
        return f"{res['steps']} steps on {res['crop']}³ crops"
    return ""


# -- driver ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "gpu-check")
    ap.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels", help="wheels to install first (make gpu-wheels)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: the wheel set and every step's plumbing, at CPU size")
    ap.add_argument("--steps", default=",".join(STEPS), help="a subset of " + ",".join(STEPS))
    ap.add_argument("--dae-steps", type=int, default=30, help="DAE steps (and the anchor's), a quarter of them warm-up")
    ap.add_argument("--finetune-steps", type=int, default=10)
    ap.add_argument("--max-wheel-mb", type=float, default=48.0)
    args = ap.parse_args(argv)
    chosen = [s for s in args.steps.split(",") if s]
    if unknown := set(chosen) - set(STEPS):
        ap.error(f"unknown step(s) {sorted(unknown)}")
    c = Check(args)
    c.out.mkdir(parents=True, exist_ok=True)
    table: dict[str, Callable[[Check], dict[str, Any]]] = {
        "setup": setup, "kernel_tests": kernel_tests, "kernel_bench": kernel_bench, "pretrain": pretrain,
        "monai_anchor": monai_anchor, "finetune": finetune}
    started = time.perf_counter()
    for step in [s for s in STEPS if s in chosen]:
        print(f"[gpu-check] {step} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = {"status": "ok", **table[step](c)}
        except Exception as e:
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        c.results[step] = res
        (c.out / f"{step}.json").write_text(json.dumps(res, indent=1) + "\n")
        print(f"[gpu-check] {step}: {res['status']} in {res['seconds']} s", flush=True)
        if step == "setup" and res["status"] != "ok":
            break  # nothing else can run without its environment
    summ = summary(c)
    summ["seconds"] = round(time.perf_counter() - started, 1)
    (c.out / "summary.json").write_text(json.dumps({"summary": summ, **{k: v for k, v in c.results.items() if not k.startswith("_")}},
                                                   indent=1) + "\n")
    return 0 if all(c.results[s]["status"] == "ok" for s in c.results if not s.startswith("_")) else 1


if __name__ == "__main__":
    sys.exit(main())
