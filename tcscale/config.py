"""Run configuration: dataclass schema <- YAML file <- CLI dotlist overrides, merged strictly.

An unknown key, a mistyped value or an invalid choice is a `ConfigError` naming the dotted key.
The merged config is written into the run directory (`config.yaml`) by the trainer.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tcscale.data.config import DataConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class TinyModelConfig:
    """Random-init SD-shaped models for CPU runs and tests (the real SD layout, tiny widths)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])  # U-Net widths per down block
    layers_per_block: int = 1  # resnets per U-Net block
    attention_head_dim: int = 8  # number of heads (diffusers' SD1.x naming)
    cross_attention_dim: int = 32  # text hidden size seen by attn2
    text_layers: int = 2  # CLIP text transformer layers
    text_heads: int = 2  # CLIP text attention heads
    vae_block_out_channels: list[int] = field(default_factory=lambda: [8, 16, 16, 16])  # 4 blocks: 8x downsampling
    prediction_type: str = "epsilon"  # scheduler prediction type of the tiny pipeline
    seed: int = 0  # weight init seed


@dataclass
class ModelConfig:
    pretrained: str | None = None  # hub id or local diffusers pipeline dir (SD1.4/1.5/2.1); null -> tiny models
    revision: str | None = None  # hub revision for `pretrained`
    variant: str | None = None  # weights variant for `pretrained`, e.g. "fp16"
    prediction_type: str | None = None  # override: "epsilon" | "v_prediction"; null -> the scheduler's own
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing in the U-Net
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class AttentionConfig:
    backend: str = "reference"  # "reference" (explicit probabilities) | "sdpa" (no grounding) | "fused" (Triton)
    blocks: list[str] = field(default_factory=lambda: ["mid", "up"])  # grounded attn2 layers: "down"/"mid"/"up"
    resolutions: list[int] | None = None  # keep layers whose latent side is listed (e.g. [16, 32]); null -> all
    token_loss_heads: str = "mean_map"  # "mean_map" (paper Eq. 5) | "per_head" (official code)
    mask_interpolation: str = "bilinear"  # mode of F.interpolate for masks -> layer resolution
    mask_threshold: float = 0.0  # binarise resized masks with > threshold


@dataclass
class SepEnConfig:
    concepts: str = "pairs"  # "pairs" | "large" | path to a concept list (one object noun per line)
    split: str = "seen"  # large-scale list split to train on: "seen" | "unseen" | "all"
    objects_per_prompt: int = 2  # K >= 2 objects per composed prompt
    map_resolution: int = 16  # latent side of the maps L_sep / L_en use (16 for SD1.4 at 512 px)
    lambda_sep: float = 1.0  # weight of L_sep
    lambda_en: float = 0.5  # weight of L_en
    lambda_norm: float = 0.0  # weight of L_norm (0.5 for large-scale training; 0 disables the frozen copy)
    gaussian_sigma: float = 0.5  # sigma of the 3x3 Gaussian smoothing in L_en


@dataclass
class ObjectiveConfig:
    name: str = "tokencompose"  # "tokencompose" | "ldm" | "sepen"
    token_loss_weight: float = 1e-3  # lambda in L = L_LDM + sum_m (lambda L_token + gamma L_pixel)
    pixel_loss_weight: float = 5e-5  # gamma
    snr_gamma: float | None = None  # min-SNR weighting gamma (5.0 is the usual value); null -> plain MSE
    noise_offset: float = 0.0  # noise offset scale (0 disables)
    sepen: SepEnConfig = field(default_factory=SepEnConfig)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save every N optimizer steps (0: only at the end)
    keep_last: int = 3  # keep the newest k checkpoints
    save_final: bool = True  # save a checkpoint when training ends


@dataclass
class TrackingConfig:
    enabled: bool = True  # log to MLflow on global rank 0
    uri: str | None = None  # tracking URI; null -> $MLFLOW_TRACKING_URI or sqlite:///<output_dir>/mlflow.db
    experiment: str = "tcscale"  # MLflow experiment name
    log_every: int = 1  # log metrics every N optimizer steps


@dataclass
class ValidationConfig:
    every_steps: int = 0  # validation images + attention heatmaps every N optimizer steps (0: never)
    prompts: list[str] = field(default_factory=lambda: ["a photo of a red circle and a blue square"])
    num_inference_steps: int = 4  # sampler steps for validation images
    guidance_scale: float = 7.5  # classifier-free guidance scale
    seed: int = 0  # generator seed for validation images


@dataclass
class EMAConfig:
    enabled: bool = False  # keep an exponential moving average of the trainable U-Net weights
    decay: float = 0.9999  # EMA decay per optimizer step


@dataclass
class TrainConfig:
    run_name: str = "run"  # name of the run (directory and MLflow run name)
    output_dir: str = "runs/run"  # run directory: config.yaml, checkpoints/, mlflow.db, export/
    seed: int = 0  # run seed; per-step noise, timesteps and data seeds derive from (seed, rank, step)
    max_steps: int = MISSING  # optimizer steps to train
    resume: str | None = None  # null | "latest" | path of a checkpoint tag directory
    log_to_stdout_every: int = 1  # print a metrics line every N optimizer steps on rank 0
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # DeepSpeed config, verbatim (no "auto" values)


CHOICES: dict[str, tuple[Any, ...]] = {
    "attention.backend": ("reference", "sdpa", "fused"),
    "attention.token_loss_heads": ("mean_map", "per_head"),
    "attention.mask_interpolation": ("bilinear", "nearest", "bicubic", "area"),
    "objective.name": ("tokencompose", "ldm", "sepen"),
    "objective.sepen.split": ("seen", "unseen", "all"),
    "data.source": ("synthetic", "webdataset"),
    "data.synthetic.phrase": ("colour_shape", "shape"),
    "model.prediction_type": (None, "epsilon", "v_prediction"),
    "model.tiny.prediction_type": ("epsilon", "v_prediction"),
}
BLOCKS = ("down", "mid", "up")
DEEPSPEED_REQUIRED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def _get(cfg: TrainConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _find_auto(obj: Any, prefix: str) -> list[str]:
    if isinstance(obj, dict):
        return [k for key, val in obj.items() for k in _find_auto(val, f"{prefix}.{key}")]
    if isinstance(obj, list):
        return [k for i, val in enumerate(obj) for k in _find_auto(val, f"{prefix}[{i}]")]
    return [prefix] if isinstance(obj, str) and obj.strip().lower() == "auto" else []


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks beyond types: choices, ranges and the DeepSpeed section. Raises ConfigError naming the key."""
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {list(allowed)}")
    for block in cfg.attention.blocks:
        if block not in BLOCKS:
            raise ConfigError(f"attention.blocks: {block!r} is not one of {list(BLOCKS)}")
    positive = {
        "max_steps": cfg.max_steps,
        "data.resolution": cfg.data.resolution,
        "data.steps_per_epoch": cfg.data.steps_per_epoch,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "tracking.log_every": cfg.tracking.log_every,
        "log_to_stdout_every": cfg.log_to_stdout_every,
        "validation.num_inference_steps": cfg.validation.num_inference_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    for key in ("checkpoint.every_steps", "validation.every_steps", "objective.noise_offset"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)}")
    if cfg.data.resolution % 8:
        raise ConfigError(
            f"data.resolution must be a multiple of 8 (the VAE downsamples 8x), got {cfg.data.resolution}"
        )
    if cfg.objective.sepen.objects_per_prompt < 2:
        raise ConfigError(
            f"objective.sepen.objects_per_prompt must be >= 2, got {cfg.objective.sepen.objects_per_prompt}"
        )
    if not 0.0 < cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay must be in (0, 1), got {cfg.ema.decay}")
    if cfg.objective.name == "tokencompose" and cfg.attention.backend == "sdpa":
        raise ConfigError(
            "attention.backend=sdpa computes no attention maps: objective.name=tokencompose needs "
            "'reference' or 'fused' (use objective.name=ldm for an LDM-only run)"
        )
    ds = cfg.deepspeed
    autos = _find_auto(ds, "deepspeed")
    if autos:
        raise ConfigError(f"{autos[0]}: 'auto' is not allowed; set an explicit value")
    for key in DEEPSPEED_REQUIRED:
        if key not in ds:
            raise ConfigError(f"deepspeed.{key} must be set explicitly")
    if "train_batch_size" in ds:
        raise ConfigError(
            "deepspeed.train_batch_size: leave it out; it is derived as "
            "train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size"
        )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage must be 0..3, got {stage!r}")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ConfigError("deepspeed: fp16.enabled and bf16.enabled are both true; pick one")
    return cfg


def merge_structured(
    schema: type[T],
    path: str | os.PathLike | None,
    overrides: list[str] | tuple[str, ...],
    error: type[Exception] = ConfigError,
) -> T:
    """Dataclass defaults <- YAML file <- `key=value` overrides, merged strictly by OmegaConf.

    An unknown key, a value of the wrong type or a required key left unset raises `error` naming the key.
    """
    merged: Any = OmegaConf.structured(schema)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise error(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise error(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise error(f"{path}: top level must be a mapping of config keys")
        layers.append((str(path), OmegaConf.create(data)))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise error(f"override {bad[0]!r} is not of the form key=value")
    if overrides:
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            raise error(f"{source}: config key '{key}': {getattr(exc, 'msg', exc)}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise error(f"config key '{missing[0]}' is required but not set")
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, schema)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Merge schema defaults <- YAML file <- `key=value` overrides, strictly, and validate."""
    return validate(merge_structured(TrainConfig, path, overrides))


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the merged config as YAML (temp file then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, val in d.items():
        name = f"{prefix}{key}"
        if isinstance(val, dict) and val:
            out.update(flatten(val, name + "."))
        else:
            out[name] = val
    return out
