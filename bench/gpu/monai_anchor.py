"""The anchor for our GPU pre-training figures: MONAI's self-supervised SwinUNETR pre-training, as its tutorial runs it.

    python bench/gpu/monai_anchor.py --src DIR [--steps 40] [--warmup 5] [--roi 96] [--feature-size 48]
                                     [--batch 2] [--samples 2] [--workers 4] [--precision bf16] [--out anchor.json]

The pipeline of Project-MONAI/research-contributions, SwinUNETR/Pretrain
(Tang et al., CVPR 2022), rebuilt from its description with MONAI's own
parts, so the same volumes and crop size can be timed the way
``bench/gpu/check.py`` times ours:

- data: ``LoadImaged`` of the ``.nii.gz`` files, ``EnsureChannelFirstd``,
  ``Orientationd`` (RAS), ``ScaleIntensityRanged`` (-1000..1000 HU to 0..1),
  ``SpatialPadd`` and ``CropForegroundd`` to the crop size,
  ``RandSpatialCropSamplesd`` (``--samples`` crops per volume read), through
  MONAI's ``Dataset`` and ``DataLoader`` (``--batch`` volumes per step, 4
  workers in the tutorial);
- network: MONAI's ``SwinTransformer`` (patch 2, window 7, depths 2-2-2-2,
  heads 3-6-12-24, ``--feature-size`` 48) with the tutorial's three heads:
  a rotation classifier (4 classes) and a contrastive projection (512) on
  the first two tokens of the deepest stage, and a convolutional decoder
  (5 x conv, instance norm, LeakyReLU, 2x trilinear upsampling) that
  reconstructs the input;
- step: every crop is rotated by a random multiple of 90° in plane, twice,
  and both copies are corrupted (random boxes filled with noise or with the
  same boxes of another crop of the batch); the loss is cross-entropy on the
  rotation, an NT-Xent loss (temperature 0.5) between the two copies, and
  L1 reconstruction of the rotated, uncorrupted crop; AdamW, lr 4e-4.

The tutorial trains with fp16 autocast and a gradient scaler; here autocast
takes ``--precision`` (bf16, as our runs do) so the two are timed alike.
Prints one JSON object: crops/s (median over the timed steps), data-wait
fraction, peak GPU memory, losses.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HU_WINDOW = (-1000.0, 1000.0)


def loader(files: list[Path], roi: int, samples: int, batch: int, workers: int) -> torch.utils.data.DataLoader:
    import monai.transforms as mt
    from monai.data import DataLoader, Dataset

    keys = ["image"]
    transform = mt.Compose([
        mt.LoadImaged(keys=keys),
        mt.EnsureChannelFirstd(keys=keys),
        mt.Orientationd(keys=keys, axcodes="RAS"),
        mt.ScaleIntensityRanged(keys=keys, a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        mt.SpatialPadd(keys=keys, spatial_size=(roi,) * 3),
        mt.CropForegroundd(keys=keys, source_key="image", k_divisible=(roi,) * 3, allow_smaller=True),
        mt.RandSpatialCropSamplesd(keys=keys, roi_size=(roi,) * 3, num_samples=samples, random_center=True, random_size=False),
    ])
    # A list long enough that the timed steps never reach an epoch's end (worker start-up is not throughput).
    items = [{"image": str(f)} for f in files] * 10_000
    return DataLoader(Dataset(items, transform), batch_size=batch, num_workers=workers, shuffle=True, drop_last=True,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


class SSLHeads(nn.Module):
    """MONAI's SwinTransformer with the tutorial's rotation, contrastive and reconstruction heads."""

    def __init__(self, feature_size: int = 48, in_channels: int = 1):
        super().__init__()
        from monai.networks.nets.swin_unetr import SwinTransformer

        self.encoder = SwinTransformer(in_chans=in_channels, embed_dim=feature_size, window_size=(7, 7, 7), patch_size=(2, 2, 2),
                                       depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), mlp_ratio=4.0, qkv_bias=True,
                                       norm_layer=nn.LayerNorm, spatial_dims=3)
        dim = feature_size * 16
        self.rotation = nn.Linear(dim, 4)
        self.contrastive = nn.Linear(dim, 512)
        widths = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv3d(a, b, 3, padding=1), nn.InstanceNorm3d(b), nn.LeakyReLU(),
                       nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]
        layers.append(nn.Conv3d(widths[-1], in_channels, 1))
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        deep = self.encoder(x.contiguous())[4]
        tokens = deep.flatten(2).transpose(1, 2)
        return self.rotation(tokens[:, 0]), self.contrastive(tokens[:, 1]), self.decoder(deep)


def rotate(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each crop turned by k x 90° in the (H, W) plane; returns the crops and k."""
    k = torch.randint(0, 4, (x.shape[0],), generator=g)
    return torch.stack([torch.rot90(c, int(r), (2, 3)) for c, r in zip(x, k)]), k.to(x.device)


def corrupt(x: torch.Tensor, g: torch.Generator, max_drop: float = 0.3, max_block: float = 0.25) -> torch.Tensor:
    """Random boxes of each crop filled with rescaled noise, then with prob. (B-1)/B boxes copied from another crop."""
    out = x.clone()
    b, _, *size = x.shape

    def boxes() -> list[tuple[slice, ...]]:
        want = float(torch.rand((), generator=g)) * max_drop * math.prod(size)
        got, found = 0, []
        while got < want:
            lo = [int(torch.randint(0, max(1, n - n // 20), (), generator=g)) for n in size]
            ext = [int(torch.randint(max(1, n // 20), max(2, int(n * max_block)), (), generator=g)) for n in size]
            sl = tuple(slice(a, min(a + e, n)) for a, e, n in zip(lo, ext, size))
            found.append(sl)
            got += math.prod(s.stop - s.start for s in sl)
        return found

    for i in range(b):
        for sl in boxes():
            noise = torch.randn(out[i][(slice(None), *sl)].shape, device=x.device)
            out[i][(slice(None), *sl)] = (noise - noise.min()) / (noise.max() - noise.min() + 1e-6)
        other = int(torch.randint(0, b, (), generator=g))
        if other != i:
            for sl in boxes():
                out[i][(slice(None), *sl)] = x[other][(slice(None), *sl)]
    return out


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    z = F.normalize(torch.cat([a, b]).float(), dim=1)
    sim = z @ z.t() / temperature
    n = a.shape[0]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    files = sorted(p for p in args.src.rglob("*") if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise SystemExit(f"{args.src}: no .nii/.nii.gz files")
    model = SSLHeads(args.feature_size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    data = iter(loader(files, args.roi, args.samples, args.batch, args.workers))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    records = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        x = next(data)["image"].as_tensor().to(device, non_blocking=True)
        t_data = time.perf_counter() - t0
        x1, r1 = rotate(x, g)
        x2, r2 = rotate(x, g)
        a1, a2 = corrupt(x1, g), corrupt(x2, g)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            rot1, con1, rec1 = model(a1)
            rot2, con2, rec2 = model(a2)
            rot_loss = F.cross_entropy(torch.cat([rot1, rot2]).float(), torch.cat([r1, r2]))
            con_loss = nt_xent(con1, con2)
            rec_loss = F.l1_loss(torch.cat([rec1, rec2]).float(), torch.cat([x1, x2]))
            loss = rot_loss + con_loss + rec_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()  # a host sync, as the tutorial's per-step print makes
        dt = time.perf_counter() - t0
        records.append({"step": step, "loss": loss_value, "seconds": dt, "data_seconds": t_data, "crops": x.shape[0]})
    timed = records[args.warmup:]
    rates = [r["crops"] / r["seconds"] for r in timed]
    losses = [r["loss"] for r in records]
    return {
        "bench": "monai_anchor", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "crops_per_s": round(statistics.median(rates), 3), "crops_per_s_range": [round(min(rates), 3), round(max(rates), 3)],
        "forward_passes_per_crop": 2, "data_wait": round(sum(r["data_seconds"] for r in timed) / sum(r["seconds"] for r in timed), 4),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "loss_first": losses[0], "loss_last": losses[-1], "loss_finite": all(math.isfinite(v) for v in losses),
        "settings": {"roi": args.roi, "feature_size": args.feature_size, "batch_volumes": args.batch, "samples_per_volume": args.samples,
                     "crops_per_step": args.batch * args.samples, "workers": args.workers, "precision": args.precision,
                     "steps": args.steps, "warmup": args.warmup, "files": len(files),
                     "parameters": sum(p.numel() for p in model.parameters())},
        "steps": records,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True, help="folder of .nii.gz volumes (the same our dataset was ingested from)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--roi", type=int, default=96, help="crop edge; a multiple of 32")
    ap.add_argument("--feature-size", type=int, default=48)
    ap.add_argument("--batch", type=int, default=2, help="volumes per step (the tutorial's batch_size)")
    ap.add_argument("--samples", type=int, default=2, help="crops per volume read (the tutorial's sw_batch_size)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--device")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.roi % 32 or args.roi < 64:
        ap.error("--roi must be a multiple of 32 (patch 2, four 2x merges) and at least 64 (the heads read two deepest tokens)")
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}))


if __name__ == "__main__":
    sys.exit(main())
