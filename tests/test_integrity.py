"""Corrupt datasets: every damaged volume file and manifest is caught by inspect and refused by the readers, naming the file."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from oracles import sha256sum
from sample_data import run_cli

from ingest.runner import IngestConfig, run_ingest
from medssl_scale.data.catalog import Catalog
from medssl_scale.data.crops import VolumeAccess
from medssl_scale.inspect import execute
from medssl_scale.store.chunks import VolumeReader
from medssl_scale.store.integrity import VolumeError, metadata_digest, seal
from medssl_scale.store.layout import DatasetDir
from medssl_scale.store.manifest import TornManifestError, read_manifest
from medssl_scale.store.volumes import volume_store
from medssl_scale.synth.phantoms import ct_phantom

SHAPE = (40, 36, 24)  # (x, y, z); stored (24, 36, 40) in 16^3 chunks, 32^3 shards: four shard files


def _ingest(src: Path, out: Path, **kw) -> None:
    run_ingest(IngestConfig(sources=[src], out=out, chunk=16, shard=32, **kw))


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    src = root / "src"
    src.mkdir()
    for i in range(2):
        p = ct_phantom(shape=SHAPE, seed=i)
        nib.save(nib.Nifti1Image(p.image, p.affine), src / f"ct{i}.nii.gz")
    _ingest(src, root / "dataset")
    return root


@pytest.fixture
def ds(clean, tmp_path) -> DatasetDir:
    shutil.copytree(clean / "dataset", tmp_path / "dataset")
    return DatasetDir(tmp_path / "dataset")


@pytest.fixture
def inspect(capsys):
    """``medssl inspect`` in this process (the command's own process costs seconds of imports): (exit code, stderr unwrapped)."""
    def run(ds: DatasetDir, quick: bool = False) -> tuple[int, str]:
        capsys.readouterr()
        rc = execute(ds.root, verify=not quick)
        return rc, capsys.readouterr().err.replace("\n", "")
    return run


def _first_volume(ds: DatasetDir) -> tuple[str, Path]:
    vid = volume_store(ds).ids()[0]
    return vid, ds.volumes / vid


def _chunk_span(shard: Path) -> tuple[int, int]:
    """(offset, length) of the first chunk stored in a shard file (index: 2x2x2 (offset, nbytes) + crc32c at the end)."""
    data = shard.read_bytes()
    index = np.frombuffer(data[-(8 * 16 + 4):-4], dtype="<u8").reshape(8, 2)
    offset, nbytes = next((int(o), int(n)) for o, n in index if o != 2**64 - 1)
    return offset, nbytes


def _corrupt(array: Path, how: str) -> str:
    """Damage shard c/0/0/0 of ``array``; returns its key."""
    key = "c/0/0/0"
    f = array / key
    if how == "deleted":
        f.unlink()
        return key
    data = bytearray(f.read_bytes())
    offset, nbytes = _chunk_span(f)
    if how == "flipped":
        data[offset + nbytes - 10] ^= 0x01  # late in the chunk: decodes to wrong voxels without a checksum
    elif how == "blosc-header":
        data[offset:offset + 16] = b"\xff" * 16  # Blosc's header: SystemError from blosc, naming nothing
    f.write_bytes(bytes(data))
    return key


def test_ingest_checksums_every_chunk_and_stored_file(ds):
    vid, array = _first_volume(ds)
    meta = json.loads((array / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]][-1] == "crc32c"
    files = meta["attributes"]["checksums"]["files"]
    assert sorted(files) == ["c/0/0/0", "c/0/0/1", "c/0/1/0", "c/0/1/1"]
    assert all(files[k]["bytes"] == (array / k).stat().st_size for k in files)
    digests = sha256sum([array / k for k in sorted(files)])
    assert {k: files[k]["sha256"] for k in files} == {k: digests[array / k] for k in files}  # by coreutils, not hashlib
    assert "checksums" not in volume_store(ds).attrs(vid)  # the store's own record, not a volume attribute
    res = run_cli("inspect", str(ds.root))
    assert "volume and shard checksums verified" in res.stdout


@pytest.mark.parametrize("how", ["deleted", "flipped", "blosc-header"])
def test_inspect_and_readers_catch_a_damaged_chunk_file(ds, how, inspect):
    vid, array = _first_volume(ds)
    key = _corrupt(array, how)
    named = f"volumes.zarr/{vid}/{key}"

    if how == "flipped":  # once through the command itself
        res = run_cli("inspect", str(ds.root), check=False)
        assert res.returncode == 1 and named in res.stderr.replace("\n", ""), res.stdout + res.stderr
    rc, err = inspect(ds)
    assert rc == 1 and f"{named}: " in err, err
    # --quick checks presence and size, and leaves the re-hashing out.
    rc, err = inspect(ds, quick=True)
    assert rc == (1 if how == "deleted" else 0), err

    # The lean crop reader (training's zarr path), a whole-volume read, and the store's zarr reads.
    whole = ((0, 0, 0), tuple(reversed(SHAPE)))
    with pytest.raises(VolumeError, match=named):
        VolumeReader(array).box(*whole)
    catalog = Catalog.load(ds.root)
    with pytest.raises(VolumeError, match=named):
        VolumeAccess(catalog, 16).read(catalog.index(vid), whole)
    with pytest.raises(VolumeError, match=named):
        volume_store(ds).read(vid)
    with pytest.raises(VolumeError, match=named):
        volume_store(ds).crop(vid, (0, 0, 0), (8, 8, 8))


def test_a_torn_manifest_is_reported_refused_and_repaired_by_resume(ds, clean, inspect):
    data = ds.manifest.read_bytes()
    whole = read_manifest(ds.manifest)
    ds.manifest.write_bytes(data[: len(data) - len(data.splitlines()[-1]) // 2 - 1])  # cut the last line in half

    rc, err = inspect(ds)
    assert rc == 1 and "manifest.jsonl: the last line is torn" in err
    with pytest.raises(TornManifestError, match="manifest.jsonl"):
        Catalog.load(ds.root)

    _ingest(clean / "src", ds.root, resume=True)
    assert read_manifest(ds.manifest, torn_tail="refuse") == whole
    assert inspect(ds) == (0, "")


def test_a_valid_last_line_without_newline_is_torn_for_the_ingest_too(tmp_path):
    """The appender cuts such a line off; a reader that kept it would make the ingest forget the item."""
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"source": "a.nii", "status": "skipped", "reason": "x"}\n{"source": "b.nii", "status": "skipped", "reason": "y"}')
    assert [r.source for r in read_manifest(path)] == ["a.nii"]
    with pytest.raises(TornManifestError):
        read_manifest(path, torn_tail="refuse")


@pytest.mark.parametrize("field,value", [("volume_id", "../../etc"), ("volume_id", "v" + "0" * 18 + "/"),
                                         ("duplicate_of", "../x"), ("shape", [24, 36]), ("spacing", [1.0, float("nan"), 1.0])])
def test_planted_manifest_values_are_refused(ds, field, value, inspect):
    lines = ds.manifest.read_text().splitlines()
    rec = json.loads(lines[0])
    rec[field] = value
    lines[0] = json.dumps(rec)
    ds.manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl:1: invalid manifest record"):
        Catalog.load(ds.root)
    rc, err = inspect(ds)
    assert rc == 1 and "manifest.jsonl:1: invalid manifest record" in err


@pytest.mark.parametrize("attr,value,cause", [
    ("spacing", [1.0, 0.0, 1.0], "spacing must be 3 finite positive"),
    ("spacing", ["1", 1, 1], "spacing must be 3 finite positive"),
    ("direction", [[1, 0, 0], [0, 1, 0]], "direction"),
    ("modality", "PET", "modality"),
    ("foreground", {"block": 16, "shape": [-1, 2, 2], "zlib_b64": ""}, "foreground shape"),
    ("checksums", {"algorithm": "sha256", "files": {"../../../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}}, "not a chunk key"),
    ("checksums", None, "no checksums recorded"),
])
def test_untrusted_array_attributes_are_checked_before_use(ds, attr, value, cause, inspect):
    vid, array = _first_volume(ds)
    meta = json.loads((array / "zarr.json").read_text())
    if value is None:
        del meta["attributes"][attr]
    else:
        meta["attributes"][attr] = value
    (array / "zarr.json").write_text(json.dumps(meta))
    where = f"volumes.zarr/{vid}/zarr.json"
    with pytest.raises(VolumeError, match=f"{where}: .*{cause}"):
        VolumeReader(array)
    with pytest.raises(VolumeError, match=where):
        volume_store(ds).read(vid)
    rc, err = inspect(ds, quick=True)
    assert rc == 1 and cause in err


def test_arrays_without_checksum_codec_are_refused(ds):
    """A volume written before checksums (format 1): the message says how to fix it."""
    vid, array = _first_volume(ds)
    meta = json.loads((array / "zarr.json").read_text())
    meta["codecs"][0]["configuration"]["codecs"].pop()  # no crc32c
    (array / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(VolumeError, match="no crc32c checksum .*re-ingest"):
        VolumeReader(array)


def test_planted_arrays_and_files_are_reported(ds, inspect):
    vid, array = _first_volume(ds)
    (array / "c" / "9").mkdir()
    (array / "c" / "9" / "0").write_bytes(b"extra")
    shutil.copytree(array, ds.volumes / "evil")
    rc, err = inspect(ds, quick=True)
    assert rc == 1
    assert f"volumes.zarr/{vid}/c/9/0: not listed in the array's checksums" in err
    assert "volumes.zarr/evil: not a volume id" in err


def test_an_invalid_shard_index_is_a_problem_not_a_crash(ds, inspect):
    ds.shard_index.write_text('{"format": "medssl-shards/1", "samples": 1, "shards": [{"name": "../../x.tar"}]}')
    rc, err = inspect(ds, quick=True)
    assert rc == 1 and "shards/index.json" in err


# -- the array metadata itself -------------------------------------------------------


def _edit_meta(array: Path, edit) -> None:
    meta = json.loads((array / "zarr.json").read_text())
    edit(meta)
    (array / "zarr.json").write_text(json.dumps(meta))


def _inner_codecs(meta: dict) -> list:
    return meta["codecs"][0]["configuration"]["codecs"]


_META_EDITS = {
    "data_type": lambda m: m.update(data_type="uint16"),
    "fill_value": lambda m: m.update(fill_value=5),
    "endian": lambda m: _inner_codecs(m)[0].update(configuration={"endian": "big"}),
    "spacing": lambda m: m["attributes"].update(spacing=[9.0, 9.0, 9.0]),
    "origin": lambda m: m["attributes"].update(origin=[o + 1.0 for o in m["attributes"]["origin"]]),
    "stats": lambda m: m["attributes"].update(stats={k: v + 1 for k, v in m["attributes"]["stats"].items()}),
}


@pytest.mark.parametrize("field", sorted(_META_EDITS))
def test_changed_array_metadata_is_caught_by_readers_and_inspect(ds, field, inspect):
    """zarr.json is sealed too: a changed data type, fill value, byte order or geometry is never read as data."""
    vid, array = _first_volume(ds)
    _edit_meta(array, _META_EDITS[field])
    where = f"volumes.zarr/{vid}/zarr.json"
    with pytest.raises(VolumeError, match=where):
        VolumeReader(array)
    with pytest.raises(VolumeError, match=where):
        volume_store(ds).read(vid)
    with pytest.raises(VolumeError, match=where):
        volume_store(ds).attrs(vid)
    catalog_error = None
    try:
        catalog = Catalog.load(ds.root)
        VolumeAccess(catalog, 16).read(catalog.index(vid), ((0, 0, 0), (4, 4, 4)))
    except (VolumeError, ValueError) as e:
        catalog_error = str(e)
    assert catalog_error and where in catalog_error
    for quick in (False, True):
        rc, err = inspect(ds, quick=quick)
        assert rc == 1 and f"{where}: " in err, err


def test_inspect_compares_data_type_and_spacing_with_the_manifest(ds, inspect):
    """Even with its metadata sealed again (a forger's edit), a volume that disagrees with its record is reported."""
    vid, array = _first_volume(ds)

    def forge(m):
        m["data_type"], m["attributes"]["spacing"] = "uint16", [9.0, 9.0, 9.0]
        m["attributes"]["checksums"]["metadata"] = metadata_digest(m)

    _edit_meta(array, forge)
    rc, err = inspect(ds, quick=True)
    assert rc == 1
    assert f"volumes.zarr/{vid} holds uint16, the manifest says int16" in err
    assert f"volumes.zarr/{vid} has spacing [9.0, 9.0, 9.0], the manifest says" in err


@pytest.mark.parametrize("edit,cause", [
    (lambda m: _inner_codecs(m).__setitem__(1, {"name": "numcodecs.lzma", "configuration": {}}), "'numcodecs.lzma' is not one the store writes"),
    (lambda m: _inner_codecs(m).insert(1, {"name": "gzip", "configuration": {"level": 1}}), "at most one compressor"),
    (lambda m: _inner_codecs(m).__setitem__(1, {"name": "numcodecs.bz2", "configuration": {"level": 9}}), "'numcodecs.bz2' is not one the store writes"),
    (lambda m: _inner_codecs(m).__setitem__(1, {"name": "numcodecs.zfpy", "configuration": {"mode": 4}}), "'numcodecs.zfpy' is not one the store writes"),
    (lambda m: _inner_codecs(m).insert(0, {"name": "transpose", "configuration": {"order": [2, 1, 0]}}), "codec 'transpose' first"),
    (lambda m: _inner_codecs(m)[1]["configuration"].update(cname="zlib"), "blosc 'zlib'"),
    (lambda m: _inner_codecs(m)[1]["configuration"].update(clevel=99), "clevel 99"),
    (lambda m: _inner_codecs(m)[1]["configuration"].update(extra=1), "settings \\['extra'\\]"),
    (lambda m: m["codecs"][0]["configuration"].update(index_location="start"), "shard index at 'start'"),
    (lambda m: m.update(storage_transformers=[{"name": "x"}]), "storage transformers"),
    (lambda m: m.update(must_understand_me={}), "metadata fields \\['must_understand_me'\\]"),
])
def test_only_the_codecs_the_store_writes_are_accepted(ds, edit, cause, inspect):
    vid, array = _first_volume(ds)
    _edit_meta(array, edit)
    with pytest.raises(VolumeError, match=f"volumes.zarr/{vid}/zarr.json: .*{cause}"):
        VolumeReader(array)
    rc, err = inspect(ds, quick=True)
    assert rc == 1 and f"volumes.zarr/{vid}/zarr.json" in err


@pytest.mark.parametrize("name", ["gzip", "zstd", "blosc"])
def test_a_chunk_that_inflates_past_its_shape_is_refused(tmp_path, name):
    """A crafted chunk (valid crc32c, sealed) that decompresses to far more than a chunk holds: no bomb."""
    import numcodecs
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec

    array = tmp_path / "a"
    codec = {"gzip": GzipCodec(), "zstd": ZstdCodec(), "blosc": BloscCodec(cname="lz4", typesize=2)}[name]
    z = zarr.create_array(str(array), shape=(8, 8, 8), dtype="int16", chunks=(8, 8, 8), compressors=[codec, Crc32cCodec()])
    z[...] = 1
    big = np.zeros(64 << 20, dtype=np.uint8)  # 64 MiB where the chunk holds 1 KiB
    packed = {"gzip": numcodecs.GZip(level=1), "zstd": numcodecs.Zstd(level=1), "blosc": numcodecs.Blosc(cname="lz4")}[name].encode(big)
    (array / "c" / "0" / "0" / "0").write_bytes(bytes(numcodecs.CRC32C().encode(packed)))
    seal(array)
    with pytest.raises(VolumeError, match=f"a/c/0/0/0: corrupt chunk"):
        VolumeReader(array).box((0, 0, 0), (8, 8, 8))


# -- special files and links in place of array files ---------------------------------


@pytest.fixture
def no_hang():
    """Fail instead of hanging: a blocked open() is interrupted by the alarm."""
    def alarm(*_):
        raise TimeoutError("blocked on a dataset file")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("plant", ["fifo", "fifo-listed-empty", "link", "linked-folder"])
def test_fifos_and_links_in_an_array_are_refused_not_waited_on(ds, plant, no_hang, inspect, tmp_path):
    vid, array = _first_volume(ds)
    shard = array / "c" / "0" / "0" / "0"
    outside = tmp_path / "outside"
    outside.mkdir()
    if plant.startswith("fifo"):
        shard.unlink()
        os.mkfifo(shard)
        if plant == "fifo-listed-empty":  # the record says 0 bytes: a FIFO's size
            _edit_meta(array, lambda m: m["attributes"]["checksums"]["files"]["c/0/0/0"].update(bytes=0))
        cause = "malformed checksum" if plant == "fifo-listed-empty" else "c/0/0/0: not a regular file"
    elif plant == "link":  # the same bytes, through a link: the store writes none
        shutil.move(shard, outside / "0")
        shard.symlink_to(outside / "0")
        cause = "c/0/0/0: a symlink"
    else:
        shutil.move(array / "c" / "0", outside / "0")
        (array / "c" / "0").symlink_to(outside / "0")
        cause = "c/0/0/0: '0' on its way is a link"
    whole = ((0, 0, 0), tuple(reversed(SHAPE)))
    with pytest.raises(VolumeError, match=cause):
        VolumeReader(array).box(*whole)
    with pytest.raises(VolumeError, match=cause):
        volume_store(ds).read(vid)
    for quick in (False, True):
        rc, err = inspect(ds, quick=quick)
        assert rc == 1 and cause.replace("\\", "") in err, err


def test_a_fifo_in_place_of_zarr_json_is_refused(ds, no_hang, inspect):
    vid, array = _first_volume(ds)
    (array / "zarr.json").unlink()
    os.mkfifo(array / "zarr.json")
    with pytest.raises(VolumeError, match=f"{vid}/zarr.json: not a regular file"):
        VolumeReader(array)
    rc, err = inspect(ds, quick=True)
    assert rc == 1 and f"{vid}/zarr.json: not a regular file" in err


# -- dataset text is printed, never interpreted ---------------------------------------


def test_names_and_reasons_from_the_manifest_are_printed_as_text(ds, capsys, monkeypatch):
    """A source like 'scan[/x].nii' crashed inspect (Rich MarkupError); '[black on black]' could hide a problem."""
    monkeypatch.setenv("COLUMNS", "400")
    hostile = [
        {"source": "scan[/x].nii", "status": "ok", "volume_id": "v" + "f" * 19, "shape": [1, 1, 1]},
        {"source": "[black on black]hidden[/]", "status": "failed", "reason": "bad [/x] file"},
        {"source": "s.nii", "status": "skipped", "reason": "[bold]odd[/bold] [/]"},
    ]
    with ds.manifest.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in hostile)
    capsys.readouterr()
    rc = execute(ds.root, verify=False)
    out = capsys.readouterr()
    assert rc == 1
    assert f"problem: scan[/x].nii: volume v{'f' * 19} is in the manifest but not in volumes.zarr" in out.err
    assert "[black on black]hidden[/]" in out.out and "bad [/x] file" in out.out
    assert "[bold]odd[/bold] [/]" in out.out


def test_a_fifo_in_place_of_the_manifest_is_refused(ds, no_hang, inspect):
    ds.manifest.unlink()
    os.mkfifo(ds.manifest)
    with pytest.raises(OSError, match="manifest.jsonl: not a regular file"):
        Catalog.load(ds.root)
    rc, err = inspect(ds, quick=True)
    assert rc == 1 and "manifest.jsonl: not a regular file" in err


@pytest.mark.parametrize("what", ["index", "shard"])
def test_a_fifo_in_place_of_a_shard_or_its_index_is_refused_by_inspect(ds, what, no_hang, inspect):
    path = ds.shard_index if what == "index" else sorted(ds.shards.glob("*.tar"))[0]
    path.unlink()
    os.mkfifo(path)
    rc, err = inspect(ds)
    assert rc == 1 and f"{path.name}: not a regular file" in err, err


def test_deeply_nested_json_is_an_error_not_a_crash(ds, inspect):
    vid, array = _first_volume(ds)
    (array / "zarr.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(VolumeError, match=f"{vid}/zarr.json: unreadable array metadata"):
        VolumeReader(array)
    with ds.manifest.open("a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match="manifest.jsonl:3: invalid manifest record"):
        Catalog.load(ds.root)
    rc, err = inspect(ds, quick=True)
    assert rc == 1 and f"{vid}/zarr.json: unreadable array metadata" in err and "manifest.jsonl:3" in err
