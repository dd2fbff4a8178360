"""Stable Diffusion components: loading from a hub id / local dir (`sd`), or built with random weights from a shape
(`architectures`: tiny ones for CPU runs, the released SD architectures for benchmarks and planning)."""

from tcscale.models.sd import SDComponents, load_components, save_pipeline_dir

__all__ = ["SDComponents", "load_components", "save_pipeline_dir"]
