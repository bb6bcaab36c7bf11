"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr`` at the last step."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    low = floor / peak
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int, warmup: int, peak: float, floor: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, peak, floor))
