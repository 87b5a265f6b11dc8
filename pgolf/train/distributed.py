"""Process-group setup from torchrun's variables (the only environment variables pgolf reads)."""

from __future__ import annotations

import dataclasses
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def die_with_parent() -> bool:
    """Under torchrun (LOCAL_RANK set) on Linux: ask the kernel to send this worker SIGTERM when its parent, the
    torchrun agent, dies. torchrun starts its workers in sessions of their own, so a SIGKILL to the job's process
    group (``kill -9``, the OOM killer) would otherwise leave them training and writing into the seed's folder
    while a rerun starts another. Returns whether it was set."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the agent died before prctl took effect: nobody would signal us
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def init_distributed(device_kind: str = "auto") -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun; absent means one process) and join the group.

    NCCL on CUDA, gloo on CPU. ``device_kind``: "auto" (CUDA when available), "cuda" or "cpu". A torchrun worker
    ends when its agent dies (:func:`die_with_parent`).
    """
    die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_kind == "auto" else device_kind == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine (use --device auto or cpu)")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=30),
            device_id=device if use_cuda else None,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_float(value: float, info: DistInfo) -> float:
    """Rank 0's value on every rank (for decisions taken from one clock: stop, loop activation)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.broadcast(t, src=0)
    return float(t.item())


def broadcast_floats(values: list[float], info: DistInfo) -> list[float]:
    """Rank 0's values on every rank, in one collective."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.broadcast(t, src=0)
    return [float(v) for v in t.tolist()]


def max_floats(values: list[float], info: DistInfo) -> list[float]:
    """Each value's maximum over the ranks, in one collective (the slowest rank's clock for a time budget)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(v) for v in t.tolist()]


def sum_ints(values: list[int], info: DistInfo) -> list[int]:
    """Each count summed over the ranks, in one collective (run-wide totals of per-rank counters)."""
    if not info.enabled:
        return [int(v) for v in values]
    t = torch.tensor(values, dtype=torch.int64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]
