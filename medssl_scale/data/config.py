"""The ``data:`` section of a run config: validated, with the defaults a 3D SSL run expects.

Sizes are voxels in the layout of training tensors, (D, H, W) = (z, y, x):
PCRLv2's "96x96x64" (x, y, z) global crop is ``[64, 96, 96]`` here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medssl_scale.data import augments

Edge = Annotated[int, Field(ge=1, le=4096)]  # voxels along one axis of a crop
Size3 = tuple[Edge, Edge, Edge]


def _size3(v: Any) -> Any:
    if isinstance(v, int):
        return (v, v, v)
    return v


class _Strict(BaseModel):
    # allow_inf_nan=False: every float of every section is finite (a NaN compares false with every bound)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Normalize(_Strict):
    """Per-modality intensity normalisation (REFERENCES.md, shared conventions)."""

    ct_window: tuple[float, float] = (-1000.0, 1000.0)  # HU clip; PCRLv2 and DAE use [-1000, 1000], BTCV recipes [-175, 250]
    ct_range: tuple[float, float] = (0.0, 1.0)  # the window maps onto this range
    mr_zscore: bool = True  # clip to the volume's 0.5-99.5th percentiles, then z-score with the clipped volume's mean/std
    mr_stats: Literal["volume", "crop"] = "volume"  # volume: the statistics ingest stored; crop: computed on the crop

    @field_validator("ct_window", "ct_range")
    @classmethod
    def _increasing(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError(f"[{v[0]}, {v[1]}] is empty: give [low, high] with low < high")
        return v


class Augment(_Strict):
    """One MONAI dictionary transform by class name, e.g. ``{name: RandGaussianNoised, args: {prob: 0.5, std: 0.05}}``.

    It sees one image at a time under the key ``image`` (and ``label``, for plain crops with
    ``labels: true``): each view and each sub-crop gets its own random draw. ``keys`` defaults
    to ``[image]``; a geometric transform on plain crops should name ``[image, label]``.

    Only the transforms and arguments in :mod:`medssl_scale.data.augments` may be named, so a
    config can never make MONAI import or call anything.
    """

    name: str
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _allowed(cls, v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("args", {}), dict):
            return {**v, "args": augments.check(v["name"], v.get("args", {}))}
        return v


class Superpixels(_Strict):
    """Felzenszwalb settings: 50-200 regions per slice inside the body (REFERENCES.md); the defaults give about 100
    inside the body of a real 128^2 CT slice (pydicom's CT_small), segmented at half resolution in 2 ms."""

    scale: float = Field(5.0, gt=0)
    sigma: float = Field(0.5, ge=0)
    min_size: int = Field(8, ge=1)  # pooled pixels, with downsample
    downsample: int = Field(2, ge=1, le=8)  # segment each slice averaged over 2 x 2 blocks (4x fewer pixels)
    body: bool = True  # regions inside the body only; the air around it gets no region (-1)


class PcrlSpatial(_Strict):
    """Each PCRLv2 crop's own flip and affine, before it becomes a restoration target: the released pipeline's
    torchio ``RandomFlip()`` and ``RandomAffine()`` at their defaults (REFERENCES.md) [code]."""

    flip_axes: list[Literal[0, 1, 2]] = Field(default_factory=lambda: [2])  # (D, H, W); torchio's first axis is x, our W
    flip_prob: float = Field(0.5, ge=0, le=1)
    rotate_deg: float = Field(10.0, ge=0, le=180)  # per axis ~ U(-deg, deg)
    scale: float = Field(0.1, ge=0, lt=1)  # per axis ~ U(1 - scale, 1 + scale)


class Views(_Strict):
    kind: Literal["none", "pair", "pcrl"] = "none"
    # pair: two crops inside one region of (1 + overlap_slack) x crop, so they always overlap.
    region_scale: float = Field(4.0 / 3.0, ge=1.0, lt=2.0)  # below 2, two crops in the region always overlap
    flip: bool = True  # random flips per view and axis (recorded, so overlaps stay matchable)
    # pcrl (PCRLv2 sub-crops; REFERENCES.md): sizes (D, H, W) before resizing.
    global_sizes: Annotated[list[Size3], Field(min_length=1, max_length=64)] = Field(default_factory=lambda: [(64, 96, 96), (96, 96, 96), (64, 112, 112), (32, 64, 64)])
    global_out: Size3 = (32, 64, 64)
    local_sizes: Annotated[list[Size3], Field(min_length=1, max_length=64)] = Field(default_factory=lambda: [(16, 32, 32), (16, 16, 16), (32, 32, 32), (8, 8, 8)])
    local_out: Size3 = (16, 16, 16)
    n_local: int = Field(6, ge=0, le=64)
    min_iou: float = Field(0.3, ge=0.0, lt=1.0)
    pcrl_spatial: PcrlSpatial | None = PcrlSpatial()  # null: crops as cut and resized
    # Region maps cut like the views (``regions1``/``regions2``), for LRC; pair and pcrl views.
    superpixels: Superpixels | None = None

    _s3 = field_validator("global_out", "local_out", mode="before")(_size3)


class DataConfig(_Strict):
    dataset: str
    source: Literal["zarr", "shards"] = "zarr"
    # Where shards are read from, {name} standing for a shard's file name, e.g.
    # "pipe:aws s3 cp s3://bucket/ds/shards/{name} -"; default: the dataset's shards/ folder.
    # Sample counts always come from the dataset's shards/index.json.
    shard_url: str | None = None
    crop: Size3 = (96, 96, 96)
    batch_size: int = Field(2, ge=1, le=1 << 16)
    workers: int = Field(2, ge=0, le=512)
    seed: int = Field(0, ge=0)
    modalities: list[Literal["CT", "MR"]] | None = None  # only these
    modality_weights: dict[Literal["CT", "MR"], Annotated[float, Field(ge=0)]] | None = None  # share of crops per modality; None: uniform over volumes
    sampling: Literal["uniform", "foreground"] = "foreground"
    min_foreground: float = Field(0.5, ge=0.0, le=1.0)  # foreground sampling: least body fraction of a crop
    pairs: bool = False  # CT and MR crops of one pseudonymous patient, side by side in each batch
    labels: bool = False  # also return label crops (-1 where a volume has no label map)
    crops_per_visit: int = Field(8, ge=1, le=1 << 16)  # crops cut from a volume while its chunks are cached (zarr); per volume read (shards)
    interleave: int | None = Field(None, ge=1, le=1 << 16)  # volumes a worker visits at once (default: the batch size, so a batch mixes volumes)
    samples_per_epoch: int | None = Field(None, ge=1)  # default: every volume visited once (crops_per_visit crops each)
    cache_mb: int = Field(512, ge=0)  # decoded-chunk cache per worker
    # lru: chunks stay until the cache is full (a small dataset is decoded once); visit: a worker forgets
    # a volume's chunks after the last crop of its visit, so its cache holds only the visits in flight,
    # which is all a dataset much larger than cache_mb ever reuses anyway
    cache_scope: Literal["lru", "visit"] = "lru"
    shuffle_buffer: int = Field(64, ge=1)  # shards: crops held for shuffling per worker
    prefetch: int = Field(2, ge=1, le=64)  # batches in flight per worker
    normalize: Normalize = Normalize()
    # raw: without augmentation, crops of views kind none/pair cross from the workers in the volume's
    # stored type (int16 for CT: half of float32) with per-sample normalisation parameters, and are
    # normalised in the training process (on its device); the float32 values are the same.
    # worker: normalised in the workers, float32 across (what augmentations and pcrl views always do).
    handoff: Literal["raw", "worker"] = "raw"
    augment: list[Augment] = Field(default_factory=list)
    views: Views = Views()

    _s3 = field_validator("crop", mode="before")(_size3)

    @field_validator("modality_weights")
    @classmethod
    def _weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and sum(v.values()) <= 0:
            raise ValueError("modality_weights must be non-negative and not all zero")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.pairs and self.batch_size % 2:
            raise ValueError("pairs: true needs an even batch_size (a batch holds whole CT/MR pairs)")
        if self.pairs and self.modality_weights:
            raise ValueError("pairs: true draws patients, not modalities: drop modality_weights")
        if self.source == "shards" and (self.pairs or self.modalities or self.modality_weights):
            raise ValueError(
                "source: shards streams every volume of every shard: pairs, modalities and modality_weights need source: zarr"
            )
        if self.labels and self.views.kind == "pcrl":
            raise ValueError("labels: true is not available with views.kind: pcrl (sub-crops are resized)")
        return self
