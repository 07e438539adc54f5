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

_SP = None  # the process group sharing one video's tokens while `sequence_parallel` is active; None: off


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


def check_sp(n: int, heads: int, tokens: int) -> None:
    """Raise ValueError unless N ranks can split `heads` attention heads and `tokens` video tokens evenly."""
    works = [d for d in range(1, heads + 1) if heads % d == 0 and tokens % d == 0]
    if heads % n:
        raise ValueError(f"sequence parallel over {n} ranks: the model's {heads} attention heads are not divisible by "
                         f"{n}; sizes that work for this model and video: --sp {works}")
    if tokens % n:
        raise ValueError(f"sequence parallel over {n} ranks: the video has {tokens} tokens (latent frames x height/patch"
                         f" x width/patch), not divisible by {n}; use --sp {works}, or change --frames / --height / "
                         f"--width so that the token count is a multiple of {n}")


def shard(x: torch.Tensor, dim: int = 1, keep: int = 0) -> torch.Tensor:
    """This rank's contiguous 1/N of x along `dim`; the first `keep` entries (a replicated text prefix) stay whole.

    x: (..., keep + L, ...) -> (..., keep + L/N, ...). Raises ValueError if L is not divisible by N, RuntimeError if
    x requires grad."""
    n = sp_world()
    if n == 1:
        return x
    if x.requires_grad:
        raise RuntimeError("sequence parallel is inference only (no gradient flows through its collectives): run the "
                           "model under torch.no_grad() or with requires_grad_(False) weights")
    video = x.narrow(dim, keep, x.shape[dim] - keep)
    if video.shape[dim] % n:
        raise ValueError(f"sequence parallel over {n} ranks: {video.shape[dim]} video tokens are not divisible by {n}; "
                         "change --frames / --height / --width or --sp (see distributed.check_sp)")
    return torch.cat([x.narrow(dim, 0, keep), video.chunk(n, dim)[sp_rank()]], dim)


def gather(x: torch.Tensor, dim: int = 1, keep: int = 0) -> torch.Tensor:
    """The inverse of `shard`: every rank's part of x along `dim`, in rank order (one all-gather).

    x: (..., keep + L/N, ...) -> (..., keep + L, ...), the same on every rank."""
    n = sp_world()
    if n == 1:
        return x
    part = x.narrow(dim, keep, x.shape[dim] - keep).contiguous()
    parts = part.new_empty((n * part.shape[0], *part.shape[1:]))  # the N parts stacked along dim 0
    dist.all_gather_into_tensor(parts, part, group=_SP)
    return torch.cat([x.narrow(dim, 0, keep), *parts.chunk(n)], dim)


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


def local_index(s: torch.Tensor, length: int, keep: int = 0) -> torch.Tensor:
    """Global sequence indices s (into keep + L tokens) -> indices into this rank's shard (keep + L/N tokens), only
    those the rank holds; the prefix indices (< keep) are the same everywhere. One process: s unchanged."""
    n = sp_world()
    if n == 1:
        return s
    per = (length - keep) // n
    start = keep + sp_rank() * per  # the global index of this rank's first video token
    mine = s[(s >= start) & (s < start + per)] - start + keep
    return torch.cat([s[s < keep], mine])
