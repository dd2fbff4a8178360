"""Stable Diffusion components (U-Net, VAE, text encoder, tokenizer, noise scheduler): the container, loading and
saving.

`load_components` reads a diffusers pipeline layout (hub id or local directory) with the real `from_pretrained`
code, or builds the tiny random-init models when no model is named, both through the family of `model.family`
(tcscale.families); `save_pipeline_dir` writes that family's pipeline directory. No distributed code here: under
ZeRO-3 the engine partitions the U-Net after loading, and the frozen VAE / text encoder are loaded plainly (no
`zero.Init`; docs/DESIGN.md §6).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tcscale.models.config import ModelConfig


class ModelLoadError(RuntimeError):
    """A model path or hub id cannot be loaded; the message names the path and the component."""


@dataclass
class SDComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    # SDXL, SD3: the second text tower (OpenCLIP ViT-bigG with projection) and its tokenizer (pads with "!")
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    family: str = "sd"  # the tcscale.families name that built them (`model.family`)
    # SD3 only: the T5 tower and its tokenizer (`unet` then holds the SD3Transformer2DModel, the pipeline's transformer)
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: object | None = None

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def text_towers(self) -> tuple[torch.nn.Module, ...]:
        """The frozen text encoders the family loaded (one for SD, two for SDXL, three for SD3)."""
        return tuple(t for t in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if t is not None)


def _is_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or os.path.sep in ref.rstrip("/") and Path(ref).expanduser().exists()


def _local_class_name(ref: str, config_file: str) -> str | None:
    """The `_class_name` in `config_file` of a local pipeline directory, e.g. "model_index.json" or
    "vae/config.json" (None for hub ids and missing or unreadable files)."""
    import json

    path = Path(ref).expanduser() / config_file
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def load_components(cfg: ModelConfig, resolution: int) -> SDComponents:
    """Load the components of `model.family` from `cfg.pretrained` (hub id or local dir) with `from_pretrained`, or
    build tiny ones when it is null."""
    from tcscale.families import check_pipeline_family, family_of

    family = family_of(cfg)
    if cfg.pretrained is None:
        comps = family.build_tiny(cfg.tiny, resolution)
    else:
        ref = cfg.pretrained
        if _is_local(ref) and not Path(ref).expanduser().is_dir():
            raise ModelLoadError(f"model.pretrained={ref!r}: directory not found")
        try:
            check_pipeline_family(Path(ref).expanduser() if _is_local(ref) else ref, family)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        loaders = family.component_classes(cfg.variant)
        if _local_class_name(ref, "vae/config.json") == "SpaceToDepthAutoencoder":  # exact latent (tiny CPU models)
            from tcscale.models.space_to_depth import SpaceToDepthAutoencoder

            loaders["vae"] = (SpaceToDepthAutoencoder, {})
        parts = {}
        for name, (cls, extra) in loaders.items():
            subfolder = family.subfolder(name)
            try:
                parts[name] = cls.from_pretrained(
                    str(Path(ref).expanduser()) if _is_local(ref) else ref, subfolder=subfolder, revision=cfg.revision,
                    **extra,
                )  # fmt: skip
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"model.pretrained={ref!r}: cannot load {subfolder}/: {exc}") from exc
        comps = SDComponents(**parts, family=family.name)
    if cfg.text_encoder_path is not None:
        comps.text_encoder = load_text_encoder(cfg.text_encoder_path, "model.text_encoder_path")
        width, expected = comps.text_encoder.config.hidden_size, comps.unet.config.cross_attention_dim
        if width != expected:
            raise ModelLoadError(
                f"model.text_encoder_path={cfg.text_encoder_path!r}: hidden size {width} does not match the U-Net's "
                f"cross_attention_dim {expected}"
            )
    if cfg.prediction_type is not None and cfg.prediction_type != comps.prediction_type:
        comps.noise_scheduler = DDPMScheduler.from_config(
            comps.noise_scheduler.config, prediction_type=cfg.prediction_type
        )
    return comps


def text_encoder_dir(path: str | os.PathLike) -> Path:
    """The CLIPTextModel directory named by `path`: the directory itself, or its `text_encoder/` subfolder when
    `path` is a pipeline directory (a tcscale export)."""
    path = Path(path).expanduser()
    sub = path / "text_encoder"
    return sub if not (path / "config.json").is_file() and (sub / "config.json").is_file() else path


def load_text_encoder(path: str | os.PathLike, key: str = "text encoder", **kwargs) -> CLIPTextModel:
    """`CLIPTextModel.from_pretrained` of a local directory (see `text_encoder_dir`); errors name `key`."""
    folder = text_encoder_dir(path)
    if not folder.is_dir():
        raise ModelLoadError(f"{key}={str(path)!r}: directory not found")
    try:
        return CLIPTextModel.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{key}={str(path)!r}: cannot load a CLIPTextModel from {folder}: {exc}") from exc


def load_base_text_encoder(cfg: ModelConfig, resolution: int) -> CLIPTextModel:
    """The text encoder `load_components(cfg)` returns, loaded again on its own in float32 (for an objective that
    trains it: the trainer keeps its copy of the frozen encoder in the compute dtype)."""
    if cfg.text_encoder_path is not None:
        return load_text_encoder(cfg.text_encoder_path, "model.text_encoder_path")
    if cfg.pretrained is None:
        from tcscale.families import family_of

        return family_of(cfg).build_tiny(cfg.tiny, resolution).text_encoder
    ref = cfg.pretrained
    try:
        return CLIPTextModel.from_pretrained(
            str(Path(ref).expanduser()) if _is_local(ref) else ref, subfolder="text_encoder", revision=cfg.revision,
            variant=cfg.variant, torch_dtype=torch.float32,
        )  # fmt: skip
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.pretrained={ref!r}: cannot load text_encoder/: {exc}") from exc


def save_pipeline_dir(
    comps: SDComponents, out_dir: str | os.PathLike, unet: UNet2DConditionModel | None = None
) -> Path:
    """Write a pipeline directory of the components' family (`StableDiffusionPipeline`,
    `StableDiffusionXLPipeline`, ...; no safety checker), optionally with another U-Net."""
    from tcscale.families import family_named

    out = Path(out_dir)
    family_named(comps.family).pipeline(comps, unet).save_pretrained(str(out))
    return out
