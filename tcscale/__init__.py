"""tcscale: scale-out finetuning of Stable Diffusion with token-level grounding objectives."""

__version__ = "0.1.0"
