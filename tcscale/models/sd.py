"""Stable Diffusion components (U-Net, VAE, text encoder, tokenizer, noise scheduler).

`load_components` reads a diffusers pipeline layout (hub id or local directory) with the real
`from_pretrained` code, or builds tiny random-init models with the SD1.x layout for CPU runs and
tests. No distributed code here: under ZeRO-3 the engine partitions the U-Net after loading, and
the frozen VAE / text encoder are loaded plainly (no `zero.Init`), as DESIGN §6 asks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tcscale.config import ModelConfig, TinyModelConfig
from tcscale.models.tokenizer import sd_clip_tokenizer


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


def tiny_unet(cfg: TinyModelConfig, latent_size: int) -> UNet2DConditionModel:
    n = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=min(32, cfg.block_out_channels[0]),
    )


def tiny_vae(cfg: TinyModelConfig, resolution: int) -> AutoencoderKL:
    n = len(cfg.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_block_out_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(32, cfg.vae_block_out_channels[0]),
        sample_size=resolution,
    )


def tiny_text_encoder(cfg: TinyModelConfig, vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.cross_attention_dim,
            intermediate_size=2 * cfg.cross_attention_dim,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=77,
            projection_dim=cfg.cross_attention_dim,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def sd_noise_scheduler(prediction_type: str) -> DDPMScheduler:
    """SD1.x training noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_components(cfg: TinyModelConfig, resolution: int) -> SDComponents:
    """Tiny random-init SD components (seeded by cfg.seed) with the real SD1.x tokenizer."""
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    tokenizer = sd_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet = tiny_unet(cfg, resolution // 8)
        vae = tiny_vae(cfg, resolution)
        text_encoder = tiny_text_encoder(cfg, len(tokenizer))
    return SDComponents(unet, vae, text_encoder, tokenizer, sd_noise_scheduler(cfg.prediction_type))


def _is_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or os.path.sep in ref.rstrip("/") and Path(ref).expanduser().exists()


def load_components(cfg: ModelConfig, resolution: int) -> SDComponents:
    """Load SD components from `cfg.pretrained` (hub id or local dir), or build tiny ones when it is null."""
    if cfg.pretrained is None:
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
