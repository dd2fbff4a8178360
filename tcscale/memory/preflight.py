"""The trainer's start-up check: the planner's predicted peak, printed and logged, and on a CUDA device a config
whose prediction exceeds the device's memory refused before any model loads."""

from __future__ import annotations

import torch

from tcscale.config import TrainConfig
from tcscale.memory.planner import GiB, MemoryPlan, PlanError, architecture_name, plan_memory
from tcscale.train.errors import RunInputError

PARAM = "memory/predicted_peak_gib"


class MemoryPreflightError(RunInputError):
    """The configured micro-batch is predicted not to fit the device; the message names one that does
    (a bad input: the launcher's exit code 2)."""


def preflight_memory(cfg: TrainConfig, world_size: int, device: torch.device) -> MemoryPlan | None:
    """The plan of this run (None when not planned: the tiny CPU models, which fit anywhere and whose CPU runs
    should not pay for planning, or a config the planner does not model). On CUDA, raise `MemoryPreflightError`
    when the predicted peak exceeds the device's total memory."""
    try:
        if device.type != "cuda" and architecture_name(cfg) == "tiny":
            return None
        plan = plan_memory(cfg, world_size)
    except PlanError:
        return None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if plan.peak() > total:
            fit = plan.max_micro_batch(total)
            advice = f"deepspeed.train_micro_batch_size_per_gpu={fit} fits"
            if not fit:
                advice = "no micro-batch fits: enable model.gradient_checkpointing, bf16 or a higher ZeRO stage"
            raise MemoryPreflightError(
                f"predicted peak {plan.peak() / GiB:.1f} GiB at micro-batch {plan.micro_batch} exceeds this GPU's "
                f"{total / GiB:.1f} GiB ({advice}; python -m tcscale.memory --config ... explains the figure)"
            )
    return plan


def describe(plan: MemoryPlan | None) -> str:
    if plan is None:
        return "memory plan: skipped (tiny CPU models)"
    return (f"memory plan: predicted peak {plan.peak() / GiB:.2f} GiB per rank at micro-batch {plan.micro_batch} "
            f"({plan.activations_per_sample / 2**20:.0f} MiB activations/sample, static "
            f"{plan.static['total'] / GiB:.2f} GiB, ZeRO-{plan.zero_stage} on {plan.world_size})")  # fmt: skip


def log_plan(tracker, plan: MemoryPlan | None) -> None:
    """The predicted peak as an MLflow param on the tracker's run (rank 0's tracker; others have no client)."""
    client, run_id = getattr(tracker, "client", None), getattr(tracker, "run_id", None)
    if plan is None or client is None or run_id is None:
        return
    try:
        client.log_param(run_id, PARAM, f"{plan.peak() / GiB:.3f}")
    except Exception:  # noqa: BLE001 - a resumed run has the param already; tracking never stops training
        pass
