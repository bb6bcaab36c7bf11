"""Which Python distributions the GPU check loads: it runs each step's imports and prints them as JSON.

    python bench/gpu/probe.py            # last line: {"distribution": "version", ...}, stdlib and the project left out

``bench/gpu/wheels.py`` carries every distribution listed here that the GPU
machine's image (``image-packages.txt``) does not hold. A module imported
only inside a function the steps never call stays out, which is why heavy
optional readers (SimpleITK for NRRD/MHA, the DICOM codecs, the MLflow
server, the Kubernetes client) are imported where they are used.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What the check's steps load: the CLI and what its pretrain, launch, ingest (generated NIfTI), registry and
# finetune paths import on first use, DeepSpeed's ZeRO-2 engine, MLflow's SQLite store, the kernels and their
# benchmark, and the MONAI anchor (MONAI's SwinUNETR pre-training pipeline).
MODULES = [
    "medssl_scale.cli", "medssl_scale.train.engine", "medssl_scale.train.tracking", "medssl_scale.data.loader",
    "medssl_scale.objectives", "medssl_scale.models", "medssl_scale.registry", "medssl_scale.downstream.finetune",
    "medssl_scale.kernels.triton_disrupt", "medssl_scale.kernels.triton_token_masking", "medssl_scale.kernels.masked_mse",
    "medssl_scale.kernels.selfcheck", "medssl_scale.synth.phantoms", "launchers.rank", "ingest.runner", "ingest.pipeline",
    "medssl_scale.io.nibabel_io",
    "deepspeed", "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.engine",
    "mlflow", "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store", "alembic",
    "monai.networks.nets", "monai.transforms", "monai.data", "monai.losses",
    "torch.distributed.run", "pytest", "xdist",
]


def loaded_distributions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    tops = {m.split(".")[0] for m in list(sys.modules)} - set(sys.stdlib_module_names)
    owners = packages_distributions()
    out: dict[str, str] = {}
    for top in sorted(tops):
        for dist in owners.get(top, []):
            name = re.sub(r"[-_.]+", "-", dist).lower()
            if name == "medssl-scale":
                continue  # the project travels as source
            try:
                out[name] = version(dist)
            except PackageNotFoundError:
                continue
    return out


def main() -> None:
    sys.path.insert(0, str(ROOT))
    import importlib

    for m in MODULES:
        importlib.import_module(m)
    print(json.dumps(loaded_distributions(), sort_keys=True))  # one line, last: some packages print on import


if __name__ == "__main__":
    main()
