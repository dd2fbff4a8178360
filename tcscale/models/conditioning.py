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
