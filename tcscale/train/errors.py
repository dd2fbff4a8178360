"""How a run ends: the exit codes of launchers/train.py (and launchers/eval.py), and the errors behind them.

0   finished (max_steps reached)
1   unexpected error (a bug: the traceback is printed)
2   bad input: config key, data path, model path, output directory (unwritable, or held by another run), checkpoint
    (not loadable, or not writable: disk full), named in one line
3   diverged: a loss term or the gradient norm became NaN/inf (step and term named; no checkpoint of it)
4   another rank failed: this rank stopped because a peer exited (its message is the one to read)
75  preempted (EX_TEMPFAIL): SIGUSR1 / SIGTERM / the launcher gone: a checkpoint and <output_dir>/PREEMPTED were
    written; requeue with resume=latest
143 stopped by SIGTERM without a checkpoint (checkpoint.on_sigterm=false); resume=latest continues from the last
    checkpoint
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_INPUT = 2
EXIT_DIVERGED = 3
EXIT_PEER_FAILED = 4
EXIT_PREEMPTED = 75
EXIT_TERMINATED = 143


class RunInputError(RuntimeError):
    """Something the user gave cannot be used (a path, a permission); the message names it."""


class NonFiniteLossError(FloatingPointError):
    """A loss term or the gradient norm is NaN/inf; raised on every rank before anything is saved."""


def exit_code_for(exc: BaseException) -> int:
    """The exit code of an exception that ended a run (see the module docstring)."""
    from tcscale.config import ConfigError
    from tcscale.data.config import DataConfigError
    from tcscale.models.sd import ModelLoadError
    from tcscale.train.checkpoint import CheckpointError
    from tcscale.train.safe_load import CheckpointReadError, UnsafeCheckpointError

    if isinstance(exc, NonFiniteLossError):
        return EXIT_DIVERGED
    if isinstance(
        exc,
        (
            ConfigError, DataConfigError, ModelLoadError, CheckpointError, CheckpointReadError, UnsafeCheckpointError,
            RunInputError,
        ),
    ):  # fmt: skip
        return EXIT_INPUT
    if is_peer_failure(exc):
        return EXIT_PEER_FAILED
    return EXIT_UNEXPECTED


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because another rank went away (gloo / NCCL connection errors)."""
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistNetworkError", None), getattr(dist, "DistBackendError", None)) if k)
    if kinds and isinstance(exc, kinds):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("Connection closed by peer" in text or "Connection reset by peer" in text)
