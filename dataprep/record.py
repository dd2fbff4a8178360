"""The in-memory grounded sample every dataprep stage hands to the shard writer.

A `GroundedRecord` is one image with one caption and its phrases; each phrase either has a binary
mask at the image's full resolution or None (the grounding found nothing). The shard writer
(`dataprep.writer`) turns it into the docs/DESIGN.md §5 contract:

    KEY.jpg        the original image (JPEG bytes passed through untouched, anything else encoded once)
    KEY.json       {"caption", "phrases": [{"text", "mask": index | null}], "source", "provenance",
                    "width", "height", "num_masks", "mask_format"}
    KEY.masks.npz  the non-null masks stacked P x H x W in phrase order, row p = mask index p
                   (bit-packed along W by default; see `dataprep.writer.encode_masks`)

Masks are named by index, never by noun text.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

# WebDataset splits a tar member name at the first dot of its basename: keys must not contain dots or slashes.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class RecordError(ValueError):
    """A record is inconsistent (message names the key and the field)."""


@dataclass
class GroundedRecord:
    """One grounded sample, as a stage produces it.

    Attributes:
        key: unique sample key inside the dataset: letters, digits, '_' and '-' only (no dots).
        image: PIL image, HxWx3 uint8 array, or encoded image bytes (JPEG bytes are stored as they are).
        caption: the caption the phrases come from.
        phrases: phrase texts (nouns / noun runs) as they appear in the caption.
        masks: one entry per phrase: HxW bool/uint8 array (nonzero = object) at the image's size, or None.
        source: where the sample comes from, e.g. {"dataset": "coco2017", "image_id": 142, "caption_id": 7}.
        provenance: how the masks were made, e.g. {"detector": "GroundingDINO-SwinT-OGC", "segmenter":
            "SAM-HQ vit_h", "box_threshold": 0.35, "text_threshold": 0.25, "caption_model": "..."}.
    """

    key: str
    image: Image.Image | np.ndarray | bytes
    caption: str
    phrases: list[str]
    masks: list[np.ndarray | None]
    source: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def image_size(self) -> tuple[int, int]:
        """(height, width) of the image (reads only the header of encoded bytes)."""
        if isinstance(self.image, Image.Image):
            return self.image.height, self.image.width
        if isinstance(self.image, np.ndarray):
            return int(self.image.shape[0]), int(self.image.shape[1])
        with Image.open(io.BytesIO(self.image)) as im:
            return im.height, im.width

    def validate(self) -> None:
        """Raise RecordError naming the key and the field if the record breaks the contract."""
        if not isinstance(self.key, str) or not _KEY_RE.match(self.key):
            raise RecordError(f"record key {self.key!r}: only letters, digits, '_' and '-' are allowed (no dots)")
        if not isinstance(self.caption, str) or not self.caption.strip():
            raise RecordError(f"record {self.key}: caption is empty")
        if len(self.phrases) != len(self.masks):
            raise RecordError(f"record {self.key}: {len(self.phrases)} phrases but {len(self.masks)} masks")
        if isinstance(self.image, np.ndarray) and (
            self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8
        ):
            raise RecordError(
                f"record {self.key}: image array must be HxWx3 uint8, got {self.image.shape} {self.image.dtype}"
            )
        try:
            hw = self.image_size()
        except Exception as exc:  # noqa: BLE001 - any decoder error means the bytes are not an image
            raise RecordError(f"record {self.key}: image cannot be read: {exc}") from exc
        for text, mask in zip(self.phrases, self.masks):
            if not isinstance(text, str) or not text.strip():
                raise RecordError(f"record {self.key}: empty phrase text")
            if mask is None:
                continue
            if not isinstance(mask, np.ndarray) or mask.ndim != 2:
                raise RecordError(f"record {self.key}: mask of phrase {text!r} must be a 2-D array")
            if tuple(mask.shape) != hw:
                raise RecordError(
                    f"record {self.key}: mask of phrase {text!r} is {tuple(mask.shape)}, image is {hw} (H, W)"
                )
