"""Open-vocabulary detection over transformers: OWLv2 (MultiGen) and OWL-ViT (VISOR).

``OpenVocabDetector`` batches images with per-image category lists, turns each category into the
query "a photo of a {obj}" (docs/DESIGN.md §8), and returns, per image, the detections with score >
``threshold`` as plain lists: ``{"labels": [category, ...], "scores": [...], "boxes": [[x0, y0, x1,
y1], ...]}``, boxes in pixels of the input image as the processor's post-processing returns them (VISOR's code
uses them so; ``clip_boxes=True`` clips them to the image, which moves the centre of a box reaching past an
edge), best score first. An image with no detection gets empty lists (a miss, not an error).

Post-processing uses ``processor.post_process_grounded_object_detection`` — in transformers 4.57
the processors' ``post_process_object_detection`` is deprecated (FutureWarning, removed in v5) in
its favour, and the image processors' ``post_process`` likewise. It takes, per predicted box, the
best-scoring query, so the queries a processor adds to pad a batch (" ", which are *not* masked by
the model) are masked here first: their logits are set to the dtype's minimum. OWLv2 pads images to
a square before resizing; its post-processing scales boxes by the longer side, so the target size
is simply each image's (height, width).

Models load with ``from_pretrained`` from a hub id (which must already be in the local Hugging Face
cache: there is no model hub on the development machines) or a local directory written by
``save_pretrained``; a local path that does not exist is one FileNotFoundError naming it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tcscale.eval.multigen import QUERY_TEMPLATE

DEFAULT_OWLV2 = "google/owlv2-large-patch14-ensemble"
DEFAULT_OWLVIT = "google/owlvit-base-patch32"
KINDS = ("owlv2", "owlvit")


def resolve_pretrained(id_or_dir: str | os.PathLike) -> str:
    """A local directory (checked to exist) or a hub id ("org/name") for ``from_pretrained``.

    Anything that is not of the form "org/name" — an absolute path, "./x", "~/x", "a/b/c" — is taken
    as a local directory, and a missing one raises FileNotFoundError naming the path.
    """
    text = os.fspath(id_or_dir)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"model path is a file, not a save_pretrained directory: {path}")
        return str(path)
    parts = text.split("/")
    is_hub_id = len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not path.is_absolute()
    if not is_hub_id:
        raise FileNotFoundError(f"model directory not found: {path}")
    return text


def load_pretrained(cls: type, id_or_dir: str | os.PathLike, what: str, **kwargs) -> Any:
    """``cls.from_pretrained`` with one clear error when neither a local directory nor the cache has it."""
    source = resolve_pretrained(id_or_dir)
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as err:
        where = "the directory" if Path(source).exists() else "the local Hugging Face cache (no model hub here)"
        raise OSError(f"could not load the {what} from {source!r}: not found in {where} ({err})") from err


def model_type(id_or_dir: str | os.PathLike) -> str | None:
    """The ``model_type`` of a checkpoint's config.json (read directly: AutoConfig guesses from the path's name)."""
    from transformers import PretrainedConfig

    source = resolve_pretrained(id_or_dir)
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {source}")
    try:
        config, _ = PretrainedConfig.get_config_dict(source)
    except OSError as err:
        raise OSError(f"could not read the config of {source!r}: not in the local Hugging Face cache ({err})") from err
    return config.get("model_type")


def _to_pil(image: Image.Image | np.ndarray, i: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image {i} must be a PIL image or uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


class OpenVocabDetector:
    """OWLv2 / OWL-ViT detector with per-image category lists.

    Args:
        model: an ``Owlv2ForObjectDetection`` or ``OwlViTForObjectDetection``.
        processor: the matching ``Owlv2Processor`` / ``OwlViTProcessor``.
        threshold: keep detections with score > threshold (default 0.1, MultiGen and VISOR).
        query_template: text query per category (default "a photo of a {}").
        batch_size: images per forward pass (default 8).
        device: torch device (default "cpu").
        clip_boxes: clip boxes to the image (default False: as returned, as VISOR's code uses them).
    """

    def __init__(
        self,
        model,
        processor,
        *,
        threshold: float = 0.1,
        query_template: str = QUERY_TEMPLATE,
        batch_size: int = 8,
        device: str = "cpu",
        clip_boxes: bool = False,
    ):
        kind = getattr(model.config, "model_type", None)
        if kind not in KINDS:
            raise ValueError(f"expected an OWLv2 or OWL-ViT model, got model_type {kind!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if "{}" not in query_template:
            raise ValueError(f"query_template must contain '{{}}' for the category, got {query_template!r}")
        self.kind = kind
        self.model = model.to(device).eval()
        self.processor = processor
        self.threshold = threshold
        self.query_template = query_template
        self.batch_size = batch_size
        self.device = device
        self.clip_boxes = clip_boxes

    @classmethod
    def from_pretrained(cls, id_or_dir: str | os.PathLike, *, kind: str | None = None, **kwargs) -> OpenVocabDetector:
        """Load model and processor from one hub id or ``save_pretrained`` directory.

        ``kind`` ("owlv2" / "owlvit") picks the classes; by default it is read from the config.
        """
        from transformers import Owlv2ForObjectDetection, Owlv2Processor, OwlViTForObjectDetection, OwlViTProcessor

        if kind is None:
            kind = model_type(id_or_dir)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        if kind == "owlv2":
            model_cls, proc_cls = Owlv2ForObjectDetection, Owlv2Processor
        else:
            model_cls, proc_cls = OwlViTForObjectDetection, OwlViTProcessor
        model = load_pretrained(model_cls, id_or_dir, f"{kind} detector")
        # The slow (PIL/numpy) image processor: the preprocessing the official evaluations ran; the fast one
        # differs slightly, and transformers would otherwise pick it by default in later versions.
        processor = load_pretrained(proc_cls, id_or_dir, f"{kind} processor", use_fast=False)
        return cls(model, processor, **kwargs)

    def __call__(
        self, images: Sequence[Image.Image | np.ndarray], categories: Sequence[Sequence[str]]
    ) -> list[dict[str, list]]:
        """Detect ``categories[i]`` in ``images[i]``; returns per image {"labels", "scores", "boxes"}."""
        if len(images) != len(categories):
            raise ValueError(f"{len(images)} images but {len(categories)} category lists")
        out: list[dict[str, list]] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(
                self._detect_batch(
                    [_to_pil(im, start + j) for j, im in enumerate(images[start : start + self.batch_size])],
                    [list(c) for c in categories[start : start + self.batch_size]],
                )
            )
        return out

    def _detect_batch(self, images: list[Image.Image], categories: list[list[str]]) -> list[dict[str, list]]:
        import torch

        n_max = max(len(c) for c in categories)
        if n_max == 0:
            return [{"labels": [], "scores": [], "boxes": []} for _ in images]
        queries = [[self.query_template.format(c) for c in cats] or [" "] for cats in categories]
        inputs = self.processor(text=queries, images=images, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        logits = outputs.logits  # (B, boxes, n_max): queries padded to the longest list
        for b, cats in enumerate(categories):
            logits[b, :, len(cats) :] = torch.finfo(logits.dtype).min
        labels = [cats + [""] * (n_max - len(cats)) for cats in categories]
        sizes = [(im.height, im.width) for im in images]
        results = self.processor.post_process_grounded_object_detection(
            outputs=outputs, threshold=self.threshold, target_sizes=sizes, text_labels=labels
        )
        out = []
        for (h, w), res in zip(sizes, results):
            scores = res["scores"].float().cpu().numpy()
            boxes = res["boxes"].float().cpu().numpy().reshape(-1, 4)
            if self.clip_boxes:
                boxes = np.clip(boxes, 0, [w, h, w, h])
            order = np.argsort(-scores, kind="stable")
            out.append(
                {
                    "labels": [res["text_labels"][k] for k in order],
                    "scores": [float(scores[k]) for k in order],
                    "boxes": [[float(v) for v in boxes[k]] for k in order],
                }
            )
        return out


def load_owlv2(id_or_dir: str | os.PathLike = DEFAULT_OWLV2, **kwargs) -> OpenVocabDetector:
    """The MultiGen detector (default ``google/owlv2-large-patch14-ensemble``); kwargs as OpenVocabDetector."""
    return OpenVocabDetector.from_pretrained(id_or_dir, kind="owlv2", **kwargs)


def load_owlvit(id_or_dir: str | os.PathLike = DEFAULT_OWLVIT, **kwargs) -> OpenVocabDetector:
    """The VISOR detector (default ``google/owlvit-base-patch32``); kwargs as OpenVocabDetector."""
    return OpenVocabDetector.from_pretrained(id_or_dir, kind="owlvit", **kwargs)


__all__ = [
    "DEFAULT_OWLV2",
    "DEFAULT_OWLVIT",
    "OpenVocabDetector",
    "load_owlv2",
    "load_owlvit",
    "load_pretrained",
    "model_type",
    "resolve_pretrained",
]
