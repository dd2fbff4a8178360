"""The layering the README promises, read from the import statements of every source file:
kernels/ imports nothing from tcscale (the lowest layer), and only tcscale/train/ and launchers/ touch DeepSpeed or
torch.distributed (model code, losses, objectives, data and evaluation run on plain tensors)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTED = ("deepspeed", "torch.distributed")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", sources("kernels"), ids=lambda p: str(p.relative_to(REPO)))
def test_kernels_import_nothing_from_tcscale(path):
    bad = sorted(m for m in imported_modules(path) if m == "tcscale" or m.startswith("tcscale."))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_only_the_training_layer_imports_distributed_code():
    offenders = {}
    for path in sources("tcscale", "kernels", "dataprep", "benchmarks"):
        rel = path.relative_to(REPO)
        if rel.parts[:2] == ("tcscale", "train"):
            continue
        bad = sorted(m for m in imported_modules(path) if m.startswith(DISTRIBUTED))
        if bad:
            offenders[str(rel)] = bad
    assert not offenders, offenders


def test_the_check_sees_imports():
    """The reader finds both import forms (so the two tests above cannot pass by reading nothing)."""
    trainer = imported_modules(REPO / "tcscale" / "train" / "distributed.py")
    assert "torch.distributed" in trainer and "deepspeed" in trainer
    assert "kernels.modes.TOKEN_LOSS_HEADS" in imported_modules(REPO / "tcscale" / "losses" / "grounding.py")
