"""Stable Diffusion 1.x / 2.x: one CLIP text tower, a `UNet2DConditionModel` with cross-attention in the first three
down blocks, the mid block and the last three up blocks, `StableDiffusionPipeline`.

Conditioning: the text encoder's last hidden states (SD2.x checkpoints already end at the penultimate layer).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from tcscale.families.base import Family
from tcscale.families.layout import UNET_LAYOUT
from tcscale.models import architectures as archs
from tcscale.models.conditioning import Conditioning
from tcscale.models.sd import SDComponents


def tiny_unet(cfg, latent_size: int, latent_channels: int = 4) -> UNet2DConditionModel:
    """The SD1.x U-Net layout at tiny widths (`model.tiny`)."""
    n = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups or min(32, cfg.block_out_channels[0]),
    )


def released_unet(arch, latent_size: int | None = None) -> UNet2DConditionModel:
    """CompVis/stable-diffusion-v1-4 (sd14) or stabilityai/stable-diffusion-2-1 (sd21) unet/config.json."""
    return UNet2DConditionModel(
        sample_size=latent_size or arch.resolution // 8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=arch.cross_attention_dim,
        attention_head_dim=arch.attention_head_dim,
        use_linear_projection=arch.use_linear_projection,
        **archs.RELEASED_UNET_COMMON,
    )


class SDFamily(Family):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    layout = UNET_LAYOUT
    hub_names = {"sd14": ("stable-diffusion-v1", "stable-diffusion-1"), "sd21": ("stable-diffusion-2",)}

    def component_classes(self, variant: str | None) -> dict[str, tuple[type, dict[str, Any]]]:
        return {
            "unet": (UNet2DConditionModel, {"variant": variant}),
            "vae": (AutoencoderKL, {"variant": variant}),
            "text_encoder": (CLIPTextModel, {"variant": variant}),
            "tokenizer": (CLIPTokenizer, {}),
            "noise_scheduler": (DDPMScheduler, {}),
        }

    def build_tiny(self, cfg, resolution: int) -> SDComponents:
        return archs.tiny_components(cfg, resolution, tiny_unet, self.name)

    def released_unet(self, arch, latent_size: int | None = None) -> UNet2DConditionModel:
        return released_unet(arch, latent_size)

    def build_released(self, arch, resolution, *, device, seed, tokenizer=None) -> SDComponents:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            unet = self.released_unet(arch, resolution // 8)
            vae = archs.random_vae(resolution, arch.vae_scaling_factor)
            text_encoder = archs.random_text_encoder(arch)
        scheduler = archs.sd_noise_scheduler(arch.prediction_type)
        return SDComponents(unet, vae, text_encoder, tokenizer, scheduler, family=self.name)

    def encode(self, towers, input_ids, *, dtype, device, target_size=None, original_sizes=None, crop_top_lefts=None):
        return Conditioning(towers.text_encoder(input_ids.to(device))[0].to(dtype))

    def pipeline(self, comps, unet=None, scheduler=None):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=comps.vae,
            text_encoder=comps.text_encoder,
            tokenizer=comps.tokenizer,
            unet=unet if unet is not None else comps.unet,
            scheduler=scheduler if scheduler is not None else comps.noise_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def load_pipeline_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}
