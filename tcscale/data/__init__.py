"""Grounded data: synthetic shapes world, WebDataset streaming loader, transforms, phrase alignment."""

from tcscale.data.config import DataConfig, DataConfigError, SyntheticDataConfig
from tcscale.data.loader import TrainLoader, build_train_loader, resolve_shards

__all__ = [
    "DataConfig",
    "DataConfigError",
    "SyntheticDataConfig",
    "TrainLoader",
    "build_train_loader",
    "resolve_shards",
]
