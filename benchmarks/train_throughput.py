"""Training throughput per GPU: LDM-only, TokenCompose (reference and fused) and the official-style replica, fp32 /
bf16, activation checkpointing off / on, each at the memory planner's largest micro-batch for this GPU.

    python benchmarks/train_throughput.py --arch sd14 --steps 20            # a CUDA GPU (random weights, no hub)
    python benchmarks/train_throughput.py --smoke --json out.json           # CPU: tiny models, 2 steps (tests)

Per row: images/s per GPU, step time median and 20/80 % quantiles (one micro-step forward + backward + AdamW step,
CUDA-synchronised), torch.cuda.max_memory_allocated, the planner's predicted peak and micro-batch. Nothing runs
through DeepSpeed (one GPU; its overhead is the same for every provider). docs/DESIGN.md §7 targets: TokenCompose
fused step <= 1.05x LDM-only; tcscale's best >= 10x the official-style images/s. No GPU figure has been measured yet
(docs/MEMORY.md): results go to benchmarks/results/train_throughput.json only when this is run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROVIDERS = {  # name -> (planner provider, overrides)
    "ldm": ("tcscale", ["objective.name=ldm"]),
    "reference": ("tcscale", ["attention.backend=reference"]),
    "fused": ("tcscale", ["attention.backend=fused"]),
    "official": ("official", []),
}
ROW_KEYS = ("provider", "dtype", "gradient_checkpointing", "micro_batch", "images_per_s", "step_s_median", "step_s_p20",
            "step_s_p80", "peak_memory_bytes", "predicted_peak_bytes", "device")  # fmt: skip


def measure(config: Path, provider: str, extra: list[str], dtype: str, ckpt: bool, args, device) -> dict:
    from tcscale.config import load_config
    from tcscale.memory.official import OFFICIAL_OVERRIDES
    from tcscale.memory.planner import StepRunner, build_models, plan_memory

    planner_provider, overrides = PROVIDERS[provider]
    pre = list(OFFICIAL_OVERRIDES) if planner_provider == "official" else []
    overrides = [*pre, *overrides, *extra, f"deepspeed.bf16.enabled={dtype == 'bf16'}",
                 f"model.gradient_checkpointing={str(ckpt).lower()}"]  # fmt: skip
    cfg = load_config(config, overrides)
    arch = "tiny" if args.smoke else args.arch
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        plan = plan_memory(cfg, 1, provider=planner_provider, arch=arch)
        batch = args.batch or plan.max_micro_batch(total)
        predicted = plan.peak(batch)
    else:
        batch, predicted = args.batch or 2, None
    row = dict(provider=provider, dtype=dtype, gradient_checkpointing=ckpt, micro_batch=batch, device=str(device),
               predicted_peak_bytes=predicted)  # fmt: skip
    if batch < 1:
        return {**row, "images_per_s": None, "step_s_median": None, "step_s_p20": None, "step_s_p80": None,
                "peak_memory_bytes": None, "note": "planner: no micro-batch fits"}  # fmt: skip
    models = build_models(cfg, arch, device)
    runner = StepRunner(cfg, models, planner_provider)
    params = [p for p in runner.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)  # fp32 master copy and mixed precision are DeepSpeed's; left out
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        runner.loss(batch, device).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {**row, "images_per_s": batch / median, "step_s_median": median, "step_s_p20": q[0], "step_s_p80": q[3],
            "peak_memory_bytes": peak}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd14", choices=("sd14", "sd21"))
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny models, 2 steps, reference providers only")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default: the planner's largest)")
    parser.add_argument("--json", default=None, help="write the results here (default on a GPU: benchmarks/results)")
    args = parser.parse_args(argv)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    device = torch.device("cuda") if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    if device.type != "cuda" and not args.smoke:
        print("error: no CUDA GPU here; run with --smoke for the CPU check (it measures nothing of interest)")
        return 2
    if args.smoke:
        config, providers, dtypes = REPO / "configs" / "tiny_cpu.yaml", ("ldm", "reference", "official"), ("fp32",)
        args.steps, args.warmup = 2, 0
        extra = []
    else:
        config = REPO / "configs" / f"{args.arch}_tokencompose.yaml"
        providers, dtypes, extra = tuple(PROVIDERS), ("fp32", "bf16"), []
    rows = [measure(config, p, extra, d, c, args, device) for p in providers for d in dtypes for c in (False, True)]
    import diffusers as _d

    result = {
        "meta": {
            "kind": "CPU smoke run (tiny models): not a throughput figure" if args.smoke else "GPU measurement",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "arch": "tiny" if args.smoke else args.arch,
            "versions": {"torch": torch.__version__, "diffusers": _d.__version__, "python": platform.python_version()},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "steps": args.steps,
        },
        "rows": rows,
    }
    out = args.json or (
        None if args.smoke else str(REPO / "benchmarks" / "results" / f"train_throughput_{args.arch}.json")
    )
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        ips = "n/a" if r["images_per_s"] is None else f"{r['images_per_s']:.2f}"
        print(f"{r['provider']:<10} {r['dtype']} ckpt={r['gradient_checkpointing']!s:<5} batch {r['micro_batch']}: "
              f"{ips} images/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
