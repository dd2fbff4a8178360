"""Evaluation: MultiGen, VISOR, FID, grounding mIoU, the SepEn protocol and the synthetic-world scorer.

Importing ``tcscale.eval`` is cheap: the two entry points docs/DESIGN.md §4 names (``multigen_scores``,
``frechet_distance``) are resolved on first use, and the modules that need transformers or
matplotlib (``detect``, ``sepen_protocol``, plotting in ``multigen``) import them inside functions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs only
    from tcscale.eval.fid import frechet_distance
    from tcscale.eval.multigen import multigen_scores

_LAZY = {"multigen_scores": "tcscale.eval.multigen", "frechet_distance": "tcscale.eval.fid"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tcscale.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["multigen_scores", "frechet_distance"]
