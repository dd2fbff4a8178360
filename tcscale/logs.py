"""Logging with levels for every entry point: the `tcscale` logger, rank 0 by default.

    setup_logging("info")      # launchers call it with their --log-level (debug | info | warning | error)
    log = logging.getLogger(__name__); log.warning(...)      # modules under tcscale.* log through it

Rank 0 logs at the chosen level, one message per line with no decoration (the step lines scripts read): debug and
info to stdout, warnings and errors to stderr;
the other ranks log warnings and errors only, prefixed `rank N:` (`--log-level debug` shows every rank's debug
and info lines too). `tcscale.train.distributed.print0` routes through it (level info, rank 0). The libraries'
loggers (diffusers, transformers) stay at error below debug: their per-module notices drown the step
lines; at debug they speak at warning.
"""

from __future__ import annotations

import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")
LOGGER = "tcscale"


class _StdoutHandler(logging.StreamHandler):
    """Debug and info to whatever sys.stdout is at the time (pytest's capture, a redirected stream); warnings and
    errors to sys.stderr."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            sys.stdout.flush()
            try:
                sys.stderr.write(self.format(record) + "\n")
                sys.stderr.flush()
            except Exception:  # noqa: BLE001 - logging must never raise
                self.handleError(record)
            return
        super().emit(record)


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def setup_logging(level: str = "info", rank: int | None = None) -> logging.Logger:
    """Configure the `tcscale` logger for this process (idempotent: the last call wins)."""
    level = level.lower()
    if level not in LEVELS:
        raise ValueError(f"--log-level {level!r}: expected one of {', '.join(LEVELS)}")
    rank = _rank() if rank is None else rank
    value = getattr(logging, level.upper())
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, _StdoutHandler):
            logger.removeHandler(handler)
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"rank {rank}: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(value if rank == 0 or value <= logging.DEBUG else max(value, logging.WARNING))
    logger.propagate = False
    _quiet_libraries(value <= logging.DEBUG)
    return logger


def _quiet_libraries(debug: bool) -> None:
    """diffusers / transformers at error (warning under debug): set now where imported, else through the variables
    they read at import (so a launcher's --help or a signal trap never waits for their import)."""
    name = "warning" if debug else "error"
    for module, variable in (("diffusers", "DIFFUSERS_VERBOSITY"), ("transformers", "TRANSFORMERS_VERBOSITY")):
        os.environ[variable] = name
        if module in sys.modules:
            sys.modules[module].utils.logging.set_verbosity(getattr(logging, name.upper()))


def get_logger() -> logging.Logger:
    """The `tcscale` logger, configured at info on first use when no entry point configured it."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        setup_logging("info")
    return logger


def add_log_level_argument(parser) -> None:
    """`--log-level` for a launcher's argparse parser."""
    parser.add_argument(
        "--log-level",
        default="info",
        choices=LEVELS,
        help="messages shown: debug | info (default) | warning | error; rank 0 only, other ranks warnings and errors",
    )
