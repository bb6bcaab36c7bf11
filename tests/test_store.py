"""The dataset directory's formats: manifest, Zarr arrays, WebDataset shards."""

import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
import zarr
from oracles import sha256sum

from medssl_scale.store.layout import DatasetDir, publish_dir
from medssl_scale.store.manifest import (
    ManifestAppender,
    ManifestRecord,
    compact,
    read_manifest,
)
from medssl_scale.store.shards import (
    ShardWriter,
    read_index,
    shard_urls,
    verify_shards,
    write_sample_fragment,
)
from medssl_scale.store.volumes import VolumeLayout, volume_store

VID = "v" + "0" * 19  # a volume id as ingest names one


def rec(source, status="ok", **kw):
    return ManifestRecord(source=source, status=status, **kw)


def test_manifest_survives_a_torn_last_line_and_compacts(tmp_path):
    path = tmp_path / "manifest.jsonl"
    with ManifestAppender(path) as m:
        m.append(rec("b.nii", volume_id="v" + "1" * 19))
        m.append(rec("a.nii", "failed", reason="truncated"))
    with open(path, "ab") as f:  # a crash in the middle of the next append
        f.write(b'{"source": "c.nii", "sta')
    assert [r.source for r in read_manifest(path)] == ["b.nii", "a.nii"]
    with ManifestAppender(path) as m:  # the next run cuts the torn tail before appending
        m.append(rec("a.nii", "ok", volume_id="v" + "2" * 19))
    records = compact(path)
    assert [(r.source, r.status) for r in records] == [("a.nii", "ok"), ("b.nii", "ok")]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_manifest_rejects_unknown_fields_and_statuses(tmp_path):
    with pytest.raises(ValueError):
        ManifestRecord(source="x", status="maybe")
    path = tmp_path / "m.jsonl"
    path.write_text('{"source": "x", "status": "ok", "surprise": 1}\n{"source": "y", "status": "ok"}\n')
    with pytest.raises(ValueError, match="m.jsonl:1"):
        read_manifest(path)


@pytest.mark.parametrize("shape", [(5, 7, 3), (70, 64, 130)])
def test_volume_store_roundtrip_chunking_and_attrs(tmp_path, shape):
    ds = DatasetDir(tmp_path)
    store = volume_store(ds, VolumeLayout(chunk=32, shard=64))
    a = np.random.default_rng(0).integers(-1000, 1000, shape).astype(np.int16)
    assert store.write(VID, a, {"modality": "CT", "spacing": [1.0, 1.0, 2.0]})
    assert not store.write(VID, a, {})  # content-addressed: a second write is a no-op
    z = zarr.open_array(str(ds.volumes / VID), mode="r")
    assert z.metadata.zarr_format == 3 and z.metadata.dimension_names == ("z", "y", "x")
    np.testing.assert_array_equal(z[...], a.T)  # on disk: (z, y, x), OME-Zarr order
    np.testing.assert_array_equal(store.read(VID), a)  # through the store: (x, y, z) RAS
    assert store.shape(VID) == shape
    assert z.attrs["modality"] == "CT"
    chunks, shards = VolumeLayout(chunk=32, shard=64).chunks_for(shape[::-1])
    assert all(c <= 32 for c in chunks) and all(s % c == 0 for s, c in zip(shards, chunks))
    assert z.shards == shards
    np.testing.assert_array_equal(store.crop(VID, (1, 2, 0), (3, 4, 3)), a[1:4, 2:6, 0:3])
    assert store.ids() == [VID]
    assert not any(ds.tmp.iterdir())  # nothing left in staging


def test_publish_dir_never_overwrites(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("first")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f").write_text("second")
    assert publish_dir(tmp_path / "a", tmp_path / "final")
    assert not publish_dir(tmp_path / "b", tmp_path / "final")
    assert (tmp_path / "final" / "f").read_text() == "first"
    assert not (tmp_path / "b").exists()


def _fragments(ds, n, codec="npy"):
    rng = np.random.default_rng(1)
    arrays = {}
    for i in range(n):
        vid = f"v{i:019x}"  # readers accept only content-address-shaped ids
        img = rng.normal(size=(6 + i, 5, 4)).astype(np.float32)
        lab = (img > 0).astype(np.uint8) if i % 2 == 0 else None
        write_sample_fragment(ds, vid, img, {"volume_id": vid, "shape": list(img.shape), "dtype": str(img.dtype)}, lab, codec)
        arrays[vid] = (img, lab)
    return arrays


@pytest.mark.parametrize("codec", ["npy", "npy.gz"])
def test_shards_are_plain_webdataset_with_checksummed_index(tmp_path, codec):
    ds = DatasetDir(tmp_path)
    arrays = _fragments(ds, 7, codec)
    w = ShardWriter(ds, target_bytes=1500)
    for vid in arrays:
        w.add(vid)
    w.close()
    index = read_index(ds)
    assert index["samples"] == 7 and len(index["shards"]) > 1
    assert not any(ds.pending.iterdir())
    assert verify_shards(ds) == []
    seen = {}
    for sample in wds.WebDataset(shard_urls(ds), shardshuffle=False).decode():
        seen[sample["__key__"]] = sample
    assert set(seen) == set(arrays)
    for vid, (img, lab) in arrays.items():
        ext = "image.npy.gz" if codec == "npy.gz" else "image.npy"
        np.testing.assert_array_equal(seen[vid][ext], img)
        if lab is not None:
            np.testing.assert_array_equal(seen[vid][ext.replace("image", "label")], lab)
        assert seen[vid]["meta.json"]["volume_id"] == vid
    digests = sha256sum([ds.shards / s["name"] for s in index["shards"]])
    for s in index["shards"]:  # the index's record of each shard, against coreutils (the code uses hashlib)
        assert (s["sha256"], s["bytes"]) == (digests[ds.shards / s["name"]], (ds.shards / s["name"]).stat().st_size)
    for s in index["shards"]:  # a well-formed tar to any reader, not just webdataset
        with tarfile.open(ds.shards / s["name"]) as tf:
            assert len({m.name.split(".")[0] for m in tf.getmembers()}) == s["samples"]


def test_same_samples_give_byte_identical_shards(tmp_path):
    digests = []
    for run in ("a", "b"):
        ds = DatasetDir(tmp_path / run)
        arrays = _fragments(ds, 3)
        w = ShardWriter(ds, target_bytes=1 << 20)
        for vid in arrays:
            w.add(vid)
        w.close()
        digests.append([s["sha256"] for s in read_index(ds)["shards"]])
    assert digests[0] == digests[1]


def test_verify_shards_detects_corruption(tmp_path):
    ds = DatasetDir(tmp_path)
    arrays = _fragments(ds, 2)
    w = ShardWriter(ds)
    for vid in arrays:
        w.add(vid)
    w.close()
    shard = ds.shards / read_index(ds)["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("sha256 mismatch" in p for p in verify_shards(ds))


def test_shard_writer_recovers_from_a_crash_before_the_index_update(tmp_path):
    ds = DatasetDir(tmp_path)
    arrays = _fragments(ds, 3)
    w = ShardWriter(ds, target_bytes=1 << 20)
    for vid in arrays:
        w.add(vid)
    # crash: the open shard never got sealed, and a stray shard file sits in shards/ unrecorded
    w._out.f.close()
    ds.shards.mkdir(parents=True, exist_ok=True)
    (ds.shards / "shard-000000.tar").write_bytes(b"garbage from a killed run")
    w2 = ShardWriter(ds, target_bytes=1 << 20)  # a resumed run
    assert not list(ds.tmp.glob("*.partial"))
    for vid in arrays:
        w2.add(vid)  # fragments were kept: only a recorded shard deletes them
    w2.close()
    assert verify_shards(ds) == []
    assert read_index(ds)["samples"] == 3
