"""``medssl preview``: a contact sheet of what the loader will feed a model.

One row per sample: the axial mid-slice of every image the sample holds
(the crop, both views with their shared region outlined, or PCRLv2's global
and first local crops), label maps overlaid where there are any. Looking at
it answers what no number does: are crops on anatomy, is the intensity
window sane, do the views overlap where they say.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command line imports this module for its parser: keep torch out of that
    import torch
    from PIL import Image

TILE = 128
_IMAGE_KEYS = ("image", "view1", "view2", "global1", "global2", "local")


def _tile(volume: torch.Tensor, label: torch.Tensor | None, box: list[list[int]] | None) -> Image.Image:
    """Axial mid-slice of a (D, H, W) tensor, anterior up, scaled to its own 1-99th percentiles."""
    import numpy as np
    from PIL import Image, ImageDraw

    from medssl_scale.viz import PALETTE

    d = volume.shape[0] // 2
    plane = volume[d].float().numpy()[::-1]
    lo, hi = np.percentile(plane, [1, 99])
    g = np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    rgb = np.repeat(g[..., None], 3, axis=2)
    if label is not None:
        lab = label[d].numpy()[::-1]
        mask = lab > 0
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * PALETTE[(lab[mask].astype(np.int64) - 1) % len(PALETTE)]
    img = Image.fromarray(rgb.astype(np.uint8)).resize((TILE, TILE), Image.Resampling.NEAREST)
    if box is not None and box[0][0] <= d < box[1][0]:
        h, w = plane.shape
        sy, sx = TILE / h, TILE / w
        (_, y0, x0), (_, y1, x1) = box
        ImageDraw.Draw(img).rectangle([x0 * sx, (h - y1) * sy, x1 * sx - 1, (h - y0) * sy - 1], outline=(255, 200, 0))
    return img


def contact_sheet(batches: list[dict[str, Any]], rows: int = 8) -> Image.Image:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    lines: list[tuple[str, list[Image.Image]]] = []
    for batch in batches:
        for i in range(len(batch["volume"])):
            tiles = []
            for key in _IMAGE_KEYS:
                if key not in batch:
                    continue
                t = batch[key][i]
                if key == "local":
                    tiles += [_tile(t[j], None, None) for j in range(min(2, t.shape[0]))]
                    continue
                n = key[-1] if key.startswith("view") else ""
                label = batch.get(f"label{n}" if n else "label")
                label = label[i, 0] if label is not None else None
                box = batch[f"overlap{n}"][i].tolist() if n and f"overlap{n}" in batch else None
                tiles.append(_tile(t[0], label, box))
            modality = ("CT", "MR")[int(batch["modality"][i])]
            lines.append((f"{batch['volume'][i][:9]} {modality} subject {int(batch['subject'][i])}", tiles))
            if len(lines) == rows:
                break
        if len(lines) == rows:
            break
    width = max(len(t) for _, t in lines) * (TILE + 4)
    sheet = Image.new("RGB", (width, len(lines) * (TILE + 14)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for r, (title, tiles) in enumerate(lines):
        y = r * (TILE + 14)
        draw.text((2, y + 1), title, fill=(255, 255, 255), font=font)
        for c, tile in enumerate(tiles):
            sheet.paste(tile, (c * (TILE + 4), y + 14))
    return sheet


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preview", help="write a contact sheet of the crops and views a data config produces")
    p.add_argument("--config", type=Path, help="a run config (its data: section) or a data section file")
    p.add_argument("--dataset", help="dataset directory (overrides the config's data.dataset)")
    p.add_argument("--rows", type=int, default=8, help="samples to show (default 8)")
    p.add_argument("--out", type=Path, default=Path("preview.png"), help="PNG to write (default preview.png)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data settings, e.g. views.kind=pair crop=64")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from medssl_scale.config import apply_overrides, load_yaml
    from medssl_scale.data.config import DataConfig
    from medssl_scale.data.loader import Loader

    try:
        raw = load_yaml(args.config) if args.config else {}
        data = raw.get("data", raw) if isinstance(raw.get("data"), dict) else raw
        data = apply_overrides(data, [o.removeprefix("data.") for o in args.overrides])
        if args.dataset:
            data["dataset"] = args.dataset
        if "dataset" not in data:
            raise ValueError("no dataset: give --dataset or data.dataset in the config")
        # One crop per visit unless asked otherwise, so the rows show different scans.
        cfg = DataConfig.model_validate({"crops_per_visit": 1, **data, "workers": 0})
        loader = Loader(cfg, rank=0, world=1)
        batches, n = [], 0
        for batch in loader:
            batches.append(batch)
            n += len(batch["volume"])
            if n >= args.rows:
                break
    except (ValueError, ValidationError, FileNotFoundError) as e:
        print(f"medssl preview: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(batches, args.rows).save(args.out)
    print(f"wrote {args.out} ({min(n, args.rows)} samples of {cfg.dataset}, views: {cfg.views.kind})")
    return 0
