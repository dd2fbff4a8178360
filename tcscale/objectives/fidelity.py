"""Paper or official code: one preset per objective fills every option left unset (docs/FIDELITY.md).

An objective whose paper and official code differ declares its options as ``None`` defaults ("from the preset")
plus a ``fidelity: paper | official`` field, and a table ``{preset: {option: value}}``. Its config check calls
`apply_preset`, which fills each unset option from the chosen preset in place; an option set explicitly (YAML or
``key=value``) wins over the preset. The check runs when the config is loaded, so the merged config the trainer
writes into the run directory (``config.yaml``) holds the resolved values, and loading it again resolves nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, get_args

Fidelity = Literal["paper", "official"]
FIDELITIES: tuple[str, ...] = get_args(Fidelity)


def apply_preset(section: Any, presets: Mapping[str, Mapping[str, Any]], prefix: str) -> list[str]:
    """Fill the options of `section` that are None from ``presets[section.fidelity]``, in place; returns the names
    of the options it filled. `prefix` is the section's dotted key (``objective.tokencompose``), for messages."""
    choice = section.fidelity
    if choice not in presets:
        raise ValueError(f"{prefix}.fidelity must be one of {sorted(presets)}, got {choice!r}")
    filled = []
    for option, value in presets[choice].items():
        if getattr(section, option) is None:
            setattr(section, option, value)
            filled.append(option)
    return filled


def resolved(section: Any, presets: Mapping[str, Mapping[str, Any]], prefix: str) -> Any:
    """A copy of `section` with its preset applied (builders that receive a config that skipped the check)."""
    out = dataclasses.replace(section)
    apply_preset(out, presets, prefix)
    return out
