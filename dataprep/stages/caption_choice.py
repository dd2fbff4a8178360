"""Caption choice: for an image with several captions keep the one CLIP scores highest.

Implementation: transformers `CLIPModel` + `CLIPProcessor`, both `from_pretrained(model)`, where `model` is a hub id
or a local dir (default ViT-L/14@336, `openai/clip-vit-large-patch14-336`). One path loads weights, tokenizer and
image preprocessing together, which is what a local checkpoint dir (and the tiny test model) needs.

Score = cosine similarity of the projected image and text embeddings (CLIP's own logit without the temperature).
Ties keep the earlier caption. Items with a single caption skip the model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm

from dataprep.stages.common import Item, StageError, batched, load_rgb, require_keys, resolve_device

log = logging.getLogger(__name__)

STAGE = "caption_choice"


@dataclass
class CaptionChoiceConfig:
    model: str = "openai/clip-vit-large-patch14-336"  # hub id or local dir of a transformers CLIP checkpoint
    dtype: str = "float16"  # weights/activations on CUDA: float16 | bfloat16 | float32 (CPU always float32)
    batch_size: int = 32  # images per forward


class ClipCaptionScorer:
    """Loads CLIP once; scores each image against its own captions."""

    def __init__(self, model: str, device: str | torch.device = "auto", dtype: str = "float16") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.device = resolve_device(device) if isinstance(device, str) else device
        if dtype not in ("float16", "bfloat16", "float32"):
            raise StageError(f"config 'caption_choice.dtype': unknown dtype {dtype!r}")
        self.dtype = getattr(torch, dtype) if self.device.type == "cuda" else torch.float32
        try:
            self.model = CLIPModel.from_pretrained(model, torch_dtype=self.dtype).to(self.device).eval()
            self.processor = CLIPProcessor.from_pretrained(model)
        except (OSError, ValueError) as exc:  # missing dir / bad repo id (huggingface_hub raises a ValueError)
            raise StageError(f"config 'caption_choice.model': cannot load CLIP from {model!r}: {exc}") from exc
        self.name = model
        self.max_text_len = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], captions: Sequence[Sequence[str]]) -> list[list[float]]:
        """Cosine similarity of image b with each of captions[b]; one forward per call (texts flattened)."""
        flat = [c for caps in captions for c in caps]
        pixel = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        text = self.processor(
            text=flat, return_tensors="pt", padding=True, truncation=True, max_length=self.max_text_len
        )
        image_emb = self.model.get_image_features(pixel_values=pixel.to(self.device, self.dtype))
        text_emb = self.model.get_text_features(
            input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
        )
        image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)  # (B, D)
        text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)  # (sum_b C_b, D)
        owner = torch.repeat_interleave(torch.arange(len(captions)), torch.tensor([len(c) for c in captions]))
        sims = (image_emb[owner.to(self.device)] * text_emb).sum(-1).cpu().tolist()  # (sum_b C_b,)
        out: list[list[float]] = []
        start = 0
        for caps in captions:
            out.append(sims[start : start + len(caps)])
            start += len(caps)
        return out


def choose_captions(
    items: Sequence[Item], scorer: ClipCaptionScorer | None, batch_size: int = 32, progress: bool = True
) -> list[Item]:
    """Return copies of `items` with "caption" (the best) and "caption_scores" (None if there was one caption)."""
    out = [dict(it) for it in items]
    for it in out:
        require_keys(it, ("id", "image", "captions"), STAGE)
        caps = it["captions"]
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise StageError(f"item {it['id']}: 'captions' must be a non-empty list of non-empty strings")
        it["caption"] = caps[0]
        it["caption_scores"] = None
    several = [it for it in out if len(it["captions"]) > 1]
    if several and scorer is None:
        raise StageError(f"item {several[0]['id']}: several captions but no CLIP scorer was given")
    bar = tqdm(total=len(several), desc="caption choice", unit="img", disable=not progress)
    for batch in batched(several, batch_size):
        images = [load_rgb(it["image"], it["id"]) for it in batch]
        scores = scorer.score(images, [it["captions"] for it in batch])  # type: ignore[union-attr]
        for it, s in zip(batch, scores):
            best = max(range(len(s)), key=lambda i: (s[i], -i))  # highest score, earlier caption on ties
            it["caption"] = it["captions"][best]
            it["caption_scores"] = [round(float(v), 6) for v in s]
        bar.update(len(batch))
    bar.close()
    return out
