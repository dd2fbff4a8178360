"""MultiGen (TokenCompose, Wang et al. CVPR 2024): multi-category instance composition scores.

Scoring is a pure function of stored detections (docs/DESIGN.md §4, the official ``gen_multigen_scores.py``):

* a prompt category is *present* in an image when some detection with that label has
  score > ``threshold`` (strict; default 0.1);
* an image's *count* is the number of distinct present categories of its prompt (a category detected
  twice counts once; a label that is not one of the prompt's categories is ignored);
* ``MG_k`` mean = 100 × (images with count ≥ k) / (all images), for k = 1..``num_objects``;
* ``MG_k`` std = population standard deviation (ddof = 0) over rounds (image slots 0..R−1) of the
  per-round percentage 100 × (round-r images with count ≥ k) / (round-r images).

Two deliberate readings of the official script, which assumes every prompt has all its rounds: the
per-round percentage divides by the images *of that round* (the official divides by images / R, the
same number when rounds are complete), and the rounds are those present in the records (the official
also counts empty slots up to ``img_per_prompt`` as 0 %). The count uses every category in a record's
``objects`` (the official takes the first ``num_ins``; the shipped prompt files have exactly 5).

Prompt files: ``coco_obj_comp_5_1k.json`` / ``ade20k_obj_comp_5_1k.json``, lists of
``{unique_id, num_objects, obj_1_attributes: [name], ..., text}``; detector queries are
"a photo of a {obj}" (docs/DESIGN.md §8, the official ``gen_json_dist.py``; its article is always "a").
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path

import numpy as np

QUERY_TEMPLATE = "a photo of a {}"
"""Detector text query per category (official MultiGen and VISOR detection code)."""

_RECORD_KEYS = ("prompt_id", "round", "objects", "labels", "scores")


def detector_queries(objects: Sequence[str]) -> list[str]:
    """Detector text queries for a prompt's categories: ``["a photo of a book", ...]``."""
    return [QUERY_TEMPLATE.format(obj) for obj in objects]


def _check_record(i: int, rec: object) -> tuple[object, int, list[str], list[str], list[float]]:
    if not isinstance(rec, Mapping):
        raise ValueError(f"record {i} is a {type(rec).__name__}, expected a mapping with keys {list(_RECORD_KEYS)}")
    for key in _RECORD_KEYS:
        if key not in rec:
            raise ValueError(f"record {i} has no {key!r} (a MultiGen record needs {list(_RECORD_KEYS)})")
    rnd = rec["round"]
    if isinstance(rnd, bool) or not isinstance(rnd, Integral) or rnd < 0:
        raise ValueError(f"record {i}: 'round' must be an integer >= 0 (the 0-based image slot), got {rnd!r}")
    objects, labels, scores = rec["objects"], rec["labels"], rec["scores"]
    for key, value in (("objects", objects), ("labels", labels), ("scores", scores)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ValueError(f"record {i}: {key!r} must be a list, got {type(value).__name__}")
    objects, labels, scores = list(objects), list(labels), list(scores)
    if not objects:
        raise ValueError(f"record {i}: 'objects' is empty (a prompt names at least one category)")
    for key, values in (("objects", objects), ("labels", labels)):
        try:
            set(values)
        except TypeError as err:
            raise ValueError(f"record {i}: {key!r} must hold category names, got {values!r}") from err
    where = f"record {i} (prompt_id={rec['prompt_id']!r}, round={rnd})"
    if len(labels) != len(scores):
        raise ValueError(f"{where}: {len(labels)} labels but {len(scores)} scores")
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, Real) or not math.isfinite(float(s)):
            raise ValueError(f"{where}: score {s!r} is not a finite number")
    return rec["prompt_id"], int(rnd), objects, labels, [float(s) for s in scores]


def _present(objects: list[str], labels: list[str], scores: list[float], threshold: float) -> set[str]:
    """Distinct prompt categories with a detection of score > threshold."""
    detected = {label for label, score in zip(labels, scores) if score > threshold}
    return detected & set(objects)


def _parse(records: Iterable[Mapping]) -> list[tuple[object, int, list[str], list[str], list[float]]]:
    parsed, seen = [], {}
    for i, rec in enumerate(records):
        item = _check_record(i, rec)
        key = (item[0], item[1])
        try:
            first = seen.setdefault(key, i)
        except TypeError as err:
            raise ValueError(f"record {i}: prompt_id {item[0]!r} is not hashable") from err
        if first != i:
            raise ValueError(f"records {first} and {i} are both (prompt_id={item[0]!r}, round={item[1]})")
        parsed.append(item)
    if not parsed:
        raise ValueError("no MultiGen records to score")
    return parsed


def multigen_scores(
    records: Iterable[Mapping], *, threshold: float = 0.1, num_objects: int = 5
) -> dict[str, dict[str, float]]:
    """MultiGen MG_1..MG_num_objects in percent: ``{"MG1": {"mean", "std"}, ..., "MG5": {...}}``.

    Args:
        records: one mapping per image with ``prompt_id``, ``round`` (0-based image slot),
            ``objects`` (the prompt's categories), ``labels`` and ``scores`` (its detections).
        threshold: a detection counts when its score is strictly greater (default 0.1).
        num_objects: how many MG_k to report (default 5).

    Raises:
        ValueError: a record lacks a key (the message names the key and the record index), labels and
            scores differ in length, a (prompt_id, round) pair repeats, or there are no records.
    """
    if isinstance(num_objects, bool) or not isinstance(num_objects, Integral) or num_objects < 1:
        raise ValueError(f"num_objects must be a positive integer, got {num_objects!r}")
    parsed = _parse(records)
    counts = np.array([len(_present(objs, labels, scores, threshold)) for _, _, objs, labels, scores in parsed])
    rounds = np.array([rnd for _, rnd, *_ in parsed])
    round_ids = np.unique(rounds)
    out: dict[str, dict[str, float]] = {}
    for k in range(1, int(num_objects) + 1):
        hit = counts >= k
        per_round = np.array([100.0 * hit[rounds == r].mean() for r in round_ids])
        out[f"MG{k}"] = {"mean": float(100.0 * hit.mean()), "std": float(per_round.std(ddof=0))}
    return out


def multigen_metrics(scores: Mapping[str, Mapping[str, float]], prefix: str) -> dict[str, float]:
    """Flat MLflow metrics from ``multigen_scores``: ``{f"{prefix}/MG2": mean, f"{prefix}/MG2_std": std, ...}``.

    ``prefix`` is e.g. "multigen/coco" or "multigen/ade20k" (the names ``tcscale.eval.compare`` reads).
    """
    flat = {}
    for name, value in scores.items():
        flat[f"{prefix}/{name}"] = float(value["mean"])
        flat[f"{prefix}/{name}_std"] = float(value["std"])
    return flat


def category_success_rates(records: Iterable[Mapping], *, threshold: float = 0.1) -> dict[str, dict[str, float]]:
    """Per category: the fraction of the images whose prompt names it in which it is present.

    Returns ``{category: {"rate": fraction in [0, 1], "present": images with it present,
    "images": images whose prompt names it}}``, categories sorted by name. Same validation and
    presence rule (score > threshold) as ``multigen_scores``.
    """
    present: dict[str, int] = {}
    total: dict[str, int] = {}
    for _, _, objs, labels, scores in _parse(records):
        found = _present(objs, labels, scores, threshold)
        for obj in set(objs):
            total[obj] = total.get(obj, 0) + 1
            present[obj] = present.get(obj, 0) + (obj in found)
    return {
        obj: {"rate": present[obj] / total[obj], "present": present[obj], "images": total[obj]} for obj in sorted(total)
    }


def _atomic_target(path: str | os.PathLike) -> tuple[Path, str]:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    return out, tmp


def plot_category_success(
    rates: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    title: str = "MultiGen per-category success",
    max_categories: int | None = None,
) -> Path:
    """Horizontal bar chart (PNG, matplotlib Agg) of ``category_success_rates`` output, worst first.

    ``max_categories`` keeps only the that many worst categories (default: all). The PNG is written to
    a temporary name and renamed, so a reader never sees half a file. Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rates:
        raise ValueError("no category success rates to plot")
    items = sorted(rates.items(), key=lambda kv: (kv[1]["rate"], kv[0]))
    if max_categories is not None:
        items = items[:max_categories]
    names = [name for name, _ in items]
    values = [100.0 * v["rate"] for _, v in items]
    fig = Figure(figsize=(7.0, max(2.0, 0.22 * len(items) + 1.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(len(items)), values, color="tab:blue")
    ax.set_yticks(range(len(items)), labels=names, fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("images with the category detected (%)")
    ax.set_title(title)
    fig.tight_layout()
    out, tmp = _atomic_target(path)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load_multigen_prompts(path: str | os.PathLike) -> list[dict]:
    """The official MultiGen prompt file -> ``[{"prompt_id", "prompt", "objects": [name, ...]}, ...]``.

    ``prompt_id`` is the entry's ``unique_id``, ``prompt`` its ``text`` and ``objects`` the first name
    of ``obj_1_attributes`` .. ``obj_<num_objects>_attributes``. A missing file raises
    FileNotFoundError; a file of the wrong shape raises one ValueError naming the file and the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MultiGen prompt file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of MultiGen prompts, got {type(data).__name__}")
    prompts, seen = [], set()
    for i, entry in enumerate(data):

        def bad(msg: str, i: int = i) -> ValueError:
            return ValueError(f"{path}: entry {i}: {msg}")

        if not isinstance(entry, dict):
            raise bad(f"expected an object, got {type(entry).__name__}")
        for key in ("unique_id", "num_objects", "text"):
            if key not in entry:
                raise bad(f"missing {key!r}")
        uid, n, text = entry["unique_id"], entry["num_objects"], entry["text"]
        if isinstance(uid, bool) or not isinstance(uid, int):
            raise bad(f"'unique_id' must be an integer, got {uid!r}")
        if uid in seen:
            raise bad(f"duplicate unique_id {uid}")
        seen.add(uid)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise bad(f"'num_objects' must be a positive integer, got {n!r}")
        if not isinstance(text, str) or not text.strip():
            raise bad("'text' must be a non-empty string")
        objects = []
        for k in range(1, n + 1):
            attrs = entry.get(f"obj_{k}_attributes")
            if not isinstance(attrs, list) or not attrs or not isinstance(attrs[0], str) or not attrs[0].strip():
                raise bad(f"'obj_{k}_attributes' must be a non-empty list whose first item is the category name")
            objects.append(attrs[0])
        prompts.append({"prompt_id": uid, "prompt": text, "objects": objects})
    return prompts


Detector = Callable[[Sequence, Sequence[Sequence[str]]], list[Mapping]]
"""(images, per-image category lists) -> per image {"labels", "scores", ...}; see ``tcscale.eval.detect``."""


def detect_records(items: Iterable[Mapping], detector: Detector, *, batch_size: int = 8) -> list[dict]:
    """Run ``detector`` over images and return MultiGen records.

    ``items``: mappings with ``prompt_id``, ``round``, ``objects`` and ``image``; the detector receives
    the images and their ``objects`` lists (it turns categories into queries and returns labels as
    category names). Records keep ``boxes`` when the detector gives them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records: list[dict] = []
    batch: list[Mapping] = []

    def flush() -> None:
        dets = detector([it["image"] for it in batch], [list(it["objects"]) for it in batch])
        if len(dets) != len(batch):
            raise ValueError(f"detector returned {len(dets)} results for {len(batch)} images")
        for it, det in zip(batch, dets):
            rec = {
                "prompt_id": it["prompt_id"],
                "round": it["round"],
                "objects": list(it["objects"]),
                "labels": list(det["labels"]),
                "scores": [float(s) for s in det["scores"]],
            }
            if "boxes" in det:
                rec["boxes"] = [list(map(float, b)) for b in det["boxes"]]
            records.append(rec)
        batch.clear()

    for i, it in enumerate(items):
        for key in ("prompt_id", "round", "objects", "image"):
            if key not in it:
                raise ValueError(f"item {i} has no {key!r}")
        batch.append(it)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return records


def records_from_official(detections: Mapping[str, Mapping], prompts: Sequence[Mapping]) -> list[dict]:
    """Records from the official detection JSON (``{"<unique_id>_<round>": {"classes", "scores"}}``).

    ``prompts`` is ``load_multigen_prompts`` output; ids missing from it raise ValueError.
    """
    by_id = {p["prompt_id"]: p for p in prompts}
    records = []
    for key, det in detections.items():
        try:
            uid, rnd = (int(x) for x in key.split("_"))
        except ValueError as err:
            raise ValueError(f"detection key {key!r} is not '<unique_id>_<round>'") from err
        if uid not in by_id:
            raise ValueError(f"detection {key!r} names prompt {uid}, which the prompt file lacks")
        for field in ("classes", "scores"):
            if field not in det:
                raise ValueError(f"detection {key!r} has no {field!r}")
        records.append(
            {
                "prompt_id": uid,
                "round": rnd,
                "objects": list(by_id[uid]["objects"]),
                "labels": list(det["classes"]),
                "scores": list(det["scores"]),
            }
        )
    return records


__all__ = [
    "QUERY_TEMPLATE",
    "detector_queries",
    "multigen_scores",
    "multigen_metrics",
    "category_success_rates",
    "plot_category_success",
    "load_multigen_prompts",
    "detect_records",
    "records_from_official",
]
