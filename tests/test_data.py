"""Training data on one process: plans, crops, views, normalisation, determinism and exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from needs import missing
from sample_data import reshard, training_dataset

from medssl_scale.data import (
    Catalog,
    CropDataset,
    DataConfig,
    EpochPlan,
    Loader,
    PlanSampler,
)
from medssl_scale.data.boxes import ForegroundSampler, iou, uniform_start
from medssl_scale.data.config import Normalize
from medssl_scale.data.stream import consumed_per_worker, deal
from medssl_scale.data.transforms import normalize
from medssl_scale.store import foreground
from medssl_scale.store.layout import DatasetDir
from medssl_scale.store.volumes import volume_store


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return training_dataset(tmp_path_factory.mktemp("data"))


def cfg(dataset, **kw) -> DataConfig:
    base = {"dataset": str(dataset), "crop": 24, "batch_size": 2, "workers": 0, "crops_per_visit": 2}
    return DataConfig(**{**base, **kw})


def batches(loader: Loader, n: int | None = None) -> list[dict]:
    out = []
    for b in loader.epoch_batches():
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=k)
            else:
                assert x[k] == y[k], k


# -- plans ------------------------------------------------------------------------------

def test_plan_splits_ranks_disjointly_and_completely(dataset):
    cat = Catalog.load(dataset)
    plan = EpochPlan(cat, seed=3, crops_per_visit=3, world=2, batch_size=2)
    per_rank = [[s for b in PlanSampler(plan, r, workers=2).batches(0) for s in b] for r in range(2)]
    slots = [{s.slot for s in ss} for ss in per_rank]
    assert len(per_rank[0]) == len(per_rank[1]) == plan.samples_per_rank()
    assert not slots[0] & slots[1]
    assert slots[0] | slots[1] == set(range(2 * plan.samples_per_rank()))
    # Every volume is visited, crops_per_visit times, when nothing is weighted.
    visits = [s.volume for ss in per_rank for s in ss]
    assert sorted(set(visits)) == list(range(len(cat)))
    # Layout for the cache: a batch mixes volumes; a worker's batches come from few volumes.
    first = PlanSampler(plan, 0, workers=2).batches(0)
    assert all(len({s.volume for s in b}) == 2 for b in first)


def test_plan_order_is_seeded(dataset):
    cat = Catalog.load(dataset)
    a = EpochPlan(cat, seed=1, world=1, batch_size=2)
    assert a.visits(0) == EpochPlan(cat, seed=1, world=1, batch_size=2).visits(0)
    assert a.visits(0) != a.visits(1)
    assert a.visits(0) != EpochPlan(cat, seed=2, world=1, batch_size=2).visits(0)


def test_modality_weights_and_filters(dataset):
    cat = Catalog.load(dataset)
    only_mr = EpochPlan(cat, seed=0, modality_weights={"CT": 0.0, "MR": 1.0}, samples_per_epoch=40)
    assert {cat.volumes[v].modality for (v,) in only_mr.visits(0)} == {"MR"}
    even = EpochPlan(cat, seed=0, crops_per_visit=1, modality_weights={"CT": 1.0, "MR": 1.0}, samples_per_epoch=4000)
    share = np.mean([cat.volumes[v].modality == "MR" for (v,) in even.visits(0)])
    assert 0.45 < share < 0.55  # 2 MR against 4 CT volumes, yet half the crops
    assert {v.modality for v in Catalog.load(dataset, ("MR",)).volumes} == {"MR"}
    with pytest.raises(ValueError, match="do not hold|does not hold"):
        EpochPlan(Catalog.load(dataset, ("CT",)), modality_weights={"MR": 1.0})


def test_paired_modality_batches(dataset):
    loader = Loader(cfg(dataset, pairs=True, batch_size=4))
    for b in batches(loader):
        assert b["modality"].tolist() == [0, 1, 0, 1]
        subj = b["subject"].tolist()
        assert subj[0] == subj[1] and subj[2] == subj[3] and subj[0] >= 0
    with pytest.raises(ValidationError, match="even batch_size"):
        cfg(dataset, pairs=True, batch_size=3)


# -- crops ------------------------------------------------------------------------------

def test_crop_matches_the_store_and_pads_small_volumes(dataset):
    loader = Loader(cfg(dataset, crop=(40, 24, 64), sampling="uniform", normalize={"ct_window": (-1024, 1024)}, labels=True))
    ds = DatasetDir(dataset)
    vols = volume_store(ds)
    for b in batches(loader, 3):
        for i in range(2):
            vid, (start, size) = b["volume"][i], b["box"][i].tolist()
            zyx = np.ascontiguousarray(vols.read(vid).T)
            pad = -1024 if b["modality"][i] == 0 else 0
            want = np.full(size, pad, np.float32)
            lo = [max(0, s) for s in start]
            hi = [min(n, s + k) for s, k, n in zip(start, size, zyx.shape)]
            want[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))] = zyx[tuple(slice(l, h) for l, h in zip(lo, hi))]
            if b["modality"][i] == 0:
                want = (np.clip(want, -1024, 1024) + 1024) / 2048
                # The volume (x = 48 voxels) is narrower than the crop (64): padded, at a random offset.
                assert start[2] <= 0 and start[2] + 64 >= 48
            else:
                continue  # MR normalisation is checked on its own
            np.testing.assert_allclose(b["image"][i, 0].numpy(), want, rtol=1e-6, atol=1e-6)
            assert b["label"].dtype == torch.int16 and b["label"].shape == (2, 1, 40, 24, 64)


def test_sample_content_does_not_depend_on_workers(dataset):
    one = batches(Loader(cfg(dataset, workers=0)))
    # Workers change the order (the cache layout), never what a slot holds.
    two = batches(Loader(cfg(dataset, workers=2)))
    by_slot = lambda bs: {int(s): b["image"][i] for b in bs for i, s in enumerate(b["slot"])}  # noqa: E731
    a, b = by_slot(one), by_slot(two)
    assert a.keys() == b.keys()
    for s in a:
        torch.testing.assert_close(a[s], b[s], rtol=0, atol=0)


@pytest.mark.parametrize("pairs", [False, True])
def test_visit_scoped_cache_forgets_each_volume_after_its_visit(dataset, pairs):
    lru = Loader(cfg(dataset, pairs=pairs, crops_per_visit=3))
    visit = Loader(cfg(dataset, pairs=pairs, crops_per_visit=3, cache_scope="visit"))
    access = visit.dataset.access
    unit = 2 if pairs else 1
    held, out = [], []
    for b in visit.epoch_batches():  # workers=0: a batch's samples are all cut when it arrives
        out.append(b)
        cached = {p.name for p in access.cache.paths()}
        held.append(len(cached))
        ended = {v for v, s in zip(b["volume"], b["slot"].tolist()) if (s // unit) % 3 == 2}
        assert not ended & cached, "a volume's chunks outlived its visit"
        assert len(cached) <= 2 * unit  # interleave (= batch_size 2) visits in flight, of `unit` volumes each
    same(batches(lru), out)
    assert max(held) > 0 and access.cache.nbytes == 0 and len(access.cache) == 0  # every visit ended, nothing kept
    assert lru.dataset.access.cache.nbytes > 0  # lru keeps what it decoded


def test_foreground_sampling_avoids_air(tmp_path):
    # A volume that is air except one corner block: uniform crops mostly miss it.
    vol = np.full((96, 96, 96), -1000, np.int16)
    vol[:32, :32, :32] = 40
    grid, block = foreground.decode(foreground.encode(foreground.foreground_grid(vol, foreground.CT_BODY_HU)))
    assert grid.shape == (6, 6, 6) and grid[0, 0, 0] == 255 and grid[5, 5, 5] == 0
    s = ForegroundSampler(grid, block, vol.shape, (32, 32, 32), min_fraction=0.5)
    rng = np.random.default_rng(0)

    def body(start):
        z, y, x = start
        return (vol[z : z + 32, y : y + 32, x : x + 32] > -900).mean()

    aware = [body(s.start(rng)) for _ in range(200)]
    uniform = [body(uniform_start(rng, vol.shape, (32, 32, 32))) for _ in range(200)]
    assert min(aware) > 0.1 and np.mean(aware) > 0.4  # never air; about min_fraction body on average
    assert np.mean(uniform) < 0.15
    # Nothing body enough: the most-body box, not an error.
    s = ForegroundSampler(grid, block, vol.shape, (96, 96, 96), min_fraction=0.9)
    assert s.start(rng) == (0, 0, 0)


def test_normalisation_per_modality():
    x = np.array([-2000, -1000, 0, 1000, 3000], np.int16)
    np.testing.assert_allclose(normalize(x, "CT", None, Normalize()), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(normalize(x, "CT", None, Normalize(ct_window=(-175, 250))), [0, 0, 175 / 425, 1, 1], rtol=1e-6)
    stats = {"p0_5": 10.0, "p99_5": 110.0, "clip_mean": 60.0, "clip_std": 20.0}
    y = np.array([0.0, 10.0, 60.0, 200.0], np.float32)
    np.testing.assert_allclose(normalize(y, "MR", stats, Normalize()), [-2.5, -2.5, 0.0, 2.5])
    np.testing.assert_allclose(normalize(y, "MR", stats, Normalize(mr_zscore=False)), [0, 0, 0.5, 1])


def test_batched_normalisation_parameters_reproduce_normalize():
    from medssl_scale.data.transforms import apply_norm, norm_params

    x = np.array([-2000, -1000, 0, 1000, 3000], np.int16)
    stats = {"p0_5": 10.0, "p99_5": 110.0, "clip_mean": 60.0, "clip_std": 20.0}
    y = np.array([0.0, 10.0, 60.0, 200.0, 35.0], np.float32)
    cases = [(x, "CT", None, Normalize(), [0, 0, 0.5, 1, 1]),
             (x, "CT", None, Normalize(ct_window=(-175, 250)), [0, 0, 175 / 425, 1, 1]),
             (y, "MR", stats, Normalize(), [-2.5, -2.5, 0.0, 2.5, -1.25]),
             (y, "MR", stats, Normalize(mr_zscore=False), [0, 0, 0.5, 1, 0.25])]
    for raw, modality, st, c, want in cases:
        got = apply_norm(torch.from_numpy(raw)[None], torch.from_numpy(norm_params(raw, modality, st, c))[None])[0]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
        assert got.dtype == torch.float32
    # Statistics of the crop itself (no stored ones): the same numbers normalize computes.
    z = np.random.default_rng(0).normal(300, 80, (6, 5, 4)).astype(np.float32)
    got = apply_norm(torch.from_numpy(z)[None], torch.from_numpy(norm_params(z, "MR", None, Normalize()))[None])[0]
    np.testing.assert_allclose(got.numpy(), normalize(z, "MR", None, Normalize()), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def ct_dataset(tmp_path_factory):
    return training_dataset(tmp_path_factory.mktemp("ct"), n_patients=2, n_mr=0)


@pytest.mark.parametrize("kind", ["none", "pair"])
def test_raw_handoff_gives_the_float32_of_normalising_in_workers(dataset, ct_dataset, kind):
    """Crops normalised in the workers (handoff: worker) and after the hand-off (raw) are the same float32."""
    key = "image" if kind == "none" else "view1"
    runs = [(ct_dataset, 2, {}), (dataset, 0, {}), (dataset, 0, {"mr_stats": "crop"}), (dataset, 0, {"mr_zscore": False})]
    for data, workers, norm in runs:
        got = {}
        for where in ("worker", "raw"):
            loader = Loader(cfg(data, workers=workers, views={"kind": kind}, labels=True, normalize=norm, handoff=where))
            got[where] = batches(loader)
            crossed = loader.dataset.cropper.spec()[key][1]
            if where == "raw" and workers:
                assert crossed == torch.int16 and loader.ring.tensors[key].dtype == torch.int16  # CT only: int16 across
            elif where == "raw":
                assert crossed == torch.float32  # MR volumes are stored as float: float32 raw, still exact
            else:
                assert crossed == torch.float32
        assert {int(m) for b in got["raw"] for m in b["modality"]} == ({0} if data == ct_dataset else {0, 1})
        for a, b in zip(got["worker"], got["raw"], strict=True):
            assert a.keys() == b.keys() and "norm" not in b
            for k in a:
                if isinstance(a[k], torch.Tensor):
                    assert a[k].dtype == b[k].dtype, k
                    torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


# -- views ------------------------------------------------------------------------------

def test_view_pairs_overlap_where_they_say(dataset):
    loader = Loader(cfg(dataset, views={"kind": "pair"}, crop=16, labels=True, augment=[]))
    checked = 0
    for b in batches(loader):
        for i in range(2):
            regions = []
            for v in (1, 2):
                view = b[f"view{v}"][i, 0]
                (z0, y0, x0), (z1, y1, x1) = b[f"overlap{v}"][i].tolist()
                r = view[z0:z1, y0:y1, x0:x1]
                flips = [ax for ax in range(3) if b[f"flip{v}"][i, ax]]
                regions.append(torch.flip(r, flips) if flips else r)
            assert regions[0].numel() > 0
            torch.testing.assert_close(regions[0], regions[1], rtol=0, atol=0)
            # Boxes in the volume agree with the overlap
            (a, sa), (c, sc) = b["box1"][i].tolist(), b["box2"][i].tolist()
            assert iou((tuple(a), tuple(sa)), (tuple(c), tuple(sc))) > 0
            checked += 1
    assert checked > 4


def test_superpixel_regions_match_across_views(dataset):
    """Region ids are cut with their views: inside the overlap, both views name the same regions voxel for voxel."""
    loader = Loader(cfg(dataset, views={"kind": "pair", "superpixels": {"min_size": 8}}, crop=16, augment=[]))
    for b in batches(loader, 2):
        assert b["regions1"].dtype == torch.int32 and b["regions1"].shape == b["view1"].shape
        for i in range(2):
            parts = []
            for v in (1, 2):
                (z0, y0, x0), (z1, y1, x1) = b[f"overlap{v}"][i].tolist()
                r = b[f"regions{v}"][i, 0][z0:z1, y0:y1, x0:x1]
                flips = [ax for ax in range(3) if b[f"flip{v}"][i, ax]]
                parts.append(torch.flip(r, flips) if flips else r)
            assert torch.equal(parts[0], parts[1])
            # Regions are segments of one axial slice each, and there are many of them.
            r1 = b["regions1"][i, 0]
            ids = [set(r1[z].unique().tolist()) - {-1} for z in range(r1.shape[0])]  # -1: outside the body, no region
            assert all(not ids[z] & ids[z + 1] for z in range(r1.shape[0] - 1))
            assert r1.unique().numel() > r1.shape[0]


def test_superpixels_follow_intensity_edges():
    from medssl_scale.data.regions import superpixels

    x = np.zeros((2, 32, 32), np.float32)
    x[:, :, 16:] = 1.0  # two halves: a sharp edge in every slice
    r = superpixels(x, scale=1.0, sigma=0.5, min_size=20, body=False)
    assert r.dtype == np.int32
    assert not set(np.unique(r[0]).tolist()) & set(np.unique(r[1]).tolist())  # ids unique across slices
    for z in range(2):
        assert not set(np.unique(r[z, :, :16]).tolist()) & set(np.unique(r[z, :, 16:]).tolist())  # no region crosses the edge


def test_superpixels_on_a_real_ct_slice_give_50_to_200_regions_inside_the_body():
    import pydicom
    from pydicom.data import get_testdata_file

    from medssl_scale.data.config import Superpixels
    from medssl_scale.data.regions import superpixels

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        missing("pydicom's bundled CT_small.dcm", "pip install pydicom (with its test data)")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    x = np.clip((hu + 1000) / 2000, 0, 1)[None]  # the default CT window, one slice
    sp = Superpixels()
    r = superpixels(x, sp.scale, sp.sigma, sp.min_size, body=sp.body, downsample=sp.downsample)[0]
    inside = r >= 0
    assert 0.6 < inside.mean() < 0.95  # the body, not the air around it
    assert (hu[~inside] < -500).mean() > 0.9  # what is left out is air
    assert 50 <= len(np.unique(r[inside])) <= 200
    assert (superpixels(np.repeat(x, 3, 0), sp.scale, sp.sigma, sp.min_size, slices=[1], downsample=2)[[0, 2]] == -1).all()  # only slices asked for


def test_pcrl_views_with_regions_take_whole_slices_so_image_and_ids_agree():
    """Ids are per axial slice: each output slice of a view must show one source slice, image and ids alike, in both views."""
    from medssl_scale.data.crops import ArrayAccess, Cropper

    vol = np.repeat((np.arange(96, dtype=np.int16) * 10 - 900)[:, None, None], 48, 1).repeat(48, 2)  # slice z holds 10 z - 900 HU
    access = ArrayAccess(vol, {"modality": "CT"})
    views = {"kind": "pcrl", "n_local": 0, "pcrl_spatial": None, "superpixels": {"body": False, "downsample": 1, "min_size": 4},
             "global_sizes": [(32, 32, 32), (64, 32, 32)], "global_out": (16, 16, 16), "min_iou": 0.1}
    cropper = Cropper(DataConfig(dataset="unused", sampling="uniform", views=views))
    for seed in range(6):
        out = cropper(access, 0, np.random.default_rng(seed))
        slice_of_id: dict[int, float] = {}
        for v in (1, 2):
            source = out[f"global{v}"][0].mean(dim=(1, 2)) * 200 - 10  # back to the source slice index: (10 z + 100) / 2000
            torch.testing.assert_close(source, source.round(), atol=1e-3, rtol=0)  # whole slices, never two averaged
            for z in range(16):
                ids = out[f"regions{v}"][0, z].unique().tolist()
                assert len(ids) == 1  # a constant slice is one region
                assert slice_of_id.setdefault(ids[0], round(float(source[z]))) == round(float(source[z]))  # same id, same slice, both views


def test_pcrl_sub_crops(dataset):
    vc = {"kind": "pcrl", "global_sizes": [(16, 24, 24), (24, 24, 24)], "global_out": (8, 16, 16), "local_sizes": [(8, 8, 8)], "local_out": 4, "n_local": 3}
    loader = Loader(cfg(dataset, views=vc))
    for b in batches(loader, 4):
        assert b["global1"].shape == (2, 1, 8, 16, 16) and b["local"].shape == (2, 3, 4, 4, 4)
        for i in range(2):
            g = [(tuple(s), tuple(z)) for s, z in b["box_global"][i].tolist()]
            assert iou(g[0], g[1]) > 0.3
            lo = np.minimum(np.array(g[0][0]), np.array(g[1][0]))
            hi = np.maximum(np.add(*g[0]), np.add(*g[1]))
            for s, _ in b["box_local"][i].tolist():
                assert (np.array(s) >= lo).all() and (np.array(s) < hi).all()


def test_views_get_independent_augmentation(dataset):
    aug = [{"name": "RandGaussianNoised", "args": {"prob": 1.0, "std": 0.1}}]
    b = batches(Loader(cfg(dataset, views={"kind": "pair", "flip": False}, crop=16, augment=aug)), 1)[0]
    d1 = b["view1"][0, 0]
    (z0, y0, x0), (z1, y1, x1) = b["overlap1"][0].tolist()
    (w0, v0, u0), (w1, v1, u1) = b["overlap2"][0].tolist()
    diff = d1[z0:z1, y0:y1, x0:x1] - b["view2"][0, 0][w0:w1, v0:v1, u0:u1]
    assert diff.abs().mean() > 0.05  # different noise in each view


def test_config_errors_are_clear(dataset):
    with pytest.raises(ValidationError, match="crop_size"):
        DataConfig(dataset=str(dataset), crop_size=96)
    with pytest.raises(ValueError, match="not a MONAI dictionary transform"):
        CropDataset(Catalog.load(dataset), cfg(dataset, augment=[{"name": "NoSuchd"}]))
    with pytest.raises(ValueError, match="overlap boxes"):
        CropDataset(Catalog.load(dataset), cfg(dataset, views={"kind": "pair"}, augment=[{"name": "RandFlipd", "args": {"prob": 0.5}}]))
    with pytest.raises(FileNotFoundError, match="not a dataset directory"):
        Catalog.load(dataset / "nope")


# -- determinism and resume ---------------------------------------------------------------

@pytest.mark.parametrize("source", ["zarr", "shards"])
def test_resume_sees_exactly_the_remaining_samples(dataset, source):
    c = cfg(dataset, source=source, workers=2, crops_per_visit=3, shuffle_buffer=4)
    full = Loader(c)
    reference = batches(full) + batches(full)  # two epochs
    n = len(reference) // 2
    for stop in (1, n - 1, n, n + 2):
        first = Loader(c)
        it = iter(first)
        seen = [next(it) for _ in range(stop)]
        state = first.state_dict()
        resumed = Loader(c)
        resumed.load_state_dict(state)
        rest = iter(resumed)
        seen += [next(rest) for _ in range(len(reference) - stop)]
        same(seen, reference)
    with pytest.raises(ValueError, match="workers 2 -> 1"):
        Loader(cfg(dataset, source=source, workers=1, crops_per_visit=3, shuffle_buffer=4)).load_state_dict(state)


def test_shards_split_unequal_shards_evenly(tmp_path):
    data = training_dataset(tmp_path, n_patients=5, n_mr=1)
    reshard(data, [4, 1, 1])
    counts = [4, 1, 1]
    bins = deal(counts, [0, 1, 2], 2)
    assert sorted(sum(counts[i] for i in b) for b in bins) == [2, 4]
    per_rank = []
    for rank in range(2):
        loader = Loader(cfg(data, source="shards", workers=2, crops_per_visit=2), rank=rank, world=2)
        got = batches(loader)
        assert len(got) == len(loader) == 3  # 6 volumes x 2 crops / 2 ranks / batch 2
        per_rank.append({v for b in got for v in b["volume"]})
    assert not per_rank[0] & per_rank[1]


def test_round_robin_consumption():
    assert consumed_per_worker(5, [3, 3]) == [3, 2]
    assert consumed_per_worker(5, [3, 2]) == [3, 2]
    assert consumed_per_worker(3, [1, 3]) == [1, 2]


def test_example_yaml_validates(dataset):
    import yaml

    path = Path(__file__).parents[1] / "configs" / "data" / "ct-mr-views.yaml"
    raw = yaml.safe_load(path.read_text())["data"]
    c = DataConfig.model_validate({**raw, "dataset": str(dataset), "crop": 16, "workers": 0})
    assert c.views.kind == "pair" and c.modality_weights == {"CT": 1.0, "MR": 1.0}
    b = batches(Loader(c), 1)[0]
    assert b["view1"].shape == (2, 1, 16, 16, 16)
    with pytest.raises(ValidationError, match="batch_sise"):
        DataConfig.model_validate({**raw, "batch_sise": 3})


def test_shards_through_pipe_urls(dataset):
    # Object storage is a pipe: command away; `cat` stands in for `aws s3 cp ... -`.
    local = batches(Loader(cfg(dataset, source="shards")))
    piped = batches(Loader(cfg(dataset, source="shards", shard_url=f"pipe:cat {dataset}/shards/{{name}}")))
    assert len(piped) == len(local) > 0
    same(local, piped)  # batch for batch, tensor for tensor


def test_corrupt_shard_is_named(tmp_path):
    data = training_dataset(tmp_path, n_patients=2, n_mr=0)
    shard = sorted((data / "shards").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:3000])  # cut inside the first member
    with pytest.raises(Exception, match=shard.name):
        batches(Loader(cfg(data, source="shards")))


def test_preview_contact_sheet(dataset, tmp_path):
    from PIL import Image
    from sample_data import run_cli

    out = tmp_path / "sheet.png"
    res = run_cli("preview", "--dataset", str(dataset), "--out", str(out), "--rows", "3", "crop=16", "views.kind=pair", "labels=true")
    assert "3 samples" in res.stdout
    img = Image.open(out)
    assert img.size == (2 * (128 + 4), 3 * (128 + 14))
    bad = run_cli("preview", "--dataset", str(dataset), "views.kind=triple", check=False)
    assert bad.returncode == 2 and "kind" in bad.stderr


# -- review regressions -------------------------------------------------------------------

def test_ring_slots_are_not_rewritten_while_held(tmp_path):
    import time

    data = training_dataset(tmp_path, n_patients=1, n_mr=0)  # 1 shard, more workers than shards
    zyx = np.ascontiguousarray(volume_store(DatasetDir(data)).read(Catalog.load(data).volumes[0].volume_id).T)
    loader = Loader(cfg(data, source="shards", workers=4, crops_per_visit=4, samples_per_epoch=64), copy=False)
    for b in loader.epoch_batches():
        time.sleep(0.01)  # a training step holding the batch while workers run ahead
        for i in range(2):
            (z, y, x), size = b["box"][i].tolist()
            assert min(z, y, x) >= 0 and list(size) == [24, 24, 24]
            want = (np.clip(zyx[z : z + 24, y : y + 24, x : x + 24], -1000, 1000) + 1000) / 2000
            np.testing.assert_allclose(b["image"][i, 0].numpy(), want, atol=1e-6)


class _Numbered(torch.utils.data.Dataset):
    """Sample i is a crop filled with i: a slot rewritten under the consumer shows another number."""

    def __len__(self) -> int:
        return 160

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((1, 16, 16, 16), i, dtype=torch.int16), "index": i}


def test_ring_slots_held_by_the_consumer_survive_two_workers_writing():
    import time

    from medssl_scale.data.collate import Collate, Ring

    prefetch, batch = 2, 2
    ring = Ring({"image": ((1, 16, 16, 16), torch.int16)}, batch, workers=2, prefetch=prefetch)
    dl = torch.utils.data.DataLoader(_Numbered(), batch_size=batch, num_workers=2, prefetch_factor=prefetch, collate_fn=Collate(ring))
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    slots = set()
    for n, b in enumerate(dl):
        from medssl_scale.data.collate import RING_KEY

        slots.add(int(b[RING_KEY][0]))
        b = ring.take(b, copy=False, pin=False)
        assert b["image"].data_ptr() in {t.data_ptr() for t in ring.tensors["image"][:, 0]}  # a view of the ring, not a copy
        held = (held + [(b["image"], b["index"])])[-2:]  # a view stays valid until two more batches are drawn
        time.sleep(0.004)  # a training step: both workers run ahead into their slots meanwhile
        for image, index in held:
            assert torch.equal(image.flatten(1).amin(1), index.to(torch.int16)) and torch.equal(image.flatten(1).amax(1), index.to(torch.int16)), n
    assert n == 79 and len(slots) == 2 * ring.per_worker  # both workers wrote, each into its own slots


def test_shards_leave_out_different_volumes_each_epoch(tmp_path):
    data = training_dataset(tmp_path, n_patients=5, n_mr=1)
    reshard(data, [4, 1, 1])
    seen = set()
    loaders = [Loader(cfg(data, source="shards", workers=0, crops_per_visit=2), rank=r, world=2) for r in range(2)]
    for _ in range(6):
        for loader in loaders:
            seen |= {v for b in batches(loader) for v in b["volume"]}
    assert seen == {v.volume_id for v in Catalog.load(data).volumes}


def test_gzipped_shards_stream(tmp_path):
    from ingest.runner import IngestConfig, run_ingest

    src = training_dataset(tmp_path / "a", n_patients=2, n_mr=0).parent / "src"
    out = tmp_path / "gz"
    run_ingest(IngestConfig(sources=[src], out=out, shard_codec="npy.gz", shard_size=1))
    got = batches(Loader(cfg(out, source="shards")))
    assert len(got) == 2 and got[0]["image"].shape == (2, 1, 24, 24, 24)


def test_shards_refuse_what_only_zarr_can_do(dataset):
    for kw in ({"modalities": ["CT"]}, {"modality_weights": {"CT": 1.0}}, {"pairs": True}):
        with pytest.raises(ValidationError, match="need source: zarr"):
            cfg(dataset, source="shards", **kw)
    with pytest.raises(ValidationError, match="region_scale"):
        cfg(dataset, views={"kind": "pair", "region_scale": 2.5})
    with pytest.raises(ValidationError, match="seed"):
        cfg(dataset, seed=-1)
    with pytest.raises(ValueError, match="not an intensity transform"):
        CropDataset(Catalog.load(dataset), cfg(dataset, views={"kind": "pair"}, augment=[{"name": "Rand3DElasticd", "args": {"sigma_range": (1, 2), "magnitude_range": (1, 2)}}]))


def test_foreground_sampling_offsets_small_volumes():
    grid = np.full((2, 6, 6), 255, np.uint8)  # 30 slices: shorter than the crop
    s = ForegroundSampler(grid, 16, (30, 96, 96), (96, 32, 32), min_fraction=0.5)
    rng = np.random.default_rng(0)
    z = [s.start(rng)[0] for _ in range(300)]
    assert min(z) <= -60 and max(z) == 0 and len(set(z)) > 40


def test_pcrl_default_sizes_keep_min_iou():
    from medssl_scale.data.crops import ArrayAccess, Cropper

    vol = np.random.default_rng(0).integers(-1000, 1000, (160, 160, 160)).astype(np.int16)
    cropper = Cropper(DataConfig(dataset="unused", views={"kind": "pcrl", "n_local": 0}, sampling="uniform",
                                 augment=[{"name": "RandGaussianNoised", "args": {"prob": 1.0}}]))
    access = ArrayAccess(vol, {"modality": "CT"})
    for i in range(40):
        out = cropper(access, 0, np.random.default_rng(i))
        g = [(tuple(a), tuple(b)) for a, b in out["box_global"].tolist()]
        assert iou(g[0], g[1]) > 0.3
        assert out["local"].shape[0] == 0
    # Region maps resized like the global views, ids intact.
    cropper = Cropper(DataConfig(dataset="unused", views={"kind": "pcrl", "n_local": 0, "superpixels": {}}, sampling="uniform"))
    out = cropper(access, 0, np.random.default_rng(0))
    assert out["regions1"].shape == out["global1"].shape and out["regions1"].dtype == torch.int32


def test_pcrl_crops_each_get_their_own_flip_and_affine_and_ids_follow():
    from medssl_scale.data.crops import ArrayAccess, Cropper

    vol = np.random.default_rng(0).integers(-1000, 1000, (96, 96, 96)).astype(np.int16)
    access = ArrayAccess(vol, {"modality": "CT"})
    views = {"kind": "pcrl", "n_local": 2, "superpixels": {}, "global_sizes": [(32, 48, 48)], "global_out": (16, 24, 24)}

    def cut(spatial):
        c = Cropper(DataConfig(dataset="unused", sampling="uniform", views={**views, "pcrl_spatial": spatial}))
        return c(access, 0, np.random.default_rng(5))

    plain = cut(None)
    # A flip of W alone (no rotation, no scaling) is exactly the plain crop mirrored, and the region ids with it.
    flipped = cut({"flip_axes": [2], "flip_prob": 1.0, "rotate_deg": 0.0, "scale": 0.0})
    for i in (1, 2):
        torch.testing.assert_close(flipped[f"global{i}"], plain[f"global{i}"].flip(-1), atol=1e-5, rtol=0)
        assert torch.equal(flipped[f"regions{i}"], plain[f"regions{i}"].flip(-1))
    torch.testing.assert_close(flipped["local"], plain["local"].flip(-1), atol=1e-5, rtol=0)
    # The released defaults: flip and affine on every crop, each its own draw; ids stay ids, what moves in is the minimum.
    moved = cut({})
    for i in (1, 2):
        assert not torch.allclose(moved[f"global{i}"], plain[f"global{i}"])
        assert set(moved[f"regions{i}"].unique().tolist()) <= set(plain[f"regions{i}"].unique().tolist()) | {-1}  # -1: no region
        assert moved[f"global{i}"].min() >= plain[f"global{i}"].min() - 1e-6
    d1 = (moved["global1"] - plain["global1"]).abs().mean()
    d2 = (moved["global2"] - plain["global2"]).abs().mean()
    assert abs(float(d1 - d2)) > 1e-4  # not one shared transform


def test_state_refuses_changes_to_the_order(dataset, tmp_path):
    loader = Loader(cfg(dataset))
    batches(loader, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="interleave"):
        Loader(cfg(dataset, interleave=1)).load_state_dict(state)
    Loader(cfg(dataset, cache_mb=16)).load_state_dict(state)  # the cache changes nothing that is seen
    smaller = tmp_path / "smaller"
    import shutil

    shutil.copytree(dataset, smaller)
    lines = (smaller / "manifest.jsonl").read_text().splitlines()
    keep = [ln for ln in lines if '"mr' not in ln and "_mr" not in ln]
    assert len(keep) < len(lines)
    (smaller / "manifest.jsonl").write_text("\n".join(keep) + "\n")
    with pytest.raises(ValueError, match="volumes"):
        Loader(cfg(smaller)).load_state_dict(state)


def test_a_shard_that_lies_about_its_samples_is_an_error(tmp_path):
    from medssl_scale.store.shards import END_OF_ARCHIVE

    data = training_dataset(tmp_path, n_patients=1, n_mr=0)
    shard = next((data / "shards").glob("*.tar"))
    shard.write_bytes(END_OF_ARCHIVE)  # index.json still counts one sample
    with pytest.raises(Exception, match=f"{shard.name}: sha256 mismatch"):
        batches(Loader(cfg(data, source="shards")))
