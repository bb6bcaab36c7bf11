"""Expected values computed by other implementations than the code under test, so a test does not check the code
against itself (e.g. a digest from coreutils' ``sha256sum`` rather than Python's hashlib, which the code uses)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from needs import missing


def sha256sum(paths: list[Path]) -> dict[Path, str]:
    """Hex sha256 of each file, by coreutils."""
    tool = shutil.which("sha256sum")
    if tool is None:
        missing("sha256sum (the independent digest oracle)", "install GNU coreutils")
    out = subprocess.run([tool, "--", *map(str, paths)], capture_output=True, text=True, check=True).stdout.splitlines()
    return {p: line.split()[0] for p, line in zip(paths, out)}
