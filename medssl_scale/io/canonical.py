"""Canonical geometry: RAS orientation, spacing, resampling.

Every volume in the dataset is stored in **RAS** voxel order (nibabel's
closest canonical orientation; what MONAI's ``Orientationd(axcodes="RAS")``
yields): array axis 0 runs left -> right, axis 1 posterior -> anterior,
axis 2 inferior -> superior. Reorientation only permutes and flips axes, so
it never interpolates; an oblique acquisition keeps its obliquity in the
affine (the direction matrix), with the voxel axes as close as possible to
R, A and S.

Affines are 4x4 voxel -> RAS+ millimetre maps (nibabel's convention).

Canonical arrays are Fortran-ordered (axis 0 varies fastest), the layout
NIfTI, NRRD, MetaImage and DICOM slices all decode into: keeping it saves a
transposing copy of every volume (measured: a third of the ingest time).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi
from nibabel import orientations as ornt_mod


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip ``array`` into RAS order; the returned affine maps each voxel
    to the same world point as before. Returns a Fortran-contiguous array."""
    affine = np.asarray(affine, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"to_canonical needs a 3D array, got shape {array.shape}")
    ornt = ornt_mod.io_orientation(affine)
    if np.isnan(ornt).any():
        raise ValueError("affine is degenerate: an axis has no direction")
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return np.asfortranarray(array), affine.copy()
    out = ornt_mod.apply_orientation(array, ornt)
    new_affine = affine @ ornt_mod.inv_ornt_aff(ornt, array.shape)
    return np.asfortranarray(out), new_affine


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (column norms of the 3x3 part)."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    sp = np.sqrt((m * m).sum(axis=0))
    return float(sp[0]), float(sp[1]), float(sp[2])


def _clean(values: np.ndarray, decimals: int) -> list:
    # Rounding keeps float noise (1e-17, -0.0) out of JSON and out of equality checks.
    return (np.round(np.asarray(values, dtype=np.float64), decimals) + 0.0).tolist()


def geometry(affine: np.ndarray) -> dict[str, list]:
    """JSON-able geometry: ``spacing`` (mm, 3), ``origin`` (RAS mm of voxel
    (0,0,0), 3) and ``direction`` (3x3, row-major, unit columns = world
    direction of each array axis)."""
    a = np.asarray(affine, dtype=np.float64)
    sp = np.array(spacing_of(a))
    direction = a[:3, :3] / np.where(sp > 0, sp, 1.0)
    return {
        "spacing": _clean(sp, 6),
        "origin": _clean(a[:3, 3], 4),
        "direction": _clean(direction, 6),
    }


def resampled_shape(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]) -> tuple[int, int, int]:
    """The grid :func:`resample` makes of ``shape`` at voxel size ``spacing``, computed without touching a voxel.

    What a caller checks against its limits before resampling: coarse volumes
    taken to fine spacings grow by the cube of the ratio (64^3 at 25 mm is
    1067^3 at 1.5 mm).
    """
    old = np.array(spacing_of(affine))
    new = np.asarray(spacing, dtype=np.float64).reshape(3)
    if not (np.all(new > 0) and np.all(np.isfinite(new)) and np.all(old > 0) and np.all(np.isfinite(old))):
        raise ValueError(f"spacings must be positive: source {old.tolist()}, target {new.tolist()}")
    return tuple(max(1, round(int(n) * float(o) / float(t))) for n, o, t in zip(shape, old, new))  # type: ignore[return-value]


def resample(
    array: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float],
    *,
    label: bool = False,
    anisotropy_threshold: float = 3.0,
    order: int = 1,
    rtol: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample to voxel size ``spacing`` (mm), keeping voxel (0,0,0)'s centre.

    New shape per axis is ``round(n * old_spacing / new_spacing)`` (at least 1)
    and the returned affine has exactly the requested spacing, the same
    direction and the same origin. Sample ``j`` of an axis lies at old index
    ``j * new/old``; samples past the last voxel take the edge value.

    Interpolation is done as separable 1D passes (one axis at a time, shrinking
    axes first so intermediates stay small):

    * images: spline ``order`` (1 = linear) in every axis, except that when the
      source is anisotropic (max/min spacing > ``anisotropy_threshold``) the
      low-resolution axis uses nearest neighbour, as nnU-Net does, so thick
      slices are not smeared into each other. Result is float32.
    * labels (``label=True``): nearest neighbour everywhere; the dtype and the
      set of values are kept exactly.

    When every axis already matches within ``rtol`` the input is returned
    unchanged (same object, same dtype, same affine).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"resample needs a 3D array, got shape {array.shape}")
    old = np.array(spacing_of(affine))
    new = np.asarray(spacing, dtype=np.float64).reshape(3)
    if not (np.all(new > 0) and np.all(np.isfinite(new)) and np.all(old > 0)):
        raise ValueError(f"spacings must be positive: source {old.tolist()}, target {new.tolist()}")
    if np.allclose(old, new, rtol=rtol, atol=0):
        return array, affine

    shape_old = np.array(array.shape)
    shape_new = np.array(resampled_shape(array.shape, affine, new))
    orders = [0 if label else order] * 3
    if not label and old.max() / old.min() > anisotropy_threshold:
        orders[int(np.argmax(old))] = 0

    out = array
    out_dtype = array.dtype if label else np.float32
    # Axes that shrink first: later passes then work on fewer voxels.
    for ax in sorted(range(3), key=lambda a: shape_new[a] / shape_old[a]):
        if shape_new[ax] == out.shape[ax] and np.isclose(old[ax], new[ax], rtol=rtol, atol=0):
            continue
        zoom = np.ones(3)
        zoom[ax] = new[ax] / old[ax]
        out_shape = list(out.shape)
        out_shape[ax] = int(shape_new[ax])
        # A diagonal matrix makes scipy take its 1D zoom/shift path: input index = zoom * output index.
        out = ndi.affine_transform(
            out, zoom, offset=0.0, output_shape=tuple(out_shape), order=orders[ax],
            mode="nearest", output=out_dtype, prefilter=orders[ax] > 1,
        )
    if out is array:  # only spacing noise below rtol on some axes and no shape change
        out = array.astype(out_dtype, copy=True)

    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] / old * new
    return out, new_affine
