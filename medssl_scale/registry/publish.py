"""Register a pre-training run's encoder as an MLflow model version, and list what is registered.

``publish`` reads the run's final checkpoint and resolved config from its
MLflow artifacts (so it works from any machine that reaches the tracking
server), rebuilds the objective, loads the fp32 weights, and writes the
encoder half in the :mod:`~medssl_scale.registry.format` form as artifacts
of the same run (``encoder/``). The model version points at them and carries
the provenance and the sha256 of every file as tags; a pull checks the bytes
against those tags, which live in the registry's database, not beside the files.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from medssl_scale.registry import format as fmt

TAG = "medssl."
HASH_TAG = TAG + "sha256."


def client(tracking_uri: str | None = None):
    import mlflow

    return mlflow.tracking.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _final_checkpoint(c, run_id: str) -> str:
    steps = [a.path for a in c.list_artifacts(run_id, "checkpoint") if a.is_dir and re.fullmatch(r"checkpoint/step-\d{8}", a.path)]
    if not steps:
        raise ValueError(f"run {run_id} has no checkpoint artifact (checkpoint/step-NNNNNNNN): it has not finished; "
                         "resume it to the end, then publish")
    return max(steps)


def publish(run_id: str, name: str, alias: str | None = None, tracking_uri: str | None = None,
            description: str | None = None) -> Any:
    """Register the encoder of finished run ``run_id`` as a new version of ``name``; returns the ModelVersion."""
    import mlflow
    import torch

    from medssl_scale.config import load_yaml  # bounded: a run's config.yaml comes back from the tracking server
    from medssl_scale.objectives.compose import build_run_objective
    from medssl_scale.train.checkpoint import fp32_state_dict
    from medssl_scale.train.config import RunConfig
    from medssl_scale.mlflow_access import redact

    c = client(tracking_uri)
    try:
        run = c.get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(f"no run {run_id!r} at {redact(c.tracking_uri)}: {e.message}") from None
    ckpt_path = _final_checkpoint(c, run_id)
    with tempfile.TemporaryDirectory(prefix="medssl-publish-") as tmp:
        tmp = Path(tmp)
        config = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml", dst_path=str(tmp / "cfg"),
                                                          tracking_uri=c.tracking_uri))
        cfg = RunConfig.model_validate(load_yaml(config))
        ckpt = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ckpt_path, dst_path=str(tmp / "ckpt"),
                                                        tracking_uri=c.tracking_uri))
        specs = cfg.objective_settings()
        objective_name = "+".join(name for name, _, _ in specs)
        objective, _ = build_run_objective([(n, w, {**cfg.objective_args(n, s), "kernels": "reference"}) for n, w, s in specs])
        fmt.load_strict(objective, fp32_state_dict(ckpt), f"run {run_id} {ckpt_path}")
        encoder = objective.encoder()
        tags = run.data.tags
        source = {"run_id": run_id, "checkpoint": ckpt_path, "objective": objective_name,
                  "dataset_manifest_sha256": tags.get(TAG + "dataset_manifest_sha256", "unknown")}
        out = tmp / "encoder"
        with torch.no_grad():
            hashes = fmt.write(encoder, out, source)
        c.log_artifacts(run_id, str(out), artifact_path="encoder")

    try:
        c.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        c.create_registered_model(name, description="medssl-scale encoder (safetensors + JSON architecture)")
    version_tags = {TAG + "objective": objective_name, TAG + "architecture": encoder.config["name"],
                    TAG + "source_run": run_id, TAG + "checkpoint": ckpt_path, TAG + "format": fmt.FORMAT,
                    TAG + "dataset_manifest_sha256": source["dataset_manifest_sha256"],
                    # Which parts the weights hold, by parameter prefix (a hybrid has cnn and transformer).
                    TAG + "components": ",".join(sorted({k.split(".")[0] for k in encoder.state_dict()})),
                    # Whether pre-training read label maps (MixCL does): a downstream score on those labels is not few-label.
                    TAG + "pretraining_labels": "yes" if cfg.data.labels else "no",
                    **{HASH_TAG + f: h for f, h in hashes.items()}}
    mv = c.create_model_version(name, source=f"{run.info.artifact_uri}/encoder", run_id=run_id, tags=version_tags,
                                description=description)
    if alias:
        c.set_registered_model_alias(name, alias, mv.version)
    return c.get_model_version(name, mv.version)


def recorded_hashes(tags: dict[str, str]) -> dict[str, str]:
    return {k[len(HASH_TAG):]: v for k, v in tags.items() if k.startswith(HASH_TAG)}


def listing(tracking_uri: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
    """One row per model version: name, version, aliases, source run, objective, created, tags."""
    c = client(tracking_uri)
    rows = []
    models = [c.get_registered_model(name)] if name else c.search_registered_models()
    for m in models:
        aliases_of: dict[str, list[str]] = {}
        for alias, version in (m.aliases or {}).items():
            aliases_of.setdefault(str(version), []).append(alias)
        quoted = m.name.replace("'", "\\'")
        for mv in c.search_model_versions(f"name='{quoted}'"):
            rows.append({"name": m.name, "version": int(mv.version), "aliases": sorted(aliases_of.get(str(mv.version), [])),
                         "run_id": mv.run_id, "created": mv.creation_timestamp, "tags": dict(mv.tags)})
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))
