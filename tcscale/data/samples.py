"""Decode a shard sample, check it against the data contract, and turn it into a training sample.

Every check failure raises `SkipSample(reason)`; the loader counts the reason and goes on.
Reasons: ``missing_part`` (no image / json / masks in the tar group), ``decode_json``,
``decode_image`` (corrupt or truncated JPEG), ``decode_masks``, ``mask_count`` (json's mask
indices do not match the masks in the npz), ``mask_size`` (a mask's H x W differs from the image's),
``too_few_phrases`` (fewer aligned phrases than data.min_phrases).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from tcscale.attention.masks import MaskRule
from tcscale.data.align import PhraseAligner
from tcscale.data.buckets import layer_grids, nearest_bucket
from tcscale.data.latent_cache import LATENTS_PART, CacheKey, check_key, decode_member
from tcscale.data.transforms import crop_params, transform_image_and_masks, transform_with_soft_masks

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = (
    "missing_part",
    "decode_json",
    "decode_image",
    "decode_masks",
    "mask_count",
    "mask_size",
    "too_few_phrases",
    "tar_read",
)


class SkipSample(Exception):
    """A sample is unusable; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Counters(Counter):
    """Integer counters (samples seen, skipped by reason, phrases dropped by reason)."""

    def take(self) -> dict[str, int]:
        """Return the counts so far and reset (for shipping deltas out of a worker)."""
        out = dict(self)
        self.clear()
        return out


def decode_masks(data: bytes) -> np.ndarray:
    """KEY.masks.npz -> K x H x W uint8 in {0, 1} (accepts `masks` uint8 or `masks_packed` + `shape`)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        if "masks_packed" in npz:
            shape = tuple(int(v) for v in npz["shape"])
            packed = npz["masks_packed"]
            return np.unpackbits(packed, axis=-1, count=shape[-1]).reshape(shape)
        if "masks" in npz:
            return (npz["masks"] != 0).astype(np.uint8)
    raise ValueError("npz holds neither 'masks' nor 'masks_packed'")


@dataclass
class RawSample:
    key: str
    image: np.ndarray  # H x W x 3 uint8
    caption: str
    phrases: list[str]  # phrases that have a mask, in json order
    masks: np.ndarray  # len(phrases) x H x W uint8, row p grounds phrases[p]
    num_null: int  # phrases of the json without a mask
    latents: bytes | None = None  # the sample's cached latents (KEY.latents.npz, tcscale.data.latent_cache), if any


def decode_shard_sample(sample: dict) -> RawSample:
    """A WebDataset tar group {"__key__", "jpg", "json", "masks.npz"} -> RawSample, or SkipSample."""
    key = sample.get("__key__", "?")
    img_bytes = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if img_bytes is None or "json" not in sample or "masks.npz" not in sample:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise SkipSample("missing_part", f"sample {key} has {have}")
    try:
        meta = json.loads(sample["json"])
        caption = str(meta["caption"])
        entries = [(str(p["text"]), p.get("mask")) for p in meta["phrases"]]
    except Exception as exc:  # noqa: BLE001
        raise SkipSample("decode_json", f"sample {key}: {exc}") from None
    try:
        with Image.open(io.BytesIO(img_bytes)) as im:
            image = np.array(im.convert("RGB"))  # writable: torch views it without a copy
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for corrupt data
        raise SkipSample("decode_image", f"sample {key}: {exc}") from None
    try:
        all_masks = decode_masks(sample["masks.npz"])
    except Exception as exc:  # noqa: BLE001
        raise SkipSample("decode_masks", f"sample {key}: {exc}") from None
    indices = [m for _, m in entries if m is not None]
    if sorted(indices) != list(range(all_masks.shape[0])) or all_masks.ndim != 3:
        raise SkipSample(
            "mask_count", f"sample {key}: json names mask indices {indices}, npz holds {all_masks.shape[0]} masks"
        )
    if all_masks.shape[1:] != image.shape[:2]:
        raise SkipSample("mask_size", f"sample {key}: masks are {all_masks.shape[1:]}, image is {image.shape[:2]}")
    texts = [t for t, m in entries if m is not None]
    masks = all_masks if indices == list(range(len(indices))) else all_masks[indices]  # rows in phrase order
    latents = sample.get(LATENTS_PART)
    return RawSample(key, image, caption, texts, masks, num_null=len(entries) - len(indices), latents=latents)


@dataclass
class ProcessSettings:
    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    max_phrases: int = 16
    min_phrases: int = 0
    layer_sizes: tuple[tuple[int, int], ...] = ()  # (h, w) grids to make layer masks for (the grounding plan's)
    mask_rule: MaskRule = field(default_factory=MaskRule)  # full-resolution mask (binary | soft) -> layer mask
    full_masks: bool | None = None  # keep the (P, R, R) masks in the batch; None: only when there are no layer sizes
    latents: str = "images"  # data.latents: "cached" puts the sample's cached latent distribution in its place
    latent_key: CacheKey | None = None  # the cache key a cached sample must carry (None: any; the trainer sets it)
    buckets: tuple[tuple[int, int], ...] = ()  # aspect-ratio buckets (h, w) (tcscale.data.buckets); (): square

    @property
    def keeps_full_masks(self) -> bool:
        return not self.layer_sizes if self.full_masks is None else self.full_masks


class SampleProcessor:
    """RawSample -> training sample: aligned phrases, transformed image + masks, layer masks."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, settings: ProcessSettings):
        self.aligner = PhraseAligner(tokenizer, max_length=77)
        self.settings = settings

    def __call__(self, raw: RawSample, rng: np.random.Generator, counters: Counters) -> dict:
        st = self.settings
        al = self.aligner.align(raw.caption, raw.phrases)
        keep, positions = [], []
        for p, (pos, reason) in enumerate(zip(al.positions, al.reasons)):
            if pos is None:
                counters[f"phrases_dropped/{reason}"] += 1
                continue
            if len(keep) >= st.max_phrases:
                counters["phrases_dropped/max_phrases"] += 1
                continue
            keep.append(p)
            positions.append(pos)
        if raw.num_null:
            counters["phrases_null"] += raw.num_null
        if len(keep) < st.min_phrases:
            raise SkipSample("too_few_phrases", f"sample {raw.key}: {len(keep)} aligned phrases < {st.min_phrases}")
        h, w = raw.image.shape[:2]
        bucket = nearest_bucket(h, w, list(st.buckets)) if st.buckets else None  # aspect-ratio bucket (h, w)
        target = bucket or (st.resolution, st.resolution)
        params = crop_params(h, w, center_crop=st.center_crop, random_flip=st.random_flip, rng=rng, target=bucket)
        # phrase_masks (P, R, R) are binary whatever the rule (evaluation IoU reads them); with mask_rule.full_res
        # "soft" the layer masks are made from the soft resampled masks instead (official TokenCompose loader)
        if st.mask_rule.full_res == "soft" and st.layer_sizes:
            pixel_values, phrase_masks, layer_source = transform_with_soft_masks(
                raw.image, raw.masks[keep], target, params
            )
        else:
            pixel_values, phrase_masks = transform_image_and_masks(raw.image, raw.masks[keep], target, params)
            layer_source = phrase_masks
        token_phrase = torch.full((len(al.input_ids),), -1, dtype=torch.int64)
        for slot, pos in enumerate(positions):
            token_phrase[pos] = slot
        layer_masks = {}
        grids = layer_grids(st.layer_sizes, st.resolution, target) if bucket else {}
        for size in st.layer_sizes:
            size = grids.get(size, (int(size[0]), int(size[1])))  # a bucket's grid of the layer
            if phrase_masks.shape[0]:
                layer_masks[size] = st.mask_rule.apply(layer_source, size)
            else:
                layer_masks[size] = torch.zeros(0, size[0] * size[1])
        counters["phrases_kept"] += len(keep)
        counters["samples_seen"] += 1
        sample = {
            "key": raw.key,
            "caption": raw.caption,
            "pixel_values": pixel_values,
            "input_ids": torch.tensor(al.input_ids, dtype=torch.int64),
            "num_phrases": len(keep),
            "token_phrase": token_phrase,
            "layer_masks": layer_masks,
            # SDXL micro-conditioning (diffusers' SDXL script): the original (h, w) and the crop's top-left corner
            # in the shorter-side-resized image (our crop-then-resize window, scaled by resolution / window side)
            "target_size": tuple(phrase_masks.shape[-2:]),  # the crop's (h, w) after resizing, in pixels
            "original_size": (h, w),
            "crop_top_left": (round(params.top * target[0] / params.window[0]),
                              round(params.left * target[1] / params.window[1])),
        }  # fmt: skip
        if bucket is not None:
            sample["bucket"] = bucket
        if st.keeps_full_masks:
            sample["phrase_masks"] = phrase_masks
        if st.latents == "cached":  # the cached posterior of this very crop (and flip) instead of its pixels
            if raw.latents is None:
                raise SkipSample("missing_part", f"sample {raw.key} has no {LATENTS_PART} (data.latents=cached)")
            cached = decode_member(raw.latents)
            check_key(cached.key, st.latent_key, f"sample {raw.key}")
            sample["latent_mean"], sample["latent_logvar"] = cached.variant(params.flip, raw.key)
            del sample["pixel_values"]
        return sample


def collate(samples: list[dict]) -> dict:
    """Stack samples; pad the phrase axis to P = max phrases in the batch (at least 1) with zero masks. The
    full-resolution `phrase_masks` are in the batch only when the samples carry them (see ProcessSettings)."""
    b = len(samples)
    p_max = max(1, max(s["num_phrases"] for s in samples))
    batch = {}
    if "phrase_masks" in samples[0]:
        phrase_masks = torch.zeros(b, p_max, *samples[0]["phrase_masks"].shape[-2:])
        for i, s in enumerate(samples):
            phrase_masks[i, : s["phrase_masks"].shape[0]] = s["phrase_masks"]
        batch["phrase_masks"] = phrase_masks
    layer_masks = {}
    for size in samples[0]["layer_masks"]:
        lm = torch.zeros(b, p_max, size[0] * size[1])
        for i, s in enumerate(samples):
            m = s["layer_masks"][size]
            lm[i, : m.shape[0]] = m
        layer_masks[size] = lm
    if "latent_mean" in samples[0]:  # data.latents=cached: (B, C, h, w) float32 each, no pixels
        batch["latent_mean"] = torch.stack([s["latent_mean"] for s in samples])
        batch["latent_logvar"] = torch.stack([s["latent_logvar"] for s in samples])
    else:
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
    batch.update(
        {
            "input_ids": torch.stack([s["input_ids"] for s in samples]),
            "token_phrase": torch.stack([s["token_phrase"] for s in samples]),
            "layer_masks": layer_masks,
            "captions": [s["caption"] for s in samples],
            "keys": [s["key"] for s in samples],
        }
    )
    if "target_size" in samples[0]:  # (B, 2) int64: each sample's (h, w) in pixels (SDXL's target size)
        batch["target_sizes"] = torch.tensor([s["target_size"] for s in samples], dtype=torch.int64)
    if "original_size" in samples[0]:  # (B, 2) int64 each: SDXL's micro-conditioning time ids
        batch["original_sizes"] = torch.tensor([s["original_size"] for s in samples], dtype=torch.int64)
        batch["crop_top_lefts"] = torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.int64)
    return batch
