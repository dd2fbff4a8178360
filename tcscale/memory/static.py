"""Per-rank bytes of a DeepSpeed engine's own state — parameters, gradients, fp32 master copy, optimizer states,
the optimizer's temporaries and ZeRO's buffers — in each phase of a step, read from DeepSpeed 0.19's code.

Two views:

* `zero_static_bytes`: what a rank holds between steps once the optimizer states exist (the ZeRO paper's table,
  Rajbhandari et al., SC 2020, §5). For Ψ trainable parameters, N ranks and AdamW (two fp32 states, m and v):

  =========  ==========================  ===================  ====================  =====================
  stage      parameters (compute dtype)  gradients            optimizer (m, v)      fp32 master copy
  =========  ==========================  ===================  ====================  =====================
  0          all (+ frozen ones)         all, compute dtype   8Ψ                    4Ψ if bf16/fp16, else 0
  1          all                         all                  8Ψ / N                4Ψ / N
  2          all                         Ψ / N                8Ψ / N                4Ψ / N
  3          Ψ / N                       Ψ / N                8Ψ / N                4Ψ / N
  =========  ==========================  ===================  ====================  =====================

* `engine_phase_bytes`: the peak of each phase — the engine build, the micro-step's backward and the optimizer
  step — as the sum of named parts live at that phase's worst moment (docs/MEMORY.md "The optimizer step"). This is
  what decides whether a run fits: the first optimizer step converts the gradient partition to fp32, creates the
  Adam states and runs the optimizer's temporaries on top of everything else, and the backward holds ZeRO's
  reduce buckets, whose size is the config's, not the model's.

A partition is ceil(Ψ / N) elements (DeepSpeed pads its flat buffers to a multiple of N; the few alignment elements
are left out). Frozen parameters stay whole on every rank in the compute dtype; under ZeRO-3 they are partitioned
with the module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# DeepSpeed's defaults (deepspeed/runtime/zero/config.py: DeepSpeedZeroConfig; runtime/engine.py:
# MEMORY_OPT_ALLREDUCE_SIZE, the bucket of the non-ZeRO gradient all-reduce)
DS_REDUCE_BUCKET = 500_000_000
DS_ALLGATHER_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
DS_PERSISTENCE_THRESHOLD = 100_000
DS_ALLREDUCE_BUCKET = 500_000_000


@dataclass(frozen=True)
class StaticBytes:
    """Bytes per rank of the trained module's parameters and their training state, between steps."""

    params: int
    grads: int
    optimizer: int  # AdamW m and v, fp32
    master: int  # fp32 master copy of the trained parameters
    stage: int
    world_size: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.master

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _partition(numel: int, world_size: int) -> int:
    return math.ceil(numel / world_size)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def zero_static_bytes(
    trainable: int, frozen: int, *, dtype: torch.dtype, stage: int, world_size: int, optimizer_states: int = 2
) -> StaticBytes:
    """Per-rank static bytes of a module with `trainable` trained and `frozen` untrained parameters, trained in
    `dtype` under ZeRO `stage` on `world_size` ranks with an optimizer of `optimizer_states` fp32 states per
    parameter (AdamW: 2)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0..3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    item = _itemsize(dtype)
    mixed = dtype != torch.float32
    n = world_size if stage >= 1 else 1
    trained_part = _partition(trainable, n)
    params = (trainable + frozen) * item if stage < 3 else (_partition(trainable, n) + _partition(frozen, n)) * item
    grads = (_partition(trainable, world_size) if stage >= 2 else trainable) * item
    optimizer = optimizer_states * 4 * trained_part
    master = 4 * trained_part if (stage >= 1 or mixed) else 0
    return StaticBytes(params, grads, optimizer, master, stage, world_size)


# -- the config's settings -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO settings that size DeepSpeed's buffers, with DeepSpeed's defaults for what a config leaves out."""

    stage: int = 0
    reduce_bucket_size: int = DS_REDUCE_BUCKET  # elements
    allgather_bucket_size: int = DS_ALLGATHER_BUCKET
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = DS_PREFETCH_BUCKET  # ZeRO-3
    max_live_parameters: int = DS_MAX_LIVE_PARAMETERS  # ZeRO-3
    param_persistence_threshold: int = DS_PERSISTENCE_THRESHOLD  # ZeRO-3

    @classmethod
    def from_config(cls, ds: dict[str, Any]) -> ZeroSettings:
        """From a DeepSpeed config dict (its ``zero_optimization`` section; the ``stage3_`` aliases accepted)."""
        z = dict(ds.get("zero_optimization") or {})
        stage = int(z.get("stage", 0))
        overlap = z.get("overlap_comm")
        return cls(
            stage=stage,
            reduce_bucket_size=int(z.get("reduce_bucket_size", DS_REDUCE_BUCKET)),
            allgather_bucket_size=int(z.get("allgather_bucket_size", DS_ALLGATHER_BUCKET)),
            # DeepSpeedZeroConfig.overlap_comm_valid: unset means on for ZeRO-3, off otherwise
            overlap_comm=bool(stage == 3 if overlap is None else overlap),
            contiguous_gradients=bool(z.get("contiguous_gradients", True)),
            prefetch_bucket_size=int(z.get("stage3_prefetch_bucket_size", z.get("prefetch_bucket_size",
                                                                                 DS_PREFETCH_BUCKET))),
            max_live_parameters=int(z.get("stage3_max_live_parameters", z.get("max_live_parameters",
                                                                               DS_MAX_LIVE_PARAMETERS))),
            param_persistence_threshold=int(z.get("stage3_param_persistence_threshold",
                                                  z.get("param_persistence_threshold", DS_PERSISTENCE_THRESHOLD))),
        )  # fmt: skip


OPTIMIZER_IMPLS = ("single_tensor", "foreach", "fused", "deepspeed")


@dataclass(frozen=True)
class OptimizerSpec:
    """Which Adam runs the step and how it computes, for its temporaries.

    * ``torch`` (``"torch_adam": true``: ``torch.optim.AdamW``): ``foreach`` on CUDA (its default there),
      ``single_tensor`` on a CPU (torch's default for CPU tensors), ``fused`` when the config asks for it;
    * ``deepspeed`` (DeepSpeed's FusedAdam on a GPU, its CPU Adam on a CPU): updates in place, no temporaries.
    """

    impl: str = "foreach"
    states: int = 2  # fp32 tensors per parameter (m and v)

    def __post_init__(self):
        if self.impl not in OPTIMIZER_IMPLS:
            raise ValueError(f"optimizer implementation must be one of {OPTIMIZER_IMPLS}, got {self.impl!r}")

    @classmethod
    def from_config(cls, ds: dict[str, Any], device_type: str = "cuda") -> OptimizerSpec:
        opt = ds.get("optimizer") or {}
        name = str(opt.get("type", "AdamW")).lower()
        if name not in ("adam", "adamw"):
            raise ValueError(f"deepspeed.optimizer.type={opt.get('type')}: the memory planner models Adam and AdamW")
        params = opt.get("params") or {}
        if not params.get("torch_adam", False):
            return cls("deepspeed")
        if params.get("fused"):
            return cls("fused")
        foreach = params.get("foreach")
        if foreach is None:  # torch.optim.optimizer._default_to_fused_or_foreach: foreach kernels are GPU-only
            foreach = device_type != "cpu"
        return cls("foreach" if foreach else "single_tensor")

    @property
    def label(self) -> str:
        return {"single_tensor": "torch AdamW (single-tensor)", "foreach": "torch AdamW (foreach)",
                "fused": "torch AdamW (fused)", "deepspeed": "DeepSpeed Adam"}[self.impl]  # fmt: skip

    def temporary(self, tensors: list[int]) -> int:
        """Bytes the step allocates beyond its states, stepping fp32 tensors of these element counts.

        torch/optim/adam.py: `_single_tensor_adam` builds ``denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt)``
        per tensor (two tensor-sized fp32 temporaries at once); `_multi_tensor_adam` keeps ``exp_avg_sq_sqrt =
        torch._foreach_sqrt(exp_avg_sqs)`` for the whole group (one fp32 copy of every tensor) and updates the rest
        in place; the fused kernels (torch's ``fused=True``, DeepSpeed's FusedAdam / CPU Adam) allocate nothing."""
        if not tensors or self.impl in ("fused", "deepspeed"):
            return 0
        if self.impl == "single_tensor":
            return 2 * 4 * max(tensors)
        return 4 * sum(tensors)


# -- the phases ------------------------------------------------------------------------------------------------------
PHASES = ("build", "backward", "step", "backward2")


@dataclass
class PhaseBytes:
    """The parts live at a phase's worst moment (bytes per rank)."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def add(self, **parts: int) -> PhaseBytes:
        return PhaseBytes({**self.parts, **{k: v for k, v in parts.items() if v}})


def _worst(*candidates: PhaseBytes) -> PhaseBytes:
    return max(candidates, key=lambda c: c.total)


def engine_phase_bytes(
    trainable: int,
    frozen: int,
    *,
    dtype: torch.dtype,
    world_size: int,
    zero: ZeroSettings,
    optimizer: OptimizerSpec,
    largest_param: int,
    initial_param_bytes: int | None = None,
    ema: bool = False,
    backend: str = "nccl",
) -> dict[str, PhaseBytes]:
    """Per-rank peak of each phase (`PHASES`: the engine build, the first micro-step's backward, the first optimizer
    step, a later micro-step's backward) from the engine's own state; the caller adds activations and the backward's
    transients to the backward phases, and any workspace.

    `largest_param`: the element count of the largest trained tensor (single-tensor AdamW steps tensor by tensor,
    DeepSpeed casts and reduces parameter by parameter). `initial_param_bytes`: what the trained module's
    parameters occupy when handed to ``deepspeed.initialize`` (default: fp32, as a pretrained U-Net is loaded). `ema`:
    the run keeps tcscale.train.ema.ShardedEMA, an fp32 average of this rank's share of the master weights, made
    once the engine is built and held from then on: 4 bytes x trained / world size (ZeRO 1-3 and bf16, whose
    optimizer partitions the master weights even at stage 0), 4 bytes x trained at stage 0 otherwise. `backend`: the
    process group's backend, ``"nccl"`` (GPU ranks) or ``"gloo"`` (CPU ranks): gloo's all-gather goes through a
    temporary the size of its whole output, NCCL's writes in place."""
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if zero.stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0..3, got {zero.stage}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    s = _itemsize(dtype)
    psi, n = trainable, world_size
    p = _partition(psi, n)
    initial = 4 * psi if initial_param_bytes is None else initial_param_bytes
    frozen_bytes = (frozen if zero.stage < 3 else _partition(frozen, n)) * s
    build_common = {"frozen_params": frozen_bytes} if frozen_bytes else {}
    # DeepSpeedEngine._cast_module_mixed_precision: ``p.data = p.data.to(dtype)`` one parameter at a time
    cast = PhaseBytes({**build_common, "params_before_cast": initial, "cast_param": largest_param * s * (s != 4)})
    if zero.stage == 0:
        phases = _stage0(psi, s, optimizer, largest_param, n)
    elif zero.stage in (1, 2):
        phases = _stage12(psi, p, s, zero, optimizer, largest_param, n, backend)
    else:
        phases = _stage3(psi, p, s, zero, optimizer, largest_param, n)
    partitioned = zero.stage > 0 or dtype == torch.bfloat16
    ema_bytes = 4 * (p if partitioned else psi) if ema else 0
    out = {}
    for name, phase in phases.items():
        phase = PhaseBytes({**build_common, **phase.parts})
        out[name] = _worst(phase, cast) if name == "build" else phase.add(ema=ema_bytes)
    return out


def _stage0(psi: int, s: int, opt: OptimizerSpec, largest: int, n: int) -> dict[str, PhaseBytes]:
    """No ZeRO. fp32: the basic optimizer on the module's own parameters, its states created at the first step.
    bf16/fp16 (runtime/fp16/): FP16_Optimizer (with DeepSpeed's Adam: one flat fp16 buffer and its fp32 copy) or
    FP16_UnfusedOptimizer (with a torch optimizer: an fp32 copy per parameter). Both run ``initialize_optimizer_states``
    (zero gradients, one optimizer step) while the engine is built, so their states exist from the build on, and both
    convert the gradients to fp32 at the step (``p.grad.to(fp32)``; FP16_Optimizer then flattens them)."""
    params = psi * s
    temps_per_param = opt.temporary([largest] if opt.impl == "single_tensor" else [psi])
    states = opt.states * 4 * psi
    # engine.allreduce_gradients -> buffered_allreduce_fallback -> allreduce_no_retain: each bucket of up to
    # MEMORY_OPT_ALLREDUCE_SIZE elements (plus the tensor that crosses it) is flattened into one new tensor, even on
    # one rank
    flat = min(psi, DS_ALLREDUCE_BUCKET + largest) * s
    if s == 4:
        build = PhaseBytes({"params": params})
        backward = build.add(grads=psi * s, allreduce_bucket=flat)
        step = build.add(grads=psi * s, optimizer_states=states, optimizer_temporaries=temps_per_param)
        return {"build": build, "backward": backward, "step": step,
                "backward2": backward.add(optimizer_states=states)}  # fmt: skip
    held = PhaseBytes({"params": params, "master": 4 * psi, "optimizer_states": states})
    if opt.impl == "deepspeed":  # FP16_Optimizer: fp32_groups_flat[i].grad = zeros, FusedAdam in place
        build = held.add(fp32_grads=4 * psi)
        step = held.add(grads=psi * s, fp32_grads=4 * psi, flat_grads=4 * psi)  # per-parameter copies + their cat
    else:  # FP16_UnfusedOptimizer: zero gradients for both copies, then the optimizer's step
        build = held.add(grads=psi * s, fp32_grads=4 * psi, optimizer_temporaries=temps_per_param)
        step = held.add(grads=psi * s, fp32_grads=4 * psi, optimizer_temporaries=temps_per_param)
    backward = held.add(grads=psi * s, allreduce_bucket=flat)
    return {"build": build, "backward": backward, "step": step, "backward2": backward}


def _stage12(psi: int, p: int, s: int, zero: ZeroSettings, opt: OptimizerSpec, largest: int, n: int, backend: str):
    """ZeRO-1/2: DeepSpeedZeroOptimizer (runtime/zero/stage_1_and_2.py)."""
    flat = psi * s  # bit16_groups_flat: the trained parameters, one flat buffer, on every rank
    master = 4 * p  # single_partition_of_fp32_groups: ``partition.clone().to(fp32)`` (a copy even for fp32)
    held = PhaseBytes({"params": flat, "master": master})
    build = _worst(
        PhaseBytes({"params_before_flatten": psi * s, "params": flat}),  # flatten_dense_tensors_aligned
        held.add(master_clone=p * s if s != 4 else 0),  # the clone before .to(fp32)
        held.add(fp32_grads=4 * p),  # initialize_optimizer_states: a zero fp32 gradient partition
    )
    # backward: setup_buckets allocates reduce_bucket_size elements per buffer (two with overlap_comm) at the first
    # gradient hook; copy_grads_in_partition keeps this rank's gradients in grads_in_partition (the parameters that
    # touch the partition, up to one parameter more than the partition); _release_ipg_buffers frees the buckets
    buckets = zero.reduce_bucket_size * s * (2 if zero.overlap_comm else 1) if zero.contiguous_gradients else 0
    grads = min(psi, p + largest) * s
    # average_tensor -> allreduce_no_retain(rank=dst): on several ranks each destination's slices of the bucket are
    # flattened into a new tensor for its reduce, one destination at a time (one rank's slice is a view)
    reduce = min(p, zero.reduce_bucket_size) * s if n > 1 else 0
    backward = held.add(reduce_buckets=buckets, grads=grads, reduce_transient=reduce, grad_in_flight=largest * s)
    # step: flatten(averaged_gradients) then ``.to(fp32)`` (single_grad_partition), the compute-dtype gradients
    # freed after it; the Adam states are created by the first optimizer.step (lazy state init)
    fp32_grads = 4 * p
    states = opt.states * 4 * p
    convert = held.add(grads=grads, flat_grads=p * s, fp32_grads=fp32_grads if s != 4 else 0)
    update = held.add(fp32_grads=fp32_grads, optimizer_states=states, optimizer_temporaries=opt.temporary([p]))
    # then all_gather_dp_groups gathers every rank's updated partition into the flat parameters (the fp32 gradient
    # freed): in place with NCCL, through a whole-output temporary with gloo (measured on CPU ranks, docs/MEMORY.md)
    gather = held.add(optimizer_states=states, allgather_copy=psi * s) if n > 1 and backend == "gloo" else held
    return {"build": build, "backward": backward, "step": _worst(convert, update, gather),
            "backward2": backward.add(optimizer_states=states)}  # fmt: skip


def _stage3(psi: int, p: int, s: int, zero: ZeroSettings, opt: OptimizerSpec, largest: int, n: int):
    """ZeRO-3: DeepSpeedZeroOptimizer_Stage3 (runtime/zero/stage3.py, partition_parameters.py)."""
    part = p * s  # fp16_partitioned_groups_flat: this rank's parameter partition
    master = 4 * p  # fp32_partitioned_groups_flat
    # _setup_for_real_optimizer: the reduce bucket (reduce_bucket_size elements) and grad_partitions_flat_buffer
    # (this rank's gradient partition) are allocated with the optimizer, before any backward
    bucket = zero.reduce_bucket_size * s if zero.contiguous_gradients else 0
    held = PhaseBytes({"params": part, "master": master, "reduce_bucket": bucket, "grads": p * s})
    build = _worst(
        PhaseBytes({"params_before_partition": psi * s, "params": part}),
        # _create_fp32_partitions converts the partition to fp32 into a second buffer; initialize_optimizer_states
        # then hangs a zero fp32 gradient on it: two fp32 partitions at once, before the bucket exists
        PhaseBytes({"params": part, "master": master, "fp32_grads": 4 * p}),
        held,
    )
    # backward: __avg_scatter_grads -> reduce_scatter_coalesced concatenates the bucket's gradients (every rank's
    # share, padded) into one flat buffer; the module being computed holds its gathered parameters
    in_bucket = min(psi, zero.reduce_bucket_size) * s
    backward = held.add(reduce_scatter=2 * in_bucket, gathered_params=largest * s)
    states = opt.states * 4 * p
    # step: flatten(averaged_gradients).to(fp32) per sub-group, then the update; states created at the first step
    convert = held.add(flat_grads=p * s, fp32_grads=4 * p if s != 4 else 0)
    update = held.add(fp32_grads=4 * p, optimizer_states=states, optimizer_temporaries=opt.temporary([p]))
    return {"build": build, "backward": backward, "step": _worst(convert, update),
            "backward2": backward.add(optimizer_states=states)}  # fmt: skip
