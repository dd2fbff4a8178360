"""Training objectives, by name: `OBJECTIVES` (see `tcscale.objectives.base`). Importing this package registers
the built-in ones: tokencompose (LDM + grounding), ldm (LDM only), sepen (Separate-and-Enhance) and
text_encoder_infonce (contrastive finetuning of the CLIP text encoder on object crops)."""

from tcscale.objectives import ldm, sepen, text_encoder_infonce, tokencompose  # noqa: E402,F401  (each registers)
from tcscale.objectives.base import (
    OBJECTIVES,
    BuildContext,
    Objective,
    ObjectiveSpec,
    StepOutput,
    register_objective,
)

__all__ = ["OBJECTIVES", "BuildContext", "Objective", "ObjectiveSpec", "StepOutput", "register_objective"]
