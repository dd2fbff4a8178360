"""DeepSpeed engine around the trained module; everything else stays outside it. Also the check of the config's
DeepSpeed section against DeepSpeed's own config models, run when a config is loaded (before any model)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from tcscale.train.distributed import remove_shm_buffer_at_exit

# top-level scalars the trainer reads itself: (type, lower bound)
SCALARS: dict[str, tuple[type | tuple[type, ...], float]] = {
    "train_micro_batch_size_per_gpu": (int, 1),
    "gradient_accumulation_steps": (int, 1),
    "gradient_clipping": ((int, float), 0.0),
}


def check_deepspeed_section(ds: dict[str, Any]) -> list[str]:
    """Problems of the `deepspeed` section, each naming its key: the trainer's scalars by type and range, and
    the zero_optimization / bf16 / fp16 sections through DeepSpeed's own pydantic models."""
    problems = []
    for key, (kind, low) in SCALARS.items():
        if key not in ds:
            continue
        value = ds[key]
        if isinstance(value, bool) or not isinstance(value, kind) or value < low:
            want = "an integer" if kind is int else "a number"
            problems.append(f"deepspeed.{key}={value!r} must be {want} >= {low:g}")
    sections = {}
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        sections = {"zero_optimization": DeepSpeedZeroConfig, "bf16": DeepSpeedBF16Config, "fp16": DeepSpeedFP16Config}
    except ImportError:  # a machine that only reads configs
        pass
    for key, model in sections.items():
        section = ds.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            problems.append(f"deepspeed.{key} must be a mapping, got {section!r}")
            continue
        try:
            model(**section)
        except Exception as exc:  # noqa: BLE001 - pydantic.ValidationError (DeepSpeed's config models)
            errors = exc.errors() if hasattr(exc, "errors") else [{"loc": (), "msg": str(exc)}]
            for err in errors[:3]:
                where = ".".join(str(p) for p in err.get("loc", ()))
                problems.append(f"deepspeed.{key}{'.' + where if where else ''}: {err.get('msg')}")
    optimizer = ds.get("optimizer")
    if optimizer is not None and (not isinstance(optimizer, dict) or not isinstance(optimizer.get("type"), str)):
        problems.append(f"deepspeed.optimizer must be a mapping with a 'type' name, got {optimizer!r}")
    return problems


def build_engine(model: torch.nn.Module, params: list[torch.nn.Parameter], ds_config: dict[str, Any]):
    """deepspeed.initialize with the YAML's DeepSpeed section (copied: DeepSpeed mutates it)."""
    import deepspeed

    if not params:
        raise ValueError("no trainable parameters")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=copy.deepcopy(ds_config))
    remove_shm_buffer_at_exit()  # deepspeed.initialize may have joined the group itself (benchmarks, tools)
    return engine
