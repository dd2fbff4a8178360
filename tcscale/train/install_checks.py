"""The install checks that touch torch.distributed and DeepSpeed (only the training layer imports them); the
rest of `python -m tcscale.doctor` is tcscale/doctor.py."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Check:
    name: str
    status: str  # "ok" | "note" | "skip" | "FAIL"
    detail: str


def check_nccl() -> list[Check]:
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        status = "skip" if not torch.cuda.is_available() else "FAIL"
        return [Check("nccl", status, "torch was built without NCCL")]
    version = ".".join(map(str, torch.cuda.nccl.version()))
    if not torch.cuda.is_available():
        return [Check("nccl", "ok", f"{version} (built in; no GPU to run it on)")]
    try:  # one rank: initialises a communicator and reduces a tensor on the GPU
        store = dist.HashStore()
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
        x = torch.ones(4, device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - every failure here is the finding
        return [Check("nccl", "FAIL", f"{version}: one-rank all-reduce failed: {exc}")]
    return [Check("nccl", "ok", f"{version}, one-rank all-reduce on cuda:0 passed")]


def check_deepspeed() -> list[Check]:
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
    except Exception as exc:  # noqa: BLE001
        return [Check("deepspeed", "FAIL", f"cannot import: {exc}")]
    checks = [
        Check("deepspeed accelerator", "ok", f"{get_accelerator().device_name()} (deepspeed {deepspeed.__version__})")
    ]
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        installed_ops = {}
    # the ops a tcscale config can reach: fused_adam (optimizer torch_adam: false on GPUs), cpu_adam (ZeRO offload)
    for op in ("fused_adam", "cpu_adam"):
        builder = ALL_OPS.get(op)
        if builder is None:
            continue
        if installed_ops.get(op):
            checks.append(Check(f"ds op {op}", "ok", "prebuilt"))
            continue
        try:
            compatible = builder.is_compatible(verbose=False)
        except Exception:  # noqa: BLE001 - a builder probing a missing toolchain raises
            compatible = False
        checks.append(Check(f"ds op {op}", "ok" if compatible else "note",
                            "builds on first use (JIT)" if compatible else "not buildable here"))  # fmt: skip
    return checks
