"""The denoiser's text conditioning: what every diffusion objective (LDM-only, TokenCompose, SepEn), validation and
evaluation feed the U-Net, encoded by the components' family (tcscale.families: SD's one tower, SDXL's two towers
and micro-conditioning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    text: torch.Tensor  # (B, 77, D) compute dtype: what attn2 reads
    added_cond_kwargs: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (B, P), time_ids (B, 6)


@torch.no_grad()
def encode_text(
    comps,
    input_ids: torch.Tensor,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    target_size: tuple[int, int] | None = None,
    original_sizes: torch.Tensor | None = None,
    crop_top_lefts: torch.Tensor | None = None,
    family: str | None = None,
) -> Conditioning:
    """The frozen text towers' conditioning of `input_ids` (first tokenizer's ids, (B, L)) by the family of `comps`
    (or `family`, for a pipeline); SDXL needs the `target_size` (h, w) in pixels for its time ids."""
    from tcscale.families import family_named

    return family_named(family or comps.family).encode(
        comps, input_ids, dtype=dtype, device=device, target_size=target_size, original_sizes=original_sizes,
        crop_top_lefts=crop_top_lefts,
    )  # fmt: skip


def batch_conditioning(
    comps, batch: dict, *, dtype: torch.dtype, device: torch.device | str, family: str | None = None
) -> Conditioning:
    """`encode_text` of a loader batch: its `input_ids`, the target size of its `pixel_values` (cached latents: the
    loader's `target_sizes`, one per sample, equal within a batch) and the recorded `original_sizes` /
    `crop_top_lefts` when the loader wrote them (the families that use them read them)."""
    if "pixel_values" in batch:
        size = tuple(batch["pixel_values"].shape[-2:])
    else:
        size = tuple(int(v) for v in batch["target_sizes"][0]) if "target_sizes" in batch else None
    return encode_text(
        comps, batch["input_ids"], dtype=dtype, device=device, target_size=size,
        original_sizes=batch.get("original_sizes"), crop_top_lefts=batch.get("crop_top_lefts"), family=family,
    )  # fmt: skip


_TAG_CAPTION_DROPOUT = 301  # keeps the dropout draw apart from the step generator's own stream


def caption_dropout_mask(generator: torch.Generator, batch_size: int, p: float) -> torch.Tensor:
    """(B,) bool: which samples of a micro-batch lose their caption, each with probability `p`. Drawn from a
    generator derived from `generator`'s seed (the trainer's per-micro-step generator, a pure function of the run
    seed and the sample slot), so a resume replays it and the step's noise and timesteps are the same for any `p`."""
    from tcscale.data.loader import derive_seed

    if p <= 0.0:
        return torch.zeros(batch_size, dtype=torch.bool)
    g = torch.Generator().manual_seed(derive_seed(generator.initial_seed(), _TAG_CAPTION_DROPOUT))
    return torch.rand(batch_size, generator=g) < p


def empty_caption_ids(tokenizer, length: int) -> torch.Tensor:
    """(length,) int64: the empty caption as the tokenizer pads it, the ids the SD pipelines encode for the
    unconditional branch of classifier-free guidance (their negative prompt "")."""
    ids = tokenizer("", max_length=length, padding="max_length", truncation=True).input_ids
    return torch.tensor(ids, dtype=torch.int64)


def drop_captions(input_ids: torch.Tensor, drop: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """`input_ids` (B, L) with the rows where `drop` (B,) is true replaced by the empty caption `empty` (L,)."""
    if not bool(drop.any()):
        return input_ids
    out = input_ids.clone()
    out[drop.to(out.device)] = empty.to(out.device, out.dtype)
    return out


def drop_phrases(token_phrase: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """`token_phrase` (B, L) with the rows where `drop` (B,) is true set to -1: a sample whose caption was dropped
    has no phrase, so the grounding losses leave it out of their batch mean (tcscale.losses.grounding)."""
    out = token_phrase.clone()
    out[drop.to(out.device)] = -1
    return out
