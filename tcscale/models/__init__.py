"""Stable Diffusion components: loading from a hub id / local dir, or tiny random-init ones for CPU runs."""

from tcscale.models.sd import SDComponents, build_tiny_components, load_components, save_pipeline_dir

__all__ = ["SDComponents", "build_tiny_components", "load_components", "save_pipeline_dir"]
