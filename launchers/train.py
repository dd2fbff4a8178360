"""Train entry point.

    deepspeed launchers/train.py --config configs/<name>.yaml [key=value ...]
    torchrun --nproc_per_node N launchers/train.py --config ... [key=value ...]
    python launchers/train.py --config ...            (one process)

DeepSpeed's launcher adds `--local_rank`; it is accepted and ignored (LOCAL_RANK is read from env).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tcscale trainer")
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. max_steps=10 data.resolution=64")
    args = parser.parse_args(argv)

    # Trap SLURM's preemption signal before the slow imports and model loading: a USR1 that arrives during
    # start-up is then honoured at the first step instead of killing the rank.
    from tcscale.train.preemption import PreemptionFlag

    preempt = PreemptionFlag().install()

    from tcscale.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from tcscale.data.config import DataConfigError
    from tcscale.models.sd import ModelLoadError
    from tcscale.train.checkpoint import CheckpointError
    from tcscale.train.trainer import NonFiniteLossError, train

    try:
        result = train(cfg, preempt=preempt)
    except (DataConfigError, ModelLoadError, CheckpointError, NonFiniteLossError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0 if result.step >= cfg.max_steps or result.preempted else 1


if __name__ == "__main__":
    sys.exit(main())
