"""MLflow tracking, rank 0 only: params, per-step metrics, the config, plots, the final checkpoint.

Without ``MLFLOW_TRACKING_URI`` the store is SQLite at ``WORKDIR/mlruns.db``
with artifacts in ``WORKDIR/mlartifacts``: nothing needs a server. With it
set, the tracking server it names. A resumed run continues the same MLflow
run (its id is kept in the run directory), so one run has one curve, with
each step once: MLflow cannot delete a metric point, so a step already on
record (sent by the life that was killed) is never sent again, and steps at
or before the checkpoint that never reached MLflow are sent from
``metrics.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from medssl_scale.mlflow_access import redact, tracking_uri
from medssl_scale.train.config import RunConfig

RUN_ID_FILE = "mlflow_run_id"
log = logging.getLogger(__name__)
NOT_LOSSES = {"step", "lr", "samples_per_s", "data_wait", "peak_memory_mb"}  # every other per-step figure is a loss term
MAX_PENDING = 100_000  # steps of metrics held through a tracking outage


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]  # MLflow's limit on a param value
    return out


def _manifest_sha256(dataset: str) -> str:
    """Which exact dataset a run saw, for the encoder's provenance (the manifest accounts for every input)."""
    from medssl_scale.store.layout import DatasetDir

    path = DatasetDir(Path(dataset)).manifest
    if not path.is_file():
        return "unknown"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tracker:
    """Does nothing on ranks other than 0.

    Opening the run fails loudly (a wrong URI should stop a job before it
    spends compute). Once training, a tracking outage only warns: metrics wait
    in memory and go with the next successful flush, plots of that moment are
    lost, and the checkpoints, the source of truth for a resume, are unaffected.
    """

    def __init__(self, cfg: RunConfig, enabled: bool):
        self.enabled = enabled
        self.cfg = cfg
        self.history: list[dict[str, Any]] = []
        self._pending: list[tuple[int, dict[str, float]]] = []
        self.failures = 0
        # metric -> {step: value} the MLflow run held when last asked (on resume, after a failed send): never sent twice.
        self._on_record: dict[str, dict[int, float]] = {}
        self._unsure = False  # a failed send may have reached the server: ask it before sending again
        self._differed: set[str] = set()
        if not enabled:
            return
        import mlflow

        self.mlflow = mlflow
        workdir = Path(cfg.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        local = "MLFLOW_TRACKING_URI" not in os.environ  # before set_tracking_uri, which sets it
        mlflow.set_tracking_uri(tracking_uri(workdir))
        exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            location = (workdir / "mlartifacts").absolute().as_uri() if local else None
            exp_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        id_file = cfg.run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None
        # System figures (CPU, memory, GPU) come from MLflow's own sampler, every 10 s.
        self.run = mlflow.start_run(run_id=run_id, experiment_id=exp_id, run_name=cfg.tracking.run_name or cfg.name,
                                    log_system_metrics=True)
        id_file.write_text(self.run.info.run_id + "\n")
        self.run_id = self.run.info.run_id
        try:
            manifest = _manifest_sha256(cfg.data.dataset)
            if run_id is None:
                mlflow.set_tags({"medssl.objective": ",".join(cfg.objectives), "medssl.dataset": str(cfg.data.dataset),
                                 "medssl.dataset_manifest_sha256": manifest})
                mlflow.log_params(_flatten(cfg.model_dump(mode="json")))
                mlflow.log_artifact(str(cfg.run_dir / "config.yaml"))
            else:
                # The provenance is what the run started on; a changed dataset is said, not silently recorded over.
                was = self.run.data.tags.get("medssl.dataset_manifest_sha256")
                if was and was != manifest:
                    log.warning("the dataset's manifest changed since this run started (%s... then, %s... now); "
                                "the run keeps its first record", was[:12], manifest[:12])
                    mlflow.set_tag("medssl.dataset_manifest_changed_on_resume", manifest)
                self._read_record(self.run.data.metrics)
                self._backfill(cfg.run_dir / "metrics.jsonl")
        except BaseException:
            mlflow.end_run("FAILED")  # not left open for MLflow's exit hook to mark FINISHED
            raise

    def metrics(self, step: int, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        self._pending.append((step, {k: float(v) for k, v in record.items() if k != "step"}))
        if len(self._pending) > MAX_PENDING:  # a long outage: memory stays bounded; metrics.jsonl has every step
            del self._pending[: len(self._pending) - MAX_PENDING]
        if len(self._pending) >= 20:
            self.flush()

    def _read_record(self, keys) -> None:
        """Every point the run holds for ``keys`` (not MLflow's own system/ figures, which it sends itself)."""
        client = self.mlflow.tracking.MlflowClient()
        for key in keys:
            if not key.startswith("system/"):
                self._on_record[key] = {m.step: m.value for m in client.get_metric_history(self.run_id, key)}

    def _backfill(self, path: Path) -> None:
        """Steps the checkpoint covers but a tracking outage kept from MLflow: a resume will not run them again."""
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                self._pending.append((int(rec["step"]), {k: float(v) for k, v in rec.items() if k != "step"}))

    def _unsent(self) -> list[tuple[str, float, int]]:
        """The pending points MLflow does not hold yet, each once; warns if a loss term on record differs."""
        out, seen = [], set()
        for step, rec in self._pending:
            for k, v in rec.items():
                held = self._on_record.get(k, {})
                if step in held:
                    if k not in NOT_LOSSES and k not in self._differed and not _same(held[step], v):
                        self._differed.add(k)
                        log.warning("%s at step %d: MLflow holds %r from before the resume, the resumed run computed %r; "
                                    "MLflow keeps its point, metrics.jsonl has the resumed value", k, step, held[step], v)
                elif (k, step) not in seen:
                    seen.add((k, step))
                    out.append((k, v, step))
        return out

    def flush(self) -> None:
        if not self.enabled or not self._pending:
            return
        from mlflow.entities import Metric

        if self._unsure and not self._guard("metrics", lambda: self._read_record({k for _, rec in self._pending for k in rec})):
            return
        self._unsure = False
        now = int(time.time() * 1000)
        unsent = self._unsent()
        metrics = [Metric(k, v, now, step) for k, v, step in unsent]
        if self._guard("metrics", lambda: self.mlflow.tracking.MlflowClient().log_batch(self.run_id, metrics=metrics)):
            self._pending = []  # sent once: nothing leaves the queue to come back, so what was sent is not kept
        else:
            self._unsure = True  # part of the batch may have been stored before the failure

    def _guard(self, what: str, call) -> bool:
        try:
            call()
        except Exception as e:  # noqa: BLE001 - any tracking failure: the training goes on
            self.failures += 1
            log.warning("MLflow tracking failed (%s; %d failure(s) so far), training goes on: %s", what, self.failures, e)
            return False
        return True

    def plots(self, step: int, visuals: dict[str, Any] | None) -> None:
        """Loss curves so far and a few mid-slices of input, disrupted input and reconstruction, as PNG artifacts."""
        if not self.enabled:
            return
        try:
            self._guard("plots", lambda: self._plots(step, visuals))
        finally:
            import matplotlib.pyplot as plt

            plt.close("all")  # a failed upload must not leave its figures behind, outage after outage

    def _plots(self, step: int, visuals: dict[str, Any] | None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        losses = sorted({k for r in self.history for k in r if k not in NOT_LOSSES})
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in losses:
            pts = [(r["step"], r[k]) for r in self.history if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=1e-3)  # contrastive terms go negative
        ax.legend()
        ax.set_title(f"{self.cfg.name}: loss terms (this session's steps)")
        fig.tight_layout()
        self.mlflow.log_figure(fig, "plots/loss.png")
        plt.close(fig)
        if visuals:
            fig, axes = plt.subplots(1, len(visuals), figsize=(3 * len(visuals), 3))
            for ax, (name, vol) in zip(axes, visuals.items()):
                ax.imshow(vol[vol.shape[0] // 2].numpy()[::-1], cmap="gray")
                ax.set_title(name)
                ax.axis("off")
            fig.suptitle(f"step {step}")
            fig.tight_layout()
            self.mlflow.log_figure(fig, f"plots/reconstruction-step{step:08d}.png")
            plt.close(fig)

    def finish(self, status: str, checkpoint: Path | None) -> None:
        if not self.enabled:
            return
        self.flush()
        if self._pending:
            log.warning("%d step(s) of metrics could not reach MLflow; they are in the run's metrics.jsonl", len(self._pending))
        if checkpoint is not None and not self._guard("final checkpoint", lambda: self._upload_checkpoint(checkpoint)):
            self._guard("status", lambda: self.mlflow.set_tag("medssl.checkpoint_upload", "failed: publish needs it; rerun to upload"))
        self._guard("status", lambda: self.mlflow.set_tag("medssl.status", status))
        end = {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED")
        self._guard("end of run", lambda: self.mlflow.end_run(end))

    def _upload_checkpoint(self, checkpoint: Path) -> None:
        """Every file, then the COMPLETE marker: an upload cut short is never taken for a checkpoint."""
        from medssl_scale.train.checkpoint import MARKER

        dest = f"checkpoint/{checkpoint.name}"
        for path in sorted(checkpoint.rglob("*")):
            if path.is_file() and path.name != MARKER:
                rel = path.parent.relative_to(checkpoint)
                self.mlflow.log_artifact(str(path), artifact_path=dest if rel == Path(".") else f"{dest}/{rel.as_posix()}")
        self.mlflow.log_artifact(str(checkpoint / MARKER), artifact_path=dest)
