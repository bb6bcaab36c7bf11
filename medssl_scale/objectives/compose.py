"""Several objectives in one run: the first is the host, the others are auxiliary terms on top of it.

``objectives: {pcrlv2: 1.0, lrc: 0.5}``: the host runs its network on the
batch and keeps the dense features of its two views (``dense_views``); an
auxiliary objective (``attach(host)``) adds its loss on those features, with
no second forward pass. The total is the weighted sum; each objective's terms
are reported as ``name.term``. The host's encoder is what gets published.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from medssl_scale.objectives import build_objective


class Composite(nn.Module):
    def __init__(self, parts: list[tuple[str, float, nn.Module]]):
        super().__init__()
        self.parts = nn.ModuleDict({name: module for name, _, module in parts})
        self.weights = {name: weight for name, weight, _ in parts}
        self.host_name = parts[0][0]
        host = parts[0][2]
        for name, _, module in parts[1:]:
            if not hasattr(module, "attach"):
                raise ValueError(f"objectives.{name} cannot be added on top of {self.host_name}: "
                                 "only auxiliary objectives (lrc) can follow the first one")
            module.attach(host)

    @property
    def host(self) -> nn.Module:
        return self.parts[self.host_name]

    def encoder(self) -> nn.Module:
        return self.host.encoder()

    def forward(self, batch: dict[str, Any], step: int = 0, rank: int = 0, micro: int = 0) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = 0.0
        for name, module in self.parts.items():  # the host first: the others read what it kept
            losses = module(batch, step=step, rank=rank, micro=micro)
            total = total + self.weights[name] * losses["loss"]
            out.update({f"{name}.{k}": v for k, v in losses.items()})
        out["loss"] = total
        if hasattr(self.host, "dense_views"):
            self.host.dense_views.clear()  # the graph they hold is the loss's now; nothing waits across steps
        return out

    @torch.no_grad()
    def visuals(self, batch: dict[str, Any], step: int = 0) -> dict[str, torch.Tensor] | None:
        return self.host.visuals(batch, step) if hasattr(self.host, "visuals") else None


def build_run_objective(specs: list[tuple[str, float, dict[str, Any]]]) -> tuple[nn.Module, float]:
    """The module a run trains and the weight of its loss: one objective as it is, several as a :class:`Composite`."""
    if len(specs) == 1:
        name, weight, args = specs[0]
        return build_objective(name, **args), weight
    return Composite([(name, weight, build_objective(name, **args)) for name, weight, args in specs]), 1.0
