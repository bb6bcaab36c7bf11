"""Disruptive Autoencoders: the disruption references, the loss terms on hand-worked cases, the objective."""

from __future__ import annotations

import math

import pytest
import torch

from medssl_scale import kernels
from medssl_scale.kernels import reference
from medssl_scale.objectives import build_objective, objective_names
from medssl_scale.objectives.dae import step_seed
from medssl_scale.objectives.losses import supervised_contrastive

TINY = {"name": "conv_ae", "channels": (8, 16, 32)}
SWIN = {"name": "swin_unetr", "feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (3, 3, 3, 3)}


# -- disruptions ----------------------------------------------------------------------------

def test_shared_channel_mask_zeroes_one_subset_everywhere():
    x = torch.randn(2, 10, 3, 4, 5) + 5  # no exact zeros of its own
    y = kernels.channel_mask(x, 0.6, seed=7)
    zero = (y == 0).all(dim=(0, 2, 3, 4))
    assert zero.sum() == 6  # round(0.6 * 10) channels, in every token of every sample
    torch.testing.assert_close(y[:, ~zero], x[:, ~zero])  # the rest untouched, not rescaled
    assert torch.equal(y, kernels.channel_mask(x, 0.6, seed=7))
    assert not torch.equal(y, kernels.channel_mask(x, 0.6, seed=8))


def test_per_token_mask_counts_and_learned_values():
    x = torch.randn(2, 8, 3, 3, 3) + 5
    values = torch.arange(8, dtype=torch.float32) - 100  # unmistakable fill
    y = kernels.channel_mask(x, 0.25, seed=1, per_token=True, values=values)
    filled = y < -50
    assert (filled.sum(dim=1) == 2).all()  # exactly 2 of 8 channels in every token
    assert filled.any(dim=(0, 2, 3, 4)).sum() > 2  # and not the same two everywhere
    chan = torch.arange(8).view(1, 8, 1, 1, 1).expand_as(x)
    torch.testing.assert_close(y[filled], values[chan[filled]])


def test_mask_gradients_reach_input_and_values():
    x = torch.randn(1, 6, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for per_token in (False, True):
        assert torch.autograd.gradcheck(lambda a, b: reference.channel_mask(a, 0.5, 3, per_token, b), (x, v))
    y = reference.channel_mask(x, 0.5, 3, False, v)
    y.sum().backward()
    # Which channels were kept, read off the output (not from the code's own channel_keep): where y is x itself.
    keep = (y == x).all(dim=(0, 2, 3, 4)).detach()
    assert keep.sum() == 3  # round(0.5 * 6) of the 6 channels masked
    torch.testing.assert_close(x.grad, keep.view(1, 6, 1, 1, 1).expand_as(x).to(x.dtype))  # d/dx = 1 where kept, 0 where masked
    assert (v.grad == 8 * (~keep).to(v.dtype)).all()  # each masked channel filled in 2 * 2 * 2 = 8 voxels


def test_noise_and_downsampling():
    x = torch.zeros(4, 1, 16, 16, 16)
    n = kernels.gaussian_noise(x, math.sqrt(0.1), seed=3)
    assert abs(n.var().item() - 0.1) < 0.01 and torch.equal(n, kernels.gaussian_noise(x, math.sqrt(0.1), seed=3))
    ramp = torch.arange(16.0).view(1, 1, 16, 1, 1).expand(1, 1, 16, 8, 8)
    d = kernels.downsample(ramp, 4)
    assert d.shape == ramp.shape and d[0, 0, :, 0, 0].tolist() == [0.0] * 4 + [4.0] * 4 + [8.0] * 4 + [12.0] * 4
    with pytest.raises(ValueError, match="'triton' for channel_mask needs CUDA tensors"):
        kernels.channel_mask(x, 0.5, 0, backend="triton")


# -- loss terms ----------------------------------------------------------------------------

def test_supervised_contrastive_by_hand():
    # Three unit vectors at 0, 90 and 180 degrees; the first two share a label.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    t = 0.5
    # Anchor 0: positive 1 (cos 0), negative 2 (cos -1); anchor 1: positive 0 (0), negative 2 (0).
    # Anchor 2 has no positive and does not count.
    # l0 = -log(e^0 / (e^0 + e^(-1/0.5))) = log(1 + e^-2) = log(1.13533528) = 0.12692801
    # l1 = -log(e^0 / (e^0 + e^0)) = log 2 = 0.69314718; mean (0.12692801 + 0.69314718) / 2 = 0.41003760
    loss = supervised_contrastive(f, labels, t)
    assert loss.item() == pytest.approx(0.41003760, abs=1e-7)
    loss.backward()
    # A descent step (-grad) moves f1 towards its positive f0 (+x) and away from the negative f2 (-x).
    assert f.grad[1, 0] < 0
    # Unknown labels are neither positives nor anchors; none at all gives a zero that backpropagates.
    assert supervised_contrastive(f, torch.tensor([-1, -1, 3]), t).item() == 0.0


# -- the objective -------------------------------------------------------------------------

def _batch(n=2, size=32):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 1, size, size, size, generator=g), "modality": torch.tensor([0, 1] * (n // 2)),
            "subject": torch.tensor(sum(([i, i] for i in range(n // 2)), []))}


def test_dae_trains_and_is_deterministic():
    assert "dae" in objective_names()
    torch.manual_seed(0)
    obj = build_objective("dae", model=TINY, cmcl_positives="both", mask_fill="learned", projection_dim=8)
    batch = _batch(4)
    a, b = obj(batch, step=3, rank=0), obj(batch, step=3, rank=0)
    assert set(a) == {"recon_l1", "cmcl", "loss"}
    torch.testing.assert_close(a["loss"], b["loss"])  # the same seed, step and rank: the same disruptions
    c = obj(batch, step=3, rank=1)
    assert c["recon_l1"] != a["recon_l1"]
    assert a["loss"].item() == pytest.approx(a["recon_l1"].item() + 0.03 * a["cmcl"].item(), rel=1e-5)
    opt = torch.optim.AdamW(obj.parameters(), lr=3e-3)
    first = None
    for step in range(12):
        loss = obj(batch, step=step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    assert obj.mask_values.grad is not None and obj.mask_values.grad.abs().sum() > 0
    v = obj.visuals(batch)
    assert v["input"].shape == v["reconstruction"].shape == (32, 32, 32)


def test_dae_config_is_validated():
    with pytest.raises(Exception, match="mask_ratio"):
        build_objective("dae", model=TINY, mask_ratio=1.5)
    with pytest.raises(Exception, match="disruptions"):
        build_objective("dae", model=TINY, disruptions=["blur"])
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("nope")
    assert step_seed(0, 1, 0, "mask") != step_seed(0, 1, 1, "mask") != step_seed(0, 2, 0, "mask")


def test_dae_on_swin_unetr_masks_the_patch_embeddings():
    torch.manual_seed(0)
    obj = build_objective("dae", model=SWIN, projection_dim=8)
    seen = []
    hook = obj.net.net.swinViT.pos_drop.drop.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    out = obj(_batch(2, 64), step=1)
    hook.remove()
    emb = seen[0]  # what reached the dropout after the patch embedding: 60% of its 12 channels zeroed
    assert emb.shape[1] == 12 and ((emb == 0).all(dim=(0, 2, 3, 4))).sum() == 7
    out["loss"].backward()
    assert obj.net.bottleneck.shape[1] == obj.net.bottleneck_channels == 192


def _best_linear_error(emb: torch.Tensor, keep: torch.Tensor, image: torch.Tensor) -> float:
    """Relative squared error of the best affine map from each token's kept channels to its 2x2x2 patch of ``image``."""
    feats = emb.permute(0, 2, 3, 4, 1).reshape(-1, emb.shape[1])[:, keep].double()
    patches = image.unfold(2, 2, 2).unfold(3, 2, 2).unfold(4, 2, 2).reshape(-1, 8).double()
    a = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], 1)
    residual = patches - a @ torch.linalg.lstsq(a, patches).solution
    return (residual.pow(2).sum() / (patches - patches.mean(0)).pow(2).sum()).item()


def test_masking_removes_information_only_with_the_nonlinear_patch_embedding():
    """60% of 48 channels masked: the linear 2x2x2 embedding still determines every patch; the released conv block does not."""
    torch.manual_seed(0)
    image = torch.nn.functional.avg_pool3d(torch.rand(4, 1, 32, 32, 32), 3, 1, 1)  # some spatial correlation, as in scans
    keep = (kernels.channel_mask(torch.ones(1, 48, 1, 1, 1), 0.6, seed=3) != 0).flatten()
    assert keep.sum() == 19  # the channels DAE leaves visible
    errors = {}
    for embed in ("linear", "conv_block"):
        net = build_objective("dae", model={**SWIN, "feature_size": 48, "patch_embed": embed}, cmcl_weight=0.0).net
        with torch.no_grad():
            emb = net.net.swinViT.patch_embed(image)
        errors[embed] = (_best_linear_error(emb, torch.ones(48, dtype=torch.bool), image), _best_linear_error(emb, keep, image))
    assert errors["linear"][0] < 1e-9 and errors["linear"][1] < 1e-9, errors  # masked or not, every patch is recoverable
    full, masked = errors["conv_block"]
    assert masked > 1.5 * full and masked - full > 0.1, errors  # masked embeddings reconstruct measurably worse (0.59 vs 0.35)


def test_dae_defaults_to_the_released_patch_embedding_and_publishes_its_decoder():
    obj = build_objective("dae", model={"name": "swin_unetr", "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 3],
                                        "patch_embed": "conv_block"}, cmcl_weight=0.0)
    assert build_objective("dae").cfg.model["patch_embed"] == "conv_block"  # the default DAE network
    enc = obj.encoder()
    names = set(enc.state_dict())
    assert {"swinViT.patch_embed.proj.conv1.conv.weight", "swinViT.patch_embed.proj.norm2.bias"} <= names  # the released names
    assert enc.config["decoder"] and {f"decoder{i}.transp_conv.conv.weight" for i in range(1, 6)} <= names
    assert enc.decoder_stages()[0] is obj.net.net.decoder5  # shared with the objective, not copied
    assert "decoder" not in build_objective("dae", model=TINY).encoder().config  # a network without decoder stages publishes its encoder
    assert "decoder" not in obj.net.encoder_module().config or not obj.net.encoder_module().config["decoder"]


_GATHER_WORKER = """
import sys, torch, torch.distributed as dist
from medssl_scale.objectives.losses import gather_from_ranks, supervised_contrastive
dist.init_process_group("gloo")
r = dist.get_rank()
torch.manual_seed(0)
z_all, y_all = torch.randn(4, 6), torch.tensor([0, 1, 1, 0])
z = z_all[2 * r: 2 * r + 2].clone().requires_grad_()
g, y = gather_from_ranks(z, y_all[2 * r: 2 * r + 2])
loss = supervised_contrastive(g, y, 0.5)
loss.backward()
torch.save({"loss": loss.detach(), "grad": z.grad}, sys.argv[1] + f"/rank{r}.pt")
dist.barrier()
dist.destroy_process_group()  # gloo's threads left running at exit can abort the process ("terminate called ...")
"""


def test_contrastive_loss_over_ranks_equals_one_big_batch(tmp_path):
    """Each rank holds crops [0,1] / [1,0]: alone, no rank has a positive pair; gathered, all do."""
    import os
    import subprocess
    import sys

    from ports import free_port

    script = tmp_path / "worker.py"
    script.write_text(_GATHER_WORKER)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    torch.manual_seed(0)
    z_all, y_all = torch.randn(4, 6), torch.tensor([0, 1, 1, 0])
    z_all.requires_grad_()
    want = supervised_contrastive(z_all, y_all, 0.5)
    want.backward()
    assert want > 0
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(got["loss"], want.detach())
        # Every rank's copy of the loss sends gradient to these features: 2x, which DeepSpeed's mean over ranks undoes.
        torch.testing.assert_close(got["grad"] / 2, z_all.grad[2 * r: 2 * r + 2])
