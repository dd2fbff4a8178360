"""Glue shared by the dataprep stages: items, jsonl I/O with atomic writes, images, devices, batching."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

T = TypeVar("T")

# An item is one image moving through the stages, as a plain JSON object:
#   {"id": str, "image": absolute path, "captions": [str, ...]}          input
#   + "caption": str, "caption_scores": [float, ...] | None             after caption choice
#   + "phrases": [str, ...]                                             after noun phrases
#   + "grounding": {"masks": npz path, "mask_index": [int | None, ...], "num_boxes": int, ...}  after grounding
Item = dict[str, Any]


class StageError(RuntimeError):
    """A stage cannot process an item or a file (the message names the item id or the path)."""


def read_jsonl(path: str | os.PathLike) -> list[Item]:
    """Read a jsonl file; a malformed line is a StageError naming the file and line number."""
    path = Path(path)
    items: list[Item] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
            if not isinstance(obj, dict):
                raise StageError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            items.append(obj)
    return items


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: a killed job never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl_atomic(path: str | os.PathLike, items: Iterable[Item]) -> None:
    """Write items as jsonl through a temp file + rename."""
    data = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items).encode("utf-8")
    atomic_write_bytes(path, data)


def save_npz_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """np.savez_compressed through a temp file + rename."""
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_rgb(path: str | os.PathLike, item_id: str) -> Image.Image:
    """Decode an image as RGB in its stored orientation (no EXIF rotation: the shard keeps the original bytes,
    and the loader decodes them the same way, so masks stay aligned)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder error is reported with the item
        raise StageError(f"item {item_id}: cannot read image {path}: {exc}") from exc


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu; anything else is passed to torch.device (e.g. 'cuda:1')."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StageError(f"config 'device' is {device!r} but no CUDA device is available")
    return dev


def batched(seq: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most `size` elements."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def require_keys(item: Item, keys: Sequence[str], stage: str) -> None:
    """StageError naming the item and the missing key if an upstream stage's field is absent."""
    for key in keys:
        if key not in item:
            item_id = item.get("id", "?")
            raise StageError(f"item {item_id}: stage {stage!r} needs field {key!r} (run the previous stage)")
