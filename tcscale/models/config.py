"""The `model` section of a run config: which family, which weights (or tiny random ones), LoRA, checkpointing.

Kept beside the model code it configures, so model code never imports the run schema (tcscale.config assembles
the sections and validates them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PredictionType = Literal["epsilon", "v_prediction"]


@dataclass
class TinyModelConfig:
    """Random-init SD-shaped models for CPU runs and tests (the real SD layout, tiny widths)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])  # U-Net widths per down block
    layers_per_block: int = 1  # resnets per U-Net block
    attention_head_dim: int = 8  # number of heads (diffusers' SD1.x naming)
    cross_attention_dim: int = 32  # text hidden size seen by attn2
    text_layers: int = 2  # CLIP text transformer layers
    text_heads: int = 2  # CLIP text attention heads
    # std of the CLIP text encoder's token embeddings; null -> CLIP's init (0.02). At 0.02 a random 2-layer encoder's
    # outputs barely depend on the caption (cosine ~0.97 between "red" and "blue" at their own position): a frozen
    # random encoder needs ~1 for the U-Net to tell words apart
    text_token_embedding_std: float | None = None
    vae_block_out_channels: list[int] = field(default_factory=lambda: [8, 16, 16, 16])  # 4 blocks: 8x downsampling
    latent: Literal["vae", "space_to_depth"] = "vae"  # tiny AutoencoderKL | exact parameter-free pixel folding
    space_to_depth_factor: int = 2  # latent="space_to_depth": pixels per latent cell along a side
    latent_scaling_factor: float = (
        3.5  # latent="space_to_depth": latent x this (3.5: unit variance on the shapes world)
    )
    norm_num_groups: int | None = None  # U-Net GroupNorm groups; null -> min(32, block_out_channels[0])
    prediction_type: PredictionType = "epsilon"  # scheduler prediction type of the tiny pipeline
    seed: int = 0  # weight init seed
    # model.family=sdxl only: width (= projection) of the second text tower; attn2 reads cross_attention_dim + this
    text_encoder_2_hidden: int = 32
    addition_time_embed_dim: int = 8  # model.family=sdxl only: sinusoidal width per time id (SDXL: 256)
    # model.family=sdxl only: transformer depth per block (SDXL: [1, 2, 10]); null -> 1 in every block
    transformer_layers_per_block: list[int] | None = None
    # model.family=sd3 only (an SD3Transformer2DModel; docs/MMDIT.md): joint blocks, heads, width per head, the
    # blocks with a second (image-only) attention (SD3.5-medium: 0..12), the T5 width (= joint_attention_dim)
    mmdit_layers: int = 3
    mmdit_heads: int = 2
    mmdit_head_dim: int = 16
    mmdit_dual_attention_layers: list[int] = field(default_factory=list)
    t5_hidden: int = 64


@dataclass
class LoRAConfig:
    """LoRA adapters on the U-Net (peft, injected as diffusers' `add_adapter` does); `model.lora: null` (the
    default) finetunes the full trainable set. Only the adapter weights train and reach the optimizer."""

    rank: int = 8  # r: rank of each adapter's A (r x in) and B (out x r)
    alpha: float | None = None  # lora_alpha (the update is scaled by alpha / rank); null -> rank (scale 1)
    dropout: float = 0.0  # dropout on the adapter input (> 0 draws from torch's global RNG: resume not bit-exact)
    # module-name suffixes peft wraps; null -> the objective's default (tokencompose/ldm: to_q, to_k, to_v,
    # to_out.0 of every U-Net attention; sepen: attn2.to_k, the paper's trainable set)
    target_modules: list[str] | None = None
    init: Literal["gaussian", "kaiming"] = "gaussian"  # A's init (B starts at 0): gaussian (diffusers' scripts)


@dataclass
class ModelConfig:
    # sd: SD1.x / SD2.x (one text tower) | sdxl: two text towers, text_time micro-conditioning (StableDiffusionXL) |
    # sd3: SD3 / SD3.5 MMDiT, two CLIP towers + T5, flow matching (StableDiffusion3; docs/MMDIT.md)
    family: Literal["sd", "sdxl", "sd3"] = "sd"
    pretrained: str | None = None  # hub id or local diffusers pipeline dir (SD1.4/1.5/2.1); null -> tiny models
    revision: str | None = None  # hub revision for `pretrained`
    variant: str | None = None  # weights variant for `pretrained`, e.g. "fp16"
    prediction_type: PredictionType | None = None  # override of the scheduler's own; null -> keep it
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing in the trained module
    # a finetuned CLIPTextModel dir (or a pipeline dir holding text_encoder/, e.g. the export of a
    # text_encoder_infonce run) loaded instead of the base model's text encoder; null -> the base one
    text_encoder_path: str | None = None
    lora: LoRAConfig | None = None  # LoRA adapters on the U-Net instead of full finetuning; null -> full
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
