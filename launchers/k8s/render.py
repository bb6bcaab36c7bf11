"""From a run config and a few flags to the manifests of a job, as YAML."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from launchers.k8s import manifests as m


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    # The config travels inside a ConfigMap: keep it readable there as a block.
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def dump(objs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, width=120)


def pod_config(config: Path | str, overrides: list[str], dataset: str | None = None) -> tuple[str, str]:
    """The run config as the pods see it: validated, with the dataset and workdir on the cluster's volumes.

    Returns (resolved YAML, run name). ``dataset``: the dataset's directory on
    the datasets volume; by default the last part of the config's ``data.dataset``.
    """
    from medssl_scale.train.config import load_run_config

    cfg = load_run_config(config, overrides)  # errors name the key, before anything reaches the cluster
    name = dataset or PurePosixPath(cfg.data.dataset).name
    cfg = load_run_config(config, [*overrides, f"data.dataset={m.DATASETS}/{name}", f"workdir={m.RUNS}"])
    return cfg.to_yaml(), cfg.name


def write(objs: list[dict[str, Any]], out: Path, name: str) -> Path:
    """One multi-document file, so ``kubectl apply -f DIR`` takes it (and nothing else is in the way)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"
    path.write_text(dump(objs))
    return path
