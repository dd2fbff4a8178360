"""The U-Net's text conditioning, for SD (one text tower) and SDXL (two towers + micro-conditioning), in one place.

Every diffusion objective (LDM-only, TokenCompose, SepEn) encodes its prompts here, so the SDXL specifics live once:

* SD1.x / SD2.x: the text encoder's last hidden states (SD2.x checkpoints already end at the penultimate layer);
* SDXL (as diffusers' `StableDiffusionXLPipeline.encode_prompt` and its training script): the per-token hidden
  states of the penultimate layer of both towers, concatenated along the width (768 + 1280 = 2048 on SDXL-base);
  the pooled, projected embedding of the second tower (`text_embeds`); the micro-conditioning `time_ids`
  (original h, w; crop top, left; target h, w), passed to the U-Net as
  ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}``.

Token positions. Phrases are aligned through the first tokenizer (the loader's). SDXL's second tokenizer uses the
same CLIP BPE, BOS and EOS and differs only in its padding ("!", id 0, after the EOS instead of more EOS), so its ids
are the first tokenizer's with the positions after the first EOS replaced by its pad id (`second_tokenizer_ids`;
tests/test_sdxl.py checks this against the second tokenizer itself): a token's position is the same in both
towers, and so in the concatenated states the cross-attention reads.

Micro-conditioning: the loader records each sample's original size and crop top-left (`original_sizes`,
`crop_top_lefts`, in the shorter-side-resized image, as diffusers' SDXL script); batches without them (data-free
SepEn prompts, validation) use original = target size and crop (0, 0), SDXL's "uncropped" conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    text: torch.Tensor  # (B, 77, D) compute dtype: what attn2 reads
    added_cond_kwargs: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (B, P), time_ids (B, 6)


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
) -> Conditioning:
    """The frozen text towers' conditioning of `input_ids` (first tokenizer's ids, (B, L)); SDXL needs the
    `target_size` (h, w) in pixels for its time ids."""
    ids = input_ids.to(device)
    if comps.text_encoder_2 is None:
        return Conditioning(comps.text_encoder(ids)[0].to(dtype))
    if target_size is None:
        raise ValueError("SDXL conditioning needs the target image size (its micro-conditioning time ids)")
    ids_2 = second_tokenizer_ids(ids, comps.tokenizer.eos_token_id, comps.tokenizer_2.pad_token_id)
    out_1 = comps.text_encoder(ids, output_hidden_states=True)
    out_2 = comps.text_encoder_2(ids_2, output_hidden_states=True)
    text = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # (B, L, D1 + D2)
    time_ids = sdxl_time_ids(
        ids.shape[0], target_size, original_sizes=original_sizes, crop_top_lefts=crop_top_lefts
    )  # fmt: skip
    added = {"text_embeds": out_2.text_embeds.to(dtype), "time_ids": time_ids.to(device, dtype)}
    return Conditioning(text.to(dtype), added)


def batch_conditioning(comps, batch: dict, *, dtype: torch.dtype, device: torch.device | str) -> Conditioning:
    """`encode_text` of a loader batch: its `input_ids`, and for SDXL the target size of its `pixel_values` and the
    recorded `original_sizes` / `crop_top_lefts` when the loader wrote them."""
    size = tuple(batch["pixel_values"].shape[-2:]) if "pixel_values" in batch else None
    return encode_text(
        comps, batch["input_ids"], dtype=dtype, device=device, target_size=size,
        original_sizes=batch.get("original_sizes"), crop_top_lefts=batch.get("crop_top_lefts"),
    )  # fmt: skip
