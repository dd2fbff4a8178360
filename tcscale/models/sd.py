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

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

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

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def _is_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or os.path.sep in ref.rstrip("/") and Path(ref).expanduser().exists()


def _vae_class_name(ref: str) -> str | None:
    """The `_class_name` of a local pipeline's vae/config.json (None for hub ids and missing files)."""
    import json

    path = Path(ref).expanduser() / "vae" / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def load_components(cfg: ModelConfig, resolution: int) -> SDComponents:
    """Load SD components from `cfg.pretrained` (hub id or local dir), or build tiny ones when it is null."""
    if cfg.pretrained is None:
        from tcscale.models.architectures import build_tiny_components

        comps = build_tiny_components(cfg.tiny, resolution)
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
        if _vae_class_name(ref) == "SpaceToDepthAutoencoder":  # tcscale's exact latent (tiny CPU models)
            from tcscale.models.space_to_depth import SpaceToDepthAutoencoder

            loaders["vae"] = (SpaceToDepthAutoencoder, {})
        for name, (cls, extra) in loaders.items():
            subfolder = "scheduler" if name == "noise_scheduler" else name
            try:
                parts[name] = cls.from_pretrained(
                    str(Path(ref).expanduser()) if _is_local(ref) else ref, subfolder=subfolder, **kw, **extra
                )
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"model.pretrained={ref!r}: cannot load {subfolder}/: {exc}") from exc
        comps = SDComponents(**parts)
    if cfg.prediction_type is not None and cfg.prediction_type != comps.prediction_type:
        comps.noise_scheduler = DDPMScheduler.from_config(
            comps.noise_scheduler.config, prediction_type=cfg.prediction_type
        )
    return comps


def save_pipeline_dir(
    comps: SDComponents, out_dir: str | os.PathLike, unet: UNet2DConditionModel | None = None
) -> Path:
    """Write a StableDiffusionPipeline-loadable directory (no safety checker), optionally with another U-Net."""
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
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
