"""Pictures a person checks at a glance: mid-plane thumbnails of RAS volumes.

Display convention (neurological, stated on every panel): the patient's
right is on the viewer's right, anterior and superior are up. Each panel is
scaled by the voxel spacing so anatomy keeps its proportions, and carries
its orientation letters, so a flipped or transposed volume is obvious.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL_HEIGHT = 192
# label value -> RGB, cycling; 0 (background) is never drawn
PALETTE = np.array(
    [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)],
    dtype=np.float32,
)


def window(plane: np.ndarray, modality: str, lohi: tuple[float, float] | None = None) -> np.ndarray:
    """To uint8: CT through a wide HU window (air to bone), MR through its 1-99th percentiles."""
    if lohi is None:
        lohi = (-1000.0, 1000.0) if modality == "CT" else tuple(np.percentile(plane, [1, 99]))  # type: ignore[assignment]
    lo, hi = lohi
    scaled = (plane.astype(np.float32) - lo) / max(hi - lo, 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def mid_planes(volume: np.ndarray) -> dict[str, tuple[np.ndarray, tuple[str, str, str, str]]]:
    """Axial, coronal and sagittal mid-planes as display rows x columns, with (top, bottom, left, right) letters."""
    x, y, z = (s // 2 for s in volume.shape)
    # In RAS index order, rows must run from anterior/superior down: hence the flips.
    return {
        "axial": (volume[:, :, z].T[::-1], ("A", "P", "L", "R")),
        "coronal": (volume[:, y, :].T[::-1], ("S", "I", "L", "R")),
        "sagittal": (volume[x, :, :].T[::-1], ("S", "I", "P", "A")),
    }


_PANEL_SPACING = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}  # (row axis, column axis) in RAS


def thumbnail(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    modality: str,
    title: str = "",
    label: np.ndarray | None = None,
    lohi: tuple[float, float] | None = None,
) -> Image.Image:
    """One PNG-ready image: the three mid-planes side by side, optional label overlay."""
    font = ImageFont.load_default()
    if lohi is None and modality != "CT":
        lohi = tuple(np.percentile(volume[::2, ::2, ::2], [1, 99]))  # type: ignore[assignment]
    panels = []
    label_planes = mid_planes(label) if label is not None else {}
    for name, (plane, letters) in mid_planes(volume).items():
        rgb = np.repeat(window(plane, modality, lohi)[..., None], 3, axis=2).astype(np.float32)
        if name in label_planes:
            lab = label_planes[name][0]
            mask = lab > 0
            colours = PALETTE[(lab[mask].astype(np.int64) - 1) % len(PALETTE)]
            rgb[mask] = 0.55 * rgb[mask] + 0.45 * colours
        img = Image.fromarray(rgb.astype(np.uint8))
        rax, cax = _PANEL_SPACING[name]
        h_mm, w_mm = plane.shape[0] * spacing[rax], plane.shape[1] * spacing[cax]
        width = max(8, round(PANEL_HEIGHT * w_mm / max(h_mm, 1e-6)))
        img = img.resize((width, PANEL_HEIGHT), Image.Resampling.BILINEAR)
        d = ImageDraw.Draw(img)
        top, bottom, left, right = letters
        for text, xy in ((top, (width // 2 - 3, 2)), (bottom, (width // 2 - 3, PANEL_HEIGHT - 12)), (left, (3, PANEL_HEIGHT // 2 - 5)), (right, (width - 9, PANEL_HEIGHT // 2 - 5))):
            d.text(xy, text, fill=(255, 255, 0), font=font)
        d.text((3, 2), name, fill=(180, 180, 180), font=font)
        panels.append(img)
    header = 14 if title else 0
    out = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), PANEL_HEIGHT + header), (0, 0, 0))
    xpos = 0
    for p in panels:
        out.paste(p, (xpos, header))
        xpos += p.width + 4
    if title:
        ImageDraw.Draw(out).text((3, 1), title, fill=(255, 255, 255), font=font)
    return out
