"""The one list of evaluation suites: config section, runner method, metric prefixes and compare's column order.

`tcscale.eval.config` (which sections exist and which can be enabled), `tcscale.eval.runner` (the order suites run
in: `Evaluation.run_<name>`) and `tcscale.eval.compare` (the column order of the table) all read `SUITES`; adding
an evaluation adds one `Suite` here (README "Where to change what").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Suite:
    name: str  # the EvalConfig section (`<name>.enabled`) and the runner method `run_<name>`
    generates: bool  # samples images with the pipeline (so it has a sampling precision, `<name>.dtype`)
    columns: tuple[str, ...] = ()  # compare's fixed column order for this suite's metrics (others: alphabetical)


_MG = tuple(f"multigen/{s}/MG{k}" for s in ("coco", "ade20k") for k in range(1, 6))
_VISOR = ("visor/OA", "visor/cond", "visor/uncond") + tuple(f"visor/VISOR_{k}" for k in range(1, 5))

SUITES: tuple[Suite, ...] = (
    Suite("multigen", True, _MG),
    Suite("visor", True, _VISOR),
    Suite("synthetic", True),
    Suite("sepen", True),
    Suite("fid", True, ("fid/coco10k",)),
    Suite("fid_flickr30k", True, ("fid/flickr30k1k",)),
    Suite("grounding", False, ("grounding/miou",)),
    Suite("daam_cocogen", False, ("daam_cocogen/miou",)),
    Suite("latency", True, ("latency/s_per_image", "latency/ratio_vs_base")),
)
"""Every suite, in the order an evaluation runs them."""

SUITE_NAMES: tuple[str, ...] = tuple(s.name for s in SUITES)
COLUMN_ORDER: tuple[str, ...] = tuple(c for s in SUITES for c in s.columns)


def suite(name: str) -> Suite:
    """The suite called `name` (KeyError naming the known ones otherwise)."""
    for s in SUITES:
        if s.name == name:
            return s
    raise KeyError(f"no evaluation suite {name!r}; known: {', '.join(SUITE_NAMES)}")


__all__ = ["Suite", "SUITES", "SUITE_NAMES", "COLUMN_ORDER", "suite"]
