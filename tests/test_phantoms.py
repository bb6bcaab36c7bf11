"""Synthetic phantoms, and CT/MR inference from intensities."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from medssl_scale.io.modality import infer_modality
from medssl_scale.synth.phantoms import Phantom, ct_phantom, mr_phantom

SMALL = (32, 28, 20)


def _median(p: Phantom, name: str) -> float:
    """Median intensity of the class's interior (partial volume blurs its rim)."""
    value = next(k for k, v in p.classes.items() if v == name)
    mask = p.label == value
    interior = ndi.binary_erosion(mask)
    return float(np.median(p.image[interior if interior.sum() >= 20 else mask]))


@pytest.mark.parametrize("make", [ct_phantom, mr_phantom])
def test_deterministic_per_seed_and_varies_across_seeds(make):
    a, b, c = make(shape=SMALL, seed=3), make(shape=SMALL, seed=3), make(shape=SMALL, seed=4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine) and a.classes == b.classes
    # Another seed moves and reshapes the organs, not just the noise.
    assert np.mean(a.label != c.label) > 0.01
    for value in a.classes:
        ca = np.argwhere(a.label == value).mean(axis=0)
        cc = np.argwhere(c.label == value).mean(axis=0)
        sa, sc = np.count_nonzero(a.label == value), np.count_nonzero(c.label == value)
        assert np.abs(ca - cc).max() > 0.05 or sa != sc, a.classes[value]


@pytest.mark.parametrize("shape", [None, SMALL])
def test_ct_phantom(shape):
    p = ct_phantom(seed=1) if shape is None else ct_phantom(shape=shape, seed=1)
    shape = shape or (96, 96, 64)
    assert p.modality == "CT" and p.image.shape == p.label.shape == shape
    assert p.image.dtype == np.int16 and p.label.dtype == np.uint8
    assert -1024 <= p.image.min() and p.image.max() <= 3071
    assert abs(float(np.median(p.image[0, 0, :])) + 1000) < 40  # air in the corner
    assert set(np.unique(p.label)) == {0, *p.classes}
    assert set(p.classes.values()) == {"liver", "spleen", "kidney_left", "kidney_right", "spine", "lungs"}
    assert nib.aff2axcodes(p.affine) == ("R", "A", "S")
    assert np.allclose(np.diag(p.affine)[:3], (1.5, 1.5, 2.5))
    if shape != (96, 96, 64):
        return  # tiny volumes: every organ present, but partial volume dominates their intensities
    m = {name: _median(p, name) for name in p.classes.values()}
    assert m["lungs"] < -700 < 60 < m["liver"] < m["spleen"] < m["kidney_left"] < m["spine"]
    assert abs(m["kidney_left"] - m["kidney_right"]) < 30
    # Anatomy sits where RAS says: liver on the patient's right (high x), spleen on the left, lungs on top.
    centre = {name: np.argwhere(p.label == k).mean(axis=0) for k, name in p.classes.items()}
    assert centre["spleen"][0] < shape[0] / 2 < centre["liver"][0]
    assert centre["kidney_left"][0] < shape[0] / 2 < centre["kidney_right"][0]
    assert centre["lungs"][2] > centre["liver"][2] > centre["kidney_left"][2] - 3


@pytest.mark.parametrize("shape", [None, SMALL])
def test_mr_phantom(shape):
    p = mr_phantom(seed=2) if shape is None else mr_phantom(shape=shape, seed=2)
    shape = shape or (80, 96, 80)
    assert p.modality == "MR" and p.image.shape == p.label.shape == shape
    assert p.image.dtype == np.float32 and p.label.dtype == np.uint8
    assert p.image.min() >= 0 and np.isfinite(p.image).all()
    assert set(np.unique(p.label)) == {0, *p.classes}
    assert set(p.classes.values()) == {"scalp", "skull", "csf", "grey_matter", "white_matter", "tumour"}
    assert np.allclose(np.diag(p.affine)[:3], (1.0, 1.0, 1.2))
    assert nib.aff2axcodes(p.affine) == ("R", "A", "S")
    if shape != (80, 96, 80):
        return  # tiny volumes: partial volume dominates the thin layers
    m = {name: _median(p, name) for name in p.classes.values()}
    background = float(np.median(p.image[p.label == 0]))
    # T1-like: WM > GM > CSF, skull dark, scalp fat bright.
    assert background < m["skull"] < m["csf"] < m["grey_matter"] < m["white_matter"]
    assert m["scalp"] > m["grey_matter"]


def test_phantoms_are_fast():
    for make in (ct_phantom, mr_phantom):
        make()
        best = min(_timed(make, seed) for seed in range(3))
        assert best < 0.25, (make.__name__, best)  # ~25-50 ms here; generous for loaded CI machines


def _timed(make, seed) -> float:
    t0 = time.perf_counter()
    make(seed=seed)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- modality inference

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_modality_inference_on_phantoms(seed):
    assert infer_modality(ct_phantom(seed=seed).image)[0] == "CT"
    assert infer_modality(mr_phantom(seed=seed).image)[0] == "MR"
    assert infer_modality(ct_phantom(shape=SMALL, seed=seed).image)[0] == "CT"
    assert infer_modality(mr_phantom(shape=SMALL, seed=seed).image)[0] == "MR"


def test_modality_inference_edge_cases():
    ct = ct_phantom(shape=(48, 48, 32)).image
    # Scanner padding outside the reconstruction circle is set aside, whatever its value.
    x, y = np.meshgrid(np.linspace(-1, 1, 48), np.linspace(-1, 1, 48), indexing="ij")
    for pad in (-2048, -3024, -32768):
        padded = ct.copy()
        padded[x**2 + y**2 > 0.9] = pad
        kind, reason = infer_modality(padded)
        assert kind == "CT" and "padding" in reason, pad
    # CT without rescale applied (raw unsigned values) is not HU: documented to read as MR.
    assert infer_modality((ct.astype(np.int32) + 1024).astype(np.uint16))[0] == "MR"
    mr = mr_phantom(shape=(40, 48, 40)).image
    assert infer_modality(mr - 20.0)[0] == "MR"                        # a little below zero
    assert infer_modality((mr - mr.mean()) / mr.std())[0] == "MR"      # z-scored
    phase = np.random.default_rng(0).uniform(-4096, 4096, (20, 20, 20)).astype(np.float32)
    assert infer_modality(phase)[0] == "MR"                            # signed, but not HU-like
    with_nan = mr.copy()
    with_nan[:5] = np.nan
    assert infer_modality(with_nan)[0] == "MR"
    assert infer_modality(np.full((4, 4, 4), -3024, np.int16))[0] == "MR"
    assert infer_modality(np.zeros((0, 4, 4), np.float32))[0] == "MR"


def test_modality_inference_reads_a_subsample_of_big_volumes():
    big = np.full((256, 256, 160), 40, dtype=np.int16)
    big[:, :30] = -1000
    t0 = time.perf_counter()
    kind, reason = infer_modality(big)
    assert kind == "CT" and "air" in reason
    assert time.perf_counter() - t0 < 1.0


def test_ct_anatomy_is_on_the_correct_side_in_ras():
    """RAS: axis 0 grows toward the patient's right, axis 1 anterior, axis 2 superior."""
    from medssl_scale.synth.phantoms import CT_CLASSES, ct_phantom

    names = {v: k for k, v in CT_CLASSES.items()}
    for seed in range(3):
        p = ct_phantom(seed=seed)
        centre = (np.array(p.label.shape) - 1) / 2

        def c(name):
            return np.argwhere(p.label == names[name]).mean(axis=0) - centre

        assert c("liver")[0] > 0 and c("spleen")[0] < 0  # liver on the right, spleen on the left
        assert c("kidney_left")[0] < 0 < c("kidney_right")[0]
        assert c("spine")[1] < 0 and c("kidney_left")[1] < 0  # posterior
        assert c("lungs")[2] > c("liver")[2]  # lungs above the liver
