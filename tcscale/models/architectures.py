"""Model shapes built with random weights: the tiny SD-shaped models of CPU runs and tests, and the released Stable
Diffusion architectures (no checkpoint, no model hub).

Tiny (`build_tiny_components`, from `model.tiny`): the SD1.x layout at tiny widths, with the real SD1.x tokenizer.
Released (`build_random_components`, `architecture(name)`): for step-time benchmarks, memory planning and scale
tests on machines that cannot reach the hub (the lent GPU machines cannot reach anything): a step's shapes, FLOPs
and memory depend on the architecture, not on the weight values. The hyper-parameters are those of the released
checkpoints' ``config.json`` files (CompVis/stable-diffusion-v1-4 for ``sd14``; stabilityai/stable-diffusion-2-1 for
``sd21``, a v-prediction model at 768 px whose text encoder is OpenCLIP ViT-H/14 used to its penultimate layer,
hence 23 layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tcscale.config import TinyModelConfig
from tcscale.models.sd import SDComponents
from tcscale.models.tokenizer import sd_clip_tokenizer


def tiny_unet(cfg: TinyModelConfig, latent_size: int, latent_channels: int = 4) -> UNet2DConditionModel:
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


def tiny_vae(cfg: TinyModelConfig, resolution: int):
    """A tiny AutoencoderKL, or (latent="space_to_depth") the exact pixel-folding autoencoder."""
    if cfg.latent == "space_to_depth":
        from tcscale.models.space_to_depth import SpaceToDepthAutoencoder

        return SpaceToDepthAutoencoder(
            factor=cfg.space_to_depth_factor, scaling_factor=cfg.latent_scaling_factor, sample_size=resolution
        )
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
    tokenizer = sd_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = tiny_vae(cfg, resolution)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution % factor:
            raise ValueError(f"resolution must be a multiple of {factor} (the latent's factor), got {resolution}")
        unet = tiny_unet(cfg, resolution // factor, vae.config.latent_channels)
        text_encoder = tiny_text_encoder(cfg, len(tokenizer))
    return SDComponents(unet, vae, text_encoder, tokenizer, sd_noise_scheduler(cfg.prediction_type))


@dataclass(frozen=True)
class SDArchitecture:
    name: str
    resolution: int  # native training resolution (px)
    cross_attention_dim: int
    attention_head_dim: int | tuple[int, ...]  # diffusers' name: heads per block for SD1 (8), head dims for SD2
    use_linear_projection: bool
    text_layers: int
    text_heads: int
    text_intermediate: int
    text_act: str
    text_projection_dim: int
    prediction_type: str


ARCHITECTURES = {
    "sd14": SDArchitecture(
        name="sd14",
        resolution=512,
        cross_attention_dim=768,
        attention_head_dim=8,
        use_linear_projection=False,
        text_layers=12,
        text_heads=12,
        text_intermediate=3072,
        text_act="quick_gelu",
        text_projection_dim=768,
        prediction_type="epsilon",
    ),
    "sd21": SDArchitecture(
        name="sd21",
        resolution=768,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        text_layers=23,
        text_heads=16,
        text_intermediate=4096,
        text_act="gelu",
        text_projection_dim=512,
        prediction_type="v_prediction",
    ),
}


def architecture(name: str) -> SDArchitecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown SD architecture {name!r}, expected one of {sorted(ARCHITECTURES)}") from None


def random_unet(arch: SDArchitecture, latent_size: int | None = None) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=latent_size or arch.resolution // 8,
        in_channels=4,
        out_channels=4,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=arch.cross_attention_dim,
        attention_head_dim=arch.attention_head_dim,
        use_linear_projection=arch.use_linear_projection,
    )


def random_vae(resolution: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=resolution,
    )


def random_text_encoder(arch: SDArchitecture) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=arch.cross_attention_dim,
            intermediate_size=arch.text_intermediate,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=77,
            hidden_act=arch.text_act,
            projection_dim=arch.text_projection_dim,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1 if arch.name == "sd21" else 49407,
        )
    )


def build_random_components(
    name: str, resolution: int | None = None, *, device: str | torch.device = "cpu", seed: int = 0, tokenizer=None
) -> SDComponents:
    """U-Net, VAE and text encoder of architecture `name` with random weights, created directly on `device`
    (``"meta"`` builds shapes only). `tokenizer` is passed through (benchmarks feed token ids directly)."""
    arch = architecture(name)
    resolution = resolution or arch.resolution
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = random_unet(arch, resolution // 8)
        vae = random_vae(resolution)
        text_encoder = random_text_encoder(arch)
    return SDComponents(unet, vae, text_encoder, tokenizer, sd_noise_scheduler(arch.prediction_type))
