"""Pre-training objectives by name.

An objective is an ``nn.Module`` that owns its network (and heads) and maps
a batch to a dict of named losses, the weighted total under ``"loss"``:
``objective(batch, step=step, rank=rank)``. ``build_objective(name, **config)``
makes one from plain config data; ``objective.encoder()`` is what gets published.
"""

from __future__ import annotations

import torch.nn as nn

from medssl_scale.named import Registry

OBJECTIVES: Registry[nn.Module] = Registry("objective")
register_objective = OBJECTIVES.register
build_objective = OBJECTIVES.build
objective_names = OBJECTIVES.names

from medssl_scale.objectives import dae, lrc, mixcl, moco, pcrlv2, reprec  # noqa: E402,F401  (register their objectives)
