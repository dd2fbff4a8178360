"""Process-group set-up and the few collectives the loop needs. Rank logic stays here, not in the loop."""

from __future__ import annotations

import atexit
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tcscale.logs import get_logger


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_missing(device: str) -> str | None:
    """Why a run configured for `device` cannot start here (None when it can): `device: cuda` needs a visible GPU."""
    if device != "cuda" or torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else f"torch {torch.__version__} sees no GPU"
    return (
        f"device: cuda, but no CUDA GPU is visible on this node ({why}; under Slurm request GPUs, e.g. "
        "--gpus-per-node); set device=cpu to train on CPU ranks"
    )


def init_distributed(device: str = "cuda") -> DistEnv:
    """Join the process group set up by the launcher (deepspeed, torchrun, srun), or a 1-process group. `device`:
    cuda (NCCL, one GPU per local rank, when CUDA is available) | cpu (gloo on CPU ranks, even beside a GPU)."""
    import deepspeed

    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    use_cuda = device == "cuda" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    remove_shm_buffer_at_exit()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, local_rank, world, device)


_SHM_BUFFERS_REGISTERED: set[str] = set()


def shm_buffer_path() -> str | None:
    """The /dev/shm file DeepSpeed's CPU all-reduce creates for this rank when it joins a group (its C++ op names it
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>), or None outside a
    group. DeepSpeed never unlinks it: 67 MB of tmpfs, i.e. of RAM, per rank per process."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port and dist.is_initialized()):
        return None
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"


def remove_shm_buffer_at_exit() -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer when the process exits (normally, by an exception
    or by sys.exit from a signal handler). The peers have mapped it by then, so unlinking the name frees nothing they
    still use; a SIGKILLed process cannot clean up (tests/conftest.py removes what a test session leaves)."""
    path = shm_buffer_path()
    if path is None or path in _SHM_BUFFERS_REGISTERED:
        return
    _SHM_BUFFERS_REGISTERED.add(path)

    def _unlink(path: str = path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    atexit.register(_unlink)


def print0(*args, level: int = logging.INFO, sep: str = " ") -> None:
    """Log a message on rank 0 through the `tcscale` logger (tcscale.logs: stdout, the --log-level of the launcher);
    other ranks say nothing."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        get_logger().log(level, sep.join(str(a) for a in args))


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    out = values.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_reduce_min(values: torch.Tensor) -> torch.Tensor:
    out = values.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if the flag is set on any rank (all ranks must call it)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank. Collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def sum_counters(counters: dict[str, float]) -> dict[str, float]:
    """Element-wise sum of per-rank counter dicts (keys may differ between ranks). Collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(counters)
    total: dict[str, float] = {}
    for part in all_gather_objects(dict(counters)):
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def checked_on_rank0(fn):
    """Run `fn` on rank 0 only; every rank then returns its result or raises its exception, marked `agreed`, so
    that all ranks stop together and only rank 0 needs to say why (collective)."""
    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - handed to every rank
            error = exc
    result, error = broadcast_object((result, error))
    if error is not None:
        error.agreed = True
        raise error
    return result
