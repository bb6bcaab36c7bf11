"""Fused Triton kernels against the eager PyTorch sequence they replace and against torch.compile of that sequence.

    python bench/kernels.py [--tokens 216,1728,4096] [--channels 768] [--batch 4] [--dtype bf16]
                            [--peak-gbs 3350] [--out bench/results/kernels.json]

Needs a CUDA device (prints a JSON saying so otherwise). Per kernel and token
count: median time of the fused kernel, of the eager sequence (draw, expand,
replace, add noise / gather, normalise, square, reduce) and of
``torch.compile`` of the same sequence, forward and backward; the speedups;
and the fused kernel's achieved memory bandwidth (bytes it must move: read x,
write y, each once; for the loss, read the masked rows of pred and target;
token masking moves as much as the disruption) in GB/s and as a fraction of
``--peak-gbs`` (default: the device's datasheet figure when known). Aims on
an H100: 3x eager, 1.2x torch.compile, 70% of peak bandwidth.

``--smoke`` runs every line of it on the CPU instead, under Triton's
interpreter with ``torch.compile``'s eager backend: the timings mean nothing,
it keeps the script working where there is no GPU (the test suite runs it).

The eager baselines are the best one would write without the kernels (for
the disruption ``torch.rand`` scores, ``topk`` of each token's lowest
scores scattered into a boolean, ``where``, ``torch.randn`` noise; for token
masking ``torch.rand``, ``topk``, a scattered boolean, ``where``), not our
references, whose Philox-in-int64 arithmetic exists to match the kernel bit
for bit and is slower than cuRAND. Every timed call starts with a cold L2:
a 256 MB buffer is written between calls, outside the timed events, so the
bandwidth figure is HBM bandwidth, not L2's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))
from _emit import emit  # noqa: E402

PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L40S": 864.0}  # HBM / GDDR datasheet figures


FLUSH_BYTES = 256 * 2**20  # several times the L2 of an H100/H200 (50-60 MB)
_flush = None


def _time(fn, warmup: int = 5, reps: int = 30) -> float:
    """Median ms of ``fn``; before each timed call a 256 MB buffer is written (outside the timed events), so no call starts with its inputs in L2."""
    global _flush
    import torch

    if not torch.cuda.is_available():  # --smoke
        import time

        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    if _flush is None:
        _flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        _flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]  # ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="216,1728,4096")
    ap.add_argument("--channels", type=int, default=768)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--peak-gbs", type=float)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="run on the CPU under TRITON_INTERPRET=1 (tiny sizes; timings meaningless)")
    args = ap.parse_args()
    if args.smoke:
        import os

        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        emit({"bench": "kernels", "skipped": "no CUDA device: the fused kernels run on GPUs (CPU tests use TRITON_INTERPRET=1)"}, args.out)
        return
    from medssl_scale.kernels import masked_mse
    from medssl_scale.kernels.triton_disrupt import disrupt
    from medssl_scale.kernels.triton_token_masking import fused_token_mask

    dev = torch.device("cpu" if args.smoke else "cuda")
    name = "cpu (TRITON_INTERPRET=1, smoke)" if args.smoke else torch.cuda.get_device_name(0)
    compile_ = (lambda fn: torch.compile(fn, backend="eager")) if args.smoke else torch.compile
    peak = args.peak_gbs or next((v for k, v in PEAK_GBS.items() if k in name), None)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    b, c = args.batch, args.channels
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        # [B, N, C] token-major embeddings, seen as [B, C, N] (no copy)
        x = torch.randn(b, n, c, device=dev, dtype=dtype).transpose(1, 2).requires_grad_()
        values = torch.randn(c, device=dev, dtype=dtype, requires_grad=True)
        grad = torch.randn(b, c, n, device=dev, dtype=dtype)

        def eager(x=x, values=values):
            kk = round(0.6 * c)
            low = torch.rand(x.shape[0], x.shape[2], c, device=dev).topk(kk, dim=-1, largest=False).indices
            masked = torch.zeros(x.shape[0], x.shape[2], c, dtype=torch.bool, device=dev).scatter_(-1, low, True).transpose(1, 2)
            y = torch.where(masked, values.view(1, -1, 1).to(x.dtype), x)
            return y + 0.3 * torch.randn_like(y)

        compiled = compile_(eager)
        ops = {"fused": lambda x=x, values=values: disrupt(x, 0.6, 1, True, values, 0.3, 2), "eager": eager, "compiled": compiled}
        moved = 2 * x.numel() * x.element_size()  # read x, write y
        row = {"kernel": "disrupt_per_token_learned_noise", "tokens": n, "channels": c, "batch": b}
        for label, fn in ops.items():
            row[f"{label}_fwd_ms"] = _time(fn)
            row[f"{label}_fwd_bwd_ms"] = _time(lambda fn=fn: torch.autograd.grad(fn(), (x, values), grad))
        rows.append(row)

        k = max(1, round(0.6 * n))
        pred = torch.randn(b, n, c, device=dev, dtype=dtype, requires_grad=True)
        target = torch.randn(b, n, c, device=dev, dtype=dtype)
        ids = torch.rand(b, n, device=dev).topk(k, dim=1, largest=False).indices
        eager_loss = lambda: masked_mse.reference(pred, target, ids, "l2")  # noqa: E731
        ops = {"fused": lambda: masked_mse.masked_loss(pred, target, ids, "l2", fused=True), "eager": eager_loss,
               "compiled": compile_(eager_loss)}
        loss_row = {"kernel": "masked_mse_l2", "tokens": n, "channels": c, "batch": b}
        for label, fn in ops.items():
            loss_row[f"{label}_fwd_ms"] = _time(fn)
            loss_row[f"{label}_fwd_bwd_ms"] = _time(lambda fn=fn: torch.autograd.grad(fn(), pred))
        rows.append(loss_row)
        loss_moved = 2 * b * k * c * pred.element_size()

        tokens = torch.randn(b, c, n, device=dev, dtype=dtype).transpose(1, 2).requires_grad_()  # as the embedding gives them
        mask_token = torch.randn(c, device=dev, dtype=dtype, requires_grad=True)
        tgrad = torch.randn(b, n, c, device=dev, dtype=dtype)

        def eager_tokens(x=tokens, tok=mask_token):
            ids = torch.rand(x.shape[0], x.shape[1], device=dev).topk(k, dim=1, largest=False).indices.sort(dim=1).values
            hidden = torch.zeros(x.shape[:2], dtype=torch.bool, device=dev).scatter_(1, ids, True)
            return torch.where(hidden[..., None], tok, x), ids

        ops = {"fused": lambda: fused_token_mask(tokens, 0.6, 3, mask_token), "eager": eager_tokens, "compiled": compile_(eager_tokens)}
        tok_row = {"kernel": "token_mask", "tokens": n, "channels": c, "batch": b}
        for label, fn in ops.items():
            tok_row[f"{label}_fwd_ms"] = _time(fn)
            tok_row[f"{label}_fwd_bwd_ms"] = _time(lambda fn=fn: torch.autograd.grad(fn()[0], (tokens, mask_token), tgrad))
        rows.append(tok_row)
        for r, nbytes in ((row, moved), (loss_row, loss_moved), (tok_row, moved)):
            r["fused_vs_eager"] = round(r["eager_fwd_ms"] / r["fused_fwd_ms"], 2)
            r["fused_vs_compiled"] = round(r["compiled_fwd_ms"] / r["fused_fwd_ms"], 2)
            r["fused_vs_eager_fwd_bwd"] = round(r["eager_fwd_bwd_ms"] / r["fused_fwd_bwd_ms"], 2)
            r["fused_vs_compiled_fwd_bwd"] = round(r["compiled_fwd_bwd_ms"] / r["fused_fwd_bwd_ms"], 2)
            r["fused_gbs"] = round(nbytes / (r["fused_fwd_ms"] * 1e-3) / 1e9, 1)
            if peak:
                r["fused_fraction_of_peak"] = round(r["fused_gbs"] / peak, 3)
    emit({"bench": "kernels", "device": name, "dtype": args.dtype, "peak_gbs": peak, "eager_baseline": "topk + scatter",
          "l2_flush_mb": 0 if args.smoke else FLUSH_BYTES // 2**20, "command": "python bench/kernels.py " + " ".join(sys.argv[1:]),
          "rows": rows}, args.out)


if __name__ == "__main__":
    main()
