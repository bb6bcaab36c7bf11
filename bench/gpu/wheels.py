"""The wheels the GPU check needs beyond what the GPU machine's image holds, fetched on a CPU machine.

    python bench/gpu/wheels.py [--out .gpu-wheels] [--python-version 3.12] [--max-mb 48]

A GPU machine often has PyTorch, Triton and a scientific stack preinstalled
and no registry to install from. This writes, for that machine's Python,
one wheel per distribution the check imports (``probe.py``) that the
image's list (``image-packages.txt``) lacks, at the versions installed
here, so what runs there is what was tested here. Torch, Triton and CUDA
libraries are never among them: the machine's own stay. DeepSpeed has no
binary wheel on PyPI; its pure-Python wheel is built from the sdist with no
ops compiled (they compile on first use, and the check uses none of them).

One wheel is carried slimmed (``SLIM``): MLflow's, without the web UI's
static files (8 MB of its 12.6), which a check that never serves the UI
does not need; its ``RECORD`` is rewritten to match.

Some distributions are loaded here only because they happen to be
installed: MONAI, pydicom and tifffile try their optional plugins and do
without them (``OPTIONAL``). ``bench/gpu/check.py --dry-run`` proves the set
complete: it runs the check's steps in an interpreter that sees only the
image's distributions, these wheels and the repository.

Exits 1 when a wheel cannot be had or the set exceeds ``--max-mb``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
IMAGE = HERE / "image-packages.txt"
# Imported opportunistically by a package that works without them (MONAI's optional_import, pydicom's
# decoder plugins, tifffile's codecs), or by MLflow parts a client never starts. bench/gpu/check.py --dry-run
# proves each of them optional: it runs every step in an interpreter that lacks them.
OPTIONAL = {
    "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pyjpegls", "imagecodecs", "simpleitk",
    "torchvision", "scikit-learn", "pandas", "pyarrow", "huggingface-hub", "matplotlib", "batchgenerators",
    "uvicorn", "google-auth", "httpx2",
    "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "narwhals", "nnunetv2", "kubernetes",
}
# Parts of a wheel the check never uses, left out of the copy carried (prefixes inside the wheel).
SLIM = {"mlflow": ("mlflow/server/js/",)}
# Never carried: the machine's own builds, which a wheel from here would replace.
MACHINE_OWN = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|pytorch-triton)$")
PLATFORMS = ["manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 38, 39)]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE) -> set[str]:
    return {normalise(line) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def requirements(dist: str) -> set[str]:
    """The distributions ``dist`` (installed here) requires, extras left out."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires(dist) or []
    except PackageNotFoundError:
        return set()
    return {normalise(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in reqs if "extra ==" not in r}


def image_side(image: set[str], carried: set[str]) -> set[str]:
    """The image's distributions as installed here, with what they require here and the image list lacks.

    Here the image's packages come at this environment's versions, whose own
    requirements can differ from the image's versions' (which the image holds). Those are
    the image's to provide, unless a carried distribution requires them: then they must travel.
    """
    needed_by_carried = set().union(*(requirements(d) for d in carried)) if carried else set()
    side, todo = set(), list(image)
    while todo:
        d = todo.pop()
        if d in side:
            continue
        side.add(d)
        todo += [r for r in requirements(d) if r not in side and (r in image or r not in needed_by_carried | carried)]
    return side


def probed(python: str = sys.executable) -> dict[str, str]:
    """{distribution: version} of everything the check's steps import, from a fresh interpreter."""
    out = subprocess.run([python, str(HERE / "probe.py")], capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"bench/gpu/probe.py failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def wanted(found: dict[str, str], image: set[str]) -> dict[str, str]:
    """The distributions to carry: loaded, not on the image, not optional, not the machine's own."""
    return {d: v for d, v in sorted(found.items()) if d not in image and d not in OPTIONAL and not MACHINE_OWN.match(d)}


def _download(dist: str, version: str, out: Path, python: str) -> Path | None:
    before = set(out.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(out), f"{dist}=={version}"]
    if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
        return None
    new = set(out.iterdir()) - before
    return next(iter(new)) if new else _existing(out, dist, version, python)


def _build(dist: str, version: str, out: Path) -> Path:
    """A pure-Python wheel built from the sdist with this environment's build tools (and torch, which DeepSpeed's setup imports)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DS_BUILD_OPS": "0", "DS_SKIP_CUDA_CHECK": "1"}
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-binary", dist, "-w", tmp,
               f"{dist}=={version}"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        built = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or len(built) != 1:
            raise SystemExit(f"no wheel for {dist}=={version}, and building one from its sdist failed:\n{res.stderr[-2000:]}")
        if not built[0].name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"{built[0].name}: built for this machine only, so useless on the GPU machine")
        return Path(shutil.copy2(built[0], out / built[0].name))


def _existing(out: Path, dist: str, version: str, python: str) -> Path | None:
    """A wheel of ``dist==version`` already in ``out`` that ``python`` can install."""
    cp = "cp" + python.replace(".", "")
    for w in out.glob("*.whl"):
        name, ver, *tags = w.name[:-4].split("-")
        pure = tags[-3] in ("py3", "py2.py3") and tags[-2] == "none"
        if normalise(name) == dist and ver == version and (pure or tags[-3] == cp or tags[-2] == "abi3"):
            return w
    return None


def slim(whl: Path, drop: tuple[str, ...]) -> int:
    """Rewrite ``whl`` in place without the files under ``drop`` (RECORD too); returns the bytes saved."""
    import zipfile

    before = whl.stat().st_size
    tmp = whl.with_suffix(".slim")
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        if not any(i.filename.startswith(drop) for i in src.infolist()):
            tmp.unlink(missing_ok=True)
            return 0
        for info in src.infolist():
            if info.filename.startswith(drop):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True) if not line.decode().startswith(drop))
            dst.writestr(info, data)
    tmp.replace(whl)
    return before - whl.stat().st_size


def build_set(out: Path, python: str, image: set[str], found: dict[str, str] | None = None) -> dict[str, object]:
    """Write the wheel set into ``out`` (kept: wheels already there at the right version are reused)."""
    out.mkdir(parents=True, exist_ok=True)
    found = probed() if found is None else found
    want = wanted(found, image)
    wheels: dict[str, str] = {}
    for dist, version in want.items():
        whl = _existing(out, dist, version, python) or _download(dist, version, out, python) or _build(dist, version, out)
        if dist in SLIM:
            slim(whl, SLIM[dist])
        wheels[dist] = whl.name
    keep = set(wheels.values())
    for stale in out.glob("*.whl"):
        if stale.name not in keep:
            stale.unlink()
    size = sum((out / w).stat().st_size for w in keep)
    return {"python": python, "wheels": wheels, "bytes": size, "mb": round(size / 2**20, 1),
            "left_to_the_image": sorted(d for d in found if d in image), "optional_not_carried": sorted(d for d in found if d in OPTIONAL),
            "slimmed": {d: list(v) for d, v in SLIM.items() if d in wheels}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu-wheels")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python (its image has 3.12)")
    ap.add_argument("--max-mb", type=float, default=48.0, help="what may travel with the repository to the GPU machine")
    args = ap.parse_args()
    report = build_set(args.out, args.python_version, image_packages())
    report["max_mb"] = args.max_mb
    (args.out / "wheels.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    if report["mb"] > args.max_mb:
        sizes = sorted(((args.out / w).stat().st_size, w) for w in report["wheels"].values())[::-1][:5]
        raise SystemExit(f"the wheel set is {report['mb']} MB, over {args.max_mb}: largest {[(w, round(b / 2**20, 1)) for b, w in sizes]}")


if __name__ == "__main__":
    main()
