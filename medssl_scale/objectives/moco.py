"""MoCo v2 (Chen et al., arXiv 2003.04297): a query network against a momentum key network and a queue of negatives.

LRC's paper adds its local region contrast to MoCo v2 above all (its
abstract's Fig. 1: "global (with an example of MoCo)"), so this is a host
``lrc`` can follow (``objectives: {mocov2: 1.0, lrc: 0.5}``). In 3D, per
REFERENCES.md, MoCo v2's settings [code: facebookresearch/moco] on a U-Net
[ours: MoCo's ResNet is 2D]:

- two views of a crop (``data.views.kind: pair``, each with its own flips and
  intensity augmentation) go through the query network and, without
  gradient, through the key network, a momentum copy of it
  (``k <- m k + (1 - m) q``, ``momentum`` 0.999, once per step);
- the bottleneck is average-pooled and projected by an MLP (C -> C -> ``dim``
  128), L2-normalised;
- symmetric InfoNCE, ``temperature`` 0.2: each view's query against the other
  view's key (the positive) and the queue (``queue_size`` negatives);
- then both views' keys, from every rank, enter the queue (first in, first
  out).

The query network keeps the finest decoder features of both views for an
auxiliary term (``DENSE_VIEWS``); without one, only its encoder runs (the
decoder and output convolution then get no gradient, on every rank alike). The key network and queue are part of the
objective's state, so a resumed run continues them exactly. The momentum
average runs in the parameters' own precision: runs use fp32
(``deepspeed.precision: fp32``), since a bf16 average of 0.999 k + 0.001 q
would round the update away; and ZeRO stages 0-2, which keep whole
parameters on every rank, so every rank averages the same numbers.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from medssl_scale.objectives import register_objective
from medssl_scale.objectives.losses import gather_from_ranks, projection_head
from medssl_scale.objectives.settings import ObjectiveConfig


class MoCoConfig(ObjectiveConfig):
    DEFAULT_MODEL = "unet"
    MODELS_ALLOWED = ("unet", "pcrl_unet")

    model: dict[str, Any] = Field(default_factory=lambda: {"name": "unet", "channels": [32, 64, 128, 256], "norm": "instance"})
    dim: int = Field(128, ge=1)  # [code] MoCo v2's output dimension
    queue_size: int = Field(65536, ge=1)  # [code] K
    momentum: float = Field(0.999, ge=0, lt=1)  # [code] m
    temperature: float = Field(0.2, gt=0)  # [code] MoCo v2's T


def queue_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of L2-normalised queries [B, D] with their keys [B, D] as positives and the queue [K, D] as negatives."""
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@register_objective("mocov2")
class MoCoV2(nn.Module):
    Config = MoCoConfig
    DENSE_VIEWS = True  # keeps the query network's finest decoder features of both views (for lrc)

    def __init__(self, **config: Any):
        super().__init__()
        self.cfg = MoCoConfig(**config)
        self.net = self.cfg.build_net()
        self.head = projection_head(self.net.channels[-1], self.cfg.dim)
        self.key_net, self.key_head = copy.deepcopy(self.net), copy.deepcopy(self.head)
        for p in (*self.key_net.parameters(), *self.key_head.parameters()):
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(self.cfg.seed)
        self.register_buffer("queue", F.normalize(torch.randn(self.cfg.queue_size, self.cfg.dim, generator=g), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("key_step", torch.full((), -1, dtype=torch.long))  # the last step the key network moved at
        self.dense_channels = self.net.pyramid_channels[-1]
        self.keep_dense = False
        self.dense_views: dict[int, torch.Tensor] = {}

    def encoder(self) -> nn.Module:
        return self.net.encoder_module()

    @torch.no_grad()
    def _momentum_update(self, step: int) -> None:
        if int(self.key_step) == step:  # once per step, whatever the micro-batches
            return
        m = self.cfg.momentum
        for q, k in zip((*self.net.parameters(), *self.head.parameters()), (*self.key_net.parameters(), *self.key_head.parameters())):
            k.mul_(m).add_(q.detach(), alpha=1 - m)
        self.key_step.fill_(step)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        (keys,) = gather_from_ranks(keys)  # every rank's keys, in rank order, as MoCo's concat_all_gather
        n, size = keys.shape[0], self.queue.shape[0]
        idx = (int(self.queue_ptr) + torch.arange(n, device=keys.device)) % size
        self.queue[idx[-size:]] = keys[-size:].to(self.queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)

    def _embed(self, net: nn.Module, head: nn.Module, x: torch.Tensor, dense: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The normalised projection of the pooled bottleneck, and (``dense``) the decoder stages; the decoder runs only then."""
        if dense:
            _, pyramid = net(x)
            deep = net.bottleneck
        else:
            pyramid, deep = [], net.encode(x)[-1]
        return F.normalize(head(deep.mean(dim=(2, 3, 4))).float(), dim=1), pyramid

    def forward(self, batch: dict[str, Any], step: int = 0, rank: int = 0, micro: int = 0) -> dict[str, torch.Tensor]:
        views = [batch["view1"], batch["view2"]]
        queries = []
        for i, x in enumerate(views, 1):
            q, pyramid = self._embed(self.net, self.head, x, dense=self.keep_dense)
            queries.append(q)
            if self.keep_dense:
                self.dense_views[i] = pyramid[-1]
        with torch.no_grad():
            self._momentum_update(step)
            keys = [self._embed(self.key_net, self.key_head, x)[0] for x in views]
        queue = self.queue.clone().detach().float()  # the negatives as they were before this batch's keys
        nce = (queue_nce(queries[0], keys[1], queue, self.cfg.temperature)
               + queue_nce(queries[1], keys[0], queue, self.cfg.temperature)) / 2
        if torch.is_grad_enabled():  # training steps fill the queue; evaluation leaves it alone
            self._enqueue(torch.cat(keys))
        return {"nce": nce, "loss": nce}
