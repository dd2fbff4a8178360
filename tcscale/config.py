"""Run configuration: dataclass schema <- YAML file <- CLI dotlist overrides, merged strictly.

An unknown key, a mistyped value or an invalid choice is a `ConfigError` naming the dotted key. Choice fields are
`Literal` types (OmegaConf checks them). The `objective` section has one sub-section per registered objective
(`tcscale.objectives.OBJECTIVES`), built from the registry when a config is loaded, so registering an objective
adds its options here without editing this file; `imports` names modules (or .py files) that register more. The
merged config is written into the run directory (`config.yaml`) by the trainer.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tcscale.attention.config import AttentionConfig
from tcscale.data.config import DataConfig, DataConfigError, check_cacheable
from tcscale.eval.grounding_maps import GroundingEvalConfig
from tcscale.models.config import LoRAConfig, ModelConfig, PredictionType, TinyModelConfig  # noqa: F401

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class ObjectiveChoice:
    """`objective.name` picks a registered objective; `objective.<name>` holds each one's options."""

    name: str = "tokencompose"  # a key of tcscale.objectives.OBJECTIVES (tokencompose | ldm | sepen | ...)


def objective_config() -> ObjectiveChoice:
    """Default `objective` section: the choice plus one sub-section per registered objective."""
    return objective_schema()()


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save every N optimizer steps (0: only at the end)
    keep_last: int = 3  # keep the newest k checkpoints
    save_final: bool = True  # save a checkpoint when training ends
    allow_unsafe_load: bool = False  # resume from files that need arbitrary unpickling (only ones you trust)
    on_sigterm: bool = True  # SIGTERM: checkpoint and exit 75 like SIGUSR1 (false: stop without saving, exit 143)


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
    grounding: GroundingEvalConfig = field(default_factory=GroundingEvalConfig)  # live held-out grounding mIoU


@dataclass
class EMAConfig:
    # keep an fp32 exponential moving average of the trained weights (any ZeRO stage and precision; checkpointed,
    # exported with launchers/export.py --ema)
    enabled: bool = False
    decay: float = 0.9999  # EMA decay per optimizer step
    warmup: bool = False  # decay min(decay, (1 + n) / (10 + n)) at update n (diffusers' EMAModel default schedule)
    validate: bool = False  # validation images, heatmaps and grounding mIoU from the EMA weights (not the trained)


@dataclass
class BatchConfig:
    """The recipe's batch (tcscale.train.batch): the samples per optimizer step the config means, kept on any number
    of ranks by deriving deepspeed.gradient_accumulation_steps from the world size."""

    # samples per optimizer step (world x micro-batch x accumulation); null -> whatever the world size gives
    global_size: int | None = None
    # a world that cannot keep global_size: none -> refuse (exit 2); linear | sqrt -> train at the nearest global
    # batch it allows with every lr scaled by (that / global_size), or its square root
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"


@dataclass
class MemoryConfig:
    # the start-up memory check on a CUDA device (docs/MEMORY.md): "refuse" stops a run whose predicted peak exceeds
    # the GPU (exit 2), "warn" prints the verdict and trains, "off" does not plan
    preflight: Literal["refuse", "warn", "off"] = "refuse"


@dataclass
class TrainConfig:
    run_name: str = "run"  # name of the run (directory and MLflow run name)
    output_dir: str = "runs/run"  # run directory: config.yaml, checkpoints/, mlflow.db, export/
    seed: int = 0  # run seed; per-step noise, timesteps and data seeds derive from (seed, rank, step)
    max_steps: int = MISSING  # optimizer steps to train
    resume: str | None = None  # null | "latest" | path of a checkpoint tag directory
    log_to_stdout_every: int = 1  # print a metrics line every N optimizer steps on rank 0
    # cuda: a run that needs a visible CUDA GPU (refused without one, exit 2) | cpu: CPU ranks (gloo), e.g. tiny runs
    device: Literal["cuda", "cpu"] = "cuda"
    batch: BatchConfig = field(default_factory=BatchConfig)
    imports: list[str] = field(default_factory=list)  # modules or .py files imported first (register objectives)
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    objective: ObjectiveChoice = field(default_factory=objective_config)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # DeepSpeed config, verbatim (no "auto" values)


DEEPSPEED_REQUIRED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
_SCHEMAS: dict[tuple, type] = {}


def objective_schema() -> type:
    """The `objective` section's dataclass for the objectives registered now (cached per registry content):
    `name` (a Literal of the registered names) and one field per objective holding its config dataclass."""
    from tcscale.objectives import OBJECTIVES

    key = tuple((name, spec.config) for name, spec in sorted(OBJECTIVES.items()))
    schema = _SCHEMAS.get(key)
    if schema is None:
        names = tuple(name for name, _ in key)
        fields = [("name", Literal.__getitem__(names), field(default="tokencompose"))]
        fields += [(name, cls, field(default_factory=cls)) for name, cls in key]
        schema = make_dataclass("ObjectiveConfig", fields, bases=(ObjectiveChoice,))
        schema.__module__ = __name__
        _SCHEMAS[key] = schema
    return schema


def _get(cfg: Any, dotted: str) -> Any:
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


def expected_vae_factor(model: ModelConfig) -> int:
    """Pixels per latent cell of the configured VAE: the tiny VAE's blocks; a local pipeline's vae/config.json
    (2^(blocks - 1), as diffusers computes it: a tiny model's export says 2); 8 for every released SD VAE."""
    if model.pretrained is None:
        if model.tiny.latent == "space_to_depth":
            return model.tiny.space_to_depth_factor
        return 2 ** (len(model.tiny.vae_block_out_channels) - 1)
    vae_config = Path(model.pretrained).expanduser() / "vae" / "config.json"
    if vae_config.is_file():
        try:
            return 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: the loader names the file when it fails on it
    return 8


def xformers_missing() -> str | None:
    """What attention.ungrounded=xformers lacks here (None when usable): the package, or a CUDA GPU."""
    if importlib.util.find_spec("xformers") is None:
        return "the xformers package (pip install -e '.[xformers]')"
    import torch

    if not torch.cuda.is_available():
        return "a CUDA GPU (xformers has no CPU kernels)"
    if not xformers_kernels_loaded():
        return (
            f"xformers kernels that load beside torch {torch.__version__} (this xformers build's compiled library "
            "does not; install an xformers built for this torch)"
        )
    return None


def xformers_kernels_loaded() -> bool:
    """Whether xformers' compiled (C++/CUDA) library loaded; a wheel built for another torch imports without it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import xformers

    return bool(getattr(xformers, "_has_cpp_library", False))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks beyond types: ranges, the DeepSpeed section, and the chosen objective's own checks (its spec's
    `check`). Raises ConfigError naming the key."""
    from tcscale.objectives import OBJECTIVES

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
    for key in ("checkpoint.every_steps", "validation.every_steps"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)}")
    factor = expected_vae_factor(cfg.model)
    if cfg.data.resolution % factor:
        raise ConfigError(
            f"data.resolution must be a multiple of {factor} (the VAE downsamples {factor}x), got {cfg.data.resolution}"
        )
    try:
        check_cacheable(cfg.data)
    except DataConfigError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.data.latents == "cached" and cfg.validation.every_steps:
        raise ConfigError(
            "validation.every_steps: validation decodes images with the VAE, which data.latents=cached does not keep; "
            "set validation.every_steps=0 (evaluate exported checkpoints with launchers/eval.py)"
        )
    check_caption_dropout(cfg)
    std = cfg.model.tiny.text_token_embedding_std
    if std is not None and not std > 0:
        raise ConfigError(f"model.tiny.text_token_embedding_std must be > 0 (or null: CLIP's 0.02), got {std}")
    if not 0.0 < cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay must be in (0, 1), got {cfg.ema.decay}")
    ds = cfg.deepspeed
    autos = _find_auto(ds, "deepspeed")
    if autos:
        raise ConfigError(f"{autos[0]}: 'auto' is not allowed; set an explicit value")
    for key in DEEPSPEED_REQUIRED:
        if key == "gradient_accumulation_steps" and cfg.batch.global_size is not None:
            continue  # derived from batch.global_size and the world size (tcscale.train.batch)
        if key not in ds:
            raise ConfigError(f"deepspeed.{key} must be set explicitly")
    if "train_batch_size" in ds:
        raise ConfigError(
            "deepspeed.train_batch_size: leave it out; it is derived as "
            "train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size"
        )
    if cfg.batch.global_size is not None and cfg.batch.global_size <= 0:
        raise ConfigError(f"batch.global_size must be > 0 (or null), got {cfg.batch.global_size}")
    if cfg.batch.lr_scaling != "none" and cfg.batch.global_size is None:
        raise ConfigError(f"batch.lr_scaling={cfg.batch.lr_scaling} needs batch.global_size (the batch its lr is for)")
    from tcscale.train.engine import check_deepspeed_section

    problems = check_deepspeed_section(ds)
    if problems:
        raise ConfigError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage must be 0..3, got {stage!r}")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ConfigError("deepspeed: fp16.enabled and bf16.enabled are both true; pick one")
    if cfg.attention.ungrounded == "xformers":
        missing = xformers_missing()
        if missing:
            raise ConfigError(f"attention.ungrounded=xformers needs {missing}; use attention.ungrounded=sdpa")
    if cfg.model.lora is not None:
        check_lora(cfg)
    from tcscale.families import family_of

    try:
        family_of(cfg.model).check_config(cfg)  # what the family cannot do yet (tcscale.families)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check = OBJECTIVES[cfg.objective.name].check
    if check is not None:
        try:
            check(cfg)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return cfg


def check_caption_dropout(cfg: TrainConfig) -> None:
    """`data.caption_dropout`: in [0, 1); above 0 only for an objective that applies it (its class's
    `caption_dropout`) and the sd family, whose pipelines encode the empty caption for the unconditional branch."""
    from tcscale.objectives import OBJECTIVES

    p = cfg.data.caption_dropout
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"data.caption_dropout must be in [0, 1), got {p}")
    if p == 0.0:
        return
    if not OBJECTIVES[cfg.objective.name].build.caption_dropout:
        dropping = sorted(name for name, spec in OBJECTIVES.items() if spec.build.caption_dropout)
        raise ConfigError(
            f"data.caption_dropout={p}: objective {cfg.objective.name!r} does not drop captions; it applies to "
            f"objective.name={' | '.join(dropping)}, or set 0"
        )
    if cfg.model.family != "sd":
        raise ConfigError(
            f"data.caption_dropout={p}: model.family={cfg.model.family} is not supported (its pipelines' "
            "unconditional branch is not the empty caption's encoding); it applies to model.family=sd, or set 0"
        )


def check_lora(cfg: TrainConfig) -> None:
    """`model.lora`: positive rank, dropout in [0, 1), and an objective that trains the U-Net (its class names
    default `lora_target_modules`)."""
    from tcscale.objectives import OBJECTIVES

    lora = cfg.model.lora
    if lora.rank <= 0:
        raise ConfigError(f"model.lora.rank must be > 0, got {lora.rank}")
    if lora.alpha is not None and lora.alpha <= 0:
        raise ConfigError(f"model.lora.alpha must be > 0 (or null: the rank), got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
    if lora.target_modules is not None and not lora.target_modules:
        raise ConfigError("model.lora.target_modules: an empty list adapts nothing (null: the objective's default)")
    if OBJECTIVES[cfg.objective.name].build.lora_target_modules is None:
        raise ConfigError(
            f"model.lora: objective {cfg.objective.name!r} does not train the U-Net; LoRA applies to the U-Net "
            "objectives (tokencompose, ldm, sepen): set model.lora=null"
        )


def read_layers(
    path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...], error: type[Exception] = ConfigError
) -> list[tuple[str, Any]]:
    """[(source, OmegaConf node)] of a YAML file and `key=value` overrides, in merge order."""
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
    return layers


def merge_layers(schema: type[T], layers: list[tuple[str, Any]], error: type[Exception] = ConfigError) -> T:
    """Dataclass defaults <- each layer, merged strictly by OmegaConf; the dataclass instance."""
    merged: Any = OmegaConf.structured(schema)
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            detail = str(getattr(exc, "msg", exc)).strip().splitlines()[0]  # OmegaConf appends full_key, types
            raise error(f"{source}: config key '{key}': {detail}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise error(f"config key '{missing[0]}' is required but not set")
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, schema)
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
    return merge_layers(schema, read_layers(path, overrides, error), error)


def import_plugins(modules: list[str]) -> None:
    """Import each entry of `imports`: a module name (``my_lab.objectives``) or a path to a .py file."""
    for entry in modules:
        try:
            if entry.endswith(".py"):
                path = Path(entry).expanduser().resolve()
                if not path.is_file():
                    raise ConfigError(f"imports: file not found: {entry}")
                name = f"tcscale_plugin_{path.stem}"
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module  # dataclass annotations resolve through sys.modules
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            else:
                importlib.import_module(entry)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a user module is a config error naming it
            raise ConfigError(f"imports: cannot import {entry!r}: {type(exc).__name__}: {exc}") from None


def _imports_of(layers: list[tuple[str, Any]]) -> list[str]:
    found: list[str] = []
    for source, layer in layers:
        value = OmegaConf.select(layer, "imports", default=None)
        if value is None:
            continue
        value = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: config key 'imports': a list of module names or .py paths, got {value!r}")
        found = value
    return found


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Merge schema defaults <- YAML file <- `key=value` overrides, strictly, and validate. The modules named by
    `imports` are imported first, so the objectives they register are part of the schema."""
    layers = read_layers(path, overrides)
    import_plugins(_imports_of(layers))
    for _, layer in layers:  # YAML 1.1 reads a bare `off` as false: memory.preflight's "off" either way
        if OmegaConf.select(layer, "memory.preflight", default=None) is False:
            OmegaConf.update(layer, "memory.preflight", "off")
    return validate(merge_layers(TrainConfig, layers))


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain data (config.yaml, MLflow params, checkpoints). The `objective` section keeps the
    built-in objectives' sub-sections and the chosen one's; sub-sections of other plugin objectives are left out,
    so the file loads in a process that imports only what this run's `imports` names."""
    from tcscale.objectives import OBJECTIVES

    out = asdict(cfg)
    chosen = out["objective"]["name"]
    for name in list(out["objective"]):
        spec = OBJECTIVES.get(name)
        if spec is not None and name != chosen and not spec.config.__module__.startswith("tcscale."):
            del out["objective"][name]
    return out


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
