"""Guess CT vs MR from intensities, for inputs whose header does not say.

Only used when neither the file (DICOM Modality, MetaImage Modality, PAR/REC)
nor the user names the modality.
"""

from __future__ import annotations

import numpy as np

# Rule constants, in Hounsfield units.
AIR_MAX_HU = -500.0          # 1st percentile at or below this: the image contains air/lung
HU_RANGE = (-1100.0, 4000.0)  # where real tissue values of a CT lie (bone and contrast included)
MIN_HU_FRACTION = 0.95
SAMPLE_VOXELS = 1_000_000


def _subsample(array: np.ndarray, target: int = SAMPLE_VOXELS) -> np.ndarray:
    # A strided view: no copy of the full volume, cost independent of its size.
    step = max(1, int(np.ceil((array.size / target) ** (1.0 / max(array.ndim, 1)))))
    view = array[tuple(slice(None, None, step) for _ in range(array.ndim))]
    v = np.asarray(view, dtype=np.float32).ravel()
    return v[np.isfinite(v)]


def infer_modality(array: np.ndarray) -> tuple[str, str]:
    """Return ``("CT" | "MR", reason)`` from intensity statistics.

    The rule, on a strided subsample of about a million voxels:

    1. Padding: if the minimum is below -1100 and at least 1% of voxels hold
       exactly that value, it is CT padding outside the field of view
       (-2048, -3024, -32768, ...) and those voxels are set aside.
    2. CT if the 1st percentile of the remaining voxels is <= -500 (air or
       lung near -1000 HU is present) *and* at least 95% of them lie within
       [-1100, 4000] HU.
    3. Otherwise MR: scanner units are non-negative (or at least nowhere near
       Hounsfield units).

    A CT whose rescale was not applied (raw unsigned values) reads as MR;
    the user's ``--modality`` overrides this guess.
    """
    v = _subsample(array)
    if v.size == 0:
        return "MR", "no finite voxels; not Hounsfield units"
    vmin = float(v.min())
    padding = None
    if vmin < HU_RANGE[0] and np.count_nonzero(v == vmin) >= 0.01 * v.size:
        padding = vmin
        v = v[v != vmin]
        if v.size == 0:
            return "MR", "image holds a single value; not Hounsfield units"
    p1 = float(np.percentile(v, 1))
    in_hu = float(np.count_nonzero((v >= HU_RANGE[0]) & (v <= HU_RANGE[1]))) / v.size
    pad_note = f", padding value {padding:g} set aside" if padding is not None else ""
    if p1 <= AIR_MAX_HU and in_hu >= MIN_HU_FRACTION:
        return "CT", (
            f"Hounsfield-like: air present (1st percentile {p1:.0f}), "
            f"{in_hu:.0%} of voxels in [-1100, 4000]{pad_note}"
        )
    if p1 > AIR_MAX_HU:
        return "MR", f"no air near -1000 (1st percentile {p1:.4g} > -500): not Hounsfield units"
    return "MR", f"only {in_hu:.0%} of voxels in the Hounsfield range [-1100, 4000]{pad_note}"
