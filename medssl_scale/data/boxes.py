"""Where crops go: uniform or foreground-aware boxes, padding for small volumes, overlapping view pairs.

Boxes are ``(start, size)`` in (z, y, x) voxels. A start may be negative or a
box may run past the volume: the reader pads those voxels. Along an axis
shorter than the crop the volume sits at a random offset inside the crop.
"""

from __future__ import annotations

import numpy as np

Box = tuple[tuple[int, int, int], tuple[int, int, int]]


def uniform_start(rng: np.random.Generator, shape: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(int(rng.integers(min(0, n - s), max(0, n - s) + 1)) for n, s in zip(shape, size))  # type: ignore[return-value]


class ForegroundSampler:
    """Crop starts whose box is at least ``min_fraction`` body, from a volume's coarse foreground map.

    The map holds the body fraction of each ``block``^3 block (see
    ``medssl_scale.store.foreground``); a box's fraction is the mean over the
    blocks it covers, computed for every block-aligned start at once with a
    summed-area table. Starts are then jittered by up to half a block, so
    a crop's true fraction can fall a little below ``min_fraction``. Where no box
    is body enough, the most-body box is used.
    """

    def __init__(self, grid: np.ndarray, block: int, shape: tuple[int, ...], size: tuple[int, ...], min_fraction: float):
        self.block, self.shape, self.size = block, tuple(shape), tuple(size)
        cover = [max(1, min(g, round(s / block))) for g, s in zip(grid.shape, size)]
        sat = np.zeros(tuple(g + 1 for g in grid.shape), dtype=np.float64)
        sat[1:, 1:, 1:] = grid.astype(np.float64).cumsum(0).cumsum(1).cumsum(2)
        a, b, c = (g - k + 1 for g, k in zip(grid.shape, cover))
        i, j, k = np.ogrid[:a, :b, :c]
        p, q, r = cover
        total = (
            sat[i + p, j + q, k + r] - sat[i, j + q, k + r] - sat[i + p, j, k + r] - sat[i + p, j + q, k]
            + sat[i, j, k + r] + sat[i, j + q, k] + sat[i + p, j, k] - sat[i, j, k]
        )
        frac = total / (255.0 * p * q * r)
        ok = np.argwhere(frac >= min_fraction)
        self.candidates = ok if len(ok) else np.argwhere(frac == frac.max())
        self.fraction = float(frac.max())

    def start(self, rng: np.random.Generator) -> tuple[int, int, int]:
        cell = self.candidates[rng.integers(len(self.candidates))]
        out = []
        for c, n, s in zip(cell, self.shape, self.size):
            if n <= s:  # the whole axis fits in the crop: a random offset, as uniform sampling does
                out.append(int(rng.integers(n - s, 1)))
                continue
            out.append(int(np.clip(c * self.block + rng.integers(-(self.block // 2), self.block // 2 + 1), 0, n - s)))
        return tuple(out)  # type: ignore[return-value]


def iou(a: Box, b: Box) -> float:
    (sa, za), (sb, zb) = a, b
    inter = 1
    for x0, n0, x1, n1 in zip(sa, za, sb, zb):
        inter *= max(0, min(x0 + n0, x1 + n1) - max(x0, x1))
    return inter / (np.prod(za) + np.prod(zb) - inter)


def union_box(boxes: list[Box]) -> Box:
    lo = [min(s[i] for s, _ in boxes) for i in range(3)]
    hi = [max(s[i] + z[i] for s, z in boxes) for i in range(3)]
    return tuple(lo), tuple(h - l for l, h in zip(lo, hi))  # type: ignore[return-value]


def cut(array: np.ndarray, box: Box, fill: float) -> np.ndarray:
    """``box`` of an in-memory array as a new C-contiguous array, ``fill`` outside the array."""
    start, size = box
    lo = [max(0, s) for s in start]
    hi = [min(n, s + k) for s, k, n in zip(start, size, array.shape)]
    if lo == list(start) and hi == [s + k for s, k in zip(start, size)]:
        return np.ascontiguousarray(array[tuple(slice(a, b) for a, b in zip(lo, hi))])
    out = np.full(size, fill, dtype=array.dtype)
    if all(b > a for a, b in zip(lo, hi)):
        out[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] = array[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return out
