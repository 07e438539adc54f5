"""torch.distributed for many processes under torchrun: the process group, rank / world size, barrier, and the
split of a sweep's jobs over ranks (data parallel). Without torchrun everything is world size 1 and no process
group exists, so one code path serves `python script.py` and `torchrun --nproc-per-node N script.py`.

The backend follows the device: gloo on the CPU, nccl on CUDA (each rank on GPU LOCAL_RANK). Environment set by
torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torch.distributed's env:// initialisation).
"""
from __future__ import annotations

import heapq
import os

import torch
import torch.distributed as dist


def init(device: str = "cpu") -> str:
    """Join torchrun's process group (once) if WORLD_SIZE is set, with the device's backend; returns the device this
    rank runs on ('cuda' -> 'cuda:LOCAL_RANK'; anything else as given). Without torchrun: nothing to join."""
    cuda = torch.device(device).type == "cuda"
    if cuda and torch.device(device).index is None and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the process that writes merged outputs (tables, reports) and prints summaries."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """x reduced over ranks in place ('sum' | 'max'), on the group's device (gloo: CPU); returns x."""
    if dist.is_initialized():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        on = x if dist.get_backend() != "nccl" else x.cuda()
        dist.all_reduce(on, ops[op])
        x.copy_(on)
    return x


def shard(costs: list[float], world_size: int | None = None) -> list[int]:
    """The rank that runs each job: greedy longest-processing-time assignment (jobs by cost, largest first, ties by
    index; each to the least-loaded rank, ties to the lowest rank). Deterministic, so every rank computes the same
    assignment without communicating; balances the summed cost (e.g. model passes), not the job count."""
    n = world() if world_size is None else world_size
    owner, loads = [0] * len(costs), [(0.0, r) for r in range(n)]
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        load, r = heapq.heappop(loads)
        owner[j] = r
        heapq.heappush(loads, (load + costs[j], r))
    return owner
