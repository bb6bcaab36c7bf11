"""Canonical orientation (RAS), spacing/geometry, and resampling."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medssl_scale.io.canonical import geometry, resample, spacing_of, to_canonical


def _rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def _affine(matrix, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = matrix
    a[:3, 3] = origin
    return a


AFFINES = {
    "ras": _affine(np.diag([0.8, 0.9, 2.5]), (-10, 20, 5)),
    "lps": _affine(np.diag([-0.8, -0.9, 2.5]), (100, 120, -40)),
    "flipped_z": _affine(np.diag([1.0, 1.0, -3.0]), (0, 0, 60)),
    # voxel axis 0 -> superior, axis 1 -> left (-R), axis 2 -> anterior
    "permuted": _affine(np.array([[0, -0.7, 0], [0, 0, 1.2], [2.0, 0, 0]]), (30, -5, -70)),
    "oblique": _affine(_rotation((1, 2, 3), 25) @ np.diag([-0.8, 0.9, 2.5]), (12.5, -30, 41)),
}


def _world(affine, ijk):
    return ijk @ affine[:3, :3].T + affine[:3, 3]


@pytest.mark.parametrize("name", list(AFFINES))
def test_to_canonical_lands_in_ras_and_keeps_world_positions(name):
    affine = AFFINES[name]
    arr = np.random.default_rng(0).integers(0, 1000, size=(5, 6, 7)).astype(np.int16)
    out, new_affine = to_canonical(arr, affine)

    assert nib.aff2axcodes(new_affine) == ("R", "A", "S")
    assert out.flags.f_contiguous and out.dtype == arr.dtype  # the canonical layout: x fastest
    assert sorted(out.shape) == sorted(arr.shape)
    assert sorted(spacing_of(new_affine)) == pytest.approx(sorted(spacing_of(affine)))
    # Every voxel keeps its value at the same world position.
    ijk = np.argwhere(np.ones(arr.shape, bool)).astype(float)
    world = _world(affine, ijk)
    new_ijk = np.linalg.solve(new_affine[:3, :3], (world - new_affine[:3, 3]).T).T
    idx = np.rint(new_ijk).astype(int)
    assert np.allclose(new_ijk, idx, atol=1e-6)
    assert np.array_equal(out[tuple(idx.T)], arr[tuple(ijk.astype(int).T)])
    # Same answer as nibabel's closest canonical (what MONAI's Orientationd(axcodes="RAS") gives).
    ref = nib.as_closest_canonical(nib.Nifti1Image(arr, affine))
    assert np.array_equal(out, np.asarray(ref.dataobj))
    assert np.allclose(new_affine, ref.affine)


def test_to_canonical_is_a_copy_free_noop_for_fortran_ras():
    """NIfTI decodes Fortran-ordered: an RAS volume must pass through without a copy."""
    arr = np.asfortranarray(np.zeros((4, 5, 6), np.float32))
    out, aff = to_canonical(arr, AFFINES["ras"])
    assert out is arr and np.array_equal(aff, AFFINES["ras"])
    c_order = np.zeros((4, 5, 6), np.float32)
    assert to_canonical(c_order, AFFINES["ras"])[0].flags.f_contiguous


def test_spacing_and_geometry_are_json_able_and_exact():
    affine = AFFINES["oblique"]
    assert spacing_of(affine) == pytest.approx((0.8, 0.9, 2.5))
    g = geometry(affine)
    assert json.loads(json.dumps(g)) == g
    assert g["spacing"] == [0.8, 0.9, 2.5]
    assert g["origin"] == [12.5, -30.0, 41.0]
    d = np.array(g["direction"])
    assert np.allclose(np.linalg.norm(d, axis=0), 1.0, atol=1e-6)
    assert np.allclose(d @ np.diag(g["spacing"]), affine[:3, :3], atol=1e-5)
    assert geometry(np.eye(4))["direction"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def _ramp(shape, coef=(2.0, 3.0, -1.0)) -> np.ndarray:
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    return coef[0] * i + coef[1] * j + coef[2] * k


def test_resample_spacing_origin_shape_and_linear_ramp():
    affine = AFFINES["oblique"]  # spacing (0.8, 0.9, 2.5): ratio 3.1 > 3 would be anisotropic
    shape = (30, 20, 12)
    arr = _ramp(shape)
    target = (1.2, 0.6, 1.0)
    out, new_affine = resample(arr, affine, target, anisotropy_threshold=5.0)

    assert out.dtype == np.float32
    assert out.shape == (20, 30, 30)  # 30 * 0.8 / 1.2, 20 * 0.9 / 0.6, 12 * 2.5 / 1.0
    assert spacing_of(new_affine) == pytest.approx(target, rel=1e-12)
    assert np.array_equal(new_affine[:3, 3], affine[:3, 3])  # voxel (0,0,0) stays put
    g_old, g_new = geometry(affine), geometry(new_affine)
    assert g_new["direction"] == g_old["direction"]
    # Interior samples (not clamped at the far edge) are exactly the ramp at their old-index position.
    pos = [np.arange(n) * t / o for n, t, o in zip(out.shape, target, (0.8, 0.9, 2.5))]
    inside = [p <= n - 1 for p, n in zip(pos, shape)]
    sub = out[np.ix_(*inside)]
    pi, pj, pk = np.meshgrid(*(p[m] for p, m in zip(pos, inside)), indexing="ij")
    assert np.allclose(sub, 2 * pi + 3 * pj - pk, atol=1e-3)


def test_resample_labels_keep_dtype_and_values():
    rng = np.random.default_rng(1)
    lab = rng.choice(np.array([0, 3, 7], dtype=np.uint8), size=(17, 15, 9))
    out, aff = resample(lab, AFFINES["lps"], (0.5, 1.3, 1.0), label=True)
    assert out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 3, 7}
    assert spacing_of(aff) == pytest.approx((0.5, 1.3, 1.0))
    # Nearest neighbour: a 2x upsampled axis repeats each voxel.
    up, _ = resample(lab, AFFINES["ras"], (0.4, 0.9, 2.5), label=True)
    assert np.array_equal(up[::2], lab)


def test_resample_anisotropic_source_uses_nearest_along_the_thick_axis():
    affine = _affine(np.diag([1.0, 1.0, 5.0]), (0, 0, 0))  # ratio 5 > 3
    arr = _ramp((8, 8, 6), coef=(0.0, 0.0, 10.0))          # changes only along z
    aniso, _ = resample(arr, affine, (1.0, 1.0, 1.0))
    assert aniso.shape == (8, 8, 30)
    assert set(np.unique(aniso)) <= set(np.unique(arr))    # z: slices repeated, not blended
    smooth, _ = resample(arr, affine, (1.0, 1.0, 1.0), anisotropy_threshold=10.0)
    assert len(np.unique(smooth)) > len(np.unique(arr))    # linear across slices
    assert smooth[0, 0, 1] == pytest.approx(2.0)           # 1 mm into a 5 mm step of 10


def test_resample_skips_matching_spacing_and_keeps_at_least_one_voxel():
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    out, aff = resample(arr, affine, (1.00001, 1.0, 0.99999))
    assert out is arr and aff is not None and np.array_equal(aff, affine)
    tiny, aff2 = resample(arr, affine, (10.0, 10.0, 10.0))
    assert tiny.shape == (1, 1, 1) and spacing_of(aff2) == pytest.approx((10.0, 10.0, 10.0))
    with pytest.raises(ValueError):
        resample(arr, affine, (0.0, 1.0, 1.0))
