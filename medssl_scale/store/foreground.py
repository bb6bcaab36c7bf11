"""A coarse foreground map per volume, stored in its attributes at ingest.

Crops that are mostly air teach a model nothing. Finding body voxels needs
the whole volume, which ingest holds in memory anyway and a crop sampler
never should read; so ingest stores, per block of 16^3 voxels, the fraction
of voxels above a body threshold (uint8, 255 = all body), zlib-compressed in
the ``foreground`` attribute: a 512x512x400 CT costs a few hundred bytes.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np

BLOCK = 16
CT_BODY_HU = -900.0  # air is -1000 (and padding lower); lung parenchyma is above this and counts as body
MR_BODY_FRACTION = 0.1  # of the robust intensity range (0.5th to 99.5th percentile)


def body_threshold(modality: str, stats: dict[str, float] | None) -> float:
    if modality == "CT":
        return CT_BODY_HU
    lo, hi = (stats or {}).get("p0_5", 0.0), (stats or {}).get("p99_5", 1.0)
    return lo + MR_BODY_FRACTION * (hi - lo)


def foreground_grid(array: np.ndarray, threshold: float, block: int = BLOCK, stride: int = 2) -> np.ndarray:
    """Fraction of voxels above ``threshold`` per ``block``^3 block, as uint8 (255 = all), same axis order.

    Estimated from every ``stride``-th voxel along each axis ((block/stride)^3 =
    512 samples per block by default): ingest computes it for every volume,
    and the full-resolution count cost more than the rest of the write.
    """
    if block % stride:
        raise ValueError(f"block {block} must be a multiple of stride {stride}")
    sub = array[::stride, ::stride, ::stride] > threshold
    b = block // stride
    grid_shape = tuple(-(-n // b) for n in sub.shape)
    padded = np.zeros(tuple(g * b for g in grid_shape), dtype=np.uint8)
    padded[tuple(slice(0, n) for n in sub.shape)] = sub
    body = padded.reshape(grid_shape[0], b, grid_shape[1], b, grid_shape[2], b).sum(axis=(1, 3, 5), dtype=np.uint32)
    # Edge blocks are scored on the voxels they hold, not on the padding.
    per_axis = [np.minimum(b, n - b * np.arange(g)) for n, g in zip(sub.shape, grid_shape)]
    voxels = per_axis[0][:, None, None] * per_axis[1][None, :, None] * per_axis[2][None, None, :]
    return np.round(255.0 * body / voxels).astype(np.uint8)


def encode(grid: np.ndarray, block: int = BLOCK) -> dict[str, Any]:
    return {
        "block": block,
        "shape": list(grid.shape),
        "zlib_b64": base64.b64encode(zlib.compress(np.ascontiguousarray(grid).tobytes(), 9)).decode("ascii"),
    }


def decode(attr: dict[str, Any]) -> tuple[np.ndarray, int]:
    """(grid, block) from the ``foreground`` attribute; ValueError unless it holds exactly ``shape``'s bytes."""
    n = int(np.prod(attr["shape"]))
    try:  # an attribute is untrusted: inflate no more than the grid it claims to be
        raw = zlib.decompressobj().decompress(base64.b64decode(attr["zlib_b64"], validate=True), n + 1)
    except (zlib.error, ValueError) as e:
        raise ValueError(f"foreground attribute does not decode ({e})") from None
    if len(raw) != n:
        raise ValueError(f"foreground attribute holds {len(raw)} bytes, not the {n} of its shape {attr['shape']}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(attr["shape"]), int(attr["block"])
