"""Model shapes built with random weights: the tiny SD-shaped models of CPU runs and tests, and the released Stable
Diffusion architectures (no checkpoint, no model hub).

Tiny (`build_tiny_components`, from `model.tiny`): the SD1.x layout at tiny widths, with the real SD1.x tokenizer.
Released (`build_random_components`, `architecture(name)`): for step-time benchmarks, memory planning and scale
tests on machines that cannot reach the hub (the lent GPU machines cannot reach anything): a step's shapes, FLOPs
and memory depend on the architecture, not on the weight values. The hyper-parameters are those of the released
checkpoints' ``config.json`` files (CompVis/stable-diffusion-v1-4 for ``sd14``; stabilityai/stable-diffusion-2-1 for
``sd21``, a v-prediction model at 768 px whose text encoder is OpenCLIP ViT-H/14 used to its penultimate layer,
hence 23 layers; stabilityai/stable-diffusion-xl-base-1.0 for ``sdxl``: a 3-block U-Net with attention only in
the two lower-resolution blocks, ten-deep transformer stacks at 32², ``text_time`` added conditioning, and two text
towers, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with projection, both read at their penultimate layer).

SDXL-shaped tiny models (`model.family: sdxl`): the same layout at tiny widths (first block without attention, two
tiny text towers, the second a `CLIPTextModelWithProjection`, `addition_embed_type="text_time"` with
`projection_class_embeddings_input_dim` = the second tower's projection + 6 time ids x `addition_time_embed_dim`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tcscale.models.config import TinyModelConfig
from tcscale.models.sd import SDComponents
from tcscale.models.tokenizer import sd_clip_tokenizer


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
    """A tiny CLIP text encoder; `text_token_embedding_std` rescales CLIP's N(0, 0.02²) token-embedding draw to that
    std (the same draw, so the rest of the seeded init is unchanged)."""
    model = CLIPTextModel(
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
    if cfg.text_token_embedding_std is not None:
        init_std = 0.02 * model.config.initializer_factor  # CLIPPreTrainedModel._init_weights' token-embedding std
        with torch.no_grad():
            model.text_model.embeddings.token_embedding.weight.mul_(cfg.text_token_embedding_std / init_std)
    return model


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


def tiny_components(cfg: TinyModelConfig, resolution: int, build_unet, family: str, build_text_encoder_2=None):
    """Tiny random-init components with the real CLIP tokenizer, seeded by cfg.seed: the VAE, `build_unet(cfg,
    latent_size, latent_channels)`, the text encoder and (two-tower families) `build_text_encoder_2(cfg, vocab)`,
    drawn in that order from one generator. The families (tcscale.families) choose the builders."""
    tokenizer = sd_clip_tokenizer()
    text_encoder_2 = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = tiny_vae(cfg, resolution)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution % factor:
            raise ValueError(f"resolution must be a multiple of {factor} (the latent's factor), got {resolution}")
        unet = build_unet(cfg, resolution // factor, vae.config.latent_channels)
        text_encoder = tiny_text_encoder(cfg, len(tokenizer))
        if build_text_encoder_2 is not None:
            text_encoder_2 = build_text_encoder_2(cfg, len(tokenizer))
    return SDComponents(
        unet, vae, text_encoder, tokenizer, sd_noise_scheduler(cfg.prediction_type), text_encoder_2, family=family
    )


def build_tiny_components(cfg: TinyModelConfig, resolution: int, family: str = "sd") -> SDComponents:
    """Tiny random-init components of `family`'s layout (`model.tiny`), seeded by cfg.seed."""
    from tcscale.families import family_named

    return family_named(family).build_tiny(cfg, resolution)


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
    family: str = "sd"  # the tcscale.families name that builds it
    text_hidden: int | None = None  # first text tower's width; None -> cross_attention_dim (SD1/2: one tower)
    vae_scaling_factor: float = 0.18215  # the VAE's latent scale (SDXL's VAE: 0.13025)
    text_pad_token_id: int = 49407  # the text encoder config's pad id (SD2.x's OpenCLIP tower: 1)


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
        text_pad_token_id=1,
    ),
    "sdxl": SDArchitecture(
        name="sdxl",
        resolution=1024,
        cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG) per-token states, concatenated
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        text_layers=12,
        text_heads=12,
        text_intermediate=3072,
        text_act="quick_gelu",
        text_projection_dim=768,
        prediction_type="epsilon",
        family="sdxl",
        text_hidden=768,
        vae_scaling_factor=0.13025,
    ),
}
# SD3 / SD3.5 (family sd3): the transformer's shape is tcscale.families.sd3.SD3_TRANSFORMERS[name]; the fields here
# describe the first CLIP tower (CLIP ViT-L/14 with projection) and the joint attention's text width (T5's 4096)
for _name in ("sd3-medium", "sd3.5-medium", "sd3.5-large"):
    ARCHITECTURES[_name] = SDArchitecture(
        name=_name, resolution=1024, cross_attention_dim=4096, attention_head_dim=64, use_linear_projection=True,
        text_layers=12, text_heads=12, text_intermediate=3072, text_act="quick_gelu", text_projection_dim=768,
        prediction_type="flow_matching", family="sd3", text_hidden=768, vae_scaling_factor=1.5305,
        text_pad_token_id=1,
    )  # fmt: skip


def architecture(name: str) -> SDArchitecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown SD architecture {name!r}, expected one of {sorted(ARCHITECTURES)}") from None


# what the released SD1.x / SD2.x / SDXL U-Net configs share
RELEASED_UNET_COMMON = dict(
    in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0, layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
)  # fmt: skip


def random_unet(arch: SDArchitecture, latent_size: int | None = None) -> UNet2DConditionModel:
    """The released U-Net of `arch` with random weights (on the current default device)."""
    from tcscale.families import family_named

    return family_named(arch.family).released_unet(arch, latent_size)


def random_vae(resolution: int, scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(
        scaling_factor=scaling_factor,
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
            hidden_size=arch.text_hidden or arch.cross_attention_dim,
            intermediate_size=arch.text_intermediate,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=77,
            hidden_act=arch.text_act,
            projection_dim=arch.text_projection_dim,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=arch.text_pad_token_id,
        )
    )


def build_random_components(
    name: str, resolution: int | None = None, *, device: str | torch.device = "cpu", seed: int = 0, tokenizer=None
) -> SDComponents:
    """The components of architecture `name` with random weights, created directly on `device` (``"meta"`` builds
    shapes only), by the family that owns it. `tokenizer` is passed through (benchmarks feed token ids directly)."""
    from tcscale.families import family_named

    arch = architecture(name)
    resolution = resolution or arch.resolution
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    return family_named(arch.family).build_released(arch, resolution, device=device, seed=seed, tokenizer=tokenizer)
