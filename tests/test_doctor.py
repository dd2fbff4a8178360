"""`python -m tcscale.doctor`: the install check a cluster user runs first."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from tcscale import doctor
from tests.helpers.launch import REPO, clean_env


def test_doctor_passes_here_and_runs_the_kernel_in_the_interpreter():
    proc = subprocess.run(
        [sys.executable, "-m", "tcscale.doctor", "--json"],
        cwd=REPO, env=clean_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    checks = {c["name"]: c for c in report["checks"]}
    assert report["failed"] == []
    assert checks["torch"]["detail"].startswith(torch.__version__.split("+")[0])
    assert checks["torch build"]["detail"].startswith(torch.__version__)
    kernel = checks["triton kernel"]
    assert kernel["status"] == "ok"
    if not torch.cuda.is_available():
        assert checks["cuda"]["status"] == "skip" and "interpreter" in kernel["detail"]
    error = float(kernel["detail"].split("reference| ")[1].split(" ")[0])
    assert error <= doctor.KERNEL_TOLERANCE
    assert checks["deepspeed accelerator"]["detail"].startswith("cuda" if torch.cuda.is_available() else "cpu")


def test_a_missing_training_package_fails_the_doctor(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "REQUIRED", (*doctor.REQUIRED, "tcscale-no-such-package"))
    assert doctor.main(["--no-kernel"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  tcscale-no-such-package" in out and "doctor: FAILED: tcscale-no-such-package" in out


def test_versions_are_compared_with_the_constraints_file(tmp_path):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# comment\ntorch==0.0.1\nopen_clip_torch==3.3.0  # trailing\n")
    tested = doctor.tested_versions(constraints)
    assert tested == {"torch": "0.0.1", "open-clip-torch": "3.3.0"}
    [check] = doctor.check_packages(required=("torch",), optional={}, tested=tested)
    assert check.status == "note" and "tested: 0.0.1" in check.detail
    [missing] = doctor.check_packages(required=(), optional={"tcscale-no-such-package": "eval"}, tested={})
    assert missing.status == "skip" and ".[eval]" in missing.detail


def test_the_shipped_constraints_pin_what_pyproject_requires():
    """constraints.txt holds one exact version for every dependency pyproject.toml names (base and extras)."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    tested = doctor.tested_versions(REPO / "constraints.txt")
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [
        Requirement(r) for extra, rs in project["optional-dependencies"].items() if extra != "xformers" for r in rs
    ]
    for req in reqs:
        name = doctor._norm(req.name)
        assert name in tested, f"constraints.txt lacks {req.name}"
        assert req.specifier.contains(Version(tested[name]), prereleases=True), (req, tested[name])
