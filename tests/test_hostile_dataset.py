"""A dataset directory is untrusted input: crafted shard indexes and corrupted shards, read by the real stream.

Shards come from a real tiny ingest; each test copies the dataset, damages one
thing, and streams it. The stream must fail naming the shard and the member
before any crop of the damaged sample is handed out, and no name from the
dataset may reach a shell.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from sample_data import reshard, training_dataset

from medssl_scale.data import DataConfig
from medssl_scale.data.stream import ShardStream
from medssl_scale.store.layout import DatasetDir
from medssl_scale.store.shards import END_OF_ARCHIVE, MEMBER_DIGEST, file_digest, filter_shard, read_index, verified_samples, verify_shards


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = training_dataset(root, n_patients=3, n_mr=0, ct_shape=(24, 20, 16))
    reshard(data, [2, 1])  # shard 0 holds two samples: the damaged one is the second
    return data


@pytest.fixture
def dataset(pristine, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(pristine, out)
    return out


def _cfg(dataset: Path, **kw) -> DataConfig:
    return DataConfig(**{"dataset": str(dataset), "source": "shards", "crop": 8, "batch_size": 1, "workers": 0,
                         "crops_per_visit": 1, "shuffle_buffer": 1, **kw})


def _stream(dataset: Path, **kw) -> tuple[list[str], Exception | None]:
    """Volumes of the crops the stream handed out, and the error that stopped it (over two epochs' worth)."""
    seen: list[str] = []
    try:
        s = ShardStream(_cfg(dataset, **kw))
        for epoch in range(2):
            s.epoch = epoch
            seen += [crop["volume"] for crop in s]
    except Exception as e:  # noqa: BLE001 - the test inspects whatever stopped the stream
        return seen, e
    return seen, None


def _members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tf:
        return tf.getmembers()


def _blocks(shard: Path, m: tarfile.TarInfo) -> bytes:
    """A member's header blocks (PAX included), data and padding, as they lie in the shard."""
    end = m.offset_data + m.size + (-m.size % tarfile.BLOCKSIZE)
    return shard.read_bytes()[m.offset:end]


def _shard0(dataset: Path) -> tuple[Path, str]:
    entry = read_index(DatasetDir(dataset))["shards"][0]
    return dataset / "shards" / entry["name"], entry["volume_ids"][1]


def _expect_refused(dataset: Path, bad_vid: str, *patterns: str) -> str:
    seen, err = _stream(dataset)
    assert err is not None, "a damaged shard was streamed without an error"
    assert bad_vid not in seen, "crops of the damaged sample were handed out"
    for p in patterns:
        assert p in str(err), (p, str(err))
    problems = verify_shards(DatasetDir(dataset))  # medssl inspect finds it too
    assert any(patterns[0] in p for p in problems), problems
    return str(err)


def test_untouched_dataset_streams_every_volume(dataset):
    seen, err = _stream(dataset)
    assert err is None
    assert set(seen) == set(read_index(DatasetDir(dataset))["shards"][0]["volume_ids"]) | set(
        read_index(DatasetDir(dataset))["shards"][1]["volume_ids"])
    assert verify_shards(DatasetDir(dataset)) == []


@pytest.mark.parametrize("name", [
    "x.tar; touch {marker}",
    "$(touch {marker}).tar",
    "`touch {marker}`",
    "shard-000000.tar\ntouch {marker}",
    "../../shards/shard-000000.tar",
])
def test_a_crafted_shard_name_never_reaches_a_shell(dataset, tmp_path, name):
    marker = tmp_path / "PWNED"
    index = DatasetDir(dataset).shard_index
    raw = json.loads(index.read_text())
    raw["shards"][0]["name"] = name.format(marker=marker)
    index.write_text(json.dumps(raw))
    for template in (f"pipe:cat {dataset}/shards/{{name}}", None):
        seen, err = _stream(dataset, shard_url=template)
        assert err is not None and str(index) in str(err) and "shards.0.name" in str(err), err
        assert seen == []
    with pytest.raises(ValueError, match="shards.0.name"):
        verify_shards(DatasetDir(dataset))
    assert not marker.exists()


def test_pipe_urls_quote_the_name(dataset):
    from medssl_scale.data.stream import shard_url

    ds = DatasetDir(dataset)
    assert shard_url("pipe:cat /x/{name}", ds, "shard-000001.tar") == "pipe:cat /x/shard-000001.tar"
    with pytest.raises(ValueError, match="not a shard name"):
        shard_url("pipe:cat /x/{name}", ds, "a'b")  # checked again here, whatever the caller validated


@pytest.mark.parametrize("field, value, where", [
    ("sha256", "Z" * 64, "shards.0.sha256"),
    ("samples", 5, "shards.0: Value error, samples is 5"),
    ("bytes", "12", "shards.0.bytes"),
    ("volume_ids", ["v" + "0" * 19, "../volumes.zarr"], "shards.0.volume_ids.1"),
    ("extra", "x", "shards.0.extra"),
])
def test_the_index_is_validated_whole(dataset, field, value, where):
    index = DatasetDir(dataset).shard_index
    raw = json.loads(index.read_text())
    raw["shards"][0][field] = value
    index.write_text(json.dumps(raw))
    seen, err = _stream(dataset)
    assert err is not None and str(index) in str(err) and where in str(err), err


def test_a_flipped_data_byte_is_refused_before_its_sample(dataset):
    shard, vid = _shard0(dataset)
    m = next(m for m in _members(shard) if m.name == f"{vid}.image.npy")
    data = bytearray(shard.read_bytes())
    data[m.offset_data + m.size // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    _expect_refused(dataset, vid, shard.name, f"{vid}.image.npy", "sha256 mismatch")


def test_a_flipped_digest_in_a_member_header_is_refused(dataset):
    shard, vid = _shard0(dataset)
    m = next(m for m in _members(shard) if m.name == f"{vid}.image.npy")
    data = bytearray(shard.read_bytes())
    at = data.index(f"{MEMBER_DIGEST}=".encode(), m.offset) + len(MEMBER_DIGEST) + 1
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    shard.write_bytes(bytes(data))
    _expect_refused(dataset, vid, shard.name, f"{vid}.image.npy", "sha256 mismatch")


def test_a_garbled_member_header_is_refused(dataset):
    shard, vid = _shard0(dataset)
    first = next(m for m in _members(shard) if m.name.startswith(vid))
    data = bytearray(shard.read_bytes())
    data[first.offset_data - tarfile.BLOCKSIZE + 3] ^= 0x20  # the ustar header's name field
    shard.write_bytes(bytes(data))
    _expect_refused(dataset, vid, shard.name, "unreadable tar at or after member")


def test_a_truncated_shard_is_refused(dataset):
    shard, vid = _shard0(dataset)
    m = next(m for m in _members(shard) if m.name == f"{vid}.image.npy")
    shard.write_bytes(shard.read_bytes()[: m.offset_data + 700])
    _expect_refused(dataset, vid, shard.name, f"{vid}.image.npy")


def test_an_appended_member_is_refused(dataset):
    shard, vid = _shard0(dataset)
    other = dataset / "shards" / read_index(DatasetDir(dataset))["shards"][1]["name"]
    stranger = _members(other)[0]
    body = shard.read_bytes()[: -len(END_OF_ARCHIVE)]
    shard.write_bytes(body + _blocks(other, stranger) + END_OF_ARCHIVE)
    # appended after the last sample: the last sample waits for the whole-shard check
    _expect_refused(dataset, vid, shard.name, stranger.name)


def test_a_member_swapped_in_from_another_shard_is_refused(dataset):
    shard, vid = _shard0(dataset)
    other = dataset / "shards" / read_index(DatasetDir(dataset))["shards"][1]["name"]
    mine = next(m for m in _members(shard) if m.name == f"{vid}.image.npy")
    theirs = next(m for m in _members(other) if m.name.endswith(".image.npy"))
    data = shard.read_bytes()
    end = mine.offset_data + mine.size + (-mine.size % tarfile.BLOCKSIZE)
    shard.write_bytes(data[: mine.offset] + _blocks(other, theirs) + data[end:])
    _expect_refused(dataset, vid, shard.name, theirs.name, "does not list")


def _rewrite(shard: Path, dataset: Path, change) -> None:
    """Repack ``shard`` as a well-formed tar with ``change(members)`` applied, and record its new digest."""
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf.getmembers()]
    members = change(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
        for m, data in members:
            out.addfile(m, io.BytesIO(data) if data is not None else None)
    shard.write_bytes(buf.getvalue())
    index = DatasetDir(dataset).shard_index
    raw = json.loads(index.read_text())
    entry = next(s for s in raw["shards"] if s["name"] == shard.name)
    entry.update(file_digest(shard))  # an index that agrees: only the members are hostile
    index.write_text(json.dumps(raw))


@pytest.mark.parametrize("kind, expect", [
    ("symlink", "not a regular file"),
    ("traversal", "not a shard member name"),
    ("huge", "claims"),
    ("no_digest", "re-ingest"),
])
def test_hostile_members_are_refused(dataset, kind, expect):
    shard, vid = _shard0(dataset)

    def change(members):
        out = []
        for m, data in members:
            if m.name == f"{vid}.image.npy":
                if kind == "symlink":
                    link = tarfile.TarInfo(m.name)
                    link.type, link.linkname, link.pax_headers = tarfile.SYMTYPE, "/etc/passwd", dict(m.pax_headers)
                    m, data = link, None
                elif kind == "traversal":
                    m.name = f"../{vid}.image.npy"
                elif kind == "huge":  # a PAX size record overrides the header's: a claim of 1 TiB
                    m.pax_headers = {**m.pax_headers, "size": str(1 << 40)}
                elif kind == "no_digest":
                    m.pax_headers = {}
            out.append((m, data))
        return out

    _rewrite(shard, dataset, change)
    _expect_refused(dataset, vid, shard.name, expect)


def test_filtered_shards_keep_their_member_digests(dataset, tmp_path):
    shard, vid = _shard0(dataset)
    out = tmp_path / "shard-000009.tar"
    entry = {"name": out.name, "samples": 1, "volume_ids": [vid], **filter_shard(shard, out, {vid})}
    with open(out, "rb") as f:
        samples = list(verified_samples(f, entry, out.name))
    assert [s["__key__"] for s in samples] == [vid]
    assert all(m.pax_headers.get(MEMBER_DIGEST) for m in _members(out))


def _replace(members, name, data):
    """``members`` with member ``name``'s bytes replaced, its size and digest made to agree (a careful forger)."""
    import hashlib

    out = []
    for m, old in members:
        if m.name == name:
            m.size = len(data)
            m.pax_headers = {**m.pax_headers, MEMBER_DIGEST: hashlib.sha256(data).hexdigest()}
            old = data
        out.append((m, old))
    return out


def _npy_bytes(array) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _meta_of(dataset: Path, vid: str) -> dict:
    shard, _ = _shard0(dataset)
    with tarfile.open(shard) as tf:
        return json.loads(tf.extractfile(f"{vid}.meta.json").read())


@pytest.mark.parametrize("kind, expect", [
    ("nan-stat", "NaN is not a number JSON allows"),
    ("inf-spacing", "spacing must be 3 finite positive numbers"),
    ("foreground-shape", "foreground map is"),
    ("image-shape", "but meta.json shape is"),
    ("image-dtype", "but meta.json dtype is"),
    ("image-extra-bytes", "data bytes, not the"),
    ("meta-shape", "foreground map is"),
])
def test_a_sample_whose_meta_or_arrays_disagree_is_refused(dataset, kind, expect):
    """Members whose digests agree but whose content no ingest writes: refused before any crop, by the stream and inspect."""
    import numpy as np

    from medssl_scale.store import foreground

    shard, vid = _shard0(dataset)
    meta = _meta_of(dataset, vid)
    x, y, z = meta["shape"]
    with tarfile.open(shard) as tf:
        image = np.load(io.BytesIO(tf.extractfile(f"{vid}.image.npy").read()))
    if kind == "nan-stat":
        meta["stats"] = {**meta.get("stats", {}), "clip_std": float("nan")}
    elif kind == "inf-spacing":
        meta["spacing"] = [1.0, 1.0, 12345.5]  # written as 1e999 below: a plain number JSON reads as inf
    elif kind == "foreground-shape":
        meta["foreground"] = foreground.encode(np.zeros((1, 1, 1), np.uint8))
    elif kind == "meta-shape":
        meta["shape"] = [x, y, z + 40]
    name, data = f"{vid}.meta.json", json.dumps(meta).replace("12345.5", "1e999").encode()  # json.dumps writes NaN as is
    if kind == "image-shape":
        name, data = f"{vid}.image.npy", _npy_bytes(np.zeros((x, y, z - 1), image.dtype))
    elif kind == "image-dtype":
        name, data = f"{vid}.image.npy", _npy_bytes(image.astype(np.float64))
    elif kind == "image-extra-bytes":
        name, data = f"{vid}.image.npy", _npy_bytes(image) + b"\0" * 64
    _rewrite(shard, dataset, lambda members: _replace(members, name, data))
    _expect_refused(dataset, vid, shard.name, f"sample {vid}", expect)


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_a_fifo_or_link_in_place_of_a_shard_is_refused_not_waited_on(dataset, tmp_path, kind):
    """The stream opens the dataset's own shards without following links or waiting on a FIFO."""
    import os
    import signal

    shard, _ = _shard0(dataset)
    outside = tmp_path / "outside.tar"
    shutil.copy(shard, outside)
    shard.unlink()
    if kind == "fifo":
        os.mkfifo(shard)
    else:
        shard.symlink_to(outside)  # the same bytes, but not the dataset's own file
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the stream waited on the shard"))
    signal.alarm(20)
    try:
        seen, err = _stream(dataset)
    finally:
        signal.alarm(0)
    assert seen == [] or err is not None
    assert err is not None and shard.name in str(err) and "refused" in str(err), err
