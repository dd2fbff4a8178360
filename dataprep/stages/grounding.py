"""Grounding: Grounding DINO boxes for "p1 . p2 . ..." -> SAM-HQ masks per box -> one mask per phrase.

Per batch of images (both models loaded once per process, images batched on the device):

1. Detector (`GroundingDinoDetector`): the package's own model build (`SLConfig.fromfile` + `build_model`) and
   checkpoint format (`torch.load(...)["model"]`), SwinT-OGC by default. A query keeps its box if its best token
   score is > `box_threshold`; its detector phrase is the caption tokens scoring > `text_threshold`
   (`get_phrases_from_posmap`), special tokens and the "." separators excluded.
2. Phrase mapping (`map_detection_to_phrase`), deterministic:
   a. normalise both sides: lowercase, every non-alphanumeric character becomes a space, split into words;
   b. exact match: the first noun phrase (caption order) whose words equal the detector phrase's words;
   c. otherwise the noun phrase sharing the most words (multiset intersection), ties -> earlier in caption order;
   d. no shared word (or an empty detector phrase) -> the box is dropped (counted as "unmatched").
3. Segmenter (`SamHqSegmenter`): SAM-HQ, one mask per box (`multimask_output=False`), at the image's size.
4. Union (`union_masks_by_phrase`): the masks of all boxes mapped to one phrase are OR-ed. A phrase with no box,
   or whose union is empty, gets mask null. Non-null masks are numbered 0..K-1 in phrase order.

Per item the stage writes `<out_dir>/<key>.npz` (masks K x H x W uint8 + the item's grounding metadata) through a
temp file + rename, so a rerun after a kill skips items already grounded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dataprep.stages.common import (
    Item,
    StageError,
    batched,
    load_rgb,
    require_keys,
    resolve_device,
    save_npz_atomic,
)

log = logging.getLogger(__name__)

STAGE = "grounding"


@dataclass
class GroundingConfig:
    detector_config: str | None = None  # Grounding DINO SLConfig .py; null -> the package's GroundingDINO_SwinT_OGC.py
    detector_checkpoint: str = "weights/groundingdino_swint_ogc.pth"  # official checkpoint ({"model": state_dict})
    text_encoder: str | None = None  # local bert-base-uncased dir replacing the config's text_encoder_type (offline)
    box_threshold: float = 0.25  # keep a query if its best caption-token score is > this
    text_threshold: float = 0.25  # tokens scoring > this form the detector phrase of a kept query
    detector_image_size: int = 800  # shorter side fed to the detector (Grounding DINO's inference default)
    detector_max_size: int = 1333  # cap on the longer side
    segmenter_type: str = "vit_h"  # sam_model_registry key of segment_anything_hq: vit_h | vit_l | vit_b | vit_tiny
    segmenter_checkpoint: str = "weights/sam_hq_vit_h.pth"  # SAM-HQ state dict
    hq_token_only: bool = False  # SAM-HQ: use only the HQ output token (False = HQ + SAM mask, the default)
    max_detections: int | None = None  # keep at most this many boxes per image, best score first; null = all
    max_boxes_per_call: int = 64  # boxes decoded per mask-decoder call (bounds the 1024^2 upsampling memory)
    batch_size: int = 4  # images per detector / image-encoder forward
    allow_unsafe_load: bool = False  # load checkpoints that need arbitrary unpickling (can run code: trusted only)


@dataclass(frozen=True)
class Detection:
    """One kept detector query."""

    box_xyxy: tuple[float, float, float, float]  # pixels of the original image
    score: float  # best caption-token score (> box_threshold)
    text: str  # detector phrase (caption tokens scoring > text_threshold)


class Detector(Protocol):
    name: str

    def detect(self, images: Sequence[np.ndarray], phrase_lists: Sequence[Sequence[str]]) -> list[list[Detection]]:
        """Detections per image (HxWx3 uint8 RGB) for the caption built from that image's phrases."""
        ...


class Segmenter(Protocol):
    name: str

    def segment(self, images: Sequence[np.ndarray], boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per image: (N, H, W) bool masks, one per box of `boxes[i]` ((N, 4) xyxy pixels)."""
        ...


# ---------------------------------------------------------------------------------------------------------------
# Pure bookkeeping (tested exactly with fakes)
# ---------------------------------------------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def _words(text: str) -> list[str]:
    return _NON_ALNUM.sub(" ", text.lower()).split()


def detector_caption(phrases: Sequence[str]) -> str:
    """ "p1 . p2 . p3 ." as Grounding DINO expects (lowercase, '.'-separated, trailing '.')."""
    return " . ".join(" ".join(_words(p)) or p.lower().strip() for p in phrases) + " ."


def map_detection_to_phrase(detected: str, phrases: Sequence[str]) -> int | None:
    """Index of the noun phrase a detector phrase belongs to, or None (rule in the module docstring)."""
    det = _words(detected)
    if not det:
        return None
    for i, p in enumerate(phrases):
        if _words(p) == det:
            return i
    det_counts = Counter(det)
    best, best_overlap = None, 0
    for i, p in enumerate(phrases):
        overlap = sum((det_counts & Counter(_words(p))).values())
        if overlap > best_overlap:  # strict: ties keep the earlier phrase
            best, best_overlap = i, overlap
    return best


def union_masks_by_phrase(
    box_masks: torch.Tensor, box_phrase: Sequence[int], num_phrases: int, image_hw: tuple[int, int]
) -> tuple[list[np.ndarray | None], np.ndarray]:
    """OR the (N, H, W) box masks per phrase.

    Returns (one HxW bool array or None per phrase, the non-null masks stacked K x H x W uint8 in phrase order).
    A phrase with no box or an all-zero union is None.
    """
    h, w = image_hw
    if len(box_phrase) != box_masks.shape[0]:
        raise ValueError(f"{box_masks.shape[0]} box masks but {len(box_phrase)} box phrase indices")
    per_phrase: list[np.ndarray | None] = []
    if len(box_phrase):
        if tuple(box_masks.shape[1:]) != (h, w):
            raise ValueError(f"box masks are {tuple(box_masks.shape[1:])}, image is {(h, w)}")
        index = torch.as_tensor(list(box_phrase), device=box_masks.device)
        counts = torch.zeros((num_phrases, h, w), dtype=torch.int32, device=box_masks.device)
        counts.index_add_(0, index, box_masks.to(torch.int32))  # boxes covering each pixel, per phrase
        unions_np = (counts > 0).cpu().numpy()
    else:
        unions_np = np.zeros((num_phrases, h, w), dtype=bool)
    for p in range(num_phrases):
        per_phrase.append(unions_np[p] if unions_np[p].any() else None)
    present = [m for m in per_phrase if m is not None]
    stacked = np.stack(present).astype(np.uint8) if present else np.zeros((0, h, w), dtype=np.uint8)
    return per_phrase, stacked


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def _torch_load_checkpoint(path: str, key: str, allow_unsafe: bool = False) -> Any:
    """A detector checkpoint, weights-only (a pickle can run code); the full pickle only behind the opt-in."""
    from tcscale.train.safe_load import UnsafeCheckpointError, safe_torch_load

    if not os.path.isfile(path):
        raise StageError(f"config '{key}': checkpoint not found: {path}")
    try:
        with safe_torch_load(allow_unsafe):
            return torch.load(path, map_location="cpu")
    except UnsafeCheckpointError:
        raise StageError(
            f"config '{key}': {path} cannot be loaded weights-only (it pickles more than tensors, which can run "
            "code); if you trust where it came from, set grounding.allow_unsafe_load: true"
        ) from None


class GroundingDinoDetector:
    """Grounding DINO, loaded once; batched forward over images with per-image captions."""

    def __init__(
        self,
        checkpoint: str,
        config_path: str | None = None,
        text_encoder: str | None = None,
        device: str | torch.device = "auto",
        box_threshold: float = 0.25,
        text_threshold: float = 0.25,
        image_size: int = 800,
        max_size: int = 1333,
        max_detections: int | None = None,
        allow_unsafe_load: bool = False,
    ) -> None:
        import groundingdino.datasets.transforms as T
        from groundingdino.models import build_model
        from groundingdino.util.misc import clean_state_dict
        from groundingdino.util.slconfig import SLConfig

        self.device = resolve_device(device) if isinstance(device, str) else device
        if config_path is None:
            spec = importlib.util.find_spec("groundingdino")
            assert spec is not None and spec.origin is not None
            config_path = str(Path(spec.origin).parent / "config" / "GroundingDINO_SwinT_OGC.py")
        if not os.path.isfile(config_path):
            raise StageError(f"config 'grounding.detector_config': file not found: {config_path}")
        args = SLConfig.fromfile(config_path)
        args.device = str(self.device)
        if text_encoder is not None:
            args.text_encoder_type = text_encoder
        # Activation checkpointing only saves training memory; under no_grad it just re-runs blocks through
        # torch.utils.checkpoint (with warnings). It does not change the parameters, so the checkpoint still fits.
        args.use_checkpoint = False
        args.use_transformer_ckpt = False
        state = _torch_load_checkpoint(checkpoint, "grounding.detector_checkpoint", allow_unsafe_load)
        if not isinstance(state, dict) or "model" not in state:
            raise StageError(f"config 'grounding.detector_checkpoint': {checkpoint} has no 'model' state dict")
        model = build_model(args)
        info = model.load_state_dict(clean_state_dict(state["model"]), strict=False)  # strict=False as upstream
        if info.unexpected_keys or [k for k in info.missing_keys if not k.endswith("position_ids")]:
            log.warning("%s: missing keys %s, unexpected keys %s", checkpoint, info.missing_keys, info.unexpected_keys)
        self.model = model.to(self.device).eval()
        self.tokenizer = model.tokenizer
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.max_detections = max_detections
        self.transform = T.Compose(
            [
                T.RandomResize([image_size], max_size=max_size),  # one size: deterministic
                T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )
        self.name = f"GroundingDINO:{Path(config_path).stem}:{Path(checkpoint).name}"
        self._special_ids = set(self.tokenizer.all_special_ids) | set(self.tokenizer.convert_tokens_to_ids(["."]))

    @torch.no_grad()
    def detect(self, images: Sequence[np.ndarray], phrase_lists: Sequence[Sequence[str]]) -> list[list[Detection]]:
        from groundingdino.util.misc import nested_tensor_from_tensor_list
        from groundingdino.util.utils import get_phrases_from_posmap

        results: list[list[Detection]] = [[] for _ in images]
        todo = [i for i, ps in enumerate(phrase_lists) if ps]
        if not todo:
            return results
        captions = [detector_caption(phrase_lists[i]) for i in todo]
        tensors = [self.transform(Image.fromarray(images[i]), None)[0] for i in todo]
        samples = nested_tensor_from_tensor_list(tensors).to(self.device)  # pads to the batch's largest image
        out = self.model(samples, captions=captions)
        logits_all = out["pred_logits"].float().sigmoid().cpu()  # (B, num_queries, max_text_len)
        boxes_all = out["pred_boxes"].float().cpu()  # (B, num_queries, 4) cx, cy, w, h in [0, 1]
        for b, i in enumerate(todo):
            tokenized = self.tokenizer(captions[b])
            n_tok = min(len(tokenized["input_ids"]), logits_all.shape[-1])
            logits = logits_all[b, :, :n_tok]
            scores = logits.max(dim=1).values  # (num_queries,)
            keep = torch.nonzero(scores > self.box_threshold).flatten()
            keep = keep[torch.argsort(scores[keep], descending=True, stable=True)][: self.max_detections]
            h, w = images[i].shape[:2]
            special = torch.tensor([t in self._special_ids for t in tokenized["input_ids"][:n_tok]])
            for logit, box in zip(logits[keep], boxes_all[b][keep]):
                posmap = (logit > self.text_threshold) & ~special
                text = get_phrases_from_posmap(posmap, tokenized, self.tokenizer) if posmap.any() else ""
                cx, cy, bw, bh = box.tolist()
                x0, x1 = max(0.0, (cx - bw / 2) * w), min(float(w), (cx + bw / 2) * w)
                y0, y1 = max(0.0, (cy - bh / 2) * h), min(float(h), (cy + bh / 2) * h)
                results[i].append(Detection((x0, y0, x1, y1), float(logit.max()), text))
        return results


class SamHqSegmenter:
    """SAM-HQ, loaded once. Image encoder batched over images; mask decoder per image in chunks of boxes.

    `Sam.forward` would decode all boxes of an image at once and upsample every mask to 1024x1024 before
    cropping; with many boxes that is the memory peak, so the same steps are run here with box chunks.
    """

    def __init__(
        self,
        model_type: str,
        checkpoint: str,
        device: str | torch.device = "auto",
        hq_token_only: bool = False,
        max_boxes_per_call: int = 64,
        allow_unsafe_load: bool = False,
    ) -> None:
        from segment_anything_hq import sam_model_registry
        from segment_anything_hq.utils.transforms import ResizeLongestSide

        from tcscale.train.safe_load import UnsafeCheckpointError, safe_torch_load

        self.device = resolve_device(device) if isinstance(device, str) else device
        if model_type not in sam_model_registry:
            raise StageError(
                f"config 'grounding.segmenter_type': {model_type!r} is not one of {sorted(sam_model_registry)}"
            )
        if not os.path.isfile(checkpoint):
            raise StageError(f"config 'grounding.segmenter_checkpoint': checkpoint not found: {checkpoint}")
        try:
            with safe_torch_load(allow_unsafe_load):  # SAM-HQ's builder calls torch.load on the file
                model = sam_model_registry[model_type](checkpoint=checkpoint)
        except UnsafeCheckpointError:
            raise StageError(
                f"config 'grounding.segmenter_checkpoint': {checkpoint} cannot be loaded weights-only; if you trust "
                "where it came from, set grounding.allow_unsafe_load: true"
            ) from None
        self.model = model.to(self.device).eval()
        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)
        self.hq_token_only = hq_token_only
        self.max_boxes_per_call = max_boxes_per_call
        self.name = f"SAM-HQ:{model_type}:{Path(checkpoint).name}"

    @torch.no_grad()
    def segment(self, images: Sequence[np.ndarray], boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        sam = self.model
        out = [torch.zeros((0, *img.shape[:2]), dtype=torch.bool, device=self.device) for img in images]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        if not todo:
            return out
        inputs = [
            torch.as_tensor(self.transform.apply_image(images[i]), device=self.device).permute(2, 0, 1).contiguous()
            for i in todo
        ]  # each 3 x h' x w', long side = img_size
        batch = torch.stack([sam.preprocess(x) for x in inputs])  # normalise + pad to img_size^2
        embeddings, interm = sam.image_encoder(batch)
        dense_pe = sam.prompt_encoder.get_dense_pe()
        for b, i in enumerate(todo):
            original_size = images[i].shape[:2]
            chunks = []
            for chunk in torch.split(boxes[i].to(self.device, torch.float32), self.max_boxes_per_call):
                sparse, dense = sam.prompt_encoder(
                    points=None, boxes=self.transform.apply_boxes_torch(chunk, original_size), masks=None
                )
                low_res, _ = sam.mask_decoder(
                    image_embeddings=embeddings[b : b + 1],
                    image_pe=dense_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                    hq_token_only=self.hq_token_only,
                    interm_embeddings=[t[b : b + 1] for t in interm],
                )
                masks = sam.postprocess_masks(low_res, inputs[b].shape[-2:], original_size)  # (n, 1, H, W)
                chunks.append(masks[:, 0] > sam.mask_threshold)
            out[i] = torch.cat(chunks)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------------------


def item_key(item: Item) -> str:
    key = item.get("key", item["id"])
    return str(key)


def _load_cached(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return json.loads(str(z["meta"]))
    except Exception as exc:  # noqa: BLE001 - a damaged cache file is recomputed, not fatal
        log.warning("%s: unreadable grounding cache (%s); recomputing", path, exc)
        return None


def ground_items(
    items: Sequence[Item],
    detector: Detector | None,
    segmenter: Segmenter | None,
    out_dir: str | os.PathLike,
    batch_size: int = 4,
    progress: bool = True,
) -> list[Item]:
    """Return copies of `items` with "grounding": {"masks": npz path, "mask_index": [...], ...}.

    Items whose `<out_dir>/<key>.npz` already exists are not recomputed. Models may be None when every item is
    cached (a resumed run does not need to load them).
    """
    out_dir = Path(out_dir)
    out = [dict(it) for it in items]
    for it in out:
        require_keys(it, ("id", "image", "phrases"), STAGE)
    todo = []
    for it in out:
        meta = _load_cached(out_dir / f"{item_key(it)}.npz")
        if meta is not None and meta.get("phrases") == it["phrases"]:
            it["grounding"] = meta
        else:
            todo.append(it)
    if todo and (detector is None or segmenter is None):
        raise StageError(f"item {todo[0]['id']}: not grounded yet and no detector/segmenter was given")
    bar = tqdm(total=len(todo), desc="grounding", unit="img", disable=not progress)
    for batch in batched(todo, batch_size):
        images = [np.asarray(load_rgb(it["image"], it["id"])) for it in batch]
        phrase_lists = [list(it["phrases"]) for it in batch]
        detections = detector.detect(images, phrase_lists)  # type: ignore[union-attr]
        kept: list[list[tuple[Detection, int]]] = []
        for dets, phrases in zip(detections, phrase_lists):
            mapped = [(d, map_detection_to_phrase(d.text, phrases)) for d in dets]
            kept.append([(d, p) for d, p in mapped if p is not None])
        boxes = [torch.tensor([d.box_xyxy for d, _ in k], dtype=torch.float32).reshape(-1, 4) for k in kept]
        box_masks = segmenter.segment(images, boxes)  # type: ignore[union-attr]
        for it, img, dets, k, bm in zip(batch, images, detections, kept, box_masks):
            per_phrase, stacked = union_masks_by_phrase(bm, [p for _, p in k], len(it["phrases"]), img.shape[:2])
            mask_index: list[int | None] = []
            for m in per_phrase:
                mask_index.append(None if m is None else sum(x is not None for x in mask_index))
            path = out_dir / f"{item_key(it)}.npz"
            meta = {
                "masks": str(path),
                "phrases": it["phrases"],
                "mask_index": mask_index,
                "height": int(img.shape[0]),
                "width": int(img.shape[1]),
                "num_detections": len(dets),
                "num_unmatched": len(dets) - len(k),
                "boxes": [[round(v, 2) for v in d.box_xyxy] + [round(d.score, 4), p] for d, p in k],
            }
            save_npz_atomic(path, masks=stacked, meta=np.array(json.dumps(meta)))
            it["grounding"] = meta
        bar.update(len(batch))
    bar.close()
    return out


def load_masks(item: Item) -> list[np.ndarray | None]:
    """The item's per-phrase masks (HxW uint8 or None) from its grounding npz, checked against the metadata."""
    require_keys(item, ("grounding",), "shards")
    g = item["grounding"]
    with np.load(g["masks"]) as z:
        stacked = z["masks"]
    k = sum(i is not None for i in g["mask_index"])
    if stacked.shape != (k, g["height"], g["width"]):
        raise StageError(
            f"item {item['id']}: {g['masks']} holds masks {stacked.shape}, metadata says {(k, g['height'], g['width'])}"
        )
    return [None if i is None else stacked[i] for i in g["mask_index"]]
