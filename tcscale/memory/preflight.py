"""The trainer's start-up check: the planner's predicted peak and its parts, printed and logged, and on a CUDA device
a config whose prediction exceeds the device's memory refused before any model loads (``memory.preflight``:
refuse | warn | off)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tcscale.config import TrainConfig
from tcscale.memory.planner import GiB, MemoryPlan, PlanError, architecture_name, plan_memory
from tcscale.train.errors import RunInputError

PARAM = "memory/predicted_peak_gib"
_SHORT = {
    "params": "parameters", "params_partitioned": "parameter partition", "frozen_params": "frozen U-Net",
    "grads": "gradients", "grad_in_flight": "gradient in flight", "flat_grads": "flat gradients",
    "fp32_grads": "fp32 gradients", "master": "fp32 master", "optimizer_states": "Adam states",
    "optimizer_temporaries": "optimizer temporaries", "reduce_buckets": "reduce buckets",
    "reduce_bucket": "reduce bucket", "allreduce_bucket": "all-reduce bucket", "gathered_params": "gathered params",
    "reduce_transient": "reduced slice", "reduce_scatter": "reduce-scatter buffer",
    "activations": "activations", "backward_transient": "backward transient", "frozen_models": "VAE + text encoder",
    "workspace": "workspace",
}  # fmt: skip


class MemoryPreflightError(RunInputError):
    """The configured run is predicted not to fit the device; the message names what to change
    (a bad input: the launcher's exit code 2)."""


@dataclass
class MemoryCheck:
    """The start-up verdict: the plan (None when not planned, `reason` says why) and the device's memory."""

    plan: MemoryPlan | None
    reason: str | None = None  # why there is no plan
    device_bytes: int | None = None  # the GPU's total memory, or the memory this machine has available (CPU)
    device_label: str = ""

    @property
    def fits(self) -> bool | None:
        if self.plan is None or self.device_bytes is None:
            return None
        return self.plan.peak() <= self.device_bytes


def peak_parts_text(plan: MemoryPlan, B: int | None = None, limit: int = 6) -> str:
    """'the optimizer step: Adam states 6.40, fp32 master 3.20, ... GiB': the peak phase's largest parts."""
    B = plan.micro_batch if B is None else B
    phase = plan.peak_phase(B)
    parts = plan.parts(B)["optimizer_step" if phase == "optimizer step" else "backward"]
    ranked = sorted(((v, k) for k, v in parts.items() if v), reverse=True)
    shown = ", ".join(f"{_SHORT.get(k, k)} {v / GiB:.2f}" for v, k in ranked[:limit])
    rest = sum(v for v, _ in ranked[limit:])
    return f"the {phase}: {shown}{f', other {rest / GiB:.2f}' if rest else ''} GiB"


def _advice(plan: MemoryPlan, device_bytes: int) -> str:
    if plan.step_peak() > device_bytes:
        return ("the optimizer step alone does not fit: a higher ZeRO stage over more ranks, LoRA (model.lora.rank=8) "
                "or DeepSpeed's fused Adam (deepspeed.optimizer.params.torch_adam=false) makes it smaller")  # fmt: skip
    fit = plan.max_micro_batch(device_bytes)
    if fit:
        return f"deepspeed.train_micro_batch_size_per_gpu={fit} fits"
    return "no micro-batch fits: enable model.gradient_checkpointing, bf16 or a higher ZeRO stage"


def _available_host_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def preflight_memory(cfg: TrainConfig, world_size: int, device: torch.device) -> MemoryCheck:
    """Plan this run (unless ``memory.preflight: off``, or the tiny models on a CPU, which fit anywhere and whose
    CPU runs should not pay for planning). On CUDA with ``memory.preflight: refuse`` (the default), raise
    `MemoryPreflightError` when the predicted peak exceeds the device's total memory; ``warn`` only says so."""
    mode = cfg.memory.preflight
    if mode == "off":
        return MemoryCheck(None, "memory.preflight=off")
    try:
        if device.type != "cuda" and architecture_name(cfg) == "tiny":
            return MemoryCheck(None, "the tiny models on a CPU fit anywhere; planning them would cost their run time")
        plan = plan_memory(cfg, world_size, target="cuda" if device.type == "cuda" else "cpu")
    except PlanError as exc:
        return MemoryCheck(None, f"the planner does not model this config ({str(exc).splitlines()[0]})")
    if device.type == "cuda":
        total, label = torch.cuda.get_device_properties(device).total_memory, "this GPU's"
    else:
        total, label = _available_host_memory(), "this machine's available"
    check = MemoryCheck(plan, device_bytes=total, device_label=label)
    if device.type == "cuda" and mode == "refuse" and check.fits is False:
        raise MemoryPreflightError(
            f"predicted peak {plan.peak() / GiB:.1f} GiB per rank at micro-batch {plan.micro_batch} exceeds {label} "
            f"{total / GiB:.1f} GiB ({peak_parts_text(plan)}); {_advice(plan, total)}; memory.preflight=warn trains "
            "anyway (python -m tcscale.memory --config ... explains the figure)"
        )
    return check


def describe(check: MemoryCheck) -> str:
    """The start-up line: the predicted peak, the phase that sets it and its largest parts, and the verdict."""
    plan = check.plan
    if plan is None:
        return f"memory plan: not planned ({check.reason})"
    line = (f"memory plan: predicted peak {plan.peak() / GiB:.2f} GiB per rank at micro-batch {plan.micro_batch}, "
            f"ZeRO-{plan.zero_stage} on {plan.world_size} ({peak_parts_text(plan)})")  # fmt: skip
    if check.fits is False:
        line += (f"; WARNING: above {check.device_label} {check.device_bytes / GiB:.1f} GiB — "
                 f"{_advice(plan, check.device_bytes)}")  # fmt: skip
    return line


def log_plan(tracker, check: MemoryCheck) -> None:
    """The predicted peak as an MLflow param on the tracker's run (rank 0's tracker; others have no client)."""
    client, run_id = getattr(tracker, "client", None), getattr(tracker, "run_id", None)
    if check.plan is None or client is None or run_id is None:
        return
    try:
        client.log_param(run_id, PARAM, f"{check.plan.peak() / GiB:.3f}")
    except Exception:  # noqa: BLE001 - a resumed run has the param already; tracking never stops training
        pass
