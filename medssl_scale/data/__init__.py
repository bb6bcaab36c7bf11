"""Training data: random crops from the Zarr store, streams from the shards, views, and a resumable loader."""

from medssl_scale.data.catalog import Catalog, VolumeInfo
from medssl_scale.data.config import DataConfig
from medssl_scale.data.crops import CropDataset
from medssl_scale.data.loader import Loader
from medssl_scale.data.plan import EpochPlan, PlanSampler, Sample
from medssl_scale.data.stream import ShardStream

__all__ = ["Catalog", "CropDataset", "DataConfig", "EpochPlan", "Loader", "PlanSampler", "Sample", "ShardStream", "VolumeInfo"]
