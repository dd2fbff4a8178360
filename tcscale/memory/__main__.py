"""``python -m tcscale.memory --config CONFIG [key=value ...] [--gpu-mem 24GiB ...] [--world-size N] [--json OUT]``.

Plans one config on the meta device (no weights, no GPU; seconds) and prints a table: the optimizer-step peak and
the backward peak, each with its parts, the larger of the two as the predicted peak. ``--json`` writes the plan with
``predicted_peak`` (bytes, micro-batch 1) and ``predicted_peak_parts``. Exit 2 with one line on a bad config key or
an unplannable config.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from tcscale.memory.planner import PROVIDERS, GiB, MemoryPlan, MiB, PlanError, plan_memory
from tcscale.memory.static import OptimizerSpec
from tcscale.models.architectures import ARCHITECTURES

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'24GiB' -> bytes (GB = 10^9, GiB = 2^30; a bare number is GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = (m.group(2) or "gib").lower() if m else ""
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 24GiB, 80GB)")
    return int(float(m.group(1)) * _UNITS[unit])


_PART_LABELS = {
    "params": "parameters (compute dtype)",
    "params_partitioned": "parameter partition",
    "frozen_params": "frozen U-Net parameters",
    "grads": "gradients (compute dtype)",
    "grad_in_flight": "a gradient being reduced",
    "flat_grads": "flattened gradient partition",
    "fp32_grads": "fp32 gradient partition",
    "master": "fp32 master copy",
    "optimizer_states": "Adam states (m, v fp32)",
    "optimizer_temporaries": "optimizer temporaries",
    "reduce_buckets": "ZeRO reduce buckets",
    "reduce_bucket": "ZeRO-3 reduce bucket",
    "allreduce_bucket": "all-reduce bucket",
    "reduce_transient": "a rank's reduced slice",
    "reduce_scatter": "reduce-scatter buffer",
    "gathered_params": "ZeRO-3 gathered parameters",
    "activations": "activations kept",
    "backward_transient": "backward transient",
    "frozen_models": "frozen VAE + text encoder",
    "workspace": "workspace",
}


def _gib(n: int) -> str:
    return f"{n / GiB:9.2f} GiB"


def format_table(plan: MemoryPlan, gpu_labels: list[str]) -> str:
    parts = plan.parts(1)
    rows = [
        ("architecture", f"{plan.arch} at {plan.resolution} px, {plan.trainable_params:,} trained parameters"),
        ("objective", f"{plan.objective} (provider {plan.provider}, attention {plan.backend}, {plan.phrases} phrases)"),
        ("dtype / checkpointing", f"{plan.dtype} / {'on' if plan.gradient_checkpointing else 'off'}"),
        ("ZeRO / optimizer",
         f"stage {plan.zero_stage} over {plan.world_size} rank(s), {OptimizerSpec(plan.optimizer).label}"),
        ("activations kept / sample", f"{plan.activations_per_sample / MiB:9.1f} MiB"),
        ("transient / sample", f"{plan.transient_per_sample / MiB:9.1f} MiB (2 x largest saved tensor"
         f"{' + largest checkpointed segment' if plan.gradient_checkpointing else ''})"),
    ]  # fmt: skip
    for title, key, peak in (("optimizer step", "optimizer_step", plan.step_peak()),
                             ("backward at micro-batch 1", "backward", plan.backward_peak(1))):  # fmt: skip
        rows.append((f"{title} peak", _gib(peak)))
        rows += [(f"  {_PART_LABELS.get(k, k)}", _gib(v)) for k, v in parts[key].items() if v]
    rows.append(("predicted peak at micro-batch 1", f"{plan.peak(1) / GiB:9.2f} GiB (the {plan.peak_phase(1)})"))
    if plan.micro_batch != 1:
        rows.append((f"predicted peak at micro-batch {plan.micro_batch}", _gib(plan.peak())))
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
    parser.add_argument("--arch", choices=(*ARCHITECTURES, "tiny"), default=None, help="override the architecture")
    parser.add_argument(
        "--workspace", default=None, help="fixed workspace margin (default 1.5GiB on cuda, 3.5GiB on cpu)"
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="the device the run trains on (torch AdamW's default implementation differs)",
    )
    parser.add_argument("--json", default=None, help="also write the plan as JSON here")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. data.resolution=768")
    args = parser.parse_args(argv)
    try:
        gpu = {label: parse_size(label) for label in args.gpu_mem}
        workspace = parse_size(args.workspace) if args.workspace is not None else None
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
                           gpu_mems=gpu, target=args.device)  # fmt: skip
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
