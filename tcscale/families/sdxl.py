"""SDXL (stabilityai/stable-diffusion-xl-base-1.0): two CLIP text towers, micro-conditioning, a 3-block
`UNet2DConditionModel` with attention only in the two lower-resolution blocks, `StableDiffusionXLPipeline`.

Conditioning (as diffusers' `StableDiffusionXLPipeline.encode_prompt` and its training script): the per-token hidden
states of the penultimate layer of both towers, concatenated along the width (768 + 1280 = 2048 on SDXL-base); the
pooled, projected embedding of the second tower (`text_embeds`); the micro-conditioning `time_ids` (original h, w;
crop top, left; target h, w), passed to the U-Net as ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}``.

Token positions. Phrases are aligned through the first tokenizer (the loader's). SDXL's second tokenizer uses the
same CLIP BPE, BOS and EOS and differs only in its padding ("!", id 0, after the EOS instead of more EOS), so its ids
are the first tokenizer's with the positions after the first EOS replaced by its pad id (`second_tokenizer_ids`;
tests/test_sdxl.py checks this against the second tokenizer itself): a token's position is the same in both towers,
and so in the concatenated states the cross-attention reads.

Micro-conditioning: the loader records each sample's original size and crop top-left (`original_sizes`,
`crop_top_lefts`, in the shorter-side-resized image, as diffusers' SDXL script); batches without them (data-free
SepEn prompts, validation) use original = target size and crop (0, 0), SDXL's "uncropped" conditioning.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from tcscale.families.sd import SDFamily
from tcscale.models import architectures as archs
from tcscale.models.conditioning import Conditioning
from tcscale.models.sd import SDComponents
from tcscale.models.tokenizer import sdxl_second_tokenizer

SDXL_TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)
# stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text tower)
SDXL_TEXT_ENCODER_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)  # fmt: skip


def second_tokenizer_ids(input_ids: torch.Tensor, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """(B, L) ids of the second SDXL tokenizer from the first's: every position after the first EOS -> its pad."""
    is_eos = input_ids == eos_token_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), input_ids.shape[1])  # (B,)
    after = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] > first_eos[:, None]
    return torch.where(after, torch.full_like(input_ids, pad_token_id), input_ids)


def sdxl_time_ids(
    batch_size: int,
    target_size: tuple[int, int],
    *,
    original_sizes: torch.Tensor | None = None,
    crop_top_lefts: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, 6) float32: original (h, w), crop top-left (y, x), target (h, w); missing parts: original = target,
    crop (0, 0)."""
    target = torch.tensor(target_size, dtype=torch.float32).expand(batch_size, 2)
    original = target if original_sizes is None else original_sizes.float().reshape(batch_size, 2)
    crop = torch.zeros(batch_size, 2) if crop_top_lefts is None else crop_top_lefts.float().reshape(batch_size, 2)
    return torch.cat([original.cpu(), crop.cpu(), target], dim=1)


def tiny_sdxl_unet(cfg, latent_size: int, latent_channels: int = 4) -> UNet2DConditionModel:
    """SDXL's U-Net layout at tiny widths: the first block without attention, linear projections, text_time."""
    n = len(cfg.block_out_channels)
    if n < 2:
        raise ValueError("model.tiny.block_out_channels: SDXL's layout needs >= 2 blocks (the first has no attention)")
    layers = cfg.transformer_layers_per_block or [1] * n
    if len(layers) != n:
        raise ValueError(f"model.tiny.transformer_layers_per_block must have {n} entries, got {layers}")
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        transformer_layers_per_block=tuple(layers),
        cross_attention_dim=cfg.cross_attention_dim + cfg.text_encoder_2_hidden,
        attention_head_dim=cfg.attention_head_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg.addition_time_embed_dim,
        projection_class_embeddings_input_dim=cfg.text_encoder_2_hidden + SDXL_TIME_IDS * cfg.addition_time_embed_dim,
        norm_num_groups=cfg.norm_num_groups or min(32, cfg.block_out_channels[0]),
    )


def tiny_text_encoder_2(cfg, vocab_size: int) -> CLIPTextModelWithProjection:
    """The second (OpenCLIP-bigG-shaped) tower of a tiny SDXL: with projection; special ids as SDXL's config."""
    width = cfg.text_encoder_2_hidden
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=width,
            bos_token_id=0,
            eos_token_id=2,  # SDXL's text_encoder_2 config: the legacy ids (pooled output at the argmax = EOS)
            pad_token_id=1,
        )
    )


def released_sdxl_unet(arch, latent_size: int | None = None) -> UNet2DConditionModel:
    """stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: 2,567,463,684 parameters."""
    return UNet2DConditionModel(
        sample_size=latent_size or arch.resolution // 8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        **archs.RELEASED_UNET_COMMON,
        cross_attention_dim=arch.cross_attention_dim,
        attention_head_dim=arch.attention_head_dim,
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=SDXL_TEXT_ENCODER_2["projection_dim"] + SDXL_TIME_IDS * 256,  # 2816
    )


class SDXLFamily(SDFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    hub_names = {"sdxl": ("stable-diffusion-xl", "sdxl")}

    def component_classes(self, variant: str | None) -> dict[str, tuple[type, dict[str, Any]]]:
        return {
            **super().component_classes(variant),
            "text_encoder_2": (CLIPTextModelWithProjection, {"variant": variant}),
            "tokenizer_2": (CLIPTokenizer, {}),
        }

    def build_tiny(self, cfg, resolution: int) -> SDComponents:
        comps = archs.tiny_components(cfg, resolution, tiny_sdxl_unet, self.name, tiny_text_encoder_2)
        comps.tokenizer_2 = sdxl_second_tokenizer()
        return comps

    def released_unet(self, arch, latent_size: int | None = None) -> UNet2DConditionModel:
        return released_sdxl_unet(arch, latent_size)

    def build_released(self, arch, resolution, *, device, seed, tokenizer=None) -> SDComponents:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            unet = self.released_unet(arch, resolution // 8)
            vae = archs.random_vae(resolution, arch.vae_scaling_factor)
            text_encoder = archs.random_text_encoder(arch)
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2))
        scheduler = archs.sd_noise_scheduler(arch.prediction_type)
        tokenizer_2 = sdxl_second_tokenizer() if tokenizer is not None else None  # the "!"-padding twin
        return SDComponents(
            unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2, tokenizer_2, family=self.name
        )

    def encode(self, towers, input_ids, *, dtype, device, target_size=None, original_sizes=None, crop_top_lefts=None):
        if target_size is None:
            raise ValueError("SDXL conditioning needs the target image size (its micro-conditioning time ids)")
        ids = input_ids.to(device)
        ids_2 = second_tokenizer_ids(ids, towers.tokenizer.eos_token_id, towers.tokenizer_2.pad_token_id)
        out_1 = towers.text_encoder(ids, output_hidden_states=True)
        out_2 = towers.text_encoder_2(ids_2, output_hidden_states=True)
        text = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # (B, L, D1 + D2)
        time_ids = sdxl_time_ids(
            ids.shape[0], target_size, original_sizes=original_sizes, crop_top_lefts=crop_top_lefts
        )  # fmt: skip
        added = {"text_embeds": out_2.text_embeds.to(dtype), "time_ids": time_ids.to(device, dtype)}
        return Conditioning(text.to(dtype), added)

    def pipeline(self, comps, unet=None, scheduler=None):
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
        )  # force_zeros_for_empty_prompt as SDXL-base (the class default)

    def load_pipeline_kwargs(self) -> dict[str, Any]:
        return {"add_watermarker": False}
