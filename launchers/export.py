"""Export a run's U-Net (from its ZeRO checkpoint) as a StableDiffusionPipeline directory.

python launchers/export.py --run-dir runs/tiny_cpu --out runs/tiny_cpu/export [--tag step30]
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="export a tcscale run as a diffusers pipeline")
    parser.add_argument("--run-dir", required=True, help="the run's output_dir (holds config.yaml, checkpoints/)")
    parser.add_argument("--out", required=True, help="directory to write the pipeline into")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step1000 (default: latest)")
    args = parser.parse_args(argv)
    from tcscale.train.export import export_pipeline

    out = export_pipeline(args.run_dir, args.out, args.tag)
    print(f"exported pipeline to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
