"""Something the suite needs from outside Python (a binary, a codec, bundled test data) is missing.

Under ``CI=true`` that fails the test, saying what to install: CI must never pass by skipping what the suite needs.
Elsewhere (a developer's machine) the test skips with the same reason.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(what: str, install: str) -> NoReturn:
    """Fail under CI=true, skip elsewhere; ``install``: how to provide it."""
    if on_ci():
        pytest.fail(f"{what} is missing and CI=true forbids skipping it: {install}", pytrace=False)
    pytest.skip(f"{what} is missing: {install}")
