"""SD3 / SD3.5 (stabilityai/stable-diffusion-3-medium, -3.5-medium, -3.5-large): an MMDiT denoiser
(`SD3Transformer2DModel`), two CLIP towers with projection and a T5 encoder, a 16-channel VAE with a shift,
flow matching (`FlowMatchEulerDiscreteScheduler`), `StableDiffusion3Pipeline`. docs/MMDIT.md.

Components. `SDComponents.unet` holds the transformer (its pipeline subfolder is transformer/); `text_encoder_3` /
`tokenizer_3` the T5 tower and its tokenizer (tiny models: `tcscale.families.sd3_tokenizer`).

Conditioning (as `StableDiffusion3Pipeline.encode_prompt`): the penultimate hidden states of both CLIP towers
concatenated along the width (768 + 1280), zero-padded to T5's width (4096), then T5's last hidden states appended
along the sequence: 77 CLIP positions + 256 T5 positions = the 333 text tokens every joint block reads; the pooled
projections of both CLIP towers concatenated (768 + 1280 = 2048) as `pooled_projections`. The second CLIP tokenizer's
ids come from the first's as for SDXL (`second_tokenizer_ids`); T5 reads the caption decoded from the CLIP ids
(`clip_caption`), so one caption source feeds all three towers.

Token positions. The loader aligns phrases in the CLIP tokenization (`token_phrase`, 77 positions); the CLIP keys of
the joint sequence sit at those positions. A T5 token belongs to phrase p when every non-space character of its
span lies in a CLIP token of phrase p (spans from the decoded caption and T5's offsets: `t5_token_phrase`).
`attention.joint_tokens` keeps both sequences' tokens (a phrase's map then sums them), the CLIP ones or the T5 ones.

Grounded layers (`MMDiTLayout`): the joint attention ``transformer_blocks.N.attn``, placed by depth thirds (early,
middle, late); every one sees the latent grid / patch size.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.models.attention_processor import Attention
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from tcscale.families.base import Family
from tcscale.families.sd3_tokenizer import T5_MAX_LENGTH, tiny_t5_tokenizer
from tcscale.families.sdxl import SDXL_TEXT_ENCODER_2, second_tokenizer_ids, tiny_text_encoder_2
from tcscale.models.conditioning import Conditioning
from tcscale.models.sd import SDComponents
from tcscale.models.tokenizer import sd_clip_tokenizer, sdxl_second_tokenizer

# Released configs (config.json of each hub repo's subfolder; docs/MMDIT.md lists the sources)
SD3_TRANSFORMERS: dict[str, dict[str, Any]] = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-medium": dict(
        num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ),
    "sd3.5-large": dict(
        num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm"
    ),
}  # fmt: skip
SD3_TRANSFORMER_COMMON = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64, joint_attention_dim=4096,
    pooled_projection_dim=2048,
)  # fmt: skip
# text_encoder/config.json: CLIP ViT-L/14 text tower with projection, the legacy special ids of the SD3 repos
SD3_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)  # fmt: skip
# text_encoder_3/config.json: T5 v1.1 XXL encoder
SD3_T5 = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
)  # fmt: skip
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609  # vae/config.json
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # scheduler/scheduler_config.json
PUNCTUATION_CLOSE = frozenset(",.;:!?)")  # decoded without a space before them


class MMDiTLayout:
    """`SD3Transformer2DModel`: the joint attention ``transformer_blocks.N.attn``; places by depth thirds."""

    _RE = re.compile(r"^transformer_blocks\.(\d+)\.attn$")
    PLACES = ("early", "middle", "late")

    def cross_attention_layers(self, denoiser: torch.nn.Module) -> dict[str, Attention]:
        return {n: m for n, m in denoiser.named_modules() if isinstance(m, Attention) and self._RE.match(n)}

    def _index(self, name: str) -> int:
        match = self._RE.match(name)
        if match is None:
            raise ValueError(f"{name!r} is not the joint attention of a transformer block")
        return int(match.group(1))

    def place(self, name: str, denoiser: torch.nn.Module | None = None) -> str:
        if denoiser is None:
            raise ValueError("an MMDiT layer's place (its depth third) needs the denoiser")
        return self.PLACES[3 * self._index(name) // denoiser.config.num_layers]

    def latent_side(self, denoiser: torch.nn.Module, name: str, input_side: int) -> int:
        self._index(name)
        return input_side // denoiser.config.patch_size


MMDIT_LAYOUT = MMDiTLayout()


def sd3_vae(block_out_channels, layers_per_block: int, resolution: int) -> AutoencoderKL:
    """SD3's VAE form: 16 latent channels, no quant convs, SD3's scale and shift."""
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, latent_channels=16, norm_num_groups=min(32, block_out_channels[0]),
        sample_size=resolution, scaling_factor=SD3_VAE_SCALING, shift_factor=SD3_VAE_SHIFT, use_quant_conv=False,
        use_post_quant_conv=False,
    )  # fmt: skip


def tiny_sd3_transformer(cfg, latent_size: int) -> SD3Transformer2DModel:
    """SD3.5's MMDiT form at tiny widths (`model.tiny.mmdit_*`): qk RMS-norm, optional dual-attention blocks."""
    clip_width = cfg.cross_attention_dim + cfg.text_encoder_2_hidden
    if cfg.t5_hidden < clip_width:
        raise ValueError(
            f"model.tiny.t5_hidden={cfg.t5_hidden} must be >= cross_attention_dim + text_encoder_2_hidden = "
            f"{clip_width} (the CLIP states are zero-padded to T5's width)"
        )
    bad = [i for i in cfg.mmdit_dual_attention_layers if not 0 <= i < cfg.mmdit_layers]
    if bad:
        raise ValueError(f"model.tiny.mmdit_dual_attention_layers: {bad} not in 0..{cfg.mmdit_layers - 1}")
    return SD3Transformer2DModel(
        sample_size=latent_size, patch_size=2, in_channels=16, out_channels=16, num_layers=cfg.mmdit_layers,
        attention_head_dim=cfg.mmdit_head_dim, num_attention_heads=cfg.mmdit_heads, joint_attention_dim=cfg.t5_hidden,
        caption_projection_dim=cfg.mmdit_heads * cfg.mmdit_head_dim, pooled_projection_dim=clip_width,
        pos_embed_max_size=latent_size, dual_attention_layers=tuple(cfg.mmdit_dual_attention_layers),
        qk_norm="rms_norm",
    )  # fmt: skip


def tiny_text_encoder_1(cfg, vocab_size: int) -> CLIPTextModelWithProjection:
    width = cfg.cross_attention_dim
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=width, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        )
    )  # fmt: skip


def tiny_t5(cfg, vocab_size: int) -> T5EncoderModel:
    width = cfg.t5_hidden
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size, d_model=width, d_kv=width // cfg.text_heads, d_ff=2 * width,
            num_layers=cfg.text_layers, num_heads=cfg.text_heads, feed_forward_proj="gated-gelu",
            dropout_rate=0.0,  # a frozen tower: no dropout even where a caller forgets eval()
        )
    )  # fmt: skip


def clip_caption(tokenizer, ids: torch.Tensor) -> tuple[str, list[tuple[int, int]]]:
    """The caption of one row of CLIP ids (BOS .. EOS, then padding) and each position's character span in it ((0, 0)
    for BOS, EOS and padding): word-end tokens are followed by a space, none before closing punctuation."""
    ids = ids.tolist()
    eos = tokenizer.eos_token_id
    end = ids.index(eos) if eos in ids else len(ids)
    text, spans = "", [(0, 0)] * len(ids)
    for pos in range(1, end):
        token = tokenizer.convert_ids_to_tokens(ids[pos])
        word_end = token.endswith("</w>")
        piece = tokenizer.convert_tokens_to_string([token[:-4] if word_end else token]).strip()
        if piece and piece[0] in PUNCTUATION_CLOSE and text.endswith(" "):
            text = text[:-1]
        spans[pos] = (len(text), len(text) + len(piece))
        text += piece + (" " if word_end else "")
    return text.rstrip(), spans


def t5_token_phrase(
    tokenizer_3, captions: list[str], clip_spans: list[list[tuple[int, int]]], clip_token_phrase: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 ids (B, 256), T5 token phrase (B, 256)): a T5 token takes phrase p when every non-space character of its
    span lies in CLIP tokens of phrase p; otherwise (other words, EOS, padding) -1."""
    enc = tokenizer_3(
        captions, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True, return_offsets_mapping=True,
        return_tensors="pt",
    )  # fmt: skip
    out = torch.full(enc.input_ids.shape, -1, dtype=torch.int64)
    for b, caption in enumerate(captions):
        char_phrase = [-1] * len(caption)
        for (a, e), p in zip(clip_spans[b], clip_token_phrase[b].tolist()):
            for c in range(a, e):
                char_phrase[c] = p
        for j, (a, e) in enumerate(enc.offset_mapping[b].tolist()):
            phrases = {char_phrase[c] for c in range(a, e) if not caption[c].isspace()}
            if len(phrases) == 1 and min(phrases) >= 0:
                out[b, j] = phrases.pop()
    return enc.input_ids, out


class SD3Family(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    layout = MMDIT_LAYOUT
    flow_matching = True
    denoiser_component = "transformer"
    hub_names = {
        "sd3.5-large": ("stable-diffusion-3.5-large",),
        "sd3.5-medium": ("stable-diffusion-3.5-medium",),
        "sd3-medium": ("stable-diffusion-3-medium",),
    }

    def component_classes(self, variant: str | None) -> dict[str, tuple[type, dict[str, Any]]]:
        weights = {"variant": variant}
        return {
            "unet": (SD3Transformer2DModel, weights),
            "vae": (AutoencoderKL, weights),
            "text_encoder": (CLIPTextModelWithProjection, weights),
            "tokenizer": (CLIPTokenizer, {}),
            "text_encoder_2": (CLIPTextModelWithProjection, weights),
            "tokenizer_2": (CLIPTokenizer, {}),
            "text_encoder_3": (T5EncoderModel, weights),
            "tokenizer_3": (T5TokenizerFast, {}),
            "noise_scheduler": (FlowMatchEulerDiscreteScheduler, {}),
        }

    # -- building ----------------------------------------------------------------------------------------------
    def build_tiny(self, cfg, resolution: int) -> SDComponents:
        if cfg.latent != "vae":
            raise ValueError(f"model.tiny.latent={cfg.latent!r}: model.family=sd3 builds SD3's 16-channel VAE only")
        tokenizer, tokenizer_3 = sd_clip_tokenizer(), tiny_t5_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            vae = sd3_vae(cfg.vae_block_out_channels, 1, resolution)
            factor = 2 ** (len(cfg.vae_block_out_channels) - 1)
            if resolution % (2 * factor):
                raise ValueError(f"resolution must be a multiple of {2 * factor} (VAE x patch), got {resolution}")
            transformer = tiny_sd3_transformer(cfg, resolution // factor)
            text_encoder = tiny_text_encoder_1(cfg, len(tokenizer))
            text_encoder_2 = tiny_text_encoder_2(cfg, len(tokenizer))
            text_encoder_3 = tiny_t5(cfg, len(tokenizer_3))
        return SDComponents(
            transformer, vae, text_encoder, tokenizer, FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
            text_encoder_2, sdxl_second_tokenizer(), family=self.name, text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )  # fmt: skip

    def released_unet(self, arch, latent_size: int | None = None) -> SD3Transformer2DModel:
        return SD3Transformer2DModel(
            **{**SD3_TRANSFORMER_COMMON, "sample_size": latent_size or arch.resolution // 8},
            **SD3_TRANSFORMERS[arch.name],
        )

    def build_released(self, arch, resolution, *, device, seed, tokenizer=None) -> SDComponents:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            transformer = self.released_unet(arch, resolution // 8)
            vae = sd3_vae((128, 256, 512, 512), 2, resolution)
            text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**SD3_TEXT_ENCODER))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2))
            text_encoder_3 = T5EncoderModel(T5Config(**SD3_T5))
        # with a tokenizer (planner, benchmarks: shapes, not vocabularies) the tiny T5 tokenizer stands in for T5's
        tokenizer_2 = sdxl_second_tokenizer() if tokenizer is not None else None
        tokenizer_3 = tiny_t5_tokenizer() if tokenizer is not None else None
        return SDComponents(
            transformer, vae, text_encoder, tokenizer, FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
            text_encoder_2, tokenizer_2, family=self.name, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        )  # fmt: skip

    # -- using -------------------------------------------------------------------------------------------------
    def captions(self, towers, input_ids: torch.Tensor) -> tuple[list[str], list[list[tuple[int, int]]]]:
        pairs = [clip_caption(towers.tokenizer, row) for row in input_ids.cpu()]
        return [c for c, _ in pairs], [s for _, s in pairs]

    def encode(self, towers, input_ids, *, dtype, device, target_size=None, original_sizes=None, crop_top_lefts=None):
        ids = input_ids.to(device)
        ids_2 = second_tokenizer_ids(ids, towers.tokenizer.eos_token_id, towers.tokenizer_2.pad_token_id)
        out_1 = towers.text_encoder(ids, output_hidden_states=True)
        out_2 = towers.text_encoder_2(ids_2, output_hidden_states=True)
        clip = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # (B, 77, D1 + D2)
        captions, _ = self.captions(towers, input_ids)
        t5_ids = towers.tokenizer_3(
            captions, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(device)  # fmt: skip
        t5 = towers.text_encoder_3(t5_ids)[0]  # (B, 256, D3)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        text = torch.cat([clip.to(dtype), t5.to(dtype)], dim=-2)  # (B, 77 + 256, D3)
        pooled = torch.cat([out_1.text_embeds, out_2.text_embeds], dim=-1)
        return Conditioning(text, {"pooled_projections": pooled.to(dtype)})

    def key_token_phrase(self, towers, input_ids, token_phrase, attention):
        captions, spans = self.captions(towers, input_ids)
        _, t5_phrase = t5_token_phrase(towers.tokenizer_3, captions, spans, token_phrase.cpu())
        clip_phrase = token_phrase.cpu()
        if attention.joint_tokens == "t5":
            clip_phrase = torch.full_like(clip_phrase, -1)
        elif attention.joint_tokens == "clip":
            t5_phrase = torch.full_like(t5_phrase, -1)
        return torch.cat([clip_phrase, t5_phrase], dim=1).to(token_phrase.device)

    def install_grounding(self, denoiser, plan, attention) -> None:
        from tcscale.attention.joint import install_joint_grounding_processors

        install_joint_grounding_processors(denoiser, plan, attention)

    def observe(self, denoiser, plan) -> None:
        from tcscale.attention.joint import observe_joint

        observe_joint(denoiser, plan)  # a layer not grounded yet: the `text` reading (a U-Net attn2's map)

    def noise_at(self, scheduler, latents, noise, timestep):
        # the model's own timestep convention t = σ·T: σ = t / T, x_σ = (1 − σ)·x₀ + σ·ε (as in training)
        T = scheduler.config.num_train_timesteps
        if not 0 <= timestep <= T:
            raise ValueError(f"timestep {timestep} outside 0..{T} (flow matching: σ = t / {T})")
        sigma = float(timestep) / T
        timesteps = torch.full((latents.shape[0],), float(timestep), device=latents.device)
        return timesteps, (1.0 - sigma) * latents + sigma * noise

    def unscale_latents(self, vae, latents):
        return latents / vae.config.scaling_factor + vae.config.shift_factor

    def sampling_scheduler(self, noise_scheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)

    def attention_call_kwargs(self, attention_kwargs):
        return {"joint_attention_kwargs": attention_kwargs}

    def scale_latents(self, vae, sample):
        return ((sample - vae.config.shift_factor) * vae.config.scaling_factor).float()

    def noise_latents(self, scheduler, latents, noise, generator, ldm_cfg):
        from tcscale.losses.flow_matching import flow_matching_noise

        return flow_matching_noise(scheduler, latents, noise, generator, ldm_cfg.flow_matching)

    def denoise(self, model, noisy, timesteps, cond, attention_kwargs=None):
        return model(
            hidden_states=noisy, encoder_hidden_states=cond.text,
            pooled_projections=cond.added_cond_kwargs["pooled_projections"], timestep=timesteps,
            **self.attention_call_kwargs(attention_kwargs),
        ).sample  # fmt: skip

    def training_target(self, scheduler, latents, noise, timesteps):
        return noise - latents  # the flow-matching velocity (tcscale.losses.flow_matching)

    def pipeline(self, comps, unet=None, scheduler=None):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=unet if unet is not None else comps.unet,
            scheduler=scheduler if scheduler is not None else comps.noise_scheduler,
            vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
            text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2, text_encoder_3=comps.text_encoder_3,
            tokenizer_3=comps.tokenizer_3,
        )  # fmt: skip
