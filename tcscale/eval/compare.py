"""Compare evaluations side by side: ``python -m tcscale.eval.compare RESULTS.json [RESULTS.json ...]``.

Prints one markdown table: a row per results file (its ``name`` and ``model``), then the papers'
reference rows (``tcscale.eval.paper_numbers``), labelled "paper: ...", for the metrics the table
shows (``--no-paper`` drops them). Columns are the union of the files' metrics in a fixed order
(MultiGen COCO, MultiGen ADE20K, VISOR, FID, grounding, then any other name alphabetically); a
metric ``X`` with a companion ``X_std`` prints as "mean ± std". Per-layer and per-timestep grounding
metrics and counts stay out of the table unless ``--details``.

results.json schema (written by ``launchers/eval.py``)::

    {"name": str, "model": str, "created": ISO-8601 date,
     "metrics": {"multigen/coco/MG2": float, "multigen/coco/MG2_std": float, ...,
                 "visor/OA": float, "visor/cond": float, "fid/coco10k": float, "grounding/miou": float},
     "details": {...}}                      # optional, free-form

Metric names are the MLflow metric names. A missing or malformed file prints one line
``error: <path>: <what is wrong>`` to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from tcscale.eval.paper_numbers import PAPER_ROWS

_ORDER = (
    [f"multigen/coco/MG{k}" for k in range(1, 6)]
    + [f"multigen/ade20k/MG{k}" for k in range(1, 6)]
    + ["visor/OA", "visor/cond", "visor/uncond"]
    + [f"visor/VISOR_{k}" for k in range(1, 5)]
    + ["fid/coco10k", "fid/flickr30k1k", "grounding/miou"]
)


class ResultsError(ValueError):
    """A results file that cannot be read; the message names the file."""


def load_results(path: str | Path) -> dict:
    """Read and validate one results.json (schema in the module docstring); raises ResultsError."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key in ("name", "model", "created", "metrics"):
        if key not in data:
            raise ResultsError(f"{path}: missing {key!r}")
    for key in ("name", "model", "created"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise ResultsError(f"{path}: {key!r} must be a non-empty string")
    try:
        datetime.fromisoformat(data["created"])
    except ValueError as err:
        raise ResultsError(f"{path}: 'created' is not an ISO-8601 date: {data['created']!r}") from err
    metrics = data["metrics"]
    if not isinstance(metrics, dict):
        raise ResultsError(f"{path}: 'metrics' must be an object of name -> number")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ResultsError(f"{path}: metric {name!r} is {value!r}, not a finite number")
    if "details" in data and not isinstance(data["details"], dict):
        raise ResultsError(f"{path}: 'details' must be an object")
    return data


DETAIL_MARKERS = ("/layer/", "/miou_t", "/phrases")  # per-layer / per-timestep / count metrics: results.json only


def _columns(metric_sets: Sequence[Mapping[str, float]], details: bool = False) -> list[str]:
    names = {n for m in metric_sets for n in m if details or not any(k in n for k in DETAIL_MARKERS)}
    base = {n for n in names if not (n.endswith("_std") and n[: -len("_std")] in names)}
    known = [n for n in _ORDER if n in base]
    return known + sorted(base - set(known))


def _fmt(name: str, metrics: Mapping[str, float]) -> str:
    if name not in metrics:
        return "—"
    digits = 4 if name.startswith("grounding/") else 2
    cell = f"{metrics[name]:.{digits}f}"
    if f"{name}_std" in metrics:
        cell += f" ± {metrics[f'{name}_std']:.{digits}f}"
    return cell


def compare_table(results: Sequence[Mapping], *, paper: bool = True, details: bool = False) -> str:
    """Markdown table of validated results (``load_results`` output), plus paper rows when ``paper``; per-layer /
    per-timestep metrics only with ``details``."""
    columns = _columns([r["metrics"] for r in results], details)
    lines = [
        "| run | model | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for r in results:
        cells = [_fmt(c, r["metrics"]) for c in columns]
        lines.append(f"| {r['name']} | {r['model']} | " + " | ".join(cells) + " |")
    if paper:
        for label, metrics in PAPER_ROWS.items():
            if any(c in metrics for c in columns):
                lines.append(f"| {label} | (paper number) | " + " | ".join(_fmt(c, metrics) for c in columns) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0, or 2 for an unreadable results file)."""
    parser = argparse.ArgumentParser(prog="python -m tcscale.eval.compare", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files written by launchers/eval.py")
    parser.add_argument("--no-paper", action="store_true", help="leave out the papers' reference rows")
    parser.add_argument("--details", action="store_true", help="per-layer and per-timestep metrics too")
    args = parser.parse_args(argv)
    try:
        results = [load_results(p) for p in args.results]
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(compare_table(results, paper=not args.no_paper, details=args.details))
    return 0


if __name__ == "__main__":
    sys.exit(main())
