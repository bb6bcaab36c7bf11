"""What one rank holds in memory, by kind, read from the live engine: the figures behind ZeRO's 1/N.

Enabled by the environment variable ``MEDSSL_MEMORY_REPORT=DIR`` (the
training-step benchmark sets it): each rank then writes ``DIR/rank-R.json``
when its run ends. Bytes are counted once per storage (ZeRO keeps parameters
as views into flat buffers), at the moment the optimizer steps, when the
gradients exist. It counts at the second step (the optimizer state exists after the
first) and then removes its hook, so the steps after it run untouched:

- ``params``: the model's parameters as this rank holds them at the step
  (under ZeRO-3 its partition); ``params_after_step``, counted when the run
  ends, adds what ZeRO-3 keeps gathered between steps (parameters below its
  persistence threshold);
- ``grads``: gradient tensors reachable through ``.grad`` of the model's
  parameters and of the optimizer's (full under stage 0 and 1, the rank's
  partition under 2 and 3);
- ``master``: the optimizer's own copies of the parameters (the fp32 master
  partition of ZeRO 1-3; none under stage 0, which steps the model's tensors);
- ``optimizer_state``: AdamW's moments (and step counters);
- ``other_buffers``: any further tensor the DeepSpeed optimizer object holds
  (flat buffers, reduction buckets);
- ``peak_rss_mb``: the process's resident-set peak (``ru_maxrss``), which on
  CPU includes the interpreter, torch and DeepSpeed themselves.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

ENV = "MEDSSL_MEMORY_REPORT"


def _storages(tensors) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _nested_tensors(obj: Any, depth: int = 3):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _nested_tensors(v, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for v in obj.values():
            yield from _nested_tensors(v, depth - 1)


class MemoryReport:
    def __init__(self, engine: Any, optimizer: torch.optim.Optimizer, path: Path):
        self.engine, self.optimizer, self.path = engine, optimizer, path
        self.snapshot: dict[str, int] = {}
        self._calls = 0
        self._hook = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._count())

    def _count(self) -> None:
        self._calls += 1
        if self._calls == 2:
            self._hook.remove()
        module_params = list(self.engine.module.parameters())
        opt_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        params = self._params()
        master = {k: v for k, v in _storages(opt_params).items() if k not in params}
        grads = _storages([p.grad for p in module_params + opt_params])
        state = _storages(_nested_tensors(list(self.optimizer.state.values())))
        seen = {**params, **master, **grads, **state}
        wrapper = self.engine.optimizer
        other = {} if wrapper is self.optimizer else {
            k: v for k, v in _storages(t for value in vars(wrapper).values() for t in _nested_tensors(value)).items() if k not in seen}
        self.snapshot = {"params": sum(params.values()), "grads": sum(grads.values()), "master": sum(master.values()),
                         "optimizer_state": sum(state.values()), "other_buffers": sum(other.values())}

    def _params(self) -> dict[int, int]:
        module_params = list(self.engine.module.parameters())
        return _storages([p.data for p in module_params] + [getattr(p, "ds_tensor", None) for p in module_params])

    def write(self, rank: int, world: int) -> None:
        numel = sum(max(p.numel(), getattr(p, "ds_numel", 0)) for p in self.engine.module.parameters())
        out = {"rank": rank, "world_size": world, "model_params": numel,
               "bytes": {**self.snapshot, "params_after_step": sum(self._params().values())},
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"rank-{rank}.json").write_text(json.dumps(out) + "\n")


def memory_report(engine: Any, optimizer: torch.optim.Optimizer) -> MemoryReport | None:
    """A report of this rank's tensors at the second optimizer step, if ``MEDSSL_MEMORY_REPORT`` asks for one."""
    where = os.environ.get(ENV)
    return MemoryReport(engine, optimizer, Path(where)) if where else None
