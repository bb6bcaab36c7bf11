"""The training engine with real processes: DeepSpeed on CPU (gloo), checkpoints, kill -9 and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, mlflow_server
from ports import free_port
from sample_data import training_dataset

from medssl_scale.train.config import load_run_config
from medssl_scale.schedule import lr_factor

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "dae" / "tiny.yaml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return training_dataset(tmp_path_factory.mktemp("train"))


def medssl(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "medssl_scale.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def run(*args: str, cwd: Path, timeout: float = 240) -> str:
    p = medssl(*args, cwd=cwd)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out
    return out


def curve(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step run again after a resume counts with its last record."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"optim.lrr: Extra inputs are not permitted"):
        load_run_config(TINY, ["optim.lrr=1"])
    with pytest.raises(ValueError, match=r"deepspeed.zero_stage"):
        load_run_config(TINY, ["deepspeed.zero_stage=4"])
    with pytest.raises(ValueError, match=r"steps: Input should be a valid integer"):
        load_run_config(TINY, ["steps=many"])
    cfg = load_run_config(TINY, ["optim.lr=1e-3", "data.dataset=/x"])
    assert cfg.optim.lr == 1e-3 and cfg.objective_settings()[0][0] == "dae"
    with pytest.raises(ValueError, match="min_lr 0.0003 is above lr 0.0001"):
        load_run_config(TINY, ["optim.lr=1e-4"])
    with pytest.raises(ValueError, match="warmup_steps"):
        load_run_config(TINY, ["steps=2"])
    # Objective and model settings are checked on load, before any process starts.
    with pytest.raises(ValueError, match="objectives.dae.mask_ratio: Input should be less than or equal to 1"):
        load_run_config(TINY, ["objectives.dae.mask_ratio=2"])
    with pytest.raises(ValueError, match="objectives.dae.model: unknown model 'conv_aee'"):
        load_run_config(TINY, ["objectives.dae.model.name=conv_aee"])
    with pytest.raises(ValueError, match="conv_ae: .*unexpected keyword argument 'widths'"):
        load_run_config(TINY, ["objectives.dae.model.widths=[4]"])
    with pytest.raises(ValueError, match="unknown objective 'mae'"):
        load_run_config(TINY, ["objectives={mae: 1.0}"])


def test_warmup_then_cosine():
    f = [lr_factor(s, 10, 2, 1.0, 0.1) for s in range(11)]
    # Worked by hand: warmup (s + 1) / 2 for s < 2; then 0.1 + 0.9 * (1 + cos(pi * (s - 2) / 8)) / 2, with
    # cos(pi/4) = 0.70710678, cos(3pi/4) = -0.70710678, cos(7pi/8) = -0.92387953.
    want = {0: 0.5, 1: 1.0, 2: 1.0,
            4: 0.86819805,  # 0.1 + 0.45 * 1.70710678
            6: 0.55,        # 0.1 + 0.45 * 1
            8: 0.23180195,  # 0.1 + 0.45 * 0.29289322
            9: 0.13425421,  # 0.1 + 0.45 * 0.07612047
            10: 0.1}        # the floor
    assert {s: round(f[s], 8) for s in want} == want
    assert all(a >= b for a, b in zip(f[1:], f[2:]))
    assert lr_factor(50, 10, 2, 1.0, 0.1) == 0.1 and lr_factor(10, 10, 2, 2.0, 0.1) == 0.05  # past the end; floor / peak


def test_kill_9_then_resume_equals_the_uninterrupted_run(dataset, tmp_path):
    common = ["pretrain", "--config", str(TINY), "--no-progress", f"data.dataset={dataset}", "steps=10", "checkpoint.every=3"]
    run(*common, "workdir=a", cwd=tmp_path)
    reference = curve(tmp_path / "a" / "dae-tiny")
    assert sorted(reference) == list(range(1, 11)) and reference[10] < reference[1]

    p = medssl(*common, "workdir=b", cwd=tmp_path)
    metrics = tmp_path / "b" / "dae-tiny" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 7):
        time.sleep(0.05)
    p.kill()  # SIGKILL: no chance to clean up, possibly mid-checkpoint
    p.communicate()
    assert p.returncode == -9
    from medssl_scale.train import checkpoint

    resumed_from = checkpoint.latest(tmp_path / "b" / "dae-tiny" / "checkpoints")
    assert resumed_from is not None and resumed_from.name < "step-00000010"  # else this test resumed nothing
    out = run(*common, "workdir=b", cwd=tmp_path)
    assert "finished at step 10" in out
    assert curve(tmp_path / "b" / "dae-tiny") == reference  # step for step, exactly (fp32 on CPU)


def test_sigterm_checkpoints_then_exits(dataset, tmp_path):
    p = medssl("pretrain", "--config", str(TINY), "--no-progress", f"data.dataset={dataset}", "steps=100000", "checkpoint.every=100000",
               cwd=tmp_path)
    metrics = tmp_path / "runs" / "dae-tiny" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 143, out  # not done: a Job must run it again (and it resumes)
    assert "stopped by SIGTERM after a checkpoint" in out
    step = max(curve(tmp_path / "runs" / "dae-tiny"))
    assert (tmp_path / "runs" / "dae-tiny" / "checkpoints" / f"step-{step:08d}" / "COMPLETE").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_zero_stage(dataset, tmp_path, stage):
    out = run("launch", "local", "--nproc", "2", "--config", str(TINY), "--no-progress", f"data.dataset={dataset}", "steps=6",
              "checkpoint.every=6", f"deepspeed.zero_stage={stage}", cwd=tmp_path, timeout=300)
    assert "finished at step 6 (2 rank(s))" in out
    run_dir = tmp_path / "runs" / "dae-tiny"
    ckpt = run_dir / "checkpoints" / "step-00000006"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "rank-0.pt").exists() and (ckpt / "rank-1.pt").exists()
    # DeepSpeed's own zero-to-fp32 conversion works on our checkpoints, from any stage.
    out_file = tmp_path / "fp32.pt"
    code = ("import sys, torch; from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as f; "
            "torch.save(f(sys.argv[1], tag='step-00000006'), sys.argv[2])")
    conv = subprocess.run([sys.executable, "-c", code, str(run_dir / "checkpoints"), str(out_file)], capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert conv.returncode == 0, conv.stdout + conv.stderr
    import torch

    state = torch.load(out_file)
    from medssl_scale.objectives import build_objective

    want = build_objective("dae", model={"name": "conv_ae", "channels": (8, 16, 32)}, projection_dim=16).state_dict()
    assert set(state) == set(want) and all(state[k].shape == want[k].shape and state[k].dtype == torch.float32 for k in want)


def _mlflow_run(uri: str, experiment: str = "medssl-tiny"):
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


def _check_tracked(client, run, steps: int) -> None:
    assert run.info.status == "FINISHED"
    assert run.data.params["deepspeed.zero_stage"] == "2" and run.data.params["objectives.dae.model.name"] == "conv_ae"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, steps + 1))
    for name in ("lr", "samples_per_s", "data_wait", "peak_memory_mb", "recon_l1"):
        assert client.get_metric_history(run.info.run_id, name), name
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots", "checkpoint"} <= top
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/loss.png" in plots and any("reconstruction" in p for p in plots)
    ckpt = {a.path for a in client.list_artifacts(run.info.run_id, f"checkpoint/step-{steps:08d}")}
    assert f"checkpoint/step-{steps:08d}/COMPLETE" in ckpt


def test_local_tracking_needs_no_server(dataset, tmp_path):
    run("pretrain", "--config", str(TINY), "--no-progress", f"data.dataset={dataset}", "steps=4", "tracking.plot_every=2", cwd=tmp_path)
    assert (tmp_path / "runs" / "mlruns.db").exists()
    client, r = _mlflow_run(f"sqlite:///{tmp_path / 'runs' / 'mlruns.db'}")
    _check_tracked(client, r, 4)
    assert (tmp_path / "runs" / "mlartifacts").is_dir()


def test_tracking_server(dataset, tmp_path):
    with mlflow_server(tmp_path) as uri:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, "-m", "medssl_scale.cli", "pretrain", "--config", str(TINY), "--no-progress",
                            f"data.dataset={dataset}", "steps=3", "tracking.plot_every=3"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stdout + p.stderr
        assert not (tmp_path / "runs" / "mlruns.db").exists()  # everything went to the server
        client, r = _mlflow_run(uri)
        _check_tracked(client, r, 3)


def _wait_for(cond, proc, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None and time.monotonic() < deadline, f"the run ended before {what}"
        time.sleep(0.005)


def test_a_tracking_outage_does_not_stop_training(dataset, tmp_path):
    """The real server is stopped mid-run and started again on its port and store: the run finishes, warns of the
    outage, and MLflow ends with every step exactly once, the values of metrics.jsonl."""
    import mlflow

    server = MlflowServer(tmp_path / "mlflow")
    uri = server.start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    log = tmp_path / "train.log"
    steps = 20
    p = subprocess.Popen([sys.executable, "-m", "medssl_scale.cli", "pretrain", "--config", str(TINY), "--no-progress",
                          f"data.dataset={dataset}", f"steps={steps}", "checkpoint.every=3", "tracking.plot_every=100"],
                         cwd=tmp_path, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    metrics = tmp_path / "runs" / "dae-tiny" / "metrics.jsonl"
    try:
        # Frozen while the server goes: steps 1-3 went with the checkpoint at 3, step 4 waits in memory.
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, p, "step 4")
        p.send_signal(signal.SIGSTOP)
        client = mlflow.MlflowClient(uri)
        (r,) = client.search_runs([client.get_experiment_by_name("medssl-tiny").experiment_id])
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [1, 2, 3]
        server.stop()
        p.send_signal(signal.SIGCONT)
        _wait_for(lambda: "MLflow tracking failed" in log.read_text(), p, "a send failed")
        p.send_signal(signal.SIGSTOP)
        done = len(metrics.read_text().splitlines())
        assert done < steps, "the outage was not mid-run"
        server.start()  # same port, same store
        p.send_signal(signal.SIGCONT)
        p.wait(timeout=240)
        out = log.read_text()
        assert p.returncode == 0 and f"finished at step {steps}" in out, out
        assert "training goes on" in out  # the outage is a warning, not an error
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [x["step"] for x in records] == list(range(1, steps + 1))
        r = client.get_run(r.info.run_id)
        assert r.info.status == "FINISHED"
        for name in ("loss", "recon_l1", "lr", "samples_per_s"):
            points = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, name))
            assert points == [(x["step"], x[name]) for x in records], name  # nothing lost, nothing twice
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
        server.stop()


def test_demo_runs_the_main_job_end_to_end(tmp_path):
    """The README's main job, smallest setting: ingest, 2-rank pre-training, publish, pull by alias, fine-tune vs scratch."""
    out = run("demo", "--workdir", str(tmp_path / "demo"), "--small", cwd=tmp_path, timeout=600)
    work = tmp_path / "demo"
    assert "finished at step 20 (2 rank(s))" in out
    assert (work / "crops.png").stat().st_size > 0 and any((work / "thumbnails").iterdir())
    assert (work / "runs" / "dae-tiny" / "checkpoints" / "step-00000020" / "COMPLETE").exists()
    assert len((work / "runs" / "dae-tiny" / "metrics.jsonl").read_text().splitlines()) == 20
    assert "demo-encoder version 1 (alias champion)" in out and "pretrained" in out and "scratch" in out
    table = json.loads((work / "finetune" / "results.json").read_text())
    assert table["label_fraction"] == 0.1 and table["inits"] == ["pretrained", "scratch"] and table["rows"][0]["class"] == "liver"
    uri = f"sqlite:///{(work / 'runs' / 'mlruns.db').absolute()}"
    assert f"mlflow ui --backend-store-uri {uri}" in out
    # Another process pulls the encoder from what the demo left behind.
    p = subprocess.run([sys.executable, "-c", "import medssl_scale; print(type(medssl_scale.load_encoder('models:/demo-encoder@champion')).__name__)"],
                       env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("ConvEncoder"), p.stderr


def test_two_nodes_through_torchrun(dataset, tmp_path):
    """Two torchrun launchers on 127.0.0.1 (--nnodes 2, one process each), as two pods would run them."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={r}", "--nproc-per-node=1",
                               "--master-addr=127.0.0.1", f"--master-port={port}", str(ROOT / "launchers" / "rank.py"),
                               "--config", str(TINY), "--no-progress", f"data.dataset={dataset}", "steps=4", "checkpoint.every=2"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(outs)
    assert "finished at step 4 (2 rank(s))" in outs[0]
    ckpt = tmp_path / "runs" / "dae-tiny" / "checkpoints" / "step-00000004"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "rank-1.pt").exists()


def test_bf16_run(dataset, tmp_path):
    out = run("pretrain", "--config", str(TINY), "--no-progress", f"data.dataset={dataset}", "steps=3", "deepspeed.precision=bf16",
              "tracking.plot_every=3", cwd=tmp_path)
    assert "finished at step 3" in out
    losses = curve(tmp_path / "runs" / "dae-tiny")
    assert len(losses) == 3 and all(0 < v < 10 for v in losses.values())


def test_resume_refuses_other_settings_and_fresh_starts_over_a_run(dataset, tmp_path):
    common = ["pretrain", "--config", str(TINY), "--no-progress", f"data.dataset={dataset}", "steps=3"]
    run(*common, cwd=tmp_path)
    for extra, expect in ((["optim.lr=1e-2"], "other settings for optim"), (["--resume", "never"], "holds a run already"),
                          (["--resume", str(tmp_path / "nope")], "not a complete checkpoint")):
        p = medssl(*common, *extra, cwd=tmp_path)
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 2 and expect in out, out
    out = run(*common, "tracking.log_every=2", cwd=tmp_path)  # tracking settings may change
    assert "finished at step 3" in out


def test_sigterm_to_the_launcher_checkpoints_every_rank(dataset, tmp_path):
    p = medssl("launch", "local", "--nproc", "2", "--config", str(TINY), "--no-progress", f"data.dataset={dataset}",
               "steps=100000", "checkpoint.every=100000", cwd=tmp_path, start_new_session=True)
    metrics = tmp_path / "runs" / "dae-tiny" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)  # what a pod's shutdown does: the whole process group
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0, out  # stopped, not finished
    ckpts = [c for c in (tmp_path / "runs" / "dae-tiny" / "checkpoints").iterdir() if (c / "COMPLETE").exists()]
    assert len(ckpts) == 1, out
    assert (ckpts[0] / "rank-0.pt").exists() and (ckpts[0] / "rank-1.pt").exists()
