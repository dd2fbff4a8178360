"""Object crops from grounded samples: (crop, phrase text) pairs for the contrastive text-encoder stage.

A grounded sample (image + phrases + one binary mask per phrase, docs/DESIGN.md §5) gives one pair per phrase whose mask
passes the crop policy (`CropConfig`):

1. tight box: the bounding box of the mask's pixels (in the original image, before any training resize); with
   `instances: components` every connected component of a phrase's mask is an object of its own (a phrase mask
   that is the union of several instances, as COCO's per-category masks, gives one crop per instance);
2. drop the object when the box covers less than `min_area` of the image or is narrower than `min_side` px, or when
   the mask fills less than `min_fill` of its box (occluded, fragmented or thin instances: the "cleaner crops"
   remedy of the seed study; 0 keeps everything, as the study did);
3. context: grow the box by `margin` × its width / height on each side, then (`square`) to a square around its
   centre, shifted to stay inside the image; whatever still falls outside the image is padded;
4. optionally paint the pixels outside the object's mask with the image tower's mean colour (`background: mean`);
5. letterbox to the image tower's input size (bicubic, aspect kept, mean-colour padding), optional horizontal flip,
   normalise with the tower's mean / std.

The text of a pair is `template.format(phrase)` tokenized with the model's tokenizer (77 tokens). Pairs of one
micro-batch carry `labels`: equal phrases (case and spacing folded) get equal labels, so the loss can leave in-batch
duplicates out of each other's negatives.

Streams: `build_crop_loader` is the training loader (`tcscale.data.loader.TrainLoader`) with this processor and
collate function, so crops are as deterministic and resumable as the grounded batches (seeds from (run seed, rank,
worker, resume step); synthetic: a pure function of the micro-step). A micro-batch is `micro_batch_size` *images*;
each contributes its crops (at most `max_per_image`, a random subset), so the number of pairs varies per batch.
`held_out_crops` collects a fixed evaluation set (no flip, every crop, one pass).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image

from tcscale.data.samples import Counters, RawSample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tcscale.data.config import DataConfig
    from tcscale.data.loader import TrainLoader

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing (transformers' OPENAI_CLIP_MEAN)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CropConfig:
    """Which objects become crops and how they are cut (see tcscale/data/crops.py)."""

    margin: float = 0.1  # context on each side, as a fraction of the tight box's width / height (0: tight box)
    square: bool = True  # grow the box to a square around its centre (more context instead of a squashed object)
    min_area: float = 0.0025  # drop objects whose tight box covers less than this fraction of the image
    min_side: int = 8  # drop objects whose tight box is narrower or shorter than this (source pixels)
    min_fill: float = 0.0  # drop objects whose mask fills less than this fraction of its tight box (0: keep all)
    background: Literal["keep", "mean"] = "keep"  # pixels outside the object's mask: as photographed | mean colour
    max_per_image: int = 0  # crops kept per image, a random subset (0: all that pass)
    # objects of a phrase: its whole mask (one crop) | each 8-connected component of it (one crop per instance)
    instances: Literal["mask", "components"] = "mask"


def check_crop_config(c: CropConfig, section: str) -> None:
    """Raise ValueError naming `<section>.<key>` for an out-of-range value."""
    if c.margin < 0:
        raise ValueError(f"{section}.margin must be >= 0, got {c.margin}")
    if not 0.0 <= c.min_area < 1.0:
        raise ValueError(f"{section}.min_area must be in [0, 1), got {c.min_area}")
    if c.min_side < 1:
        raise ValueError(f"{section}.min_side must be >= 1, got {c.min_side}")
    if not 0.0 <= c.min_fill <= 1.0:
        raise ValueError(f"{section}.min_fill must be in [0, 1], got {c.min_fill}")
    if c.max_per_image < 0:
        raise ValueError(f"{section}.max_per_image must be >= 0, got {c.max_per_image}")


@dataclass(frozen=True)
class Box:
    top: int
    left: int
    bottom: int  # exclusive
    right: int  # exclusive

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left


def tight_box(mask: np.ndarray) -> Box | None:
    """Bounding box of the mask's nonzero pixels; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return Box(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def context_box(box: Box, image_hw: tuple[int, int], margin: float, square: bool) -> Box:
    """`box` grown by `margin` per side and (square) to a square, shifted into the image where it fits. The result
    may still extend past the image (a square larger than the image's shorter side): that part is padded."""
    h, w = image_hw
    bh, bw = box.height * (1 + 2 * margin), box.width * (1 + 2 * margin)
    if square:
        bh = bw = max(bh, bw)
    cy, cx = (box.top + box.bottom) / 2, (box.left + box.right) / 2

    def span(centre: float, size: float, limit: int) -> tuple[int, int]:
        size = max(1, int(round(size)))
        start = int(round(centre - size / 2))
        if size <= limit:
            start = min(max(start, 0), limit - size)
        else:  # larger than the image: centred on it, padded on both sides
            start = -((size - limit) // 2)
        return start, start + size

    top, bottom = span(cy, bh, h)
    left, right = span(cx, bw, w)
    return Box(top, left, bottom, right)


@dataclass(frozen=True)
class CropDecision:
    phrase_index: int
    box: Box | None  # the tight box (None: empty mask)
    reason: str | None  # None: kept; else why it was dropped (empty | small | low_fill)
    mask: np.ndarray | None = None  # the object's own mask when it is one component of the phrase's (H, W)


def _objects(mask: np.ndarray, instances: str) -> list[np.ndarray | None]:
    """The object masks of one phrase mask: [None] (the mask itself) or one per 8-connected component."""
    if instances == "mask":
        return [None]
    from scipy import ndimage

    labels, count = ndimage.label(mask > 0, structure=np.ones((3, 3), dtype=bool))
    return [labels == k for k in range(1, count + 1)] or [None]


def select_objects(masks: np.ndarray, policy: CropConfig) -> list[CropDecision]:
    """The policy's verdict per object of a (P, H, W) mask stack (steps 1-2 of the module docstring)."""
    out = []
    if masks.ndim != 3:
        raise ValueError(f"masks must be (P, H, W), got shape {masks.shape}")
    h, w = masks.shape[1:]
    for p, phrase_mask in enumerate(masks):
        for own in _objects(phrase_mask, policy.instances):
            mask = phrase_mask if own is None else own
            box = tight_box(mask)
            if box is None:
                out.append(CropDecision(p, None, "empty"))
                continue
            area = box.height * box.width
            filled = np.count_nonzero(mask[box.top : box.bottom, box.left : box.right])
            if area < policy.min_area * h * w or min(box.height, box.width) < policy.min_side:
                reason = "small"
            elif filled < policy.min_fill * area:
                reason = "low_fill"
            else:
                reason = None
            out.append(CropDecision(p, box, reason, own))
    return out


def cut_crop(
    image: np.ndarray,
    mask: np.ndarray,
    box: Box,
    size: int,
    *,
    mean: tuple[float, float, float] = CLIP_MEAN,
    background: str = "keep",
) -> np.ndarray:
    """(size, size, 3) uint8: the image inside `box` (padded with the mean colour outside the image), optionally
    with the non-mask pixels painted, letterboxed to size × size."""
    h, w = image.shape[:2]
    fill = np.array([round(255 * m) for m in mean], dtype=np.uint8)
    region = np.empty((box.height, box.width, 3), dtype=np.uint8)
    region[:] = fill
    top, left, bottom, right = max(box.top, 0), max(box.left, 0), min(box.bottom, h), min(box.right, w)
    src = image[top:bottom, left:right]
    if background == "mean":
        src = np.where(mask[top:bottom, left:right, None] > 0, src, fill)
    region[top - box.top : bottom - box.top, left - box.left : right - box.left] = src
    scale = size / max(box.height, box.width)
    rh, rw = max(1, round(box.height * scale)), max(1, round(box.width * scale))
    resized = np.asarray(Image.fromarray(region).resize((rw, rh), Image.Resampling.BICUBIC))
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[:] = fill
    oy, ox = (size - rh) // 2, (size - rw) // 2
    out[oy : oy + rh, ox : ox + rw] = resized
    return out


def phrase_key(text: str) -> str:
    """The phrase as duplicates are compared: lower case, single spaces."""
    return " ".join(text.lower().split())


class CropProcessor:
    """RawSample -> its (crop, text) pairs: {"pixel_values" (k, 3, S, S) float32, "input_ids" (k, 77) int64,
    "phrases" [k str], "keys" [k str]}. Counters: crops_kept, crops_dropped/<reason>, samples_seen."""

    counter_names = ("samples_seen", "crops_kept")  # always reported by the loader (0 until counted)

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        policy: CropConfig,
        *,
        image_size: int,
        template: str = "{}",
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        random_flip: bool = False,
        subsample: bool = True,
    ):
        self.tokenizer = tokenizer
        self.policy = policy
        self.image_size = image_size
        self.template = template
        self.mean, self.std = tuple(mean), tuple(std)
        self.random_flip = random_flip
        self.subsample = subsample  # False (evaluation): every crop that passes, max_per_image ignored
        self._norm_mean = torch.tensor(self.mean).view(3, 1, 1)
        self._norm_std = torch.tensor(self.std).view(3, 1, 1)
        self._text_cache: dict[str, list[int]] = {}

    def text_ids(self, phrase: str) -> list[int]:
        ids = self._text_cache.get(phrase)
        if ids is None:
            ids = self.tokenizer(
                self.template.format(phrase), padding="max_length", max_length=77, truncation=True
            ).input_ids
            if len(self._text_cache) < 100_000:
                self._text_cache[phrase] = ids
        return ids

    def normalise(self, crop: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255.0
        return (x - self._norm_mean) / self._norm_std

    def __call__(self, raw: RawSample, rng: np.random.Generator, counters: Counters) -> dict:
        decisions = select_objects(raw.masks, self.policy)
        kept = [d for d in decisions if d.reason is None]
        for d in decisions:
            if d.reason is not None:
                counters[f"crops_dropped/{d.reason}"] += 1
        cap = self.policy.max_per_image
        if self.subsample and cap and len(kept) > cap:
            chosen = sorted(rng.choice(len(kept), size=cap, replace=False).tolist())
            counters["crops_dropped/max_per_image"] += len(kept) - cap
            kept = [kept[i] for i in chosen]
        pixels, ids, phrases, keys = [], [], [], []
        for n, d in enumerate(kept):
            box = context_box(d.box, raw.image.shape[:2], self.policy.margin, self.policy.square)
            mask = raw.masks[d.phrase_index] if d.mask is None else d.mask
            crop = cut_crop(raw.image, mask, box, self.image_size, mean=self.mean, background=self.policy.background)
            if self.random_flip and rng.random() < 0.5:
                crop = crop[:, ::-1]
            phrase = raw.phrases[d.phrase_index]
            pixels.append(self.normalise(crop))
            ids.append(self.text_ids(phrase))
            phrases.append(phrase)
            keys.append(f"{raw.key}/{d.phrase_index}" + (f".{n}" if d.mask is not None else ""))
        counters["crops_kept"] += len(kept)
        counters["samples_seen"] += 1
        if not pixels:
            return self.empty()
        return {
            "pixel_values": torch.stack(pixels),
            "input_ids": torch.tensor(ids, dtype=torch.int64),
            "phrases": phrases,
            "keys": keys,
        }

    def empty(self) -> dict:
        """The pairs of an image without a usable object."""
        s = self.image_size
        return {"pixel_values": torch.zeros(0, 3, s, s), "input_ids": torch.zeros(0, 77, dtype=torch.int64),
                "phrases": [], "keys": []}  # fmt: skip


def collate_crops(samples: list[dict]) -> dict:
    """Concatenate the pairs of several images; `labels` (N,) int64 numbers the distinct phrases of the batch."""
    phrases = [p for s in samples for p in s["phrases"]]
    ids: dict[str, int] = {}
    labels = [ids.setdefault(phrase_key(p), len(ids)) for p in phrases]
    return {
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "input_ids": torch.cat([s["input_ids"] for s in samples]),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "phrases": phrases,
        "keys": [k for s in samples for k in s["keys"]],
        "num_images": len(samples),
    }


def build_crop_loader(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    processor: CropProcessor,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    seed: int,
    start_step: int = 0,
) -> TrainLoader:
    """The training loader over `cfg`'s source (synthetic world or shards) yielding crop batches (collate_crops)."""
    from tcscale.data.loader import TrainLoader

    return TrainLoader(
        cfg, tokenizer, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size, seed=seed,
        start_step=start_step, processor=processor, collate_fn=collate_crops,
    )  # fmt: skip


def held_out_crops(
    processor: CropProcessor,
    *,
    source: str,
    num_images: int,
    max_crops: int,
    resolution: int,
    shards: str | None = None,
    synthetic_seed: int = 4321,
    max_objects: int = 3,
    min_objects: int = 1,
    phrase: str = "colour_shape",
    combos: str = "train",
) -> dict:
    """The evaluation crops (collate_crops of every crop of the first `num_images` held-out images, at most
    `max_crops`): the synthetic world with another seed rendered at `resolution`, or one ordered pass over `shards`.
    Deterministic (the processor should have random_flip=False, subsample=False)."""
    rng = np.random.default_rng(0)
    counters = Counters()
    if source == "synthetic":
        from tcscale.data.synthetic import SyntheticWorld

        world = SyntheticWorld(num_images, max_objects, synthetic_seed, phrase, combos, min_objects)
        raws = (
            RawSample(s.key, s.image, s.caption, s.phrases, s.masks, num_null=0)
            for s in (world.render(i, resolution) for i in range(num_images))
        )
    elif source == "webdataset":
        from tcscale.data.config import DataConfig
        from tcscale.data.loader import resolve_shards
        from tcscale.data.samples import SkipSample, decode_shard_sample

        urls = resolve_shards(DataConfig(source="webdataset", shards=shards))

        def decoded():
            import webdataset as wds

            for sample in wds.tariterators.tarfile_samples([{"url": u} for u in urls], handler=wds.warn_and_continue):
                try:
                    yield decode_shard_sample(sample)
                except SkipSample:
                    continue

        raws = itertools.islice(decoded(), num_images)
    else:
        raise ValueError(f"held-out crop source must be synthetic or webdataset, got {source!r}")
    parts, total = [], 0
    for raw in raws:
        part = processor(raw, rng, counters)
        parts.append(part)
        total += len(part["phrases"])
        if total >= max_crops:
            break
    batch = collate_crops(parts) if parts else collate_crops([processor.empty()])
    if len(batch["phrases"]) > max_crops:
        batch = {k: (v[:max_crops] if k != "num_images" else v) for k, v in batch.items()}
    return batch
