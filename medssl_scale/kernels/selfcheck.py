"""A one-time check of each fused kernel on the device it is about to run on, before ``auto`` trusts it.

``kernels: auto`` sends CUDA tensors to the Triton kernels. A kernel that
miscompiles for some GPU, driver or Triton version would not crash: it would
train on wrong masks or a wrong loss, silently. So the first time ``auto``
would run an op on a device, the op runs on small tensors both ways, fused
and reference, forward and backward, and the two are compared. An op that
differs, or raises, uses the reference for the rest of the process, with
one warning naming the op and what differed. ``kernels: triton`` skips the
check (it insists on the kernel); ``reference`` never needs it.

The check draws its tensors from a generator of its own, so it leaves the
global random state, and hence the run, as it found it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

OPS = ("channel_mask", "gaussian_noise", "masked_loss", "token_mask")
TOLERANCE = 1e-4  # fp32 inputs of order 1; the kernels agree to ~4e-6 (tests/test_kernels.py)

_results: dict[tuple[str, str], bool] = {}


def passed(op: str, device: torch.device | str) -> bool:
    """Whether ``op``'s fused kernel agreed with its reference on ``device``; checked once per process."""
    key = (op, str(torch.device(device)))
    if key not in _results:
        try:
            err = _CHECKS[op](torch.device(device))
        except Exception as e:  # a kernel that does not compile or launch is a failed check, not a crash
            ok, why = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
        else:
            ok, why = err <= TOLERANCE, f"largest difference from the reference {err:.3g}, more than {TOLERANCE:g}"
        if not ok:
            warnings.warn(f"kernels: the fused {op} failed its one-time self-check on {key[1]} ({why}); "
                          f"{op} uses the PyTorch reference in this process", RuntimeWarning, stacklevel=3)
        _results[key] = ok
    return _results[key]


def forget() -> None:
    """Drop every result, so the next call checks again (after a kernel or driver change in a long-lived process)."""
    _results.clear()


# -- the checks: each returns the largest absolute difference over outputs and gradients ------------


def _inputs(device: torch.device, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(20261207)
    return [torch.randn(s, generator=g, device=device).requires_grad_() for s in shapes]


def _both(fused: Callable[..., torch.Tensor], ref: Callable[..., torch.Tensor], inputs: list[torch.Tensor], upstream: torch.Tensor) -> float:
    """max |fused - reference| over the output and the gradients of every input."""
    outs = []
    for fn in (fused, ref):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with torch.enable_grad(), torch.autocast(device_type=upstream.device.type, enabled=False):
            y = fn(*leaves)
            grads = torch.autograd.grad((y.float() * upstream).sum(), leaves, allow_unused=True)
        outs.append([y.detach().float()] + [torch.zeros_like(t) if g is None else g.float() for t, g in zip(leaves, grads)])
    return max((a - b).abs().max().item() if a.numel() else 0.0 for a, b in zip(*outs))


def _channel_mask(device: torch.device) -> float:
    from medssl_scale.kernels import reference, triton_disrupt

    x, values = _inputs(device, (2, 16, 3, 4, 5), (16,))
    up = _inputs(device, (2, 16, 3, 4, 5))[0].detach()
    errs = []
    for pt in (False, True):  # a shared subset (the released recipe) and one per token; zero and learned fills
        errs.append(_both(lambda t, pt=pt: triton_disrupt.disrupt(t, 0.6, 7, pt),
                          lambda t, pt=pt: reference.channel_mask(t, 0.6, 7, pt), [x], up))
        errs.append(_both(lambda t, v, pt=pt: triton_disrupt.disrupt(t, 0.6, 7, pt, v),
                          lambda t, v, pt=pt: reference.channel_mask(t, 0.6, 7, pt, v), [x, values], up))
    return max(errs)


def _gaussian_noise(device: torch.device) -> float:
    from medssl_scale.kernels import reference, triton_disrupt

    (x,) = _inputs(device, (2, 8, 5, 7))
    up = torch.ones_like(x)
    return _both(lambda t: triton_disrupt.disrupt(t, 0.0, 0, std=0.5, noise_seed=5),
                 lambda t: reference.gaussian_noise(t, 0.5, 5), [x], up)


def _masked_loss(device: torch.device) -> float:
    from medssl_scale.kernels import masked_mse

    pred, target = _inputs(device, (2, 12, 8), (2, 12, 8))
    ids = torch.tensor([[0, 3, 4, 9, 11], [1, 2, 5, 6, 10]], device=device)
    up = torch.ones((), device=device)
    return max(_both(lambda p, t, n=norm: masked_mse.masked_loss(p, t, ids, n, fused=True),
                     lambda p, t, n=norm: masked_mse.masked_loss(p, t, ids, n, fused=False), [pred, target], up)
               for norm in ("none", "patch", "l2"))


def _token_mask(device: torch.device) -> float:
    from medssl_scale.kernels import token_masking

    x, token = _inputs(device, (2, 20, 8), (8,))
    fused_ids = token_masking.token_mask(x.detach(), 0.5, 9, token.detach(), fused=True)[1]
    ref_ids = token_masking.token_mask(x.detach(), 0.5, 9, token.detach(), fused=False)[1]
    if not torch.equal(fused_ids, ref_ids):
        return float("inf")  # other tokens hidden: no tolerance makes that right
    up = _inputs(device, (2, 20, 8))[0].detach()
    return _both(lambda t, m: token_masking.token_mask(t, 0.5, 9, m, fused=True)[0],
                 lambda t, m: token_masking.token_mask(t, 0.5, 9, m, fused=False)[0], [x, token], up)


_CHECKS: dict[str, Callable[[torch.device], float]] = {
    "channel_mask": _channel_mask, "gaussian_noise": _gaussian_noise, "masked_loss": _masked_loss, "token_mask": _token_mask,
}
