"""VISOR (Gokhale et al., "Benchmarking Spatial Relationships in Text-to-Image Generation", 2022).

Sources read (microsoft/VISOR): ``create_spatial_phrases.py`` (the SR2D prompt set),
``text2image_realtime_evaluate.ipynb`` (OWL-ViT detection and the per-image spatial check) and
``visor.py`` (the aggregate scores, the numbers of the paper's table). What they define:

* **Prompts (SR2D).** The 80 COCO categories; for each unordered pair (A, B) in
  ``itertools.combinations`` order and each relation R in ("to the left of", "to the right of",
  "above", "below"): "art(A) A R art(B) B" then "art(B) B R art(A) A" (so every ordered pair A ≠ B),
  then the two "A and B" prompts; the 80 single-object prompts at the end; ``unique_id`` counts
  through that order (31,680 prompts). The article comes from ``inflect`` ("an" before a vowel
  sound); for the COCO-80 names that is "an" exactly before a written vowel, which is the rule here.
  docs/DESIGN.md §8 uses the relation prompts only (25,280); ``visor_prompts`` keeps the official ids.
* **Detection.** OWL-ViT base-patch32, queries "a photo of a {obj}", detections with score > 0.1.
* **Per image.** An object is detected when any detection carries its label. The spatial check
  (``sra``) holds when *at least one* pair (box of A, box of B) has box centres in the relation
  (strict: x_A < x_B for "to the left of", x_A > x_B "to the right of", y_A < y_B "above" and
  y_A > y_B "below", image y growing downwards); so an object detected several times passes if any
  of its detections does.
* **Scores** (percent). OA = images with both objects / all images; VISOR_cond = images with both
  objects and the relation right / images with both objects; VISOR_uncond = images with both and the
  relation right / all images (= VISOR_cond × OA / 100, as ``visor.py`` computes it); VISOR_k =
  prompts with at least k of their images right (both objects and the relation) / all prompts,
  k = 1..4 (4 images per prompt). Also OA_A / OA_B, each object alone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real

COCO_CATEGORIES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip
"""The 80 COCO detection categories in COCO id order (the names VISOR and DAAM use)."""

RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
"""VISOR's four spatial relations, in the official order."""


def article(noun: str) -> str:
    """'an' before a written vowel, else 'a' (what inflect gives for every COCO-80 name)."""
    return "an" if noun[:1].lower() in "aeiou" else "a"


def visor_prompts(
    categories: Sequence[str] = COCO_CATEGORIES, *, include_and: bool = False, include_single: bool = False
) -> list[dict]:
    """The SR2D prompts with the official ``unique_id`` numbering.

    Returns ``[{"prompt_id", "prompt", "objects": [A, B], "relation"}]``; by default only the spatial
    prompts (docs/DESIGN.md §8). ``include_and`` adds the "A and B" prompts (relation "and"),
    ``include_single`` the single-object ones (relation "single", objects [A]). Ids are the official
    ones whatever is included (they count every kind), so they index ``text_spatial_rel_phrases.json``.
    """
    if len(set(categories)) != len(categories) or len(categories) < 2:
        raise ValueError("categories must be at least two distinct names")
    prompts: list[dict] = []
    uid = 0

    def add(objects: list[str], relation: str, text: str, keep: bool) -> None:
        nonlocal uid
        if keep:
            prompts.append({"prompt_id": uid, "prompt": text, "objects": objects, "relation": relation})
        uid += 1

    for a, b in itertools.combinations(categories, 2):
        for rel in RELATIONS:
            add([a, b], rel, f"{article(a)} {a} {rel} {article(b)} {b}", True)
            add([b, a], rel, f"{article(b)} {b} {rel} {article(a)} {a}", True)
        add([a, b], "and", f"{article(a)} {a} and {article(b)} {b}", include_and)
        add([b, a], "and", f"{article(b)} {b} and {article(a)} {a}", include_and)
    for a in categories:
        add([a], "single", f"{article(a)} {a}", include_single)
    return prompts


def relation_holds(relation: str, centre_a: Sequence[float], centre_b: Sequence[float]) -> bool:
    """Whether A's box centre (x, y) stands in ``relation`` to B's (pixels, y downwards; strict)."""
    dx, dy = centre_a[0] - centre_b[0], centre_a[1] - centre_b[1]
    if relation == "to the left of":
        return dx < 0
    if relation == "to the right of":
        return dx > 0
    if relation == "above":
        return dy < 0
    if relation == "below":
        return dy > 0
    raise ValueError(f"unknown VISOR relation {relation!r}; expected one of {list(RELATIONS)}")


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3]))


_KEYS = ("prompt_id", "round", "objects", "relation", "labels", "scores", "boxes")


def image_visor(record: Mapping, *, threshold: float = 0.1) -> dict[str, bool]:
    """Per-image VISOR outcome: ``{"A", "B", "both", "spatial"}`` (spatial = both and the relation holds)."""
    a, b = record["objects"]
    kept = [(lab, box) for lab, s, box in zip(record["labels"], record["scores"], record["boxes"]) if s > threshold]
    boxes_a = [_centre(box) for lab, box in kept if lab == a]
    boxes_b = [_centre(box) for lab, box in kept if lab == b]
    both = bool(boxes_a) and bool(boxes_b)
    spatial = both and any(relation_holds(record["relation"], ca, cb) for ca in boxes_a for cb in boxes_b)
    return {"A": bool(boxes_a), "B": bool(boxes_b), "both": both, "spatial": spatial}


def _check(i: int, rec: object) -> None:
    if not isinstance(rec, Mapping):
        raise ValueError(f"record {i} is a {type(rec).__name__}, expected a mapping with keys {list(_KEYS)}")
    for key in _KEYS:
        if key not in rec:
            raise ValueError(f"record {i} has no {key!r} (a VISOR record needs {list(_KEYS)})")
    if len(rec["objects"]) != 2:
        raise ValueError(f"record {i}: a VISOR prompt names two objects, got {rec['objects']!r}")
    if rec["relation"] not in RELATIONS:
        raise ValueError(f"record {i}: relation {rec['relation']!r} is not one of {list(RELATIONS)}")
    n = len(rec["labels"])
    if len(rec["scores"]) != n or len(rec["boxes"]) != n:
        raise ValueError(
            f"record {i}: {n} labels, {len(rec['scores'])} scores and {len(rec['boxes'])} boxes (must be equal)"
        )
    for s in rec["scores"]:
        if isinstance(s, bool) or not isinstance(s, Real) or not math.isfinite(float(s)):
            raise ValueError(f"record {i}: score {s!r} is not a finite number")
    for box in rec["boxes"]:
        if len(box) != 4:
            raise ValueError(f"record {i}: box {box!r} is not [x0, y0, x1, y1]")


def visor_scores(records: Iterable[Mapping], *, threshold: float = 0.1, num_images: int = 4) -> dict[str, float]:
    """VISOR scores in percent: ``{"OA", "OA_A", "OA_B", "cond", "uncond", "VISOR_1".."VISOR_<num_images>",
    "images", "prompts"}``.

    ``records``: one per image with ``prompt_id``, ``round``, ``objects`` [A, B], ``relation``,
    ``labels``, ``scores`` and ``boxes`` ([x0, y0, x1, y1] pixels). Detections count when
    score > ``threshold`` (default 0.1). ``cond`` is 0 when no image has both objects.
    """
    per_prompt: dict[object, int] = {}
    seen: set[tuple[object, object]] = set()
    n = both = spatial = hit_a = hit_b = 0
    for i, rec in enumerate(records):
        _check(i, rec)
        key = (rec["prompt_id"], rec["round"])
        if key in seen:
            raise ValueError(f"record {i}: (prompt_id={key[0]!r}, round={key[1]!r}) appears twice")
        seen.add(key)
        out = image_visor(rec, threshold=threshold)
        n += 1
        hit_a += out["A"]
        hit_b += out["B"]
        both += out["both"]
        spatial += out["spatial"]
        per_prompt[rec["prompt_id"]] = per_prompt.get(rec["prompt_id"], 0) + out["spatial"]
    if n == 0:
        raise ValueError("no VISOR records to score")
    scores = {
        "OA": 100.0 * both / n,
        "OA_A": 100.0 * hit_a / n,
        "OA_B": 100.0 * hit_b / n,
        "cond": 100.0 * spatial / both if both else 0.0,
        "uncond": 100.0 * spatial / n,
    }
    for k in range(1, num_images + 1):
        scores[f"VISOR_{k}"] = 100.0 * sum(c >= k for c in per_prompt.values()) / len(per_prompt)
    scores["images"] = float(n)
    scores["prompts"] = float(len(per_prompt))
    return scores


def visor_metrics(scores: Mapping[str, float], prefix: str = "visor") -> dict[str, float]:
    """Flat MLflow metrics: ``visor/OA``, ``visor/cond``, ``visor/uncond``, ``visor/VISOR_1`` ..."""
    return {f"{prefix}/{k}": float(v) for k, v in scores.items() if k not in ("images", "prompts")}


__all__ = [
    "COCO_CATEGORIES",
    "RELATIONS",
    "article",
    "visor_prompts",
    "relation_holds",
    "image_visor",
    "visor_scores",
    "visor_metrics",
]
