"""torch.distributed for many processes under torchrun: the process group, rank / world size, barrier, and the
split of a sweep's jobs over ranks (data parallel). Without torchrun everything is world size 1 and no process
group exists, so one code path serves `python script.py` and `torchrun --nproc-per-node N script.py`.

The backend follows the device: gloo on the CPU, nccl on CUDA (each rank on GPU LOCAL_RANK). Environment set by
torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torch.distributed's env:// initialisation).

Sequence parallel (one video's tokens over N ranks, DeepSpeed-Ulysses, arXiv 2309.14509; read, not copied: xDiT/xfuser and
the official Wan `generate.py` `--ulysses_size`, which shard the same way) is the second section.
"""
from __future__ import annotations

import heapq
import os
from contextlib import contextmanager

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


def assign(costs: list[float], world_size: int | None = None) -> list[int]:
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


# ----------------------------------------------------------------------------------------------------------
# sequence parallel (DeepSpeed-Ulysses): the video tokens of one forward split over the ranks of a group
#
# Inside `with sequence_parallel():` every DiT forward keeps 1/N of the video tokens on each of the N ranks (a
# contiguous slice, rank order = sequence order): `shard` after the patch embedding, `gather` once before
# unpatchify. Everything a DiT does per token (norms, modulation, FFN, cross-attention to the text, the head) then
# runs on the shard unchanged; self-attention trades sequence shards for head shards with one all-to-all before and
# one after (attention.ulysses_attention), so each rank attends over the full sequence for heads/N heads. Tokens
# before the video (CogVideoX's 226 text tokens, `keep`) are the same on every rank and are never split. Every rank
# runs the same passes in the same order, so the collectives match. Outside the block (or with N = 1) every function
# here is the identity and nothing is communicated.
#
# A token count L that N does not divide is padded at the end to N * ceil(L/N) with zero tokens: `shard` records L
# for the forward now running, self-attention drops the padding right after its first all-to-all (so no mask is
# needed and no real token attends to it), STAS's max leaves it out and `gather` removes it.

_SP = None  # the process group sharing one video's tokens while `sequence_parallel` is active; None: off
_TOKENS = 0  # L, the video tokens of the forward now running (set by `shard`); each rank holds ceil(L/N) of them


@contextmanager
def sequence_parallel(group=None):
    """Within this block every DiT forward splits its video tokens over the ranks of `group` (default: all ranks
    of the initialized process group). Nested blocks restore the outer setting on exit."""
    global _SP
    outer, _SP = _SP, (group if group is not None else dist.group.WORLD)
    try:
        yield
    finally:
        _SP = outer


def sp_world() -> int:
    """N: the ranks sharing one video's tokens (1 outside `sequence_parallel`)."""
    return 1 if _SP is None else dist.get_world_size(_SP)


def sp_rank() -> int:
    """This rank's index in the sequence-parallel group: it holds tokens [rank L/N, (rank + 1) L/N) of the video."""
    return 0 if _SP is None else dist.get_rank(_SP)


def check_sp(n: int, heads: int) -> None:
    """Raise ValueError unless N ranks can split `heads` attention heads evenly."""
    if n < 1:
        raise ValueError(f"sequence parallel over {n} ranks: N must be >= 1 (--sp 1: one process)")
    if heads % n:
        works = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(f"sequence parallel over {n} ranks: the model's {heads} attention heads are not divisible by "
                         f"{n}; sizes that work for this model: --sp {works}")


def sp_tokens() -> tuple[int, int]:
    """(L, ceil(L/N)): the video tokens of the forward now running and the (padded) share of each rank."""
    return _TOKENS, -(-_TOKENS // sp_world())


def sp_valid() -> int:
    """How many of this rank's ceil(L/N) video tokens are real (the rest is padding, at the end of the last ranks)."""
    tokens, per = sp_tokens()
    return max(0, min(per, tokens - sp_rank() * per))


def shard(x: torch.Tensor, dim: int = 1, keep: int = 0) -> torch.Tensor:
    """This rank's contiguous share of x along `dim`; the first `keep` entries (a replicated text prefix) stay whole.

    x: (..., keep + L, ...) -> (..., keep + ceil(L/N), ...), zero-padded at the end of the last ranks when N does not
    divide L; records L for the forward now running (every `shard` of one forward splits the same L tokens).
    Raises RuntimeError if x requires grad."""
    global _TOKENS
    n = sp_world()
    if n == 1:
        return x
    if x.requires_grad:
        raise RuntimeError("sequence parallel is inference only (no gradient flows through its collectives): run the "
                           "model under torch.no_grad() or with requires_grad_(False) weights")
    video = x.narrow(dim, keep, x.shape[dim] - keep)
    _TOKENS = video.shape[dim]
    per = sp_tokens()[1]
    pad = list(video.shape)
    pad[dim] = n * per - _TOKENS
    video = torch.cat([video, video.new_zeros(pad)], dim)  # (..., N ceil(L/N), ...)
    return torch.cat([x.narrow(dim, 0, keep), video.narrow(dim, sp_rank() * per, per)], dim)


def all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's x, concatenated along `dim` in rank order (one all-gather), the same on every rank."""
    n = sp_world()
    if n == 1:
        return x
    x = x.contiguous()
    parts = x.new_empty((n * x.shape[0], *x.shape[1:]))  # the N parts stacked along dim 0
    dist.all_gather_into_tensor(parts, x, group=_SP)
    return torch.cat(parts.chunk(n), dim)


def gather(x: torch.Tensor, dim: int = 1, keep: int = 0) -> torch.Tensor:
    """The inverse of `shard`: all ranks' tokens of x along `dim`, padding removed.

    x: (..., keep + ceil(L/N), ...) -> (..., keep + L, ...), the same on every rank."""
    if sp_world() == 1:
        return x
    video = all_gather(x.narrow(dim, keep, x.shape[dim] - keep), dim).narrow(dim, 0, _TOKENS)
    return torch.cat([x.narrow(dim, 0, keep), video], dim)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x into N pieces along scatter_dim, send piece j to rank j, concatenate the pieces received along
    gather_dim in rank order (one all_to_all_single). Ulysses: (B, L/N, heads, hd) with (2, 1) -> (B, L, heads/N, hd),
    and back with (1, 2)."""
    n = sp_world()
    pieces = torch.stack(x.chunk(n, scatter_dim)).contiguous()  # (N, ...): piece j goes to rank j
    received = torch.empty_like(pieces)
    dist.all_to_all_single(received, pieces, group=_SP)
    return torch.cat(received.unbind(0), gather_dim)


def all_max(x: torch.Tensor) -> torch.Tensor:
    """The elementwise max of x over the sequence-parallel ranks (all_reduce MAX; in place, returned)."""
    if sp_world() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=_SP)
    return x


def local_index(s: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """Global sequence indices s (into keep + L tokens) -> indices into this rank's shard (keep + ceil(L/N) tokens),
    only those the rank holds; the prefix indices (< keep) are the same everywhere. One process: s unchanged."""
    if sp_world() == 1:
        return s
    per = sp_tokens()[1]
    start = keep + sp_rank() * per  # the global index of this rank's first video token
    mine = s[(s >= start) & (s < start + per)] - start + keep
    return torch.cat([s[s < keep], mine])
