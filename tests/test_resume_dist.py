"""Two ranks, ZeRO-2 and ZeRO-3: kill -9 of ONE rank mid-run, then a resume. The curve equals the uninterrupted
run's step for step, in metrics.jsonl and in MLflow (a real server), where every step is recorded exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow_server import MlflowServer
from sample_data import training_dataset

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "dae" / "tiny.yaml"
STEPS, EVERY = 8, 3
TRACKED = ("loss", "recon_l1", "lr")  # the figures a resume must reproduce (timings differ by nature)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return training_dataset(tmp_path_factory.mktemp("data"), n_patients=3, n_mr=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    s.start()
    yield s
    s.stop()


def _launch(workdir: Path, stage: int, experiment: str, uri: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "medssl_scale.cli", "launch", "local", "--nproc", "2", "--config", str(TINY), "--no-progress",
           f"data.dataset={workdir.parent / 'dataset'}", f"workdir={workdir}", f"steps={STEPS}", f"checkpoint.every={EVERY}",
           f"deepspeed.zero_stage={stage}", f"tracking.experiment={experiment}", f"tracking.plot_every={STEPS}"]
    return subprocess.Popen(cmd, cwd=workdir.parent, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _finish(p: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    p.wait(timeout=timeout)
    out = log.read_text()
    assert p.returncode == 0, out
    assert f"finished at step {STEPS} (2 rank(s))" in out, out
    return out


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _ranks(launcher: int) -> dict[int, int]:
    """RANK -> pid of the processes torchrun started under ``launcher``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in v)
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def _mlflow_curves(uri: str, experiment: str) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run.info.status, {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in TRACKED}


@pytest.mark.parametrize("stage, victim", [(2, 1), (3, 0)], ids=["zero2-kill-rank1", "zero3-kill-rank0"])
def test_kill_one_rank_then_resume_equals_the_uninterrupted_run(dataset, server, tmp_path, stage, victim):
    from medssl_scale.train import checkpoint

    os.symlink(dataset, tmp_path / "dataset")
    ref_dir, run_dir = tmp_path / "ref" / "dae-tiny", tmp_path / "b" / "dae-tiny"
    _finish(_launch(tmp_path / "ref", stage, f"ref-z{stage}", server.uri, tmp_path / "ref.log"), tmp_path / "ref.log")
    reference = _records(ref_dir)
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))

    # Freeze both ranks once a step after the first checkpoint is on record, so the kill lands mid-run for sure.
    p = _launch(tmp_path / "b", stage, f"resume-z{stage}", server.uri, tmp_path / "b.log")
    deadline = time.monotonic() + 240
    while len(_records(run_dir)) < EVERY + 1:
        assert p.poll() is None and time.monotonic() < deadline, "the run ended before the kill point: " + (tmp_path / "b.log").read_text()
        time.sleep(0.005)
    ranks = _ranks(p.pid)
    assert sorted(ranks) == [0, 1], ranks
    for pid in ranks.values():
        os.kill(pid, signal.SIGSTOP)
    done = len(_records(run_dir))
    resumed_from = checkpoint.latest(run_dir / "checkpoints")
    assert EVERY < done < STEPS and resumed_from is not None and resumed_from.name < checkpoint.tag_for(STEPS), (done, resumed_from)
    os.kill(ranks[victim], signal.SIGKILL)  # one rank only, not the launcher
    for rank, pid in ranks.items():
        if rank != victim:
            os.kill(pid, signal.SIGCONT)
    p.wait(timeout=240)
    assert p.returncode != 0, (tmp_path / "b.log").read_text()  # the launcher saw a rank die: not done
    before = _mlflow_curves(server.uri, f"resume-z{stage}")[1]["loss"]
    start = int(checkpoint.latest(run_dir / "checkpoints").name.removeprefix("step-"))
    assert start < STEPS and [s for s, _ in before] == sorted({s for s, _ in before})

    out = _finish(_launch(tmp_path / "b", stage, f"resume-z{stage}", server.uri, tmp_path / "b2.log"), tmp_path / "b2.log")
    assert f"resumed from {run_dir / 'checkpoints'}/step-{start:08d}" in out
    resumed = _records(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # every step once
    for k in TRACKED:  # step for step, exactly (fp32 on CPU)
        assert [r[k] for r in resumed] == [r[k] for r in reference], k

    status, curves = _mlflow_curves(server.uri, f"resume-z{stage}")
    assert status == "FINISHED"
    for k in TRACKED:
        assert curves[k] == [(r["step"], r[k]) for r in reference], k  # each step exactly once, the uninterrupted values
    if victim == 1:
        # The surviving rank 0 sent what it had before failing: steps past the checkpoint were on record
        # before the resume recomputed them, which is the duplicate this guards against.
        assert max(s for s, _ in before) > start, (before, start)
