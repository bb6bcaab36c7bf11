"""Super-pixel region maps for local-region objectives (LRC): Felzenszwalb per axial slice, ids unique across slices.

scikit-image's ``felzenszwalb`` takes 2D images only, so regions are 2D
segments of each axial slice (REFERENCES.md, LRC). Each slice is scaled to
[0, 1] first [ours], so the ``scale`` setting means the same for CT and for
z-scored MR. The map is computed on the region a sample's views are cut
from, then cut exactly like the views, so a region id names the same tissue
in both views.
"""

from __future__ import annotations

import numpy as np


def superpixels(x: np.ndarray, scale: float, sigma: float, min_size: int) -> np.ndarray:
    """int32 region ids for a [D, H, W] volume, segmenting each axial (first-axis) slice on its own."""
    from skimage.segmentation import felzenszwalb

    out = np.empty(x.shape, dtype=np.int32)
    start = 0
    for z in range(x.shape[0]):
        sl = x[z].astype(np.float32)
        lo, hi = float(sl.min()), float(sl.max())
        sl = (sl - lo) / (hi - lo) if hi > lo else np.zeros_like(sl)
        seg = felzenszwalb(sl, scale=scale, sigma=sigma, min_size=min_size)
        out[z] = seg + start
        start += int(seg.max()) + 1
    return out
