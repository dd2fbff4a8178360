"""Compare evaluations side by side: ``python -m tcscale.eval.compare RESULTS.json [RESULTS.json ...]``.

Prints one markdown table: a row per results file (its ``name`` and ``model``), then the papers'
reference rows (``tcscale.eval.paper_numbers``), labelled "paper: ...", for the metrics the table
shows (``--no-paper`` drops them). Columns are the union of the files' metrics in the suites' fixed
order (``tcscale.eval.suites``), then any other name alphabetically; a metric ``X`` with a companion
``X_std`` prints as "mean ± std". Per-layer and per-timestep grounding metrics and counts stay out of
the table unless ``--details``.

A measured value stands beside a paper value as comparable only when it was measured with the paper's
protocol: the same suite, sampling precision, sample count and sampler (those the paper states,
``PAPER_PROTOCOLS``), read from the results file's ``protocol``. Otherwise its cell carries a mark
``†N`` and a note under the table gives the reason (e.g. "precision fp16 (paper: fp32); 500 samples
(paper: 10000)"); a results file without a ``protocol`` entry for the metric is marked too.

results.json schema (written by ``launchers/eval.py``)::

    {"name": str, "model": str, "created": ISO-8601 date,
     "metrics": {"multigen/coco/MG2": float, "multigen/coco/MG2_std": float, ...,
                 "visor/OA": float, "visor/cond": float, "fid/coco10k": float, "grounding/miou": float},
     "protocol": {"multigen/coco": {"suite": "multigen", "precision": "fp32", "samples": 10000,
                                    "sampler": "pndm, 50 steps, CFG 7.5, 512 px", ...}, ...},  # optional
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

from tcscale.eval.paper_numbers import PAPER_ALIASES, PAPER_PROTOCOLS, PAPER_ROWS
from tcscale.eval.suites import COLUMN_ORDER


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
    protocol = data.get("protocol", {})
    if not isinstance(protocol, dict) or not all(isinstance(v, dict) for v in protocol.values()):
        raise ResultsError(f"{path}: 'protocol' must be an object of metric prefix -> object")
    return data


DETAIL_MARKERS = ("/layer/", "/miou_t", "/phrases")  # per-layer / per-timestep / count metrics: results.json only


def _columns(metric_sets: Sequence[Mapping[str, float]], details: bool = False) -> list[str]:
    names = {n for m in metric_sets for n in m if details or not any(k in n for k in DETAIL_MARKERS)}
    base = {n for n in names if not (n.endswith("_std") and n[: -len("_std")] in names)}
    known = [n for n in COLUMN_ORDER if n in base]
    return known + sorted(base - set(known))


def _fmt(name: str, metrics: Mapping[str, float]) -> str:
    if name not in metrics:
        return "—"
    digits = 4 if name.endswith("/miou") or name.startswith("grounding/") else 2
    cell = f"{metrics[name]:.{digits}f}"
    if f"{name}_std" in metrics:
        cell += f" ± {metrics[f'{name}_std']:.{digits}f}"
    return cell


def _entry(table: Mapping[str, Mapping], metric: str) -> Mapping | None:
    """The entry of `table` whose key is the longest "/"-prefix of `metric` (e.g. "multigen/coco" for
    "multigen/coco/MG2")."""
    parts = metric.split("/")
    for k in range(len(parts), 0, -1):
        key = "/".join(parts[:k])
        if key in table:
            return table[key]
    return None


def protocol_difference(metric: str, protocol: Mapping[str, Mapping]) -> str | None:
    """Why a measured `metric` (with its results file's `protocol`) is not comparable with the paper's value, or
    None when it is (or when the paper has no protocol for it)."""
    paper = _entry(PAPER_PROTOCOLS, metric)
    if paper is None:
        return None
    if "never" in paper:
        return str(paper["never"])
    run = _entry(protocol, metric)
    if run is None:
        return "no protocol recorded in the results file"
    if run.get("suite") != paper["suite"]:
        what = f": {paper['what']}" if "what" in paper else ""
        return f"suite {run.get('suite')} (paper: {paper['suite']}{what})"
    reasons = []
    for key, want in paper.items():
        if key not in ("suite", "what") and want is not None and run.get(key) != want:
            reasons.append(f"{key} {run.get(key)} (paper: {want})")
    return "; ".join(reasons) or None


def compare_table(results: Sequence[Mapping], *, paper: bool = True, details: bool = False) -> str:
    """Markdown table of validated results (``load_results`` output), plus paper rows when ``paper``; per-layer /
    per-timestep metrics only with ``details``. With paper rows, a measured cell not measured with the paper's
    protocol is marked †N, and note N under the table says why."""
    columns = _columns([r["metrics"] for r in results], details)
    paper_rows = {}
    for label, metrics in PAPER_ROWS.items() if paper else ():
        shown = {**metrics, **{col: metrics[src] for col, src in PAPER_ALIASES.items() if src in metrics}}
        if any(c in shown for c in columns):
            paper_rows[label] = shown
    with_paper = {c for c in columns if any(c in m for m in paper_rows.values())}
    lines = [
        "| run | model | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    notes: dict[str, int] = {}
    for r in results:
        cells = []
        for c in columns:
            cell = _fmt(c, r["metrics"])
            reason = protocol_difference(c, r.get("protocol", {})) if c in with_paper and c in r["metrics"] else None
            if reason is not None:
                note = f"{r['name']}, {c.rsplit('/', 1)[0] if c.count('/') > 1 else c}: {reason}"
                cell += f" †{notes.setdefault(note, len(notes) + 1)}"
            cells.append(cell)
        lines.append(f"| {r['name']} | {r['model']} | " + " | ".join(cells) + " |")
    for label, metrics in paper_rows.items():
        lines.append(f"| {label} | (paper number) | " + " | ".join(_fmt(c, metrics) for c in columns) + " |")
    if notes:
        lines += ["", "† not the paper's protocol, so not comparable with the paper rows:"]
        lines += [f"†{n} {note}" for note, n in notes.items()]
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
