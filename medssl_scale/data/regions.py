"""Super-pixel region maps for local-region objectives (LRC): Felzenszwalb per axial slice, inside the body.

scikit-image's ``felzenszwalb`` takes 2D images only, so regions are 2D
segments of each axial slice (REFERENCES.md, LRC). Each slice is scaled to
[0, 1] first [ours], so the ``scale`` setting means the same for CT and for
z-scored MR. Only the body counts [ours, after the issue's 50-200 regions
per slice inside a body mask]: pixels above a tenth of the slice's range
(air sits at its bottom), holes filled (lungs and bowel gas are inside),
the largest connected part; everything else gets id -1, no region. The map
is computed on the region a sample's views are cut from, then cut exactly
like the views, so a region id names the same tissue in both views; only
the slices the views sample (``slices``) are segmented.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NO_REGION = -1


def body_mask(sl: np.ndarray) -> np.ndarray:
    """The body in one [0, 1]-scaled slice: above a tenth of its range, holes filled, the largest connected part."""
    from scipy import ndimage

    m = ndimage.binary_fill_holes(sl > 0.1)
    lab, n = ndimage.label(m)
    if n > 1:
        m = lab == (np.bincount(lab.ravel())[1:].argmax() + 1)
    return m


def _pool(sl: np.ndarray, f: int) -> np.ndarray:
    """``sl`` averaged over f x f blocks (edges padded by repetition)."""
    h, w = -(-sl.shape[0] // f) * f, -(-sl.shape[1] // f) * f
    sl = np.pad(sl, ((0, h - sl.shape[0]), (0, w - sl.shape[1])), mode="edge")
    return sl.reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def superpixels(x: np.ndarray, scale: float, sigma: float, min_size: int, slices: Iterable[int] | None = None,
                body: bool = True, downsample: int = 1) -> np.ndarray:
    """int32 region ids for a [D, H, W] volume, each axial (first-axis) slice segmented on its own.

    Ids are unique across slices; -1 (:data:`NO_REGION`) outside the body (``body``) and on slices
    not listed in ``slices`` (default: every slice). ``downsample`` f segments each slice averaged over
    f x f blocks and gives every voxel of a block its block's id: f^2 times fewer pixels for Felzenszwalb,
    whose ``scale`` and ``min_size`` then count pooled pixels.
    """
    from skimage.segmentation import felzenszwalb

    out = np.full(x.shape, NO_REGION, dtype=np.int32)
    start = 0
    h, w = x.shape[1:]
    for z in sorted(set(range(x.shape[0]) if slices is None else slices)):
        sl = x[z].astype(np.float32)
        lo, hi = float(sl.min()), float(sl.max())
        sl = (sl - lo) / (hi - lo) if hi > lo else np.zeros_like(sl)
        small = _pool(sl, downsample) if downsample > 1 else sl
        seg = felzenszwalb(small, scale=scale, sigma=sigma, min_size=min_size).astype(np.int32)
        if downsample > 1:
            seg = seg.repeat(downsample, 0).repeat(downsample, 1)[:h, :w]
        inside = body_mask(sl) if body else np.ones(sl.shape, dtype=bool)
        out[z] = np.where(inside, seg + start, NO_REGION)  # ids unique across slices; a few may go unused
        start += int(seg.max()) + 1
    return out
