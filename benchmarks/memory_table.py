"""Memory-planner predictions (meta device, no GPU) for SD1.4 at 512 px, SD2.1 at 768 px and SDXL at 1024 px: every
provider (LoRA rank 8 among them) x dtype x activation checkpointing, written to benchmarks/results/memory_<arch>.json
with the machine, versions and date, and a markdown table of the largest micro-batch per GPU size printed to stdout.

    python benchmarks/memory_table.py                 # every architecture
    python benchmarks/memory_table.py --arch sd14

These are predictions of the planner (tcscale.memory, docs/MEMORY.md), not GPU measurements: one rank, ZeRO-2,
the configs' torch AdamW on CUDA (foreach), 4 phrases per sample, workspace 1.5 GiB; each row's peak is the larger of
the backward and the first optimizer step.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "sd14": ("configs/sd14_tokencompose.yaml", 512),
    "sd21": ("configs/sd21_tokencompose.yaml", 768),
    "sdxl": ("configs/sdxl_tokencompose.yaml", 1024),
}
PROVIDERS = {  # name -> (provider, overrides)
    "ldm": ("tcscale", ["objective.name=ldm"]),
    "reference": ("tcscale", ["attention.backend=reference"]),
    "fused": ("tcscale", ["attention.backend=fused"]),
    "official": ("official", []),
    "reference_lora8": ("tcscale", ["attention.backend=reference", "model.lora.rank=8"]),  # LoRA rank 8, q/k/v/out
}
GPUS = {"24 GiB": 24 * 2**30, "40 GiB": 40 * 2**30, "80 GiB": 80 * 2**30, "141 GB": 141 * 10**9}


def run(arch: str, reuse: dict | None = None) -> dict:
    from tcscale.config import load_config
    from tcscale.memory.official import OFFICIAL_OVERRIDES
    from tcscale.memory.planner import COUNT_FIELDS, plan_memory

    config, res = CONFIGS[arch]
    rows = []
    for name, (provider, extra) in PROVIDERS.items():
        for dtype in ("fp32", "bf16"):
            for ckpt in (False, True):
                pre = list(OFFICIAL_OVERRIDES) if provider == "official" else []
                overrides = [*pre, *extra, f"data.resolution={res}", f"deepspeed.bf16.enabled={dtype == 'bf16'}",
                             f"model.gradient_checkpointing={str(ckpt).lower()}"]  # fmt: skip
                cfg = load_config(REPO / config, overrides)
                counts = None
                if reuse is not None:  # the same row of the stored results: its activation counts
                    (old,) = [r for r in reuse["plans"] if r["provider"] == name and r["dtype"] == dtype
                              and r["gradient_checkpointing"] == ckpt]  # fmt: skip
                    counts = {k: old[k] for k in COUNT_FIELDS}
                plan = plan_memory(cfg, 1, provider=provider, gpu_mems=GPUS, counts=counts)
                rows.append({**plan.as_dict(), "planner_provider": provider, "provider": name, "dtype": dtype})
                print(f"{arch} {name} {dtype} ckpt={ckpt}: {plan.activations_per_sample / 2**20:.1f} MiB/sample, "
                      f"fits {plan.fits}", file=sys.stderr)  # fmt: skip
    import diffusers

    meta = {
        "kind": "meta-device prediction (tcscale.memory planner), not a GPU measurement",
        "arch": arch,
        "resolution": res,
        "world_size": 1,
        "zero_stage": 2,
        "phrases": 4,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, no GPU",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu_sizes": GPUS,
    }
    if reuse is not None:
        meta["activation_counts_from"] = reuse["meta"].get("activation_counts_from", reuse["meta"]["date"])
    return {"meta": meta, "plans": rows}


def markdown(results: dict[str, dict]) -> str:
    lines = ["| arch | provider | dtype | checkpointing | MiB/sample | optimizer step GiB | peak at 1 GiB | "
             + " | ".join(GPUS) + " |", "|---|---|---|---|---:|---:|---:|" + "---:|" * len(GPUS)]  # fmt: skip
    for arch, data in results.items():
        for r in data["plans"]:
            fits = " | ".join(str(r["fits"][g]) for g in GPUS)
            ckpt = "on" if r["gradient_checkpointing"] else "off"
            mib = r["activations_per_sample"] / 2**20
            step = sum(r["predicted_peak_parts"]["optimizer_step"].values()) / 2**30
            peak = r["predicted_peak"] / 2**30
            lines.append(f"| {arch} | {r['provider']} | {r['dtype']} | {ckpt} | {mib:,.0f} | {step:.1f} | {peak:.1f} "
                         f"| {fits} |")  # fmt: skip
    return "\n".join(lines)


README_COLUMNS = {  # README's compact table: (provider, dtype) per column, checkpointing on
    "TokenCompose bf16": ("reference", "bf16"),
    "+ LoRA rank 8": ("reference_lora8", "bf16"),
    "LDM-only bf16": ("ldm", "bf16"),
    "official-style fp32": ("official", "fp32"),
}
README_ROWS = {"sd14": "SD1.4, 512 px", "sd21": "SD2.1, 768 px", "sdxl": "SDXL, 1024 px"}


def readme_markdown(results: dict[str, dict]) -> str:
    """The README's table: largest micro-batch at each GPU size, checkpointing on."""
    lines = ["| model | " + " | ".join(README_COLUMNS) + " |", "|---|" + "---|" * len(README_COLUMNS)]
    for arch, data in results.items():
        cells = []
        for provider, dtype in README_COLUMNS.values():
            (row,) = [r for r in data["plans"]
                      if r["provider"] == provider and r["dtype"] == dtype and r["gradient_checkpointing"]]  # fmt: skip
            cells.append(" / ".join(str(row["fits"][g]) for g in GPUS))
        lines.append(f"| {README_ROWS[arch]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--reuse-counts", action="store_true",
                        help="re-plan from the activation counts stored in --out-dir (seconds, not minutes): for a "
                        "change to the engine's parts that leaves the counted micro-step alone")  # fmt: skip
    args = parser.parse_args()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    results = {}
    for arch in args.arch or sorted(CONFIGS):
        stored = Path(args.out_dir, f"memory_{arch}.json")
        reuse = json.loads(stored.read_text()) if args.reuse_counts else None
        results[arch] = run(arch, reuse)
        Path(args.out_dir, f"memory_{arch}.json").write_text(json.dumps(results[arch], indent=1) + "\n")
    print(markdown(results))
    if set(results) == set(CONFIGS):
        print("\nREADME (checkpointing on):\n" + readme_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
