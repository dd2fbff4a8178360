"""Export a run (from its ZeRO checkpoint) as a StableDiffusionPipeline directory: the trained U-Net, or the
trained text encoder of a text_encoder_infonce run, with the base model's other components.

python launchers/export.py --run-dir runs/tiny_cpu --out runs/tiny_cpu/export [--tag step30]
python launchers/export.py --run-dir runs/sd14_te --out exports/sd14_te_text --text-encoder   # CLIPTextModel dir only
python launchers/export.py --run-dir runs/lora --out exports/lora              # LoRA run: adapter (load_lora_weights)
python launchers/export.py --run-dir runs/lora --out exports/merged --merge-lora   # LoRA folded into a full U-Net
python launchers/export.py --run-dir runs/sd14 --out exports/sd14_ema --ema    # the EMA weights (ema.enabled runs)

Every export carries a model card (README.md: base model, objective, which weights, steps, data, config, and the
metrics of the evaluations named by --eval-results).
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
        "--ema",
        action="store_true",
        help="export the run's fp32 EMA weights (runs trained with ema.enabled=true) instead of the trained ones",
    )
    parser.add_argument(
        "--eval-results",
        action="append",
        default=[],
        metavar="PATH",
        help="an evaluation's results.json (or its output_dir) to list in the model card; repeatable",
    )
    parser.add_argument(
        "--allow-unsafe-load",
        action="store_true",
        help="read checkpoint files that need arbitrary unpickling (can run code: only files you trust)",
    )
    from tcscale.logs import add_log_level_argument, setup_logging

    add_log_level_argument(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from tcscale.config import ConfigError
    from tcscale.models.sd import ModelLoadError
    from tcscale.train.checkpoint import CheckpointError
    from tcscale.train.export import export_pipeline, export_text_encoder
    from tcscale.train.safe_load import CheckpointReadError, UnsafeCheckpointError

    try:
        if args.text_encoder:
            out = export_text_encoder(
                args.run_dir, args.out, args.tag, args.allow_unsafe_load, ema=args.ema, eval_results=args.eval_results
            )
        else:
            out = export_pipeline(
                args.run_dir, args.out, args.tag, args.allow_unsafe_load, merge_lora=args.merge_lora, ema=args.ema,
                eval_results=args.eval_results,
            )  # fmt: skip
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
    weights = "EMA weights" if args.ema else "trained weights"
    print(f"exported {'text encoder' if args.text_encoder else 'pipeline'} ({weights}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
