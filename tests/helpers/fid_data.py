"""Small stand-ins for the FID data a user downloads: a COCO captions file with its images, a Flickr30K Entities
folder with its images (random pixels; the layouts and file formats are the real ones)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def fake_coco(root: Path, n_images: int = 8, captions_per_image: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """(captions json, images dir) shaped like COCO's captions_val2017.json and val2017/."""
    images = root / "val2017"
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    coco = {"images": [], "annotations": []}
    for i in range(n_images):
        name = f"{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / name)
        coco["images"].append({"id": i, "file_name": name})
        coco["annotations"] += [
            {"id": 10 * i + j, "image_id": i, "caption": f"a photo {i} {j}"} for j in range(captions_per_image)
        ]
    captions = root / "captions_val2017.json"
    captions.write_text(json.dumps(coco))
    return captions, images


def fake_flickr30k(root: Path, ids: tuple[int, ...] = (101, 102, 103), seed: int = 1) -> tuple[Path, Path]:
    """(Flickr30K Entities dir with val.txt and Sentences/, images dir of <id>.jpg)."""
    entities, images = root / "flickr30k_entities", root / "flickr30k-images"
    (entities / "Sentences").mkdir(parents=True)
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    (entities / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    for i in ids:
        (entities / "Sentences" / f"{i}.txt").write_text(f"[/EN#1/people A man] in photo {i} .\nA dog {i} .\n")
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
    return entities, images
