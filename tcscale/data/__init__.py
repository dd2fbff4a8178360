"""Grounded data: synthetic shapes world, WebDataset streaming loader, transforms, phrase alignment.

The loader names are imported lazily, so that ``tcscale.config`` (which needs only ``tcscale.data.config``) does not
pull in webdataset and the image stack: a benchmark or a GPU machine without them can still read configs.
"""

from __future__ import annotations

import importlib

from tcscale.data.config import DataConfig, DataConfigError, SyntheticDataConfig

_LAZY = {"TrainLoader": "tcscale.data.loader", "build_train_loader": "tcscale.data.loader",
         "resolve_shards": "tcscale.data.loader"}  # fmt: skip

__all__ = ["DataConfig", "DataConfigError", "SyntheticDataConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tcscale.data' has no attribute {name!r}")
