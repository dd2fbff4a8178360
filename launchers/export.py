"""Export a run (from its ZeRO checkpoint) as a StableDiffusionPipeline directory: the trained U-Net, or the
trained text encoder of a text_encoder_infonce run, with the base model's other components.

python launchers/export.py --run-dir runs/tiny_cpu --out runs/tiny_cpu/export [--tag step30]
python launchers/export.py --run-dir runs/sd14_te --out exports/sd14_te_text --text-encoder   # CLIPTextModel dir only
python launchers/export.py --run-dir runs/lora --out exports/lora              # LoRA run: adapter (load_lora_weights)
python launchers/export.py --run-dir runs/lora --out exports/merged --merge-lora   # LoRA folded into a full U-Net
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="export a tcscale run as a diffusers pipeline")
    parser.add_argument("--run-dir", required=True, help="the run's output_dir (holds config.yaml, checkpoints/)")
    parser.add_argument("--out", required=True, help="directory to write the pipeline into")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step1000 (default: latest)")
    parser.add_argument(
        "--text-encoder",
        action="store_true",
        help="write only the run's text encoder, in transformers format (CLIPTextModel.from_pretrained loads it)",
    )
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="LoRA runs: write a full pipeline with the adapters merged into the U-Net (default: the adapter alone)",
    )
    parser.add_argument(
        "--allow-unsafe-load",
        action="store_true",
        help="read checkpoint files that need arbitrary unpickling (can run code: only files you trust)",
    )
    args = parser.parse_args(argv)
    from tcscale.config import ConfigError
    from tcscale.models.sd import ModelLoadError
    from tcscale.train.checkpoint import CheckpointError
    from tcscale.train.export import export_pipeline, export_text_encoder
    from tcscale.train.safe_load import CheckpointReadError, UnsafeCheckpointError

    try:
        if args.text_encoder:
            out = export_text_encoder(args.run_dir, args.out, args.tag, args.allow_unsafe_load)
        else:
            out = export_pipeline(args.run_dir, args.out, args.tag, args.allow_unsafe_load, merge_lora=args.merge_lora)
    except (
        ConfigError,
        CheckpointError,
        CheckpointReadError,
        UnsafeCheckpointError,
        ModelLoadError,
        FileNotFoundError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {'text encoder' if args.text_encoder else 'pipeline'} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
