"""Static memory per rank: parameters, gradients, optimizer states and the fp32 master copy, as DeepSpeed's ZeRO
stages partition them over the data-parallel ranks (Rajbhandari et al., "ZeRO", SC 2020, §5; DeepSpeed's
``stage_1_and_2.py`` / ``stage3.py``).

For Ψ trainable parameters, N ranks and AdamW (two fp32 states, m and v):

=========  ==========================  ===================  ====================  =====================
stage      parameters (compute dtype)  gradients            optimizer (m, v)      fp32 master copy
=========  ==========================  ===================  ====================  =====================
0          all (+ frozen ones)         all, compute dtype   8Ψ                    4Ψ if bf16/fp16, else 0
1          all                         all                  8Ψ / N                4Ψ / N
2          all                         Ψ / N                8Ψ / N                4Ψ / N
3          Ψ / N                       Ψ / N                8Ψ / N                4Ψ / N
=========  ==========================  ===================  ====================  =====================

ZeRO 1-3 keep the fp32 partition even for an fp32 model (DeepSpeed copies it into ``single_partition_of_fp32_groups``
/ ``fp32_partitioned_groups_flat``). A partition is ceil(Ψ / N) elements (DeepSpeed pads the flat buffer to a
multiple of N; the alignment padding of a few elements is left out). Frozen parameters (not trained) stay whole on
every rank in the compute dtype; under ZeRO-3 they are partitioned with the module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class StaticBytes:
    """Bytes per rank of the trained module's parameters and their training state."""

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
    item = torch.empty((), dtype=dtype).element_size()
    mixed = dtype != torch.float32
    n = world_size if stage >= 1 else 1
    trained_part = _partition(trainable, n)
    params = (trainable + frozen) * item if stage < 3 else (_partition(trainable, n) + _partition(frozen, n)) * item
    grads = (_partition(trainable, world_size) if stage >= 2 else trainable) * item
    optimizer = optimizer_states * 4 * trained_part
    master = 4 * trained_part if (stage >= 1 or mixed) else 0
    return StaticBytes(params, grads, optimizer, master, stage, world_size)
