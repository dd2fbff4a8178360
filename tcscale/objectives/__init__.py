"""Training objectives, by name: `OBJECTIVES` (see `tcscale.objectives.base`). Importing this package registers
the built-in ones: tokencompose (LDM + grounding), ldm (LDM only) and sepen (Separate-and-Enhance)."""

from tcscale.objectives import ldm, sepen, tokencompose  # noqa: E402,F401  (each registers itself)
from tcscale.objectives.base import (
    OBJECTIVES,
    BuildContext,
    Objective,
    ObjectiveSpec,
    StepOutput,
    register_objective,
)

__all__ = ["OBJECTIVES", "BuildContext", "Objective", "ObjectiveSpec", "StepOutput", "register_objective"]
