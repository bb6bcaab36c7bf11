"""Partitioned ingest (one part per pod of an Indexed Job) + finalize equals a single-process ingest of the same inputs."""

from __future__ import annotations

import shutil
from pathlib import Path
from collections import Counter

import pytest
from sample_data import assert_same_dataset, mixed_collection, run_cli

from ingest import partitions
from medssl_scale.inspect import check_dataset
from medssl_scale.store.layout import DatasetDir
from medssl_scale.store.manifest import latest, read_manifest
from medssl_scale.store.shards import read_index

N = 3
ARGS = ["--no-progress", "--chunk", "16", "--shard-shape", "32"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Every kind of input, plus copies of one image whose names fall into every partition (duplicates across parts)."""
    col = mixed_collection(tmp_path_factory.mktemp("src") / "col")
    image = sorted((col / "phantoms").rglob("*.nii.gz"))[0]
    seen: set[int] = set()
    for k in range(100):
        name = f"copies/c{k}.nii.gz"
        part = partitions.partition_of(f"col/{name}", N)
        if part not in seen:
            seen.add(part)
            (col / name).parent.mkdir(exist_ok=True)
            shutil.copy(image, col / name)
    assert seen == set(range(N))
    return col


@pytest.fixture(scope="module")
def single(collection, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "ds"
    run_cli("ingest", str(collection), "--out", str(out), *ARGS)
    return out


def _parts(collection, out, n=N, extra=()):
    for i in range(n):
        run_cli("ingest", str(collection), "--out", str(out), "--partition", f"{i}/{n}", *ARGS, *(["--workers", "2"] if i == 0 else []),
                *extra)


def test_partition_of_is_stable_and_spreads():
    assert partitions.partition_of("hospital-a/ct/0001.nii.gz", 8) == partitions.partition_of("hospital-a/ct/0001.nii.gz", 8)
    # The first 8 bytes of sha256, big-endian, mod n; digests from coreutils (`printf x/0 | sha256sum`), not Python:
    # x/0 -> 04e622c795ad08e5 = 353007861400144101 = 7 * 50429694485734871 + 4
    # x/1 -> 6e342990302ac2ec = 7941017742221165292 = 7 * 1134431106031595041 + 5
    # x/2 -> 8efd4bbf2209463d = 10303474806775432765 = 7 * 1471924972396490395 + 0
    assert [partitions.partition_of(f"x/{i}", 7) for i in range(3)] == [4, 5, 0]
    counts = Counter(partitions.partition_of(f"site/{i:05d}.dcm", 4) for i in range(4000))
    assert min(counts.values()) > 900
    assert partitions.parse("2/5") == (2, 5)
    for bad in ("5/5", "-1/3", "a/b", "3"):
        with pytest.raises(ValueError, match="--partition"):
            partitions.parse(bad)


def test_partitioned_ingest_then_finalize_equals_a_single_ingest(collection, single, tmp_path):
    out = tmp_path / "ds"
    _parts(collection, out)
    parts = sorted((out / "parts").iterdir())
    assert [p.name for p in parts] == [f"part-{i:05d}-of-{N:05d}" for i in range(N)]
    recs = [latest(read_manifest(DatasetDir(p).manifest)) for p in parts]
    assert sum(len(r) for r in recs) == len(latest(read_manifest(DatasetDir(single).manifest)))  # every input in exactly one part
    series = [r for rs in recs for r in rs.values() if r.format == "dicom" and r.status == "ok"]
    assert len(series) == 2 and all(r.files and len(r.files) > 1 for r in series)  # each series whole, in one part

    res = run_cli("ingest", "--out", str(out), "--finalize", str(N), "--no-progress")
    assert "3 parts merged" in res.stdout
    ds = DatasetDir(out)
    assert check_dataset(ds) == []  # shard hashes, sample counts, manifest vs stores
    assert_same_dataset(single, out)  # same manifest (owners of duplicates included), volume ids, arrays and labels
    assert not (out / "parts").exists() and not ds.tmp.exists() and not ds.lock.exists()
    index = read_index(ds)
    ok = [r for r in latest(read_manifest(ds.manifest)).values() if r.kind == "image" and r.status == "ok"]
    assert index["samples"] == len(ok) and sorted(v for s in index["shards"] for v in s["volume_ids"]) == sorted(r.volume_id for r in ok)
    dups = [r for r in latest(read_manifest(ds.manifest)).values() if r.duplicate_of]
    assert len(dups) == N  # the original and N copies: one owner, N duplicates, whichever parts they were in

    # A later ingest of the same inputs into the merged dataset finds nothing to do.
    again = run_cli("ingest", str(collection), "--out", str(out), *ARGS)
    assert "done: 0 processed" in sorted(ds.logs.glob("ingest-*.log"))[-1].read_text()
    assert again.returncode == 0


def test_finalize_waits_for_parts_and_refuses_mismatched_ones(collection, tmp_path):
    out = tmp_path / "ds"
    run_cli("ingest", str(collection), "--out", str(out), "--partition", f"0/{N}", *ARGS)
    res = run_cli("ingest", "--out", str(out), "--finalize", str(N), "--wait", "1", "--no-progress", check=False)
    assert res.returncode == 2 and f"2 of {N} part(s)" in res.stderr and "part-00001-of-00003" in res.stderr
    for i in (1, 2):
        run_cli("ingest", str(collection), "--out", str(out), "--partition", f"{i}/{N}", *ARGS[:-2], "--shard-shape", "64")
    res = run_cli("ingest", "--out", str(out), "--finalize", str(N), "--no-progress", check=False)
    assert res.returncode == 2 and "shard_shape" in res.stderr and "other settings" in res.stderr
    assert not DatasetDir(out).manifest.exists()  # nothing merged
    other = tmp_path / "other-secret"
    other.write_text("another site's secret, not this one's")
    for i in (1, 2):  # the right options, but another site secret: pseudonyms would not match across parts
        shutil.rmtree(partitions.part_dir(out, i, N))
        run_cli("ingest", str(collection), "--out", str(out), "--partition", f"{i}/{N}", *ARGS, "--secret-file", str(other))
    res = run_cli("ingest", "--out", str(out), "--finalize", str(N), "--no-progress", check=False)
    assert res.returncode == 2 and "secret_fingerprint" in res.stderr and "site secret" in res.stderr
    assert not DatasetDir(out).manifest.exists()
    assert list(out.rglob(".ingest-running*")) == []  # a refused finalize leaves no lock behind
    res = run_cli("ingest", str(collection), "--out", str(out), "--finalize", "3", check=False)
    assert res.returncode == 2 and "--out only" in res.stderr
    for i in (1, 2):  # the site fixes its mistake: those parts again, with the options part 0 had
        shutil.rmtree(partitions.part_dir(out, i, N))
        run_cli("ingest", str(collection), "--out", str(out), "--partition", f"{i}/{N}", *ARGS)
    run_cli("ingest", "--out", str(out), "--finalize", str(N), "--no-progress")
    assert check_dataset(DatasetDir(out)) == [] and list(out.rglob(".ingest-running*")) == []


def test_a_finalize_killed_midway_is_finished_by_running_it_again(collection, single, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    _parts(collection, out)
    calls = {"n": 0}
    real = partitions.publish_dir

    def dies_on_the_fourth_move(src, dst):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(partitions, "publish_dir", dies_on_the_fourth_move)
    with pytest.raises(KeyboardInterrupt):
        partitions.finalize(out, N)
    assert (out / ".finalize-plan.json").exists() and DatasetDir(out).lock.exists()
    monkeypatch.setattr(partitions, "publish_dir", real)
    res = run_cli("ingest", str(collection), "--out", str(out), "--resume", *ARGS, check=False)
    assert res.returncode == 2 and "being merged from its parts" in res.stderr  # a plain ingest would lose moved shards
    partitions.finalize(out, N)
    assert check_dataset(DatasetDir(out)) == []
    assert_same_dataset(single, out)


def _two_sites(root, swap: bool):
    """One image in two roots whose folder names sort the other way round from their paths (x1/site-z < x2/site-a)."""
    src = sorted((mixed_collection(root / "col") / "phantoms").rglob("*.nii.gz"))
    roots = [root / "x1" / "site-z", root / "x2" / "site-a"]
    for r in roots:
        r.mkdir(parents=True)
    for k, image in enumerate(src):
        shutil.copy(image, roots[k % 2] / image.name)
    for k in range(50):  # the shared copy: one name per root that falls into different parts
        name = f"shared-{k}.nii.gz"
        if partitions.partition_of(f"site-z/{name}", 2) != partitions.partition_of(f"site-a/{name}", 2):
            break
    for r in roots:
        shutil.copy(src[0], r / name)
    return roots[::-1] if swap else roots


@pytest.mark.parametrize("hash_paths", [False, True])
def test_owners_of_duplicates_follow_a_single_ingest_with_several_roots_and_hashed_paths(tmp_path, hash_paths):
    roots = _two_sites(tmp_path, swap=hash_paths)
    extra = ["--hash-paths"] if hash_paths else []
    run_cli("ingest", *map(str, roots), "--out", str(tmp_path / "single"), *ARGS, *extra)
    for i in range(2):
        run_cli("ingest", *map(str, roots), "--out", str(tmp_path / "parted"), "--partition", f"{i}/2", *ARGS, *extra)
    run_cli("ingest", "--out", str(tmp_path / "parted"), "--finalize", "2", "--no-progress")
    assert check_dataset(DatasetDir(tmp_path / "parted")) == []
    assert_same_dataset(tmp_path / "single", tmp_path / "parted")
    dups = [r for r in latest(read_manifest(DatasetDir(tmp_path / "single").manifest)).values() if r.duplicate_of]
    assert len(dups) == 2  # the phantom's own copy and the shared one


def test_a_label_map_added_later_arrives_through_a_partitioned_reingest(tmp_path):
    import nibabel as nib

    col = tmp_path / "col"
    (col / "labels").mkdir(parents=True)
    from medssl_scale.synth.phantoms import ct_phantom

    for i in range(3):
        p = ct_phantom(shape=(24, 20, 16), seed=i)
        nib.save(nib.Nifti1Image(p.image, p.affine), col / f"p{i}.nii.gz")
    flows = {"single": lambda: run_cli("ingest", str(col), "--out", str(tmp_path / "single"), *ARGS)}

    def parted():
        for i in range(2):
            run_cli("ingest", str(col), "--out", str(tmp_path / "parted"), "--partition", f"{i}/2", *ARGS)
        run_cli("ingest", "--out", str(tmp_path / "parted"), "--finalize", "2", "--no-progress")

    flows["parted"] = parted
    for flow in flows.values():
        flow()
    p = ct_phantom(shape=(24, 20, 16), seed=1)
    nib.save(nib.Nifti1Image(p.label, p.affine), col / "labels" / "p1.nii.gz")  # the label map arrives later
    for flow in flows.values():
        flow()
    assert check_dataset(DatasetDir(tmp_path / "parted")) == []
    assert_same_dataset(tmp_path / "single", tmp_path / "parted")
    rec = next(r for r in latest(read_manifest(DatasetDir(tmp_path / "parted").manifest)).values() if r.kind == "image" and r.source.endswith("p1.nii.gz"))
    assert rec.has_label and rec.warnings and "label map added after" in rec.warnings[-1]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Two parts of a tiny collection and a finalize killed just after it saved its plan."""
    import nibabel as nib

    from medssl_scale.synth.phantoms import ct_phantom

    root = tmp_path_factory.mktemp("planned")
    col = root / "col"
    col.mkdir()
    for i in range(4):
        p = ct_phantom(shape=(20, 16, 12), seed=i)
        nib.save(nib.Nifti1Image(p.image, p.affine), col / f"p{i}.nii.gz")
    out = root / "ds"
    for i in range(2):
        run_cli("ingest", str(col), "--out", str(out), "--partition", f"{i}/2", *ARGS)
    real = partitions.publish_dir

    def killed(src, dst):
        raise KeyboardInterrupt("killed")

    partitions.publish_dir = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            partitions.finalize(out, 2)
    finally:
        partitions.publish_dir = real
    return out


def _tamper(plan, how, victim):
    if how == "parts":
        plan["parts"] = [str(victim), *plan["parts"][1:]]
    elif how == "move-id":
        plan["moves"][0]["volume_id"] = f"../../../../{victim.name}"
    elif how == "move-paths":  # the old plan format's raw paths
        plan["moves"] = [[str(victim), str(victim) + "-moved"]]
    elif how == "shard-name":
        plan["shards"][0]["name"] = "../../" + victim.name
    elif how == "shard-src":
        plan["shards"][0]["src"] = "../../../../" + victim.name
    elif how == "settings":
        plan["settings"]["chunk"] = 0
    elif how == "part-number":
        plan["moves"][0]["part"] = 7


@pytest.mark.parametrize("how", ["parts", "move-id", "move-paths", "shard-name", "shard-src", "settings", "part-number"])
def test_a_crafted_finalize_plan_is_refused_and_touches_nothing_outside(planned, tmp_path, how):
    import json

    out = tmp_path / "ds"
    shutil.copytree(planned, out)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    plan_file = DatasetDir(out).finalize_plan
    plan = json.loads(plan_file.read_text())
    _tamper(plan, how, victim)
    plan_file.write_text(json.dumps(plan))
    with pytest.raises(partitions.PartitionError, match=r"\.finalize-plan\.json"):
        partitions.finalize(out, 2)
    assert (victim / "precious.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["ds", "victim"]
    assert not DatasetDir(out).manifest.exists()  # nothing merged


@pytest.mark.parametrize("what", ["part-order", "settings", "part-link", "old-format"])
def test_a_parts_own_files_are_validated_before_the_plan(planned, tmp_path, what):
    import json

    out = tmp_path / "ds"
    shutil.copytree(planned, out)
    for leftover in (DatasetDir(out).finalize_plan, DatasetDir(out).lock, *(DatasetDir(partitions.part_dir(out, i, 2)).lock for i in range(2))):
        leftover.unlink()  # as before any finalize: it reads the parts afresh
    part = DatasetDir(partitions.part_dir(out, 1, 2))
    if what == "part-order":
        part.part_order.write_text(json.dumps({"x": {"key": "not a key", "label": None}}))
        match = "part-order.json"
    elif what == "settings":
        part.settings.write_text(part.settings.read_text().replace('"chunk": 16', '"chunk": 0'))
        match = "ingest.json: chunk"
    elif what == "old-format":  # every part older alike: no other setting differs
        for i in range(2):
            pinned = DatasetDir(partitions.part_dir(out, i, 2)).settings
            doc = json.loads(pinned.read_text())
            pinned.write_text(json.dumps({**doc, "format_version": doc["format_version"] - 1}))
        match = "older than this version writes .*re-ingest"
    else:
        elsewhere = tmp_path / "elsewhere"
        part.root.rename(elsewhere)
        part.root.symlink_to(elsewhere)
        match = "symbolic link"
    with pytest.raises(partitions.PartitionError, match=match):
        partitions.finalize(out, 2)
    assert not DatasetDir(out).manifest.exists()


def test_pinned_settings_model_knows_every_key_ingest_pins():
    from ingest.pinned import PinnedSettings, check_pinned
    from ingest.runner import IngestConfig

    pinned = IngestConfig(sources=[], out=Path("x")).pinned("0123456789abcdef")
    assert set(PinnedSettings.model_fields) == set(pinned) and check_pinned(pinned, "x") == pinned
