"""Loss functions: grounding (TokenCompose), diffusion (LDM), Separate-and-Enhance."""

from tcscale.losses.grounding import grounding_losses

__all__ = ["grounding_losses"]
