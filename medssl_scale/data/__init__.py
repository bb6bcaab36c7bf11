"""Training data: random crops from the Zarr store, streams from the shards, views, and a resumable loader.

Names are imported on first use: the ``medssl`` command line imports this
package for its ``preview`` subcommand and should not pay for torch and
MONAI when it runs ``ingest``.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Catalog": "catalog", "VolumeInfo": "catalog", "DataConfig": "config", "CropDataset": "crops",
    "Loader": "loader", "EpochPlan": "plan", "PlanSampler": "plan", "Sample": "plan", "ShardStream": "stream",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
