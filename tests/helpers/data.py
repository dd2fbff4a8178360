"""Tiny grounded-data fixtures built on the fly from scikit-image's bundled photos (no binary files).

* `make_tokencompose_dir(root)`: the official TokenCompose layout (metadata.jsonl, images, seg/ PNG masks).
* `make_coco_dir(root)`: a COCO-style instances + captions json with polygon masks and the images.
* `records(...)`: GroundedRecords with known masks (rectangles) on real photos.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from dataprep.record import GroundedRecord


def photo(name: str) -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def rect_mask(h: int, w: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[top:bottom, left:right] = 1
    return m


# (photo, caption, [(phrase, (top, left, bottom, right) as fractions or None)])
PHOTO_SAMPLES = [
    (
        "chelsea",
        "A Cat lying on a blanket next to a wine glass.",
        [("Cat", (0.1, 0.2, 0.9, 0.7)), ("blanket", None), ("wine glass", (0.0, 0.8, 0.3, 1.0))],
    ),
    (
        "coffee",
        "A coffee cup on a saucer beside a chest of drawers.",
        [
            ("coffee cup", (0.2, 0.2, 0.8, 0.8)),
            ("saucer", (0.7, 0.1, 0.95, 0.9)),
            ("chest of drawers", (0.0, 0.0, 0.2, 0.3)),
        ],
    ),
    (
        "rocket",
        "A rocket on the launch pad under a blue sky.",
        [("rocket", (0.05, 0.4, 0.9, 0.6)), ("pad", (0.85, 0.1, 1.0, 0.9)), ("sky", None)],
    ),
    (
        "astronaut",
        "An astronaut holding a helmet in front of a flag.",
        [("astronaut", (0.0, 0.1, 1.0, 0.8)), ("helmet", (0.5, 0.6, 0.9, 0.95)), ("flag", (0.0, 0.0, 0.3, 0.2))],
    ),
]


def _frac_rect(h: int, w: int, box) -> np.ndarray:
    t, left, b, r = box
    return rect_mask(h, w, int(t * h), int(left * w), int(b * h), int(r * w))


def records(n: int, prefix: str = "photo") -> list[GroundedRecord]:
    """n records cycling over the photo samples (keys prefix_0000...), masks as fractional rectangles."""
    out = []
    for i in range(n):
        name, caption, phrases = PHOTO_SAMPLES[i % len(PHOTO_SAMPLES)]
        img = photo(name)
        h, w = img.shape[:2]
        out.append(
            GroundedRecord(
                key=f"{prefix}_{i:04d}",
                image=img,
                caption=caption,
                phrases=[p for p, _ in phrases],
                masks=[None if box is None else _frac_rect(h, w, box) for _, box in phrases],
                source={"dataset": "fixture", "photo": name, "index": i},
                provenance={"detector": "fixture", "segmenter": "fixture"},
            )
        )
    return out


def make_tokencompose_dir(root: str | Path, copies: int = 2) -> Path:
    """The official layout: root/metadata.jsonl, root/<file_name>.jpg, root/seg/<stem>/mask_<stem>_<phrase>.png."""
    root = Path(root)
    (root / "seg").mkdir(parents=True, exist_ok=True)
    lines = []
    for c in range(copies):
        for j, (name, caption, phrases) in enumerate(PHOTO_SAMPLES):
            img = photo(name)
            h, w = img.shape[:2]
            stem = f"{c * 1000 + j:012d}"
            Image.fromarray(img).save(root / f"{stem}.jpg", quality=90)
            attn = []
            for text, box in phrases:
                if box is None:
                    attn.append([text, None])
                    continue
                rel = f"seg/{stem}/mask_{stem}_{text.replace(' ', '_')}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_frac_rect(h, w, box) * 255).save(root / rel)
                attn.append([text, rel])
            lines.append(json.dumps({"file_name": f"{stem}.jpg", "text": caption, "attn_list": attn}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root / "metadata.jsonl"


def make_coco_dir(root: str | Path) -> tuple[Path, Path, Path]:
    """(instances json, captions json, image folder) for 3 photos: cat, cup, person (polygon masks)."""
    root = Path(root)
    images = root / "train"
    images.mkdir(parents=True, exist_ok=True)
    cats = [
        {"id": 17, "name": "cat", "supercategory": "animal"},
        {"id": 47, "name": "cup", "supercategory": "kitchen"},
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 62, "name": "chair", "supercategory": "f"},
    ]
    specs = [
        (1, "chelsea", [(17, (0.1, 0.2, 0.9, 0.7))], ["A cat lying on a blanket.", "A sleepy kitten."]),
        (2, "coffee", [(47, (0.2, 0.2, 0.8, 0.8)), (47, (0.0, 0.85, 0.1, 1.0))], ["Two cups of coffee on a table."]),
        (3, "astronaut", [(1, (0.0, 0.1, 1.0, 0.8)), (62, (0.6, 0.0, 1.0, 0.1))], ["A woman in a space suit."]),
    ]
    imgs, anns, caps = [], [], []
    for image_id, name, objs, texts in specs:
        img = photo(name)
        h, w = img.shape[:2]
        fname = f"{image_id:012d}.jpg"
        Image.fromarray(img).save(images / fname, quality=90)
        imgs.append({"id": image_id, "file_name": fname, "height": h, "width": w})
        for cat_id, (t, left, b, r) in objs:
            x0, y0, x1, y1 = left * w, t * h, r * w, b * h
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat_id,
                    "iscrowd": 0,
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                    "area": (x1 - x0) * (y1 - y0),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                }
            )
        for text in texts:
            caps.append({"id": 100 + len(caps), "image_id": image_id, "caption": text})
    inst = root / "instances_fixture.json"
    inst.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    capf = root / "captions_fixture.json"
    capf.write_text(json.dumps({"images": imgs, "annotations": caps}))
    return inst, capf, images
