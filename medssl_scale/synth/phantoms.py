"""Synthetic CT and MR phantoms with organ label maps.

Used by the demo, the tests and the benchmarks, and as a tiny segmentation
task for fine-tuning tests: each organ has a consistent intensity and shape,
while position, size, orientation and outline vary with the seed, so a model
has something learnable that is not a single memorised template.

Shapes are drawn in normalised coordinates ([-1, 1] across the field of view
on every axis, RAS: +x = patient's left, +y = anterior, +z = superior), so
every shape (even 32x28x20 test volumes) shows every organ; ``spacing`` only
sets the affine. A smooth random warp of the coordinates bends all outlines
per seed. Everything is broadcast numpy on float32: ~20-40 ms for the default
shapes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.ndimage as ndi


@dataclasses.dataclass
class Phantom:
    image: np.ndarray        # CT: int16 Hounsfield units; MR: float32 scanner-like units (>= 0)
    label: np.ndarray        # uint8 label map, same shape
    affine: np.ndarray       # 4x4 voxel -> RAS mm
    classes: dict[int, str]  # label value -> name; 0 is background and not listed
    modality: str


CT_CLASSES = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "spine", 6: "lungs"}
MR_CLASSES = {1: "scalp", 2: "skull", 3: "csf", 4: "grey_matter", 5: "white_matter", 6: "tumour"}


def _affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    # RAS, centred on the world origin.
    a = np.diag([*map(float, spacing), 1.0])
    a[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing, dtype=np.float64)
    return a


def _coords(shape: tuple[int, int, int], rng: np.random.Generator, warp: float):
    """Normalised X, Y, Z (float32, broadcastable to ``shape``) bent by a smooth random warp."""
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive ints, got {shape}")
    x, y, z = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    f = rng.uniform(1.0, 2.5, size=6).astype(np.float32)
    p = rng.uniform(0, 2 * np.pi, size=6).astype(np.float32)
    # Each axis is displaced by a low-frequency function of the other two.
    X = x + warp * np.sin(f[0] * y + p[0]) * np.cos(f[1] * z + p[1])
    Y = y + warp * np.sin(f[2] * x + p[2]) * np.cos(f[3] * z + p[3])
    Z = z + warp * np.sin(f[4] * x + p[4]) * np.cos(f[5] * y + p[5])
    return X, Y, Z


def _q(X, Y, Z, centre, radii, angle: float = 0.0) -> np.ndarray:
    """Quadratic form of an ellipsoid rotated by ``angle`` about z: <= 1 inside."""
    dx, dy, dz = X - np.float32(centre[0]), Y - np.float32(centre[1]), Z - np.float32(centre[2])
    if angle:
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        dx, dy = dx * c + dy * s, dy * c - dx * s
    r = np.asarray(radii, dtype=np.float32)
    return (dx / r[0]) ** 2 + (dy / r[1]) ** 2 + (dz / r[2]) ** 2


def _box(shape, centre, radii, margin: float) -> tuple[slice, ...]:
    """Index box that surely holds an ellipsoid: organs are small, so evaluating
    them only there is what keeps a phantom fast."""
    reach = (max(radii[:2]), max(radii[:2]), radii[2])  # any rotation about z stays inside
    box = []
    for n, c, h in zip(shape, centre, reach):
        lo = int(np.floor((c - h - margin + 1.0) / 2.0 * (n - 1)))
        hi = int(np.ceil((c + h + margin + 1.0) / 2.0 * (n - 1))) + 1
        box.append(slice(min(max(lo, 0), n), min(max(hi, 0), n)))
    return tuple(box)


def ct_phantom(shape=(96, 96, 64), spacing=(1.5, 1.5, 2.5), seed: int = 0) -> Phantom:
    """Abdomen-like CT in Hounsfield units (int16, within [-1024, 3071]).

    Air outside an elliptic body with a subcutaneous fat layer (-100) around
    soft tissue (45); lungs (-850) at the top, liver (105, patient's right),
    spleen (125, left, posterior), two bean-shaped kidneys (180), a vertebral
    column (cancellous 250 with a 900 cortex, discs unlabelled); slight blur
    (partial volume) and Gaussian noise.
    """
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    X, Y, Z = _coords(shape, rng, warp=0.06)
    jit = lambda s=0.1: 1.0 + rng.uniform(-s, s)  # noqa: E731
    off = lambda s=0.05: rng.uniform(-s, s)        # noqa: E731
    full = np.broadcast_shapes(X.shape, Y.shape, Z.shape)

    body_r = (0.86 * jit(0.06), 0.66 * jit(0.06))
    q_body = (X / body_r[0]) ** 2 + ((Y - 0.02) / body_r[1]) ** 2  # X, Y are 3D once warped
    body = q_body <= 1.0
    inner = q_body <= (1.0 - 0.11 * jit(0.3)) ** 2  # inside the subcutaneous fat

    label = np.zeros(full, dtype=np.uint8)
    hu = np.full(full, -1000.0, dtype=np.float32)
    hu[body] = -100.0
    hu[inner] = 45.0

    def organ(centre, radii, angle: float, value: int, intensity: float, notch=None) -> None:
        box = _box(shape, centre, radii, margin=0.07)
        x, y, z = X[box], Y[box], Z[box]
        mask = (_q(x, y, z, centre, radii, angle) <= 1) & inner[box]
        if notch is not None:  # a second ellipsoid carved out (kidney hilum)
            mask &= _q(x, y, z, *notch) > 1
        label[box][mask] = value
        hu[box][mask] = intensity

    # RAS: +x is the patient's right (liver), -x the left (spleen).
    organ((0.38 + off(), 0.08 + off(), 0.28 + off()), (0.38 * jit(), 0.42 * jit(), 0.32 * jit()), off(0.3), 1, 105.0)
    organ((-0.55 + off(), -0.25 + off(), 0.35 + off()), (0.14 * jit(), 0.24 * jit(), 0.20 * jit()), off(0.4), 2, 125.0)
    for value, side, z0 in ((3, -1.0, 0.0), (4, 1.0, -0.08)):  # kidney_left at -x, the right one lower
        c = (side * (0.36 + off(0.03)), -0.40 + off(0.03), z0 + off())
        hilum = ((c[0] - side * 0.11, c[1] + 0.03, c[2]), (0.07, 0.08, 0.11))  # medial notch: a bean
        organ(c, (0.12 * jit(), 0.17 * jit(), 0.26 * jit()), side * off(0.3), value, 180.0, hilum)
    for side in (1.0, -1.0):
        organ((side * (0.43 + off(0.03)), -0.05 + off(), 0.95 + off()),
              (0.31 * jit(), 0.48 * jit(), 0.50 * jit()), side * off(0.2), 6, -850.0)

    # Spine: vertebral bodies with a cortex, a posterior arch around the canal, discs between levels.
    sx, sy = off(0.03), -0.36 + off(0.03)
    box = _box(shape, (sx, sy - 0.07, 0.0), (0.18, 0.18, 2.0), margin=0.07)
    x, y, z = X[box], Y[box], Z[box]
    r_body = np.sqrt((x - sx) ** 2 + (y - sy) ** 2) / np.float32(0.10 * jit())
    r_arch = np.sqrt((x - sx) ** 2 + (y - sy + 0.15) ** 2) / np.float32(0.075)
    level = (z * np.float32(rng.uniform(2.5, 3.5)) + np.float32(rng.uniform(0, 1))) % 1.0
    disc = (level < 0.18) & (r_body <= 1)
    bone = ((r_body <= 1) | ((r_arch <= 1) & (r_arch > 0.55))) & ~disc
    lab, val = label[box], hu[box]
    lab[bone] = 5
    val[bone] = 250.0
    val[bone & (r_body > 0.78)] = 900.0  # cortex
    val[disc] = 80.0
    val[(r_arch <= 0.55) & (r_body > 1)] = 15.0  # spinal canal

    hu = ndi.gaussian_filter(hu, 0.6, truncate=3.0)
    hu += rng.standard_normal(full, dtype=np.float32) * np.float32(12.0 * jit(0.2))
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return Phantom(image, label, _affine(shape, spacing), dict(CT_CLASSES), "CT")


def mr_phantom(shape=(80, 96, 80), spacing=(1.0, 1.0, 1.2), seed: int = 0) -> Phantom:
    """Head-like T1-weighted MR in float32 scanner units (non-negative).

    Concentric layers of scalp (bright), skull (dark), CSF (dark), grey and
    white matter (WM > GM, with a gyral boundary and CSF-filled sulci), two
    lateral ventricles and a ring-enhancing tumour with a necrotic core; a
    smooth multiplicative bias field and Rician noise.
    """
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    X, Y, Z = _coords(shape, rng, warp=0.04)
    jit = lambda s=0.1: 1.0 + rng.uniform(-s, s)  # noqa: E731
    off = lambda s=0.05: rng.uniform(-s, s)        # noqa: E731

    r = np.sqrt(_q(X, Y, Z, (off(0.03), off(0.03), -0.05 + off(0.03)),
                   (0.80 * jit(0.05), 0.90 * jit(0.05), 0.85 * jit(0.05)), off(0.15)))
    freq = rng.uniform(10.0, 16.0, size=3).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3).astype(np.float32)
    gyri = np.sin(freq[0] * X + phase[0]) * np.sin(freq[1] * Y + phase[1]) * np.sin(freq[2] * Z + phase[2])

    label = np.zeros(r.shape, dtype=np.uint8)
    label[r <= 1.0] = 1                                       # scalp
    label[r <= 0.92] = 2                                      # skull
    label[r <= 0.84] = 3                                      # CSF
    label[r <= 0.80] = 4                                      # grey matter
    label[(r > 0.70) & (r <= 0.80) & (gyri < -0.55)] = 3      # sulci
    label[r <= 0.64 + 0.06 * gyri] = 5                        # white matter
    for side in (1.0, -1.0):
        vent = _q(X, Y, Z, (side * 0.11 * jit(), 0.02 + off(0.03), 0.08 + off(0.03)),
                  (0.06 * jit(0.2), 0.26 * jit(), 0.12 * jit()), side * 0.25)
        label[vent <= 1] = 3

    # Tumour somewhere in the hemispheres, with a lumpy outline.
    d = rng.normal(size=3)
    centre = d / np.linalg.norm(d) * rng.uniform(0.25, 0.45) * np.array([0.8, 0.9, 0.85])
    q_t = _q(X, Y, Z, centre, (rng.uniform(0.12, 0.2),) * 3) / (1.0 + 0.3 * gyri)
    label[q_t <= 1] = 6

    t1 = np.array([0.0, 0.75, 0.08, 0.15, 0.48, 0.80, 0.85], dtype=np.float32)  # per label value
    img = t1[label]
    img[q_t <= 0.35] = 0.25  # necrotic core inside the enhancing rim

    img = ndi.gaussian_filter(img, 0.6, truncate=3.0)
    b = rng.uniform(-0.1, 0.1, size=4).astype(np.float32)
    bias = 1.0 + b[0] * X + b[1] * Y + b[2] * Z + b[3] * (X * X + Y * Y - 0.6)
    scale = np.float32(1000.0 * jit(0.3))
    img *= np.maximum(bias, 0.7) * scale
    sigma = np.float32(0.025) * scale
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    n1 *= sigma
    n2 *= sigma
    img += n1
    image = np.sqrt(img * img + n2 * n2).astype(np.float32)  # Rician: magnitude of a complex signal
    return Phantom(image, label, _affine(shape, spacing), dict(MR_CLASSES), "MR")
