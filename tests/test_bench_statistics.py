"""The downstream benchmark's statistics, against values worked by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _downstream():
    spec = importlib.util.spec_from_file_location("bench_downstream", ROOT / "bench" / "downstream.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_downstream_sample_std_and_paired_t_interval_by_hand():
    ds = _downstream()
    # seeds 0.30, 0.50: mean 0.40, sample std |0.30 - 0.50| / sqrt(2) = 0.141421 (the population std would be 0.10)
    s = ds.seed_stats([0.30, 0.50])
    assert s["mean"] == pytest.approx(0.40) and s["std"] == pytest.approx(0.141421, abs=1e-6)
    assert ds.seed_stats([0.3])["std"] is None
    # differences 0.20, 0.30: mean 0.25, sd 0.070711, se 0.05; t(0.975, 1 df) = 12.7062 -> 0.25 -/+ 0.63531
    d = ds.paired_difference([0.30, 0.50], [0.10, 0.20])
    assert d["per_seed"] == [0.2, 0.3] and d["mean"] == 0.25 and d["std"] == pytest.approx(0.0707, abs=1e-4)
    assert d["ci"] == pytest.approx([-0.3853, 0.8853], abs=1e-4)
    # three seeds, differences 0.1, 0.2, 0.3: sd 0.1, se 0.057735; t(0.975, 2 df) = 4.30265 -> 0.2 -/+ 0.248414
    d3 = ds.paired_difference([0.4, 0.5, 0.6], [0.3, 0.3, 0.3])
    assert d3["ci"] == pytest.approx([-0.0484, 0.4484], abs=1e-4) and "2 degree(s)" in d3["interval"]
