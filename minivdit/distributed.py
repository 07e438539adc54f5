"""torch.distributed helpers: process-group setup, and sequence parallelism (DeepSpeed-Ulysses) for one video.

Sequence parallel: arXiv 2309.14509 (DeepSpeed-Ulysses); read, not copied: xDiT/xfuser and the official Wan
`generate.py` (`--ulysses_size`), which shard the same way.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

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


def _setup_from_env(device: torch.device | str = "cpu") -> None:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) unless already joined; needs torchrun's env.

    A minimal private stand-in for the process-group setup at the top of this module (sweeps branch): the integrator
    replaces it by that one."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("--sp needs torchrun: run `torchrun --nproc-per-node N samplers/sample.py --sp N ...` "
                           "(RANK / WORLD_SIZE are not set, so this process was not started by torchrun)")
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")


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
