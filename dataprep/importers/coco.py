"""COCO instance annotations as a grounding source: GT masks of the categories a caption names.

For each image with instance annotations, a caption (from a COCO captions file, or composed from
the categories when none is given) is scanned for the image's category names — and a few common
synonyms and plurals ("man"/"people" for person, "bike" for bicycle, "dogs" for dog). Each match
becomes a phrase whose text is the caption's own words (so it aligns to the caption's tokens) and
whose mask is the union of that category's instances (pycocotools `annToMask`, crowd RLEs included).
With `captions="best"` (default) the caption naming the most categories is kept; `"all"` writes
one record per caption.

    python -m dataprep.importers.coco --instances annotations/instances_train2017.json \
        --captions annotations/captions_train2017.json --images train2017 --out data/coco
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from dataprep.record import GroundedRecord
from dataprep.writer import write_shards

SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "person",
        "people",
        "man",
        "men",
        "woman",
        "women",
        "boy",
        "boys",
        "girl",
        "girls",
        "child",
        "children",
        "kid",
        "kids",
        "guy",
        "lady",
        "player",
        "skier",
        "surfer",
        "skateboarder",
    ),
    "bicycle": ("bicycle", "bike"),
    "motorcycle": ("motorcycle", "motorbike", "motor bike"),
    "airplane": ("airplane", "plane", "jet", "aircraft"),
    "couch": ("couch", "sofa"),
    "tv": ("tv", "television"),
    "cell phone": ("cell phone", "phone", "cellphone"),
    "dining table": ("dining table", "table"),
    "potted plant": ("potted plant", "plant"),
    "sports ball": ("ball",),
    "hair drier": ("hair drier", "hair dryer"),
    "laptop": ("laptop", "computer"),
    "cup": ("cup", "mug"),
    "car": ("car", "cars"),
}
PROVENANCE = {"importer": "coco_instances", "detector": None, "segmenter": "COCO ground-truth instance masks"}


def _plural(word: str) -> list[str]:
    if word.endswith(("s", "x", "ch", "sh")):
        return [word, word + "es"]
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return [word, word[:-1] + "ies"]
    if word.endswith("fe"):
        return [word, word[:-2] + "ves"]
    if word.endswith("f"):
        return [word, word[:-1] + "ves"]
    return [word, word + "s"]


def category_patterns(name: str) -> re.Pattern:
    """Whole-word, case-insensitive pattern for a category's names (synonyms, plural of the last word)."""
    forms = []
    for base in SYNONYMS.get(name, (name,)):
        words = base.split()
        forms += [" ".join(words[:-1] + [last]) for last in _plural(words[-1])]
    forms = sorted(set(forms), key=len, reverse=True)  # longest first: "dining table" before "table"
    return re.compile(r"\b(" + "|".join(re.escape(f).replace(r"\ ", r"\s+") for f in forms) + r")\b", re.IGNORECASE)


def compose_caption(names: list[str]) -> str:
    arts = [f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in names]
    return "a photo of " + (arts[0] if len(arts) == 1 else ", ".join(arts[:-1]) + " and " + arts[-1])


class CocoGrounding:
    """Callable for `write_shards`: items are (image_id, caption or None, caption_id) tuples."""

    def __init__(self, instances: str | Path, image_root: str | Path, captions: str | Path | None = None):
        self.coco = COCO(str(instances))
        self.image_root = Path(image_root)
        self.captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
        if captions is not None:
            caps = COCO(str(captions))
            for ann in caps.dataset.get("annotations", []):
                self.captions[ann["image_id"]].append((ann["id"], ann["caption"].strip()))
        self.patterns = {cid: category_patterns(c["name"]) for cid, c in self.coco.cats.items()}

    def _categories(self, image_id: int) -> dict[int, list[dict]]:
        by_cat: dict[int, list[dict]] = defaultdict(list)
        for ann in self.coco.imgToAnns.get(image_id, []):
            by_cat[ann["category_id"]].append(ann)
        return by_cat

    def phrases_in(self, caption: str, cat_ids) -> list[tuple[int, str, int]]:
        """(category id, caption words, char position) for each category named in the caption, in caption order."""
        found, taken = [], []
        for cid in cat_ids:
            for m in self.patterns[cid].finditer(caption):
                if any(m.start() < e and s < m.end() for s, e in taken):
                    continue  # these words already ground another category
                found.append((cid, m.group(0), m.start()))
                taken.append((m.start(), m.end()))
                break
        return sorted(found, key=lambda f: f[2])

    def items(self, captions: str = "best") -> list[tuple[int, str | None, int | None]]:
        out = []
        for image_id in sorted(self.coco.imgs):
            cats = self._categories(image_id)
            if not cats:
                continue
            caps = self.captions.get(image_id, [])
            if not caps:
                out.append((image_id, None, None))
            elif captions == "all":
                out += [(image_id, text, cap_id) for cap_id, text in caps]
            else:
                best = max(caps, key=lambda c: len(self.phrases_in(c[1], cats)))
                out.append((image_id, best[1], best[0]))
        return out

    def record(self, item: tuple[int, str | None, int | None]) -> GroundedRecord | None:
        image_id, caption, cap_id = item
        info = self.coco.imgs[image_id]
        by_cat = self._categories(image_id)
        if caption is None:
            names = [self.coco.cats[c]["name"] for c in sorted(by_cat)]
            caption = compose_caption(names)
        try:
            data = (self.image_root / info["file_name"]).read_bytes()
        except OSError as exc:
            print(f"coco import: image {image_id} ({info['file_name']}) skipped: {exc}")
            return None
        phrases, masks = [], []
        for cid, words, _ in self.phrases_in(caption, by_cat):
            union = np.zeros((info["height"], info["width"]), dtype=np.uint8)
            for ann in by_cat[cid]:
                union |= self.coco.annToMask(ann).astype(np.uint8)
            phrases.append(words)
            masks.append(union)
        key = f"{image_id:012d}" + (f"_{cap_id}" if cap_id is not None else "")
        return GroundedRecord(
            key=key,
            image=data,
            caption=caption,
            phrases=phrases,
            masks=masks,
            source={"dataset": "coco", "image_id": image_id, "file_name": info["file_name"], "caption_id": cap_id},
            provenance=dict(PROVENANCE),
        )

    def __call__(self, items: Sequence[tuple]) -> Iterator[GroundedRecord | None]:
        for item in items:
            yield self.record(item)


def import_coco(
    instances: str | Path,
    image_root: str | Path,
    out: str | Path,
    *,
    captions: str | Path | None = None,
    caption_mode: str = "best",
    samples_per_shard: int = 1000,
    prefix: str = "coco",
    progress: bool = True,
) -> dict:
    if caption_mode not in ("best", "all"):
        raise ValueError(f"caption_mode must be 'best' or 'all', got {caption_mode!r}")
    grounding = CocoGrounding(instances, image_root, captions)
    return write_shards(
        grounding.items(caption_mode),
        grounding,
        out,
        prefix=prefix,
        samples_per_shard=samples_per_shard,
        progress=progress,
        run_info={"importer": "coco", "instances": str(instances), "captions": str(captions), "mode": caption_mode},
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", required=True, help="instances_*.json")
    ap.add_argument("--images", required=True, help="image folder")
    ap.add_argument("--captions", default=None, help="captions_*.json (default: captions composed from categories)")
    ap.add_argument("--caption-mode", choices=["best", "all"], default="best")
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--prefix", default="coco")
    args = ap.parse_args(argv)
    s = import_coco(
        args.instances,
        args.images,
        args.out,
        captions=args.captions,
        caption_mode=args.caption_mode,
        samples_per_shard=args.samples_per_shard,
        prefix=args.prefix,
    )
    print(f"{s['samples']} samples, {s['phrases']} phrases: {s['shards']}")


if __name__ == "__main__":
    main()
