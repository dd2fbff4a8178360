"""Loss functions: grounding (TokenCompose), diffusion (LDM), Separate-and-Enhance, contrastive (InfoNCE)."""

from tcscale.losses.contrastive import info_nce
from tcscale.losses.grounding import grounding_losses, grounding_losses_grouped
from tcscale.losses.sepen import sepen_losses

__all__ = ["grounding_losses", "grounding_losses_grouped", "info_nce", "sepen_losses"]
