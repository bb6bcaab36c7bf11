"""The fused kernels against their PyTorch references, and the references' own semantics.

Triton runs on the CPU only under ``TRITON_INTERPRET=1``, which must be set
before ``triton`` is imported: each comparison runs in its own process. With
``MEDSSL_KERNEL_TEST_DEVICE=cuda`` (what ``bench/gpu/check.py`` sets on a
GPU machine) the same scripts run on the GPU with compiled kernels instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from medssl_scale import kernels
from medssl_scale.kernels import philox

ROOT = Path(__file__).resolve().parents[1]

_TRITON_DRAWS = """
import json, sys, torch, triton, triton.language as tl

@triton.jit
def draw(out_u, out_n, seed, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_u + offs, tl.rand(seed, offs), mask=m)
    tl.store(out_n + offs, tl.randn(seed, offs), mask=m)

n, out = 2500, {}
for seed in (0, 7, 2**40 + 123, 2**63 - 5):
    u, r = torch.empty(n), torch.empty(n)
    draw[(triton.cdiv(n, 1024),)](u, r, seed, n, BLOCK=1024)  # n is not a multiple of the block
    out[str(seed)] = [u.tolist(), r.tolist()]
json.dump(out, open(sys.argv[1], "w"))
"""


DEVICE = os.environ.get("MEDSSL_KERNEL_TEST_DEVICE", "cpu")
# Every script starts here: on a GPU its tensors are made there (factories follow the default device).
_PRELUDE = f"""
import torch
DEVICE = {DEVICE!r}
torch.set_default_device(DEVICE)
"""


def interpreted(tmp_path: Path, script: str, timeout: float = 600) -> dict:
    """Run ``script`` (it writes JSON to argv[1]) with Triton's CPU interpreter, or compiled on the GPU
    under ``MEDSSL_KERNEL_TEST_DEVICE=cuda``; returns what it wrote."""
    path = tmp_path / "script.py"
    path.write_text(_PRELUDE + script)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, str(path), str(tmp_path / "out.json")], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


def test_philox_reference_matches_triton_bit_for_bit(tmp_path):
    draws = interpreted(tmp_path, _TRITON_DRAWS)
    offs = torch.arange(2500)
    for seed, (u, r) in draws.items():
        assert torch.equal(philox.rand(int(seed), offs), torch.tensor(u, dtype=torch.float32)), seed
        torch.testing.assert_close(philox.randn(int(seed), offs), torch.tensor(r, dtype=torch.float32), rtol=0, atol=1e-5)


def test_philox_uniforms_look_uniform_and_streams_differ():
    u = philox.rand(3, torch.arange(200_000))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    assert abs(torch.histc(u, 10, 0, 1).std().item() / 20_000) < 0.02
    n = philox.randn(3, torch.arange(200_000))
    assert abs(n.mean().item()) < 0.01 and abs(n.std().item() - 1) < 0.01
    assert not torch.equal(philox.rand(4, torch.arange(100)), philox.rand(3, torch.arange(100)))


_FUSED_VS_REFERENCE = """
import json, sys, torch
from medssl_scale import kernels
from medssl_scale.objectives import build_objective

out = {"ops": [], "objective": {}}
torch.manual_seed(0)
cases = [(shape, pt, lv, torch.float32) for shape in [(2, 10, 3, 4, 5), (3, 37, 11)] for pt in (False, True) for lv in (False, True)]
cases += [((2, 10, 3, 4, 5), True, True, torch.bfloat16), ((3, 37, 11), False, False, torch.bfloat16)]
for shape, per_token, learned, dtype in cases:  # channels-first embeddings; a token-major [B, N, C] seen as [B, C, N]
    token_major = len(shape) == 3
    base = torch.randn(shape[0], shape[2], shape[1]) if token_major else torch.randn(shape)
    base = base.to(dtype).requires_grad_()
    x = base.transpose(1, 2) if token_major else base
    vals = (torch.randn(shape[1]) - 5).to(dtype).requires_grad_() if learned else None
    g = torch.randn(shape).to(dtype)
    ys = {}
    for backend in ("reference", "triton"):
        y = kernels.channel_mask(x, 0.6, 11, per_token, vals, backend=backend)
        y = kernels.gaussian_noise(y, 0.3, 5, backend=backend)
        grads = torch.autograd.grad((y * g).float().sum(), [base] + ([vals] if learned else []))
        ys[backend] = (y.detach().float(), [t.float() for t in grads])
    (yr, gr), (yt, gt) = ys["reference"], ys["triton"]
    # bf16: relative to each tensor's largest magnitude (one rounding of a value of ~|5| is 0.02)
    rel = lambda a, b: (a - b).abs().max().item() / (1.0 if dtype == torch.float32 else a.abs().max().item() + 1e-6)  # noqa: E731
    err = max([rel(yr, yt)] + [rel(a, b) for a, b in zip(gr, gt)])
    out["ops"].append({"shape": shape, "per_token": per_token, "learned": learned, "dtype": str(dtype), "err": err})

for backend in ("reference", "triton"):
    torch.manual_seed(0)
    obj = build_objective("dae", model={"name": "conv_ae", "channels": [4, 8]}, kernels=backend, mask_per_token=True,
                          mask_fill="learned", cmcl_weight=0.0)
    x = torch.rand(2, 1, 16, 16, 16)
    losses = obj({"image": x}, step=3, rank=1)
    losses["loss"].backward()
    out["objective"][backend] = {"loss": losses["loss"].item(),
                                 "grads": {k: p.grad.flatten()[:50].tolist() for k, p in obj.named_parameters()}}
json.dump(out, open(sys.argv[1], "w"))
"""


def test_fused_disruption_kernel_matches_the_reference_forward_and_backward(tmp_path):
    """Shared and per-token masks, zero and learned fills, noise, non-contiguous input; then a DAE step on either path."""
    out = interpreted(tmp_path, _FUSED_VS_REFERENCE)
    assert len(out["ops"]) == 10
    for case in out["ops"]:
        # fp32: 4e-6 seen (the learned values' gradients sum in another order); bf16: within a rounding or two
        assert case["err"] < (1e-5 if case["dtype"] == "torch.float32" else 1e-2), case
    ref, tri = out["objective"]["reference"], out["objective"]["triton"]
    assert abs(ref["loss"] - tri["loss"]) < 1e-5
    for name, g in ref["grads"].items():
        torch.testing.assert_close(torch.tensor(tri["grads"][name]), torch.tensor(g), rtol=1e-4, atol=1e-5)


# Seeds where float32 scores tie exactly at the k-th place (found by searching philox.rand; the test checks the tie is there):
# per token, seed 48 ties token 1's 41st and 42nd lowest of 64 channels; shared, seed 892 ties the 18th and 19th.
_TIES = """
import json, sys, torch
from medssl_scale import kernels

torch.manual_seed(0)
out = []
for per_token, seed, k in ((True, 48, 41), (False, 892, 18)):
    base = torch.randn(2, 64, 16, requires_grad=True)  # [B, C, S]: 32 tokens, token t = (t // 16, t % 16)
    vals = (1000 + torch.arange(64.0)).requires_grad_()  # a masked element is recognisable by its value
    g = torch.randn(2, 64, 16)
    res = {}
    for backend in ("reference", "triton"):
        y = kernels.channel_mask(base, k / 64, seed, per_token, vals, backend=backend)
        gx, gv = torch.autograd.grad((y * g).sum(), [base, vals])
        res[backend] = {"counts": (y.detach() >= 999).sum(1).flatten().tolist(), "y": y.detach(), "gx": gx, "gv": gv,
                        "zero_grads": (gx == 0).sum(1).flatten().tolist()}
    r, t = res["reference"], res["triton"]
    out.append({"per_token": per_token, "k": k, "counts": {b: res[b]["counts"] for b in res}, "zero_grads": {b: res[b]["zero_grads"] for b in res},
                "err": max((r[n] - t[n]).abs().max().item() for n in ("y", "gx")), "gv_err": (r["gv"] - t["gv"]).abs().max().item()})
json.dump(out, open(sys.argv[1], "w"))
"""


def test_disruption_masks_exactly_k_channels_when_scores_tie(tmp_path):
    """float32 scores tie at the k-th place: both paths mask exactly k per token, the same k (ties to the lower channel), forward and backward."""
    for per_token, seed, k, token in ((True, 48, 41, 1), (False, 892, 18, 0)):
        ranked = philox.rand(seed, torch.arange(32 * 64)).view(32, 64)[token].sort().values
        assert ranked[k - 1] == ranked[k]  # the premise: the k-th and (k+1)-th lowest scores are equal
    out = interpreted(tmp_path, _TIES)
    for case in out:
        for backend in ("reference", "triton"):
            assert case["counts"][backend] == [case["k"]] * 32, (case["per_token"], backend, case["counts"][backend])
            assert case["zero_grads"][backend] == [case["k"]] * 32, (case["per_token"], backend)
        assert case["err"] == 0 and case["gv_err"] < 1e-4, case  # the same channels; the values' gradient sums in another order


_MASKED_LOSS = """
import json, sys, torch
from medssl_scale import kernels

torch.manual_seed(0)
out = []
for norm in ("none", "patch", "l2"):
    for dtype in (torch.float32, torch.bfloat16):
        pred = torch.randn(3, 9, 37).to(dtype).requires_grad_()  # 37: not a power of two
        tgt = torch.randn(3, 9, 37).to(dtype)
        ids = torch.stack([torch.randperm(9)[:4] for _ in range(3)])
        res = {}
        for backend in ("reference", "triton"):
            loss = kernels.masked_loss(pred, tgt, ids, norm, backend=backend)
            (g,) = torch.autograd.grad(loss * 3.0, pred)
            res[backend] = (loss.item(), g.float())
        out.append({"norm": norm, "dtype": str(dtype), "loss_err": abs(res["reference"][0] - res["triton"][0]),
                    "grad_err": (res["reference"][1] - res["triton"][1]).abs().max().item(),
                    "unmasked_grad": res["triton"][1].index_put((torch.arange(3)[:, None], ids), torch.zeros(())).abs().sum().item()})
pred = torch.randn(2, 5, 8, requires_grad=True)
empty = kernels.masked_loss(pred, torch.randn(2, 5, 8), torch.zeros(2, 0, dtype=torch.long), backend="triton")
empty.backward()
json.dump({"cases": out, "empty": [empty.item(), pred.grad.abs().sum().item()]}, open(sys.argv[1], "w"))
"""


def test_fused_masked_loss_matches_the_reference(tmp_path):
    out = interpreted(tmp_path, _MASKED_LOSS)
    for case in out["cases"]:
        tol = 1e-5 if "float32" in case["dtype"] else 1e-3  # bf16 gradients are rounded on the way out
        assert case["loss_err"] < 1e-5 and case["grad_err"] < tol and case["unmasked_grad"] == 0, case
    assert out["empty"] == [0.0, 0.0]  # no masked token: a zero loss, no gradient


def test_references_pass_gradcheck_in_double_precision():
    from medssl_scale.kernels import reference
    from medssl_scale.kernels.masked_mse import reference as masked_reference

    p = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, 5, dtype=torch.float64)
    ids = torch.tensor([[0, 3], [5, 1]])
    for norm in ("none", "patch", "l2"):
        assert torch.autograd.gradcheck(lambda x, n=norm: masked_reference(x, t, ids, n), (p,))
    x = torch.randn(2, 6, 2, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for per_token in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, pt=per_token: reference.gaussian_noise(reference.channel_mask(a, 0.5, 3, pt, b), 0.2, 4), (x, v))


# -- token masking (RepRec's representation recovery) -----------------------------------------

def test_token_mask_reference_exact_counts_seeds_and_uniform_positions():
    from medssl_scale.kernels import token_masking as tm

    x = torch.randn(3, 50, 4) + 5
    tok = torch.full((4,), -100.0)
    y, ids = kernels.token_mask(x, 0.6, 9, tok)
    assert ids.shape == (3, 30) and torch.equal(ids, ids.sort(dim=1).values)  # exactly round(0.6 N), ascending
    hidden = (y == -100).all(-1)
    assert torch.equal(hidden.nonzero()[:, 1].view(3, 30), ids)  # the ids are the rows that hold the mask token
    torch.testing.assert_close(y[~hidden], x[~hidden])
    assert not torch.equal(ids[0], ids[1])  # each sample its own subset
    assert torch.equal(ids, kernels.token_mask(x, 0.6, 9, tok)[1])
    assert not torch.equal(ids, kernels.token_mask(x, 0.6, 10, tok)[1])
    y0, ids0 = kernels.token_mask(x, 0.0, 9, tok)
    assert ids0.shape == (3, 0) and torch.equal(y0, x)  # ratio 0 masks nothing
    assert tm.keys(4, 1000, 3, x.device).unique().numel() == 4000  # distinct keys: counts are exact even when draws tie
    freq = torch.zeros(40)
    for seed in range(400):
        freq.index_add_(0, tm.mask_ids(1, 40, 0.25, seed, x.device)[0], torch.ones(10))
    assert (freq / 400 - 0.25).abs().max() < 0.1  # every position is hidden about a quarter of the time


def test_token_mask_reference_passes_gradcheck():
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    tok = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t: kernels.token_mask(a, 0.5, 4, t, backend="reference")[0], (x, tok))


_TOKEN_MASK = """
import json, sys, torch
from medssl_scale import kernels
from medssl_scale.objectives import build_objective

torch.manual_seed(0)
out = {"ops": [], "objective": {}}
for b, n, c, dtype, ratio in [(2, 7, 5, torch.float32, 0.6), (3, 300, 37, torch.float32, 0.75), (2, 216, 300, torch.bfloat16, 0.6),
                              (2, 9, 4, torch.float32, 0.0), (1, 1, 3, torch.float32, 0.6),
                              (1, 8200, 3, torch.float32, 0.6),  # above SORT_TOKENS: keys ranked by torch, the pass still fused
                              (2, 5, 0, torch.float32, 0.6)]:  # no channels: ids all the same
    base = torch.randn(b, c, n).to(dtype).requires_grad_()  # token-major [B, N, C] as a transpose: not contiguous
    x = base.transpose(1, 2)
    tok = torch.randn(c).to(dtype).requires_grad_()
    g = torch.randn(b, n, c).to(dtype)
    res = {}
    for backend in ("reference", "triton"):
        y, ids = kernels.token_mask(x, ratio, 2**40 + 17, tok, backend=backend)
        gx, gt = torch.autograd.grad((y * g).float().sum(), [base, tok])
        res[backend] = (y.detach().float(), ids, gx.float(), gt.float())
    r, t = res["reference"], res["triton"]
    err = lambda a, b: (a - b).abs().max().item() if a.numel() else 0.0  # noqa: E731
    out["ops"].append({"shape": [b, n, c], "dtype": str(dtype), "ids_equal": torch.equal(r[1], t[1]), "k": t[1].shape[1],
                       "y_err": err(r[0], t[0]), "gx_err": err(r[2], t[2]),
                       "gtok_err": err(r[3], t[3]) / (r[3].abs().max().item() + 1e-6) if c else 0.0})

model = {"name": "reprec_hybrid", "channels": [4, 8, 16, 32], "dim": 16, "depth": 1, "heads": 2}
x = torch.rand(2, 1, 24, 24, 24)
for backend in ("reference", "triton"):
    torch.manual_seed(0)
    obj = build_objective("reprec", model=model, projection_dim=8, kernels=backend, recovery_trains_cnn=True)
    losses = obj({"view1": x, "view2": x.flip(3)}, step=3, rank=1)
    losses["loss"].backward()
    out["objective"][backend] = {"recovery": losses["recovery"].item(),
                                 "grads": {k: p.grad.flatten()[:50].tolist() for k, p in obj.named_parameters() if p.grad is not None}}
json.dump(out, open(sys.argv[1], "w"))
"""


def test_fused_token_mask_matches_the_reference_and_reprec_agrees_on_either_path(tmp_path):
    out = interpreted(tmp_path, _TOKEN_MASK)
    for case in out["ops"]:
        assert case["ids_equal"] and case["y_err"] == 0 and case["gx_err"] == 0 and case["gtok_err"] < 1e-2, case
    assert [case["k"] for case in out["ops"]] == [4, 225, 130, 0, 1, 4920, 3]
    ref, tri = out["objective"]["reference"], out["objective"]["triton"]
    assert ref["recovery"] > 0 and abs(ref["recovery"] - tri["recovery"]) < 1e-5
    assert "net.mask_token" in tri["grads"] and tri["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(torch.tensor(tri["grads"][name]), torch.tensor(g), rtol=1e-4, atol=1e-5)


def test_kernel_benchmark_runs_every_line_in_smoke_mode(tmp_path):
    """No GPU in CI: ``--smoke`` keeps bench/kernels.py working (interpreter, compile's eager backend) until one runs it."""
    out = tmp_path / "kernels.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--smoke", "--tokens", "8", "--channels", "16", "--batch", "2",
                        "--out", str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["disrupt_per_token_learned_noise", "masked_mse_l2", "token_mask"]
    assert all(r[f"{label}_fwd_bwd_ms"] > 0 for r in rows for label in ("fused", "eager", "compiled"))


_SELF_CHECK = """
import json, sys, warnings, torch
from medssl_scale import kernels
from medssl_scale.kernels import reference, selfcheck, triton_disrupt

out = {}
states = lambda: [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if DEVICE != "cpu" else [])  # noqa: E731
before = states()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    out["healthy"] = {op: selfcheck.passed(op, DEVICE) for op in selfcheck.OPS}
out["healthy_warnings"] = [str(m.message) for m in w]
out["rng_untouched"] = all(torch.equal(a, b) for a, b in zip(before, states()))

# auto consults the check wherever it would compile: on the CPU the interpreter stands in for a GPU.
kernels._compiled_device = lambda x: True
calls = {"n": 0}
real = triton_disrupt.disrupt
def counted(*a, **kw):
    calls["n"] += 1
    return real(*a, **kw)
triton_disrupt.disrupt = counted
x = torch.randn(2, 16, 3, 4, 5)
y = kernels.channel_mask(x, 0.6, 3, True, backend="auto")
out["healthy_dispatch_fused"] = calls["n"] == 1 and (y - reference.channel_mask(x, 0.6, 3, True)).abs().max().item() < 1e-5

# A kernel that is off by a little, and one that does not run at all.
selfcheck.forget()
triton_disrupt.disrupt = lambda *a, **kw: real(*a, **kw) * 1.001
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    out["broken"] = {op: selfcheck.passed(op, DEVICE) for op in selfcheck.OPS}
    out["again"] = selfcheck.passed("channel_mask", DEVICE)
    y = kernels.channel_mask(x, 0.6, 3, True, backend="auto")
out["broken_warnings"] = [str(m.message) for m in w]
out["broken_dispatch_is_reference"] = torch.equal(y, reference.channel_mask(x, 0.6, 3, True))
def raises(*a, **kw):
    raise RuntimeError("PassManager::run failed")
triton_disrupt.disrupt = raises
selfcheck.forget()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    out["raising"] = selfcheck.passed("gaussian_noise", DEVICE)
    y = kernels.gaussian_noise(x, 0.1, 4, backend="auto")
out["raising_warnings"] = [str(m.message) for m in w]
out["raising_dispatch_is_reference"] = torch.equal(y, reference.gaussian_noise(x, 0.1, 4))
json.dump(out, open(sys.argv[1], "w"))
"""


def test_auto_trusts_a_kernel_only_after_its_self_check_and_falls_back_with_one_warning(tmp_path):
    out = interpreted(tmp_path, _SELF_CHECK)
    assert out["healthy"] == {op: True for op in ("channel_mask", "gaussian_noise", "masked_loss", "token_mask")}
    assert out["healthy_warnings"] == [] and out["rng_untouched"] and out["healthy_dispatch_fused"]
    # Off by 0.1%: the disruption ops fail, the others (other kernels) still pass; each failure warns once.
    assert out["broken"] == {"channel_mask": False, "gaussian_noise": False, "masked_loss": True, "token_mask": True}
    assert out["again"] is False and out["broken_dispatch_is_reference"]
    assert len(out["broken_warnings"]) == 2, out["broken_warnings"]
    first = out["broken_warnings"][0]
    assert f"fused channel_mask failed its one-time self-check on {DEVICE}" in first and "largest difference" in first
    assert "uses the PyTorch reference" in first
    assert out["raising"] is False and out["raising_dispatch_is_reference"]
    assert len(out["raising_warnings"]) == 1 and "RuntimeError: PassManager::run failed" in out["raising_warnings"][0]
