"""The memory report the training-step benchmark reads (MEDSSL_MEMORY_REPORT), from a real one-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sample_data import training_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "dae" / "tiny.yaml"
# conv_ae channels 8,16,32 and the DAE's projection head of 16, as configs/dae/tiny.yaml builds them, worked out
# layer by layer (weights + biases and norm affines): stem 64+8, down 3456+48 and 13824+96, up 4096+16, 6912+48,
# 1024+8, 1728+24, 512+8, output 8+1, projection 1024+32 and 512+16.
TINY_PARAMS = 33465
PAD = 64  # DeepSpeed pads its flat fp32 buffers for alignment: a few bytes, not a copy


def _report(tmp_path: Path, nproc: int) -> Path:
    data = training_dataset(tmp_path / "d", n_patients=2, n_mr=0)
    report = tmp_path / "mem"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MEDSSL_MEMORY_REPORT": str(report)}
    env.pop("MLFLOW_TRACKING_URI", None)
    launch = ["pretrain"] if nproc == 1 else ["launch", "local", "--nproc", str(nproc)]
    res = subprocess.run([sys.executable, "-m", "medssl_scale.cli", *launch, "--config", str(TINY), "--no-progress",
                          f"data.dataset={data}", "data.workers=0", "steps=3", "deepspeed.zero_stage=1",
                          f"workdir={tmp_path / 'runs'}", "tracking.plot_every=100"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    return report


def test_memory_report_counts_the_fp32_master_copy_of_zero1(tmp_path):
    r = json.loads((_report(tmp_path, 1) / "rank-0.json").read_text())
    b = r["bytes"]
    assert r["world_size"] == 1 and r["model_params"] == TINY_PARAMS
    fp32 = 4 * TINY_PARAMS
    # One rank holds everything once: weights, their gradients, and (ZeRO's cost) a second fp32 copy to step.
    for kind in ("params", "grads", "master", "params_after_step"):
        assert fp32 <= b[kind] <= fp32 + PAD, (kind, b)
    assert 2 * fp32 <= b["optimizer_state"] <= 2 * fp32 + 2 * PAD, b  # AdamW's two moments (and a step counter)
    assert 100 < r["peak_rss_mb"] < 8192


def test_memory_report_of_each_rank_halves_master_and_adam_state_on_two_ranks(tmp_path):
    report = _report(tmp_path, 2)
    assert sorted(p.name for p in report.iterdir()) == ["rank-0.json", "rank-1.json"]
    fp32 = 4 * TINY_PARAMS
    for rank in (0, 1):
        r = json.loads((report / f"rank-{rank}.json").read_text())
        b = r["bytes"]
        assert r["world_size"] == 2 and r["rank"] == rank and r["model_params"] == TINY_PARAMS
        assert fp32 <= b["params"] <= fp32 + PAD, b  # ZeRO-1 keeps whole weights on every rank
        # ... but each rank steps only its half: its share of the fp32 master copy and of AdamW's moments.
        assert fp32 / 2 <= b["master"] <= fp32 / 2 + PAD, b
        assert fp32 <= b["optimizer_state"] <= fp32 + 2 * PAD, b
