"""The pre-training objectives: loss terms on hand-worked cases, and each objective trained with 2 ranks, then published."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sample_data import training_dataset

from medssl_scale import kernels
from medssl_scale.objectives import build_objective
from medssl_scale.objectives.pcrlv2 import symmetric_cosine

ROOT = Path(__file__).resolve().parents[1]
TINY = {name: ROOT / "configs" / name / "tiny.yaml" for name in ("dae", "pcrlv2", "lrc", "mixcl", "reprec")}
TINY["lrc-moco"] = ROOT / "configs" / "lrc" / "moco-tiny.yaml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return training_dataset(tmp_path_factory.mktemp("objectives"))


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name not in ("data", "finetune")))
def test_every_shipped_run_config_validates(path):
    from medssl_scale.train.config import load_run_config

    cfg = load_run_config(ROOT / path)
    assert cfg.objectives and cfg.name in path.replace("/", "-")


def test_the_btcv_finetune_recipe_validates():
    from medssl_scale.config import load_yaml
    from medssl_scale.downstream.finetune import FinetuneConfig

    cfg = FinetuneConfig.model_validate({**load_yaml(ROOT / "configs" / "finetune" / "btcv.yaml"), "encoder": "models:/x@y"})
    assert len(cfg.class_names) == 13 and cfg.normalize.ct_window == (-175.0, 250.0) and cfg.crop == (96, 96, 96)


# -- PCRLv2 ------------------------------------------------------------------------------------

def test_symmetric_cosine_by_hand_and_stop_gradient():
    p1 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    p2 = torch.tensor([[0.0, 2.0]], requires_grad=True)
    z1 = torch.tensor([[3.0, 0.0]], requires_grad=True)
    z2 = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss = symmetric_cosine(p1, z1, p2, z2)
    # cos(p1, z2) = 1/sqrt(2); cos(p2, z1) = 0
    torch.testing.assert_close(loss, torch.tensor(-0.5 / 2**0.5))
    loss.backward()
    assert z1.grad is None and z2.grad is None  # the targets are stop-gradient
    # Descending the loss turns p1 towards z2: its gradient points away from z2's direction.
    assert (p1.grad @ torch.tensor([1.0, 1.0])) < 0


def test_patch_swap_exchanges_two_cubes_and_keeps_the_values():
    x = torch.arange(2 * 8 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8, 8)
    y = kernels.patch_swap(x, patch=2, swaps=1, seed=3)
    assert torch.equal(y, kernels.patch_swap(x, 2, 1, seed=3)) and not torch.equal(y, x)
    changed = [(y[b] != x[b]).sum().item() for b in range(2)]
    assert max(changed) > 0 and all(c <= 16 for c in changed)  # two 2^3 cubes at most (fewer if they overlap)
    for b in range(2):
        assert torch.equal(y[b].flatten().sort().values, x[b].flatten().sort().values)
    assert torch.equal(kernels.patch_swap(x, 2, 0, seed=3), x)


def test_gamma_keeps_sign_and_is_identity_at_zero_spread():
    x = torch.linspace(-2, 2, 50).view(1, 1, 50, 1, 1).repeat(3, 1, 1, 1, 1)
    y = kernels.gamma(x, 0.5, seed=1)
    assert torch.equal(torch.sign(y), torch.sign(x)) and not torch.equal(y, x)
    assert torch.equal(kernels.gamma(x, 0.0, seed=1), x)


def test_pcrlv2_disrupts_each_crop_on_its_own_draws_in_the_released_order():
    """Blur, noise ~ U(0, 0.25), gamma, swaps (global views), then z-normalisation, with draws per crop and per step."""
    obj = build_objective("pcrlv2", model={"name": "pcrl_unet", "channels": [4, 8, 16, 32]}, swap_patch=(2, 4, 4), swap_count=10)
    x = torch.rand(1, 1, 8, 16, 16).repeat(6, 1, 1, 1, 1)  # six copies of one crop
    y = obj.disrupt(x, step=3, rank=0, micro=0, what="global0", swap=True)
    assert torch.equal(y, obj.disrupt(x, step=3, rank=0, micro=0, what="global0", swap=True))  # seeded by (step, rank, view)
    assert not torch.equal(y, obj.disrupt(x, step=4, rank=0, micro=0, what="global0", swap=True))
    torch.testing.assert_close(y.mean(dim=(1, 2, 3, 4)), torch.zeros(6), atol=1e-5, rtol=0)  # z-normalised, crop by crop
    torch.testing.assert_close(y.std(dim=(1, 2, 3, 4), unbiased=False), torch.ones(6), atol=1e-4, rtol=0)
    assert len({round(float((y[i] - y[0]).abs().mean()), 4) for i in range(1, 6)}) == 5  # every copy disrupted differently
    # The noise alone: its spread varies from crop to crop, within U(0, 0.25), as torchio's RandomNoise draws it.
    noisy = build_objective("pcrlv2", model={"name": "pcrl_unet", "channels": [4, 8, 16, 32]}, blur_sigma=0.0, gamma_log_range=0.0,
                            swap_count=0, znorm=False)
    flat = torch.full((40, 1, 8, 16, 16), 0.5)
    spread = (noisy.disrupt(flat, step=1, rank=0, micro=0, what="local", swap=False) - 0.5).std(dim=(1, 2, 3, 4))
    assert spread.max() < 0.27 and spread.min() < 0.05 and spread.max() > 0.2 and spread.std() > 0.05
    # Blur alone smooths: neighbouring voxels grow alike.
    blurry = build_objective("pcrlv2", model={"name": "pcrl_unet", "channels": [4, 8, 16, 32]}, noise_std=0.0, gamma_log_range=0.0,
                             swap_count=0, znorm=False)
    b = blurry.disrupt(x, step=1, rank=0, micro=0, what="local", swap=False)
    assert (b.diff(dim=-1).abs().mean() < 0.8 * x.diff(dim=-1).abs().mean()).item()


def test_pcrlv2_terms_beta_and_gradients():
    obj = build_objective("pcrlv2", model={"name": "pcrl_unet", "channels": [4, 8, 16, 32]}, total_steps=100, swap_patch=2, swap_count=2)
    assert obj.beta(0) == 1.0 and abs(obj.beta(50) - 0.5) < 1e-9 and obj.beta(100) < 1e-12
    torch.manual_seed(0)
    batch = {"global1": torch.rand(2, 1, 8, 16, 16), "global2": torch.rand(2, 1, 8, 16, 16), "local": torch.rand(2, 3, 8, 8, 8)}
    out = obj(batch, step=10)
    assert set(out) == {"restore", "restore_level", "siamese", "global_local", "loss"}
    torch.testing.assert_close(out["loss"], out["restore"] + out["restore_level"] + out["siamese"] + out["global_local"])
    assert -1 <= out["siamese"] <= 1 and -1 <= out["global_local"] <= 1
    out["loss"].backward()
    lv = obj.level(10, 0, 0)
    assert all(p.grad is not None for p in obj.net.parameters())
    assert all(p.grad is not None for p in obj.levels[lv].parameters())
    assert all(p.grad is None for i, level in enumerate(obj.levels) if i != lv for p in level.parameters())
    # The same level for every rank of a step, different levels across steps.
    assert obj.level(10, 1, 0) == lv and len({obj.level(s, 0, 0) for s in range(20)}) == 3


# -- LRC and composition --------------------------------------------------------------------

def test_region_pool_and_region_nce_by_hand():
    from medssl_scale.objectives.lrc import region_nce, region_pool

    f = torch.tensor([[[1.0, 3.0], [5.0, 7.0]], [[0.0, 0.0], [2.0, 4.0]]])  # [C=2, 2, 2]
    ids = torch.tensor([[4, 4], [9, 4]])
    torch.testing.assert_close(region_pool(f, ids, torch.tensor([9, 4])), torch.tensor([[5.0, 2.0], [11 / 3, 4 / 3]]))
    z = torch.eye(3)
    # Matching rows identical, others orthogonal: logits 1/T on the diagonal, 0 elsewhere.
    want = -torch.log(torch.exp(torch.tensor(10.0)) / (torch.exp(torch.tensor(10.0)) + 2))
    torch.testing.assert_close(region_nce(z, z, 0.1), want)
    z2 = z[[1, 0, 2]]  # regions 0 and 1 swapped in the second view: a much larger loss
    assert region_nce(z, z2, 0.1) > want + 5
    # Descending the loss moves region 0's feature towards its match in the other view and away from the rest.
    a = torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.3, 0.0, 1.0]], requires_grad=True)
    b = torch.tensor([[0.8, 0.0, 0.6], [0.0, 1.0, 0.0], [0.6, 0.0, 0.8]])
    region_nce(a, b, 0.5).backward()
    step = -a.grad[0]
    assert step @ b[0] > 0 > step @ b[1]


def test_lrc_composes_on_a_host():
    from medssl_scale.objectives.compose import Composite

    torch.manual_seed(0)
    host = build_objective("pcrlv2", model={"name": "pcrl_unet", "channels": [4, 8, 16, 32]}, total_steps=10, swap_count=0)
    comp = Composite([("pcrlv2", 1.0, host), ("lrc", 0.5, build_objective("lrc", regions=8, min_voxels=2))])
    x = torch.rand(2, 1, 8, 16, 16)
    regions = (torch.arange(8 * 16 * 16).view(1, 1, 8, 16, 16) // 64).repeat(2, 1, 1, 1, 1).int()  # 32 strips of 64 voxels
    batch = {"global1": x, "global2": x.clone(), "regions1": regions, "regions2": regions.clone()}
    out = comp(batch, step=1)
    assert {"pcrlv2.restore", "pcrlv2.siamese", "lrc.region_nce", "loss"} <= set(out)
    torch.testing.assert_close(out["loss"], out["pcrlv2.loss"] + 0.5 * out["lrc.loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in comp.parts["lrc"].parameters())
    assert set(dict(comp.named_parameters())) == {f"parts.pcrlv2.{k}" for k in dict(host.named_parameters())} | {
        f"parts.lrc.{k}" for k, _ in comp.parts["lrc"].named_parameters()}  # the host is registered once
    assert comp.encoder().config["name"] == "pcrl_unet"
    # -1 marks voxels a view's affine brought in from outside: never a region, however many there are.
    padded = torch.full_like(regions, -1)
    padded[..., :2, :, :] = 5  # one real region
    out = comp({**batch, "regions1": padded, "regions2": padded.clone()}, step=1)
    assert out["lrc.region_nce"].item() == 0.0  # one region and the padding: no pair to contrast
    with pytest.raises(ValueError, match="keeps dense features of two views"):
        Composite([("dae", 1.0, build_objective("dae", model={"name": "conv_ae"})), ("lrc", 0.5, build_objective("lrc"))])


def test_region_ids_follow_the_hosts_patch_swaps():
    host = build_objective("pcrlv2", model={"name": "pcrl_unet", "channels": [4, 8, 16, 32]}, swap_patch=2, swap_count=6,
                           gamma_log_range=0.0, noise_std=0.0, blur_sigma=0.0, znorm=False)
    regions = torch.randint(0, 50, (3, 1, 8, 8, 8)).float()
    disrupted = host.disrupt(regions / 100, step=4, rank=1, micro=0, what="global1", swap=True)  # the second global view
    moved = host.follow_disruption(regions, step=4, rank=1, micro=0, view=2)
    assert not torch.equal(moved, regions)
    torch.testing.assert_close(moved / 100, disrupted)


def test_queue_nce_by_hand():
    from medssl_scale.objectives.moco import queue_nce

    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    want = -torch.log(torch.exp(torch.tensor(5.0)) / (torch.exp(torch.tensor(5.0)) + torch.exp(torch.tensor(0.0)) + torch.exp(torch.tensor(-5.0))))
    torch.testing.assert_close(queue_nce(q, k, queue, 0.2), want)


def test_mocov2_momentum_queue_and_lrc_on_top():
    from medssl_scale.objectives.compose import Composite

    torch.manual_seed(0)
    model = {"name": "unet", "channels": [4, 8, 16], "norm": "instance"}
    host = build_objective("mocov2", model=model, dim=8, queue_size=6, momentum=0.9)
    comp = Composite([("mocov2", 1.0, host), ("lrc", 0.5, build_objective("lrc", regions=4, min_voxels=2))])
    x = torch.rand(2, 1, 16, 16, 16)
    regions = (torch.arange(16 ** 3).view(1, 1, 16, 16, 16) // 256).repeat(2, 1, 1, 1, 1).int()
    batch = {"view1": x, "view2": x.flip(-1), "regions1": regions, "regions2": regions.flip(-1)}
    key_before = [p.clone() for p in host.key_net.parameters()]
    queue_before = host.queue.clone()
    out = comp(batch, step=1)
    assert out["mocov2.nce"] > 0 and out["lrc.region_nce"] > 0
    out["loss"].backward()
    trained = [p for n, p in host.net.named_parameters() if not n.startswith("out.")]  # the U-Net's output conv is not used
    assert all(p.grad is not None for p in trained) and all(p.grad is None for p in host.key_net.parameters())
    # k <- 0.9 k + 0.1 q, once per step: a second micro-batch of the same step does not move it again.
    for kb, k, q in zip(key_before, host.key_net.parameters(), host.net.parameters()):
        torch.testing.assert_close(k, 0.9 * kb + 0.1 * q.detach())
    moved = [p.clone() for p in host.key_net.parameters()]
    comp(batch, step=1)
    assert all(torch.equal(a, b) for a, b in zip(moved, host.key_net.parameters()))
    # Both views' keys (2 x 2) entered the queue after the first batch, at its start; the pointer wraps around.
    assert int(host.queue_ptr) == (4 + 4) % 6
    assert not torch.equal(host.queue[:4], queue_before[:4])
    torch.testing.assert_close(host.queue.norm(dim=1), torch.ones(6))
    state = host.state_dict()
    assert {"queue", "queue_ptr", "key_step"} <= set(state) and any(k.startswith("key_net.") for k in state)  # resumable


def test_composition_is_checked_when_the_config_loads():
    from medssl_scale.train.config import load_run_config

    for override, message in (("deepspeed.precision=bf16", "use deepspeed.precision: fp32"), ("deepspeed.zero_stage=3", "zero_stage 0, 1 or 2"),
                              ("data.views.kind=pcrl", "set data.views.kind: pair")):
        with pytest.raises(ValueError, match=message):
            load_run_config(ROOT / "configs" / "lrc" / "moco-tiny.yaml", [override])
    with pytest.raises(ValueError, match="lrc is added on top of another objective"):
        load_run_config(TINY["lrc"], ["objectives={lrc: 1.0}"])
    with pytest.raises(ValueError, match="set data.views.superpixels"):
        load_run_config(TINY["lrc"], ["data.views.superpixels=null"])
    with pytest.raises(ValueError, match="only auxiliary objectives"):
        load_run_config(TINY["lrc"], ["objectives={pcrlv2: 1.0, dae: 1.0}"])
    with pytest.raises(ValueError, match="superpixels are computed for objectives.lrc only"):
        load_run_config(TINY["pcrlv2"], ["data.views.superpixels={}"])
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        load_run_config(TINY["pcrlv2"], ["data.batch_size=1"])
    with pytest.raises(ValueError, match="dae keeps no dense features"):
        load_run_config(TINY["dae"], ["objectives={dae: 1.0, lrc: 0.5}", "data.views.kind=pair", "data.views.superpixels={}"])


# -- MixCL ----------------------------------------------------------------------------------

def test_mixcl_samples_balanced_known_voxels():
    from medssl_scale.objectives.mixcl import sample_voxels

    labels = torch.tensor([-1] * 50 + [0] * 30 + [1] * 5 + [2] * 15)
    idx = sample_voxels(labels, 10, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels[idx] + 1, minlength=4).tolist()
    assert counts == [0, 10, 5, 10] and idx.unique().numel() == idx.numel()  # unknowns never drawn, none twice
    assert sample_voxels(torch.full((8,), -1), 10, torch.Generator()).numel() == 0


def test_mixcl_terms_on_partly_labelled_views():
    obj = build_objective("mixcl", model={"name": "unet", "channels": [4, 8, 16]}, projection_dim=8, voxels_per_class=16, swap_patch=2, swap_count=1)
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8, 8)
    lab = torch.randint(0, 3, (2, 1, 8, 8, 8), dtype=torch.int16)
    lab[1] = -1  # the second crop's volume has no label map
    out = obj({"view1": x, "view2": x.flip(2), "label1": lab, "label2": lab.flip(2)}, step=3)
    assert set(out) == {"identity", "label", "reconstruction", "loss"} and out["label"] > 0
    torch.testing.assert_close(out["loss"], out["identity"] + out["label"] + out["reconstruction"])
    out["loss"].backward()
    assert all(p.grad is not None for p in obj.parameters())
    unknown = obj({"view1": x, "view2": x, "label1": torch.full_like(lab, -1), "label2": torch.full_like(lab, -1)}, step=3)
    assert unknown["label"] == 0  # nothing labelled, nothing to contrast
    bg = build_objective("mixcl", model={"name": "unet", "channels": [4, 8, 16]}, background="unknown")
    only_bg = torch.zeros_like(lab)
    assert bg({"view1": x, "view2": x, "label1": only_bg, "label2": only_bg}, step=3)["label"] == 0


# -- RepRec ---------------------------------------------------------------------------------

def test_reprec_recovery_loss_by_hand():
    from medssl_scale.objectives.reprec import recovery_loss

    target = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    pred = torch.tensor([[[3.0, 0.0], [1.0, 0.0]]], requires_grad=True)
    hidden = torch.tensor([[1]])
    # Only token 1 counts: normalised (1, 0) vs (0, 1): squared distance 2; token 0 (a perfect match) is visible.
    loss = recovery_loss(pred, target, hidden)
    torch.testing.assert_close(loss, torch.tensor(2.0))
    loss.backward()
    assert pred.grad[0, 0].abs().sum() == 0 and pred.grad[0, 1, 1] < 0  # descending turns token 1 towards the target


def test_reprec_stages_and_the_hybrid_encoder():
    from medssl_scale.models import build_encoder

    model = {"name": "reprec_hybrid", "channels": [4, 8, 16, 32], "dim": 16, "depth": 1, "heads": 2}
    obj = build_objective("reprec", model=model, projection_dim=8, stage_a_steps=5)
    x = torch.rand(2, 1, 16, 16, 16)
    batch = {"view1": x, "view2": x.flip(3)}
    a = obj(batch, step=2)
    assert a["recovery"] == 0
    a["loss"].backward()
    assert all(p.grad is None for p in obj.net.encoder.transformer.parameters())  # stage A: the transformer waits
    obj.zero_grad(set_to_none=True)
    b = obj(batch, step=7)
    assert b["recovery"] > 0
    b["loss"].backward()
    assert all(p.grad is not None for p in obj.net.encoder.transformer.parameters())
    enc = obj.encoder()
    names = {k.split(".")[0] for k in enc.state_dict()}
    assert names == {"cnn", "embed", "transformer"}  # which part is which, by name
    feats = build_encoder(**enc.config)(x)
    assert [f.shape[1] for f in feats] == enc.feature_channels == [4, 8, 16, 32 + 16]


def test_reprec_recovery_sees_only_what_stays_visible():
    """The prediction at hidden tokens cannot depend on the hidden voxels (a leak through the CNN's receptive field would
    let it), and does depend on the visible ones; and with less visible information, recovery is worse."""
    model = {"name": "reprec_hybrid", "channels": [4, 8, 16, 32], "dim": 16, "depth": 1, "heads": 2}
    torch.manual_seed(0)
    net = build_objective("reprec", model=model, projection_dim=8).net.eval()
    x = torch.rand(2, 1, 32, 32, 32)
    seed, s = 11, net.token_stride
    from medssl_scale.kernels.token_masking import mask_ids

    ids = mask_ids(2, 64, 0.6, seed, x.device)
    hidden = torch.zeros(2, 64, dtype=torch.bool).scatter_(1, ids, True).view(2, 1, 4, 4, 4)
    voxels = hidden.repeat_interleave(s, 2).repeat_interleave(s, 3).repeat_interleave(s, 4)
    with torch.no_grad():
        pred, got = net.masked_prediction(x, 0.6, seed, "reference")
        assert torch.equal(got, ids)
        other_hidden = torch.where(voxels, torch.rand_like(x), x)  # new content under the hidden tokens only
        torch.testing.assert_close(net.masked_prediction(other_hidden, 0.6, seed, "reference")[0], pred, rtol=0, atol=0)
        other_visible = torch.where(voxels, x, torch.rand_like(x))  # new content where the tokens stay visible
        assert not torch.allclose(net.masked_prediction(other_visible, 0.6, seed, "reference")[0], pred)
    # Recovery from the transformer's input around each hidden token: the best linear map from its 6 neighbours' input
    # features to its target. When the CNN also sees the hidden voxels (masking tokens only, the leak), the visible
    # neighbours carry hidden content and recovery is easier; blanked, they carry less, and the recovery error rises.
    x = torch.nn.functional.avg_pool3d(torch.rand(64, 1, 32, 32, 32), 3, 1, 1)  # content independent beyond a voxel
    ids = mask_ids(64, 64, 0.6, 5, x.device)
    hidden = torch.zeros(64, 64, dtype=torch.bool).scatter_(1, ids, True).view(64, 4, 4, 4)
    voxels = hidden[:, None].repeat_interleave(s, 2).repeat_interleave(s, 3).repeat_interleave(s, 4)
    with torch.no_grad():
        target = net.encoder.cnn_features(x)[-1]
        leaky = _best_recovery_error(target, target, hidden)
        blanked = _best_recovery_error(net.encoder.cnn_features(x * ~voxels)[-1], target, hidden)
    assert blanked > leaky + 0.04, (leaky, blanked)  # 0.59 against 0.51


def _best_recovery_error(inputs: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor) -> float:
    """Relative squared error of the best affine map from the 6 face neighbours' visible ``inputs`` to ``target`` at hidden tokens."""
    visible = inputs * (~hidden).to(inputs.dtype)[:, None]
    around = torch.cat([torch.roll(visible, shift, dim) for dim in (2, 3, 4) for shift in (1, -1)], 1)
    a = around.permute(0, 2, 3, 4, 1)[hidden].double()
    t = target.permute(0, 2, 3, 4, 1)[hidden].double()
    a = torch.cat([a, torch.ones(len(a), 1, dtype=torch.float64)], 1)
    r = t - a @ torch.linalg.lstsq(a, t).solution
    return (r.pow(2).sum() / (t - t.mean(0)).pow(2).sum()).item()


# -- every objective: 2 ranks, loss goes down, the encoder is published and pulled ----------------

@pytest.mark.parametrize("name", ["dae", "pcrlv2", "lrc", "lrc-moco", "mixcl", "reprec"])
def test_objective_trains_on_two_ranks_and_publishes(name, dataset, tmp_path):
    from medssl_scale.registry import load_encoder
    from medssl_scale.registry.publish import publish

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-m", "medssl_scale.cli", "launch", "local", "--nproc", "2", "--config", str(TINY[name]),
                        "--no-progress", f"data.dataset={dataset}", "steps=30", "checkpoint.every=30"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run_dir = next((tmp_path / "runs").glob(f"{name}-*"))
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    if name == "lrc-moco":  # MoCo's loss first rises: the queue's random negatives give way to real keys (towards log K)
        assert max(losses) < 2 * math.log(64 + 1) + 2
    else:
        assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8, losses
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlruns.db'}"
    mv = publish((run_dir / "mlflow_run_id").read_text().strip(), f"{name}-encoder", alias="champion", tracking_uri=uri)
    assert mv.tags["medssl.objective"] == {"lrc": "pcrlv2+lrc", "lrc-moco": "mocov2+lrc"}.get(name, name)
    if name == "reprec":
        assert mv.tags["medssl.components"] == "cnn,embed,transformer"
    enc = load_encoder(f"models:/{name}-encoder@champion", tracking_uri=uri)
    assert not enc.training
    feats = enc(torch.zeros(1, 1, 16, 16, 16))
    assert [f.shape[1] for f in feats] == enc.feature_channels
