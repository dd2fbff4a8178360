"""Flickr30K Entities -> a COCO-captions-shaped file, so FID (F) samples its pairs as FID (C) does.

What a user has (the data cannot be downloaded here; it comes from the Flickr30K Entities release and the Flickr30K
image request form):

    <entities_dir>/train.txt, val.txt, test.txt       image ids of each split, one per line (val: 1,000 images)
    <entities_dir>/Sentences/<id>.txt                 five captions per image, phrases in brackets:
                                                      "[/EN#18/people A child] in [/EN#19/clothing a pink dress] ..."
      (or <entities_dir>/annotations/Sentences/, or <entities_dir>/annotations.zip holding Sentences/, as released)
    <entities_dir>/UNRELATED_CAPTIONS                 optional: "<image id> <caption number, 1-based>" per line
    <images_dir>/<id>.jpg                             the Flickr30K images

`flickr30k_captions(entities_dir, split)` reads the split's captions with the bracket markup removed (the words of
each phrase kept in place, as the release's own parser rebuilds a sentence) and drops the captions the release
lists as unrelated to their image; `write_flickr30k_captions` writes them as ``{"images": [{"id", "file_name"}],
"annotations": [{"id", "image_id", "caption"}]}`` (temporary name, then rename), the shape
`tcscale.eval.fid.sample_coco_captions` reads.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

SPLITS = ("train", "val", "test")
_PHRASE = re.compile(r"\[/EN#[^\s\]]*\s+([^\]]*)\]")


def strip_entities(sentence: str) -> str:
    """A Flickr30K Entities sentence without its phrase markup: "[/EN#18/people A child] runs ." -> "A child runs ."."""
    return " ".join(_PHRASE.sub(lambda m: m.group(1), sentence).split())


class _Sentences:
    """Sentences/<id>.txt from a folder or from the released annotations.zip."""

    def __init__(self, root: Path):
        for folder in (root / "Sentences", root / "annotations" / "Sentences"):
            if folder.is_dir():
                self.folder, self.zip = folder, None
                return
        if (root / "annotations.zip").is_file():
            self.folder, self.zip = None, zipfile.ZipFile(root / "annotations.zip")
            self.names = {Path(n).name: n for n in self.zip.namelist() if "/Sentences/" in f"/{n}"}
            return
        raise FileNotFoundError(f"{root}: no Sentences/ folder (nor annotations/Sentences/, nor annotations.zip)")

    def read(self, image_id: str) -> str | None:
        if self.folder is not None:
            path = self.folder / f"{image_id}.txt"
            return path.read_text(encoding="utf-8") if path.is_file() else None
        name = self.names.get(f"{image_id}.txt")
        return None if name is None else self.zip.read(name).decode("utf-8")


def flickr30k_captions(entities_dir: str | os.PathLike, split: str = "val") -> dict:
    """The split's images and captions as a COCO captions dict (module docstring); errors name the file."""
    root = Path(entities_dir)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split_file = root / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"Flickr30K Entities split list not found: {split_file}")
    ids = [line.strip() for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids or not all(i.isdigit() for i in ids):
        raise ValueError(f"{split_file}: expected one numeric image id per line")
    unrelated: set[tuple[str, int]] = set()
    flagged = root / "UNRELATED_CAPTIONS"
    if flagged.is_file():
        for line in flagged.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                unrelated.add((parts[0], int(parts[1])))
    sentences = _Sentences(root)
    images, annotations = [], []
    for image_id in ids:
        text = sentences.read(image_id)
        if text is None:
            raise FileNotFoundError(f"{root}: no Sentences/{image_id}.txt for image {image_id} of {split_file.name}")
        images.append({"id": int(image_id), "file_name": f"{image_id}.jpg"})
        lines = [line for line in text.splitlines() if line.strip()]
        for number, line in enumerate(lines, start=1):
            if (image_id, number) in unrelated:
                continue
            annotations.append({"id": int(image_id) * 10 + number, "image_id": int(image_id),
                                "caption": strip_entities(line)})  # fmt: skip
    return {"images": images, "annotations": annotations, "info": {"source": "Flickr30K Entities", "split": split}}


def write_flickr30k_captions(entities_dir: str | os.PathLike, split: str, out_path: str | os.PathLike) -> Path:
    """`flickr30k_captions` written to `out_path` (temporary name, then rename); returns the path."""
    out = Path(out_path)
    data = flickr30k_captions(entities_dir, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, out)
    return out


__all__ = ["SPLITS", "strip_entities", "flickr30k_captions", "write_flickr30k_captions"]
