"""``python -m tcscale.memory --config CONFIG [key=value ...] [--gpu-mem 24GiB ...] [--world-size N] [--json OUT]``.

Plans one config on the meta device (no weights, no GPU; seconds) and prints a table. Exit 2 with one line on a bad
config key or an unplannable config.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from tcscale.memory.planner import PROVIDERS, GiB, MemoryPlan, MiB, PlanError, plan_memory

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'24GiB' -> bytes (GB = 10^9, GiB = 2^30; a bare number is GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = (m.group(2) or "gib").lower() if m else ""
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 24GiB, 80GB)")
    return int(float(m.group(1)) * _UNITS[unit])


def format_table(plan: MemoryPlan, gpu_labels: list[str]) -> str:
    s = plan.static
    rows = [
        ("architecture", f"{plan.arch} at {plan.resolution} px, {plan.trainable_params:,} trained parameters"),
        ("objective", f"{plan.objective} (provider {plan.provider}, attention {plan.backend}, {plan.phrases} phrases)"),
        ("dtype / checkpointing", f"{plan.dtype} / {'on' if plan.gradient_checkpointing else 'off'}"),
        ("ZeRO", f"stage {plan.zero_stage} over {plan.world_size} rank(s); per rank:"),
        ("  parameters", f"{s['params'] / GiB:9.2f} GiB"),
        ("  gradients", f"{s['grads'] / GiB:9.2f} GiB"),
        ("  optimizer (AdamW m, v fp32)", f"{s['optimizer'] / GiB:9.2f} GiB"),
        ("  fp32 master copy", f"{s['master'] / GiB:9.2f} GiB"),
        ("  frozen VAE + text encoder", f"{plan.frozen_bytes / GiB:9.2f} GiB"),
        ("activations kept / sample", f"{plan.activations_per_sample / MiB:9.1f} MiB"),
        ("transient / sample", f"{plan.transient_per_sample / MiB:9.1f} MiB (2 x largest saved tensor"
         f"{' + largest checkpointed segment' if plan.gradient_checkpointing else ''})"),
        ("workspace", f"{plan.workspace / GiB:9.2f} GiB (CUDA context, library workspaces, fragmentation)"),
        (f"predicted peak at micro-batch {plan.micro_batch}", f"{plan.peak() / GiB:9.2f} GiB"),
    ]  # fmt: skip
    rows += [(f"largest micro-batch on {label}", str(plan.fits[label])) for label in gpu_labels]
    rows.append(("planned in", f"{plan.seconds:.1f} s (meta device: a prediction, nothing was allocated)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcscale.memory", description="tcscale memory planner")
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--gpu-mem", action="append", default=[], help="device memory, e.g. 24GiB (repeatable)")
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (ZeRO partitions)")
    parser.add_argument("--provider", choices=PROVIDERS, default="tcscale", help="official: the official-style replica")
    parser.add_argument(
        "--arch", choices=("sd14", "sd21", "sdxl", "tiny"), default=None, help="override the architecture"
    )
    parser.add_argument("--workspace", default="1.5GiB", help="fixed workspace margin (default 1.5GiB)")
    parser.add_argument("--json", default=None, help="also write the plan as JSON here")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. data.resolution=768")
    args = parser.parse_args(argv)
    try:
        gpu = {label: parse_size(label) for label in args.gpu_mem}
        workspace = parse_size(args.workspace)
    except argparse.ArgumentTypeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.world_size < 1:
        print(f"error: --world-size must be >= 1, got {args.world_size}", file=sys.stderr)
        return 2

    import diffusers

    from tcscale.config import ConfigError, load_config

    diffusers.utils.logging.set_verbosity_error()  # the meta U-Net's dtype cast notice

    overrides = list(args.overrides)
    if args.provider == "official":
        from tcscale.memory.official import OFFICIAL_OVERRIDES

        overrides = [*OFFICIAL_OVERRIDES, *overrides]
    try:
        cfg = load_config(args.config, overrides)
        plan = plan_memory(cfg, args.world_size, provider=args.provider, arch=args.arch, workspace=workspace,
                           gpu_mems=gpu)  # fmt: skip
    except (ConfigError, PlanError) as exc:
        print(f"config error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_table(plan, list(gpu)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(plan.as_dict(), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
