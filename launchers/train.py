"""Train entry point.

    deepspeed launchers/train.py --config configs/<name>.yaml [key=value ...]
    torchrun --nproc_per_node N launchers/train.py --config ... [key=value ...]
    python launchers/train.py --config ...            (one process)

DeepSpeed's launcher adds `--local_rank`; it is accepted and ignored (LOCAL_RANK is read from env).

Exit codes (tcscale.train.errors): 0 finished; 1 unexpected error (traceback); 2 bad input (config key, data, model
or output path, checkpoint) in one line; 3 diverged (NaN/inf loss or gradient, step and term named); 4 this rank
stopped because another rank failed; 75 preempted (SIGUSR1, SIGTERM, launcher gone): checkpoint + PREEMPTED written,
requeue with resume=latest; 143 stopped by SIGTERM without a checkpoint (checkpoint.on_sigterm=false).
An error every rank agrees on is printed by rank 0 only.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tcscale.logs import add_log_level_argument, setup_logging  # noqa: E402 - light: no torch


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tcscale trainer")
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    add_log_level_argument(parser)
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. max_steps=10 data.resolution=64")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)

    # Trap SLURM's preemption signal (and watch the launcher) before the slow imports and model loading: a USR1
    # that arrives during start-up is then honoured at the first step instead of killing the rank.
    from tcscale.train.preemption import PreemptionFlag

    preempt = PreemptionFlag().install()

    from tcscale.config import ConfigError, load_config
    from tcscale.train.errors import (
        EXIT_INPUT,
        EXIT_OK,
        EXIT_PREEMPTED,
        EXIT_TERMINATED,
        EXIT_UNEXPECTED,
        exit_code_for,
    )

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        if _rank() == 0:
            print(f"config error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    from tcscale.train.trainer import train

    try:
        result = train(cfg, preempt=preempt)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line and a documented exit code
        code = exit_code_for(exc)
        if code == EXIT_UNEXPECTED:
            raise  # a bug: keep the traceback
        rank = _rank()
        if rank == 0 or not getattr(exc, "agreed", False):
            prefix = "" if rank == 0 else f"rank {rank}: "
            if code == 4:
                print(f"{prefix}stopping: another rank failed ({type(exc).__name__}); see its message", file=sys.stderr)
            else:
                print(f"{prefix}error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if getattr(exc, "agreed", False):
            _wait_for_every_rank()  # the launcher kills the others when one rank exits: rank 0's line first
        return code
    finally:
        preempt.stop_watching()
    if result.preempted:
        return EXIT_PREEMPTED
    if result.terminated:
        return EXIT_TERMINATED
    return EXIT_OK if result.step >= cfg.max_steps else EXIT_UNEXPECTED


def _wait_for_every_rank() -> None:
    """Every rank raised the same verdict (an "agreed" error): meet once more before exiting, so a peer's early
    exit (on which the deepspeed launcher kills the rest) cannot stop rank 0 before it printed the one line."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone: nothing left to wait for
            pass


if __name__ == "__main__":
    sys.exit(main())
