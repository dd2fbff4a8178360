"""Check an install: `python -m tcscale.doctor`.

One line per check, then a verdict; exit 0 when every required check passes, 1 otherwise. What it checks:

* versions of the packages training needs (required) and of the optional extras (`dataprep`, `eval`, `xformers`),
  each against the tested resolution in `constraints.txt` when the repository's copy is beside the package
  (a different version is a note, not a failure: the ranges in pyproject.toml allow it);
* torch's build (CUDA version), the GPUs it sees, the NVIDIA driver (`nvidia-smi`), NCCL's version and, with a GPU,
  a one-rank NCCL all-reduce;
* the fused grounded-attention kernel: compiled by Triton and run on the GPU (or, with `TRITON_INTERPRET=1` and no
  GPU, in Triton's CPU interpreter), against the PyTorch reference on a small problem;
* DeepSpeed: its accelerator, and which of the ops the trainer can ask for are prebuilt / buildable here.

`--json` prints the checks as one JSON object instead. Nothing is downloaded and nothing is built.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from tcscale.train.install_checks import Check, check_deepspeed, check_nccl

# distribution name -> the extra that installs it (None: the base install)
REQUIRED = (
    "torch", "torchvision", "triton", "deepspeed", "diffusers", "transformers", "tokenizers", "huggingface_hub",
    "accelerate", "safetensors", "peft", "webdataset", "mlflow", "open_clip_torch", "omegaconf", "numpy",
    "matplotlib",
)  # fmt: skip
OPTIONAL = {
    "flair": "dataprep", "groundingdino-py": "dataprep", "segment-anything-hq": "dataprep", "pycocotools": "dataprep",
    "clean-fid": "eval", "scipy": "eval", "xformers": "xformers", "pytest": "dev",
}  # fmt: skip
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"  # the repository's, for editable installs
KERNEL_TOLERANCE = 2e-3  # fp32 fused kernel vs the fp32 PyTorch reference on the doctor's small problem


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def tested_versions(path: Path = CONSTRAINTS) -> dict[str, str]:
    """`name==version` lines of a constraints file (normalised names), {} when there is none."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[_norm(name.split("[")[0])] = version.strip()
    return out


def check_packages(
    required: tuple[str, ...] | None = None,
    optional: dict[str, str] | None = None,
    tested: dict[str, str] | None = None,
) -> list[Check]:
    required = REQUIRED if required is None else required
    optional = OPTIONAL if optional is None else optional
    tested = tested_versions() if tested is None else tested
    checks = []
    for name in (*required, *optional):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in optional:
                extra = optional[name]
                checks.append(Check(name, "skip", f"not installed (pip install -e '.[{extra}]' adds it)"))
            else:
                checks.append(Check(name, "FAIL", "not installed (a training dependency: pip install -e .)"))
            continue
        want = tested.get(_norm(name))
        local = version.split("+")[0]
        if want is not None and local != want.split("+")[0]:
            checks.append(Check(name, "note", f"{version} (tested: {want}, constraints.txt)"))
        else:
            checks.append(Check(name, "ok", version))
    return checks


def _driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def check_torch() -> list[Check]:
    import torch

    checks = [Check("torch build", "ok", f"{torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}")]
    if not torch.cuda.is_available():
        why = "no CUDA device visible" if torch.version.cuda else "a CPU build of torch"
        checks.append(Check("cuda", "skip", f"{why}: CPU only (training configs with bf16 on GPUs need one)"))
        return checks
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
    checks.append(Check("cuda", "ok", f"{torch.cuda.device_count()} GPU(s): {', '.join(names)} (sm {cap})"))
    driver = _driver_version()
    checks.append(Check("driver", "ok" if driver else "note", driver or "nvidia-smi not found: driver not read"))
    return checks


def check_kernel() -> list[Check]:
    """The fused kernel against the reference on (B=1, H=2, Lq=64, Lk=16, d=32), forward and backward."""
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        return [Check("triton kernel", "skip", "no GPU (TRITON_INTERPRET=1 runs it in Triton's CPU interpreter)")]
    try:
        from kernels.grounded_attention import cross_attention_with_grounding
        from tcscale.attention.reference import cross_attention_with_grounding_reference
    except Exception as exc:  # noqa: BLE001
        return [Check("triton kernel", "FAIL", f"cannot import the kernel: {exc}")]
    device = torch.device("cuda" if on_gpu else "cpu")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 32, generator=gen) for n in (64, 16, 16))
    masks = (torch.rand(1, 2, 64, generator=gen) > 0.5).float()
    token_phrase = torch.full((1, 16), -1, dtype=torch.long)
    token_phrase[0, 1:3], token_phrase[0, 4] = 0, 1
    results = []
    try:
        for fn in (cross_attention_with_grounding, cross_attention_with_grounding_reference):
            leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
            out, token, pixel = fn(*leaves, masks.to(device), token_phrase.to(device))
            (out.square().mean() + token + pixel).backward()
            results.append([t.detach().float().cpu() for t in (out, token, pixel, *(x.grad for x in leaves))])
    except Exception as exc:  # noqa: BLE001 - a compile or launch error is the finding
        return [Check("triton kernel", "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")]
    err = max(float((a - b).abs().max()) for a, b in zip(*results))
    where = f"compiled on {torch.cuda.get_device_name(0)}" if on_gpu else "Triton CPU interpreter"
    status = "ok" if err <= KERNEL_TOLERANCE else "FAIL"
    return [
        Check("triton kernel", status, f"{where}; max |fused - reference| {err:.1e} (tolerance {KERNEL_TOLERANCE})")
    ]


def run_checks(kernel: bool = True) -> list[Check]:
    checks = [Check("python", "ok", f"{platform.python_version()} ({sys.executable})")]
    checks += check_packages()
    if any(c.name == "torch" and c.status == "FAIL" for c in checks):
        return checks
    checks += check_torch() + check_nccl()
    if kernel:
        checks += check_kernel()
    checks += check_deepspeed()
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcscale.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--no-kernel", action="store_true", help="skip the Triton kernel check")
    args = parser.parse_args(argv)
    checks = run_checks(kernel=not args.no_kernel)
    failed = [c.name for c in checks if c.status == "FAIL"]
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "failed": failed}, indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.status:>4}  {c.name:<{width}}  {c.detail}")
        print(f"doctor: {'FAILED: ' + ', '.join(failed) if failed else 'every required check passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
