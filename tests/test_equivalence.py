"""Numerical equivalence through the engine: real runs (one process, and 2 ranks under torchrun with gloo on CPU).

What holds (docs/training.md, "What is tested to be equivalent"): the same global batch gives the same
losses and weights whether it is one batch, grad_accum micro-batches, or one batch per rank, under ZeRO
stages 0 to 3; bf16 follows the fp32 curve. The runs use DAE with only its deterministic disruption
(downsampling) and no contrastive term: noise and masking draw per (step, rank, micro-batch), so with
them on, the runs see other (equally distributed) draws and are not expected to be equal. They use SGD:
AdamW divides each gradient element by its own running magnitude, so an element whose true gradient is
zero (a convolution bias before InstanceNorm) moves by about lr in the direction of its rounding noise,
and weights then differ by up to lr however exact the arithmetic (measured: 5.7e-3 apart after 4 steps).

Tolerances, fp32: the runs differ only in the order of float32 sums (a batch mean against a mean of
rank means; DeepSpeed's gradient all-reduce against one backward over the whole batch), each about
1e-7 relative; over STEPS steps these stay below LOSS_RTOL for the per-step losses and below
WEIGHT_ATOL + WEIGHT_RTOL * |w| for every weight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sample_data import training_dataset
from test_train import TINY, curve, run

STEPS = 4
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-7
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 5e-6
BF16_RTOL = 0.05  # per-step loss of a bf16 run (bf16 weights and activations, fp32 master weights) against fp32
RUN = "dae-tiny"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return training_dataset(tmp_path_factory.mktemp("equiv"), n_patients=3, n_mr=1, ct_shape=(32, 32, 24), mr_shape=(32, 32, 24))


def _common(dataset: Path) -> list[str]:
    return ["--config", str(TINY), "--no-progress", f"data.dataset={dataset}", f"steps={STEPS}", "data.crop=16", "data.workers=1",
            "objectives.dae.disruptions=[downsample]", "objectives.dae.cmcl_weight=0", "optim.name=sgd", "optim.lr=0.05",
            "optim.warmup_steps=1",
            f"checkpoint.every={STEPS}", f"tracking.plot_every={STEPS}"]


def _train(dataset: Path, where: Path, *overrides: str, nproc: int = 1) -> Path:
    launch = ["pretrain"] if nproc == 1 else ["launch", "local", "--nproc", str(nproc)]
    out = run(*launch, *_common(dataset), "workdir=w", *overrides, cwd=where, timeout=300)
    assert f"finished at step {STEPS} ({nproc} rank(s))" in out
    return where / "w" / RUN


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from medssl_scale.train.checkpoint import fp32_state_dict

    return {k: v.detach() for k, v in fp32_state_dict(run_dir / "checkpoints" / f"step-{STEPS:08d}").items()}


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = curve(a), curve(b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([lb[s] for s in sorted(lb)], [la[s] for s in sorted(la)], rtol=LOSS_RTOL, atol=LOSS_ATOL)
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    for k in wa:
        np.testing.assert_allclose(wb[k].numpy(), wa[k].numpy(), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, err_msg=k)
    # Trained weights far from where they started, else the comparison says nothing about training.
    moved = {k: float((wa[k] - _initial()[k]).abs().max()) for k in wa}
    assert min(moved.values()) > 0 and max(moved.values()) > 1000 * WEIGHT_ATOL, moved


def _objective():
    from medssl_scale.objectives import build_objective

    return build_objective("dae", model={"name": "conv_ae", "channels": (8, 16, 32)}, projection_dim=16, cmcl_weight=0.0)


_INIT: dict[str, torch.Tensor] = {}


def _initial() -> dict[str, torch.Tensor]:
    """The weights every run starts from (seed 0), to check that the compared weights moved."""
    if not _INIT:
        torch.manual_seed(0)
        _INIT.update(_objective().state_dict())
    return _INIT


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """One process, ZeRO-0, batch 2: the global batch every other run must reproduce."""
    return _train(dataset, tmp_path_factory.mktemp("ref"), "data.batch_size=2", "deepspeed.zero_stage=0")


def test_grad_accum_2_of_batch_1_equals_batch_2(dataset, reference, tmp_path):
    """ZeRO-1, one process, 2 micro-batches of 1 against one batch of 2 (ZeRO-0)."""
    accum = _train(dataset, tmp_path, "data.batch_size=1", "deepspeed.grad_accum=2", "deepspeed.zero_stage=1")
    assert_same_run(reference, accum)


def test_zero0_on_2_ranks_equals_one_process_and_exports(dataset, reference, tmp_path):
    """ZeRO-0, 2 ranks of batch 1 against one process of batch 2; the run's encoder published and pulled back equals the trained one."""
    two = _train(dataset, tmp_path, "data.batch_size=1", "deepspeed.zero_stage=0", nproc=2)
    assert_same_run(reference, two)

    from medssl_scale.registry import load_encoder
    from medssl_scale.registry.publish import publish

    uri = f"sqlite:///{(tmp_path / 'w' / 'mlruns.db').absolute()}"
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (r,) = client.search_runs([client.get_experiment_by_name("medssl-tiny").experiment_id])
    publish(r.info.run_id, "equiv-encoder", alias="zero0", tracking_uri=uri)
    pulled = load_encoder("models:/equiv-encoder@zero0", tracking_uri=uri).state_dict()
    trained = _objective()
    trained.load_state_dict(_weights(two))
    want = trained.encoder().state_dict()
    assert set(pulled) == set(want) and len(want) > 0
    for k in want:
        assert torch.equal(pulled[k], want[k]), k


@pytest.fixture(scope="module")
def zero2(dataset, tmp_path_factory):
    return _train(dataset, tmp_path_factory.mktemp("zero2"), "data.batch_size=1", "deepspeed.zero_stage=2", nproc=2)


def test_zero2_on_2_ranks_equals_one_process(reference, zero2):
    """ZeRO-2, 2 ranks of batch 1 (each rank's optimizer state and gradients half of the whole) against one process of batch 2."""
    assert_same_run(reference, zero2)


def test_zero3_equals_zero2(dataset, zero2, tmp_path):
    """ZeRO-3 (parameters partitioned too, gathered for each forward) against ZeRO-2, 2 ranks each."""
    assert_same_run(zero2, _train(dataset, tmp_path, "data.batch_size=1", "deepspeed.zero_stage=3", nproc=2))


def test_bf16_follows_the_fp32_curve(dataset, reference, tmp_path):
    """bf16 (the engine's bf16: weights, activations and gradients in bf16, fp32 master weights) against fp32, one process of batch 2."""
    bf16 = curve(_train(dataset, tmp_path, "data.batch_size=2", "deepspeed.zero_stage=2", "deepspeed.precision=bf16"))
    fp32 = curve(reference)
    assert sorted(bf16) == sorted(fp32) == list(range(1, STEPS + 1))
    rel = [abs(bf16[s] - fp32[s]) / fp32[s] for s in fp32]
    assert max(rel) <= BF16_RTOL, rel
    assert max(rel) > 1e-6, "the bf16 run computed exactly the fp32 losses: it did not run in bf16"
