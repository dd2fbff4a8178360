"""DeepSpeed engine around the U-Net (the only trainable model); VAE and text encoder stay outside it."""

from __future__ import annotations

import copy
from typing import Any

import torch


def compute_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_engine(model: torch.nn.Module, params: list[torch.nn.Parameter], ds_config: dict[str, Any]):
    """deepspeed.initialize with the YAML's DeepSpeed section (copied: DeepSpeed mutates it)."""
    import deepspeed

    if not params:
        raise ValueError("no trainable parameters")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=copy.deepcopy(ds_config))
    return engine
