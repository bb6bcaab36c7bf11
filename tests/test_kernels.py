"""The kernels' random numbers: the PyTorch references draw exactly what Triton's ``tl.rand``/``tl.randn`` draw.

Triton runs on the CPU only under ``TRITON_INTERPRET=1``, which must be set
before ``triton`` is imported: the comparison runs in its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

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


def test_philox_reference_matches_triton_bit_for_bit(tmp_path):
    script = tmp_path / "draw.py"
    script.write_text(_TRITON_DRAWS)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "draws.json")], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    draws = json.loads((tmp_path / "draws.json").read_text())
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
