"""Stable Diffusion components (U-Net, VAE, text encoder, tokenizer, noise scheduler): the container, loading and
saving.

`load_components` reads a diffusers pipeline layout (hub id or local directory) with the real `from_pretrained`
code, or builds the tiny random-init models of `tcscale.models.architectures` when no model is named;
`save_pipeline_dir` writes a `StableDiffusionPipeline` directory. No distributed code here: under ZeRO-3 the engine
partitions the U-Net after loading, and the frozen VAE / text encoder are loaded plainly (no `zero.Init`), as
DESIGN §6 asks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tcscale.config import ModelConfig


class ModelLoadError(RuntimeError):
    """A model path or hub id cannot be loaded; the message names the path and the component."""


@dataclass
class SDComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    # SDXL only: the second text tower (OpenCLIP ViT-bigG with projection) and its tokenizer (pads with "!")
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def family(self) -> str:
        """The model family: "sdxl" when there is a second text tower, else "sd" (SD1.x / SD2.x)."""
        return "sdxl" if self.text_encoder_2 is not None else "sd"


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


def check_family(ref: str, family: str) -> None:
    """A local pipeline directory's class agrees with `model.family` (an SDXL dir read as SD would lose its second
    text tower; the reverse has none to read)."""
    name = _local_class_name(ref, "model_index.json")
    if name is None:
        return
    is_xl = "XL" in name
    if is_xl != (family == "sdxl"):
        raise ModelLoadError(
            f"model.pretrained={ref!r} is a {name}: set model.family={'sdxl' if is_xl else 'sd'} (got {family!r})"
        )


def load_components(cfg: ModelConfig, resolution: int) -> SDComponents:
    """Load SD components from `cfg.pretrained` (hub id or local dir), or build tiny ones when it is null."""
    if cfg.pretrained is None:
        from tcscale.models.architectures import build_tiny_components

        comps = build_tiny_components(cfg.tiny, resolution, cfg.family)
    else:
        ref = cfg.pretrained
        if _is_local(ref) and not Path(ref).expanduser().is_dir():
            raise ModelLoadError(f"model.pretrained={ref!r}: directory not found")
        kw = {"revision": cfg.revision}
        parts = {}
        loaders = {
            "unet": (UNet2DConditionModel, {"variant": cfg.variant}),
            "vae": (AutoencoderKL, {"variant": cfg.variant}),
            "text_encoder": (CLIPTextModel, {"variant": cfg.variant}),
            "tokenizer": (CLIPTokenizer, {}),
            "noise_scheduler": (DDPMScheduler, {}),
        }
        if _local_class_name(ref, "vae/config.json") == "SpaceToDepthAutoencoder":  # exact latent (tiny CPU models)
            from tcscale.models.space_to_depth import SpaceToDepthAutoencoder

            loaders["vae"] = (SpaceToDepthAutoencoder, {})
        if cfg.family == "sdxl":
            loaders["text_encoder_2"] = (CLIPTextModelWithProjection, {"variant": cfg.variant})
            loaders["tokenizer_2"] = (CLIPTokenizer, {})
        check_family(ref, cfg.family)
        for name, (cls, extra) in loaders.items():
            subfolder = "scheduler" if name == "noise_scheduler" else name
            try:
                parts[name] = cls.from_pretrained(
                    str(Path(ref).expanduser()) if _is_local(ref) else ref, subfolder=subfolder, **kw, **extra
                )
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"model.pretrained={ref!r}: cannot load {subfolder}/: {exc}") from exc
        comps = SDComponents(**parts)
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
        from tcscale.models.architectures import build_tiny_components

        return build_tiny_components(cfg.tiny, resolution, cfg.family).text_encoder
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
    """Write a StableDiffusionPipeline- (SDXL: StableDiffusionXLPipeline-) loadable directory (no safety checker),
    optionally with another U-Net."""
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    if comps.family == "sdxl":
        sdxl_pipeline(comps, unet).save_pretrained(str(out))
        return out
    pipe = StableDiffusionPipeline(
        vae=comps.vae,
        text_encoder=comps.text_encoder,
        tokenizer=comps.tokenizer,
        unet=unet if unet is not None else comps.unet,
        scheduler=comps.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out))
    return out


def sdxl_pipeline(comps: SDComponents, unet: UNet2DConditionModel | None = None, scheduler=None):
    """A StableDiffusionXLPipeline of the components (no watermarker; `force_zeros_for_empty_prompt` as SDXL-base)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=comps.vae,
        text_encoder=comps.text_encoder,
        text_encoder_2=comps.text_encoder_2,
        tokenizer=comps.tokenizer,
        tokenizer_2=comps.tokenizer_2,
        unet=unet if unet is not None else comps.unet,
        scheduler=scheduler if scheduler is not None else comps.noise_scheduler,
        add_watermarker=False,
    )
