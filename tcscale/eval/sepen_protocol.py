"""The Separate-and-Enhance evaluation protocol (Bao et al., SIGGRAPH 2024; docs/DESIGN.md §8).

* **Success rate.** An image succeeds when *every* object of its prompt is detected with
  score > 0.7 ("individual": one model per concept pair) or > 0.3 ("large_scale"). The paper's
  detector, Detic, is not installable here; ``tcscale.eval.detect`` (OWLv2 / OWL-ViT) stands in, and
  results must say so (``DETECTOR_NOTE``).
* **Text–text similarity.** A caption of the image (BLIP, ``BlipForConditionalGeneration``) against
  the prompt: cosine of their CLIP text embeddings (``CLIPModel.get_text_features``, L2-normalised),
  the measure Attend-and-Excite introduced (its ``metrics/blip_captioning_and_clip_similarity.py``:
  BLIP base-COCO captions, CLIP ViT-B/16 text features). Attend-and-Excite averages the prompt's
  embedding over 80 ImageNet templates; here the plain prompt is embedded by default and
  ``prompt_templates`` gives that variant.

Captioner and embedder are injectable callables (images -> captions; texts -> (N, D) embeddings);
``BlipCaptioner`` and ``ClipTextEmbedder`` are the transformers-backed ones, loaded with
``from_pretrained`` from a hub id in the local cache or a ``save_pretrained`` directory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Real

import numpy as np
from PIL import Image

from tcscale.eval.detect import load_pretrained

SEPEN_THRESHOLDS: dict[str, float] = {"individual": 0.7, "large_scale": 0.3}
"""Detection score a SepEn success needs, per setting (strictly greater)."""

DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"
DEFAULT_CLIP = "openai/clip-vit-base-patch16"
DETECTOR_NOTE = "SepEn's detector (Detic) is not installable here; detections come from an OWL detector"

Captioner = Callable[[Sequence[Image.Image]], list[str]]
TextEmbedder = Callable[[Sequence[str]], np.ndarray]


def success_threshold(setting: str) -> float:
    """0.7 for "individual", 0.3 for "large_scale"."""
    if setting not in SEPEN_THRESHOLDS:
        raise ValueError(f"SepEn setting must be one of {list(SEPEN_THRESHOLDS)}, got {setting!r}")
    return SEPEN_THRESHOLDS[setting]


def sepen_success(objects: Sequence[str], labels: Sequence[str], scores: Sequence[float], *, threshold: float) -> bool:
    """True when every object has a detection with that label and score > ``threshold``."""
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores")
    if not objects:
        raise ValueError("a SepEn prompt names at least one object")
    found = {label for label, score in zip(labels, scores) if score > threshold}
    return all(obj in found for obj in objects)


def sepen_success_rate(
    records: Iterable[Mapping], *, setting: str = "individual", threshold: float | None = None
) -> float:
    """Percent of images where every object is detected above the setting's threshold.

    ``records``: mappings with ``objects``, ``labels`` and ``scores``; ``threshold`` overrides the
    setting's (0.7 individual, 0.3 large-scale).
    """
    thr = success_threshold(setting) if threshold is None else threshold
    hits = n = 0
    for i, rec in enumerate(records):
        for key in ("objects", "labels", "scores"):
            if key not in rec:
                raise ValueError(f"record {i} has no {key!r}")
        for s in rec["scores"]:
            if isinstance(s, bool) or not isinstance(s, Real) or not math.isfinite(float(s)):
                raise ValueError(f"record {i}: score {s!r} is not a finite number")
        try:
            hits += sepen_success(rec["objects"], rec["labels"], rec["scores"], threshold=thr)
        except ValueError as err:
            raise ValueError(f"record {i}: {err}") from err
        n += 1
    if n == 0:
        raise ValueError("no SepEn records to score")
    return 100.0 * hits / n


class BlipCaptioner:
    """BLIP image captioning (``BlipForConditionalGeneration`` + ``BlipProcessor``), greedy decoding.

    ``__call__(images) -> list[str]``; ``max_new_tokens`` bounds a caption (default 30).
    """

    def __init__(self, model, processor, *, device: str = "cpu", max_new_tokens: int = 30, batch_size: int = 16):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, id_or_dir: str | os.PathLike = DEFAULT_BLIP, **kwargs) -> BlipCaptioner:
        """Load from a hub id in the local cache (default Salesforce/blip-image-captioning-base) or a directory."""
        from transformers import BlipForConditionalGeneration, BlipProcessor

        model = load_pretrained(BlipForConditionalGeneration, id_or_dir, "BLIP captioner")
        processor = load_pretrained(BlipProcessor, id_or_dir, "BLIP processor", use_fast=False)  # reference PIL path
        return cls(model, processor, **kwargs)

    def __call__(self, images: Sequence[Image.Image | np.ndarray]) -> list[str]:
        import torch

        pil = [im.convert("RGB") if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
        captions: list[str] = []
        for start in range(0, len(pil), self.batch_size):
            inputs = self.processor(images=pil[start : start + self.batch_size], return_tensors="pt").to(self.device)
            with torch.no_grad():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            captions.extend(t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        return captions


class ClipTextEmbedder:
    """L2-normalised CLIP text embeddings (``CLIPModel.get_text_features``), float64 (N, D)."""

    def __init__(self, model, tokenizer, *, device: str = "cpu", batch_size: int = 64):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, id_or_dir: str | os.PathLike = DEFAULT_CLIP, **kwargs) -> ClipTextEmbedder:
        """Load from a hub id in the local cache (default openai/clip-vit-base-patch16) or a directory."""
        from transformers import CLIPModel, CLIPTokenizer

        model = load_pretrained(CLIPModel, id_or_dir, "CLIP model")
        tokenizer = load_pretrained(CLIPTokenizer, id_or_dir, "CLIP tokenizer")
        return cls(model, tokenizer, **kwargs)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(
                list(texts[start : start + self.batch_size]), padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            with torch.no_grad():
                feats = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            chunks.append(feats.double().cpu().numpy())
        if not chunks:
            raise ValueError("no texts to embed")
        emb = np.concatenate(chunks)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def _unit_rows(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float64)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def text_text_similarity(
    captions: Sequence[str],
    prompts: Sequence[str],
    embedder: TextEmbedder,
    *,
    prompt_templates: Sequence[str] | None = None,
) -> np.ndarray:
    """(N,) cosine similarity of caption i and prompt i in the embedder's space.

    With ``prompt_templates`` (strings with "{}") a prompt's embedding is the normalised mean of its
    normalised templated embeddings (Attend-and-Excite's variant); by default the plain prompt.
    """
    if len(captions) != len(prompts):
        raise ValueError(f"{len(captions)} captions but {len(prompts)} prompts")
    cap = _unit_rows(embedder(list(captions)))
    if prompt_templates:
        templated = [t.format(p) for p in prompts for t in prompt_templates]
        per = _unit_rows(embedder(templated)).reshape(len(prompts), len(prompt_templates), -1).mean(axis=1)
        pro = _unit_rows(per)
    else:
        pro = _unit_rows(embedder(list(prompts)))
    return np.sum(cap * pro, axis=1)


def sepen_scores(
    records: Sequence[Mapping],
    *,
    setting: str = "individual",
    captioner: Captioner | None = None,
    embedder: TextEmbedder | None = None,
    prompt_templates: Sequence[str] | None = None,
) -> dict[str, float]:
    """SepEn scores of a set of images: ``{"success_rate" (%), "text_similarity", "text_similarity_std",
    "images"}``.

    ``records``: per image ``prompt``, ``objects``, ``labels``, ``scores`` and either ``caption`` or
    ``image`` (then ``captioner`` captions it). Without ``embedder`` the similarity keys are left out.
    """
    out = {"success_rate": sepen_success_rate(records, setting=setting), "images": float(len(records))}
    if embedder is None:
        return out
    captions = [rec.get("caption") for rec in records]
    missing = [i for i, c in enumerate(captions) if c is None]
    if missing:
        if captioner is None:
            raise ValueError(f"records {missing[:5]} have no 'caption' and no captioner was given")
        for i in missing:
            if "image" not in records[i]:
                raise ValueError(f"record {i} has neither 'caption' nor 'image'")
        new = captioner([records[i]["image"] for i in missing])
        for i, c in zip(missing, new):
            captions[i] = c
    prompts = [rec["prompt"] for rec in records]
    sims = text_text_similarity(captions, prompts, embedder, prompt_templates=prompt_templates)
    out["text_similarity"] = float(sims.mean())
    out["text_similarity_std"] = float(sims.std(ddof=0))
    return out


__all__ = [
    "SEPEN_THRESHOLDS",
    "DEFAULT_BLIP",
    "DEFAULT_CLIP",
    "DETECTOR_NOTE",
    "success_threshold",
    "sepen_success",
    "sepen_success_rate",
    "BlipCaptioner",
    "ClipTextEmbedder",
    "text_text_similarity",
    "sepen_scores",
]
