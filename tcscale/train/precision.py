"""The compute dtype a DeepSpeed config asks for (bf16 / fp16 / fp32): read by the engine, the trainer and the
memory planner, with no DeepSpeed import."""

from __future__ import annotations

from typing import Any

import torch


def compute_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """bf16 when `bf16.enabled`, fp16 when `fp16.enabled`, else fp32."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
