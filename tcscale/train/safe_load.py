"""Loading checkpoints someone else could hand you, without running their code.

A pickle can execute code when it is loaded. Every checkpoint file tcscale reads (DeepSpeed's model and optimizer
states, the EMA weights, the export's consolidation) goes through `torch.load(weights_only=True)`, which only
rebuilds tensors, containers and an allow-list of plain classes — here the three DeepSpeed classes its optimizer
states hold (an enum, a named tuple of indices, the loss scaler's attributes). DeepSpeed itself and its
`zero_to_fp32` helpers call `torch.load(weights_only=False)`; inside `safe_torch_load()` those calls are made
weights-only too. A file that cannot be read at all (truncated, corrupt) fails with a `CheckpointReadError` naming
it. A file that needs more fails with an `UnsafeCheckpointError` naming it and the opt-in
(`checkpoint.allow_unsafe_load: true` / `--allow-unsafe-load`), which only someone who trusts the file should set.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch

OPT_IN = "checkpoint.allow_unsafe_load=true (or export's --allow-unsafe-load)"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file cannot be loaded weights-only; the message names the file and the opt-in."""


class CheckpointReadError(RuntimeError):
    """A checkpoint file cannot be read (truncated, corrupt, unreadable); the message names the file."""


def _deepspeed_safe_globals() -> list:
    """The plain classes DeepSpeed's optimizer states pickle (none when DeepSpeed is not installed)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, fragment_address, LossScaler]


@contextlib.contextmanager
def safe_torch_load(allow_unsafe: bool = False) -> Iterator[None]:
    """Within the block, every `torch.load` (tcscale's, DeepSpeed's) loads weights-only with DeepSpeed's plain
    classes allowed; a file that needs arbitrary unpickling raises UnsafeCheckpointError naming it, unless
    `allow_unsafe` (then it loads as pickled, with a warning)."""
    original = torch.load

    @functools.wraps(original)
    def guarded(f, *args, **kwargs):
        kwargs.pop("weights_only", None)
        try:
            return original(f, *args, weights_only=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError (or RuntimeError wrapping it)
            if "weights only" not in str(exc).lower() and "weights_only" not in str(exc).lower():
                # a truncated or corrupt file (PytorchStreamReader / zip errors, EOF, I/O): name it, one line
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                raise CheckpointReadError(
                    f"{f}: cannot be read ({type(exc).__name__}: {first}); the file is truncated or corrupt"
                ) from exc
            if not allow_unsafe:
                raise UnsafeCheckpointError(
                    f"{f}: cannot be loaded weights-only (it needs arbitrary unpickling, which can run code); "
                    f"if you trust where it came from, set {OPT_IN}"
                ) from None
            warnings.warn(f"{f}: loading with weights_only=False (allowed by the unsafe-load opt-in)", stacklevel=2)
            return original(f, *args, weights_only=False, **kwargs)

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        torch.load = guarded
        try:
            yield
        finally:
            torch.load = original
