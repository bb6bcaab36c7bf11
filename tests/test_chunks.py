"""The lean crop read path against zarr itself, on every layout the store writes, and its cache bound."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec, GzipCodec

from medssl_scale.store.chunks import ChunkCache, VolumeReader
from medssl_scale.store.integrity import seal
from medssl_scale.store.volumes import ArrayStore, VolumeLayout

VID = "v" + "0" * 19  # a volume id as ingest names one
SHAPE_XYZ = (70, 45, 33)  # not a multiple of any chunk


def _volume(dtype=np.int16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.asfortranarray(rng.integers(-1000, 1500, SHAPE_XYZ).astype(dtype))


def _boxes(rng, shape, n=40):
    for _ in range(n):
        size = tuple(int(rng.integers(1, 2 * s)) for s in shape)
        start = tuple(int(rng.integers(-s // 2 - 5, s)) for s in shape)
        yield start, size


def _expected(zyx: np.ndarray, start, size, fill) -> np.ndarray:
    """Index by index, not by clipped ranges as the reader cuts them: each voxel of the box is the volume's voxel at that
    index, or ``fill`` where the index falls outside."""
    idx = [np.arange(s, s + k) for s, k in zip(start, size)]
    inside = [(i >= 0) & (i < n) for i, n in zip(idx, zyx.shape)]
    out = zyx[np.ix_(*[np.clip(i, 0, n - 1) for i, n in zip(idx, zyx.shape)])].copy()
    out[~(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])] = fill
    return out


@pytest.mark.parametrize(
    "layout",
    [
        VolumeLayout(chunk=16, shard=32, cname="lz4", clevel=5),
        VolumeLayout(chunk=16, shard=0, cname="zstd", clevel=3),
        VolumeLayout(chunk=64, shard=256),
    ],
    ids=["sharded-lz4", "unsharded-zstd", "default"],
)
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_boxes_equal_zarr_and_pad_outside(tmp_path, layout, dtype):
    store = ArrayStore(tmp_path / "v.zarr", tmp_path / "tmp", layout)
    vol = _volume(dtype)
    store.write(VID, vol, {})
    reader = VolumeReader(tmp_path / "v.zarr" / VID, ChunkCache(1 << 20))
    zyx = np.ascontiguousarray(vol.T)
    rng = np.random.default_rng(1)
    for start, size in _boxes(rng, zyx.shape):
        got = reader.box(start, size, fill=-7)
        np.testing.assert_array_equal(got, _expected(zyx, start, size, -7), err_msg=f"box {start} {size}")
        assert got.flags.c_contiguous
    # Inside the volume, the store's own crop (zarr) agrees too.
    x, y, z = 5, 7, 3
    np.testing.assert_array_equal(reader.box((z, y, x), (20, 30, 40)), store.crop(VID, (x, y, z), (40, 30, 20)).T)


def test_gzip_chunks_are_read_and_other_layouts_refused(tmp_path):
    zyx = np.ascontiguousarray(_volume().T)
    g = zarr.create_array(str(tmp_path / "g"), shape=zyx.shape, dtype=zyx.dtype, chunks=(8, 8, 8), compressors=[GzipCodec(), Crc32cCodec()])
    g[...] = zyx
    # A transposing array-to-array codec is not one the store writes: refused, never handed to zarr.
    t = zarr.create_array(str(tmp_path / "t"), shape=zyx.shape, dtype=zyx.dtype, chunks=(8, 8, 8), serializer="auto",
                          compressors=Crc32cCodec(), filters=[{"name": "transpose", "configuration": {"order": [2, 1, 0]}}])
    t[...] = zyx
    seal(tmp_path / "g")
    seal(tmp_path / "t")
    lean = VolumeReader(tmp_path / "g")
    for start, size in _boxes(np.random.default_rng(2), zyx.shape, 10):
        np.testing.assert_array_equal(lean.box(start, size, fill=0), _expected(zyx, start, size, 0))
    with pytest.raises(OSError, match=r"t/zarr.json: codecs: codec 'transpose' first"):
        VolumeReader(tmp_path / "t")


def test_cache_is_bounded_and_reused(tmp_path):
    store = ArrayStore(tmp_path / "v.zarr", tmp_path / "tmp", VolumeLayout(chunk=16, shard=32))
    store.write(VID, _volume(), {})
    chunk_bytes = 16**3 * 2
    cache = ChunkCache(5 * chunk_bytes)
    reader = VolumeReader(tmp_path / "v.zarr" / VID, cache)
    reader.box((0, 0, 0), (16, 16, 32))  # two chunks
    assert cache.misses == 2 and cache.hits == 0
    reader.box((0, 0, 0), (16, 16, 32))
    assert cache.hits == 2
    reader.box((0, 0, 0), (33, 45, 70))  # every chunk: far more than the budget
    assert 0 < cache.nbytes <= 5 * chunk_bytes


def test_corrupt_shard_names_the_file(tmp_path):
    store = ArrayStore(tmp_path / "v.zarr", tmp_path / "tmp", VolumeLayout(chunk=16, shard=32))
    store.write(VID, _volume(), {})
    shard = tmp_path / "v.zarr" / VID / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the shard index
    shard.write_bytes(bytes(data))
    with pytest.raises(OSError, match=r"c/0/0/0: corrupt shard index"):
        VolumeReader(tmp_path / "v.zarr" / VID).box((0, 0, 0), (4, 4, 4))
