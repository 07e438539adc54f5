"""The one attention function of minivdit. Every attention-level intervention (STG-A) has its home here."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import distributed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, identity_from: int | None = None) -> torch.Tensor:
    """Multi-head scaled-dot-product attention, softmax scale 1/sqrt(head_dim), no mask, non-causal.

    q: (B, Lq, heads, head_dim); k, v: (B, Lk, heads, head_dim) -> (B, Lq, heads * head_dim).
    identity_from: None, or a query index n: query rows >= n get the identity attention map, i.e. their output is
    their own value vector (STG-A, STG paper appendix; requires Lq == Lk). Rows < n (CogVideoX's text prefix)
    attend as usual. Wan uses n = 0.
    """
    if identity_from is None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2)  # (B, Lq, heads * head_dim)
    if q.shape[1] != k.shape[1]:
        raise ValueError("identity attention needs self-attention (queries and keys of equal length)")
    q = q[:, :identity_from]  # only the rows before n attend
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return torch.cat([out, v[:, identity_from:]], dim=1).flatten(2)  # (B, Lq, heads * head_dim)


# ----------------------------------------------------------------------------------------------------------
# sequence parallel (DeepSpeed-Ulysses, arXiv 2309.14509): the same attention over a sequence split across ranks


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, identity_from: int | None = None,
                      keep: int = 0) -> torch.Tensor:
    """`attention` over the full sequence when each rank holds 1/N of the tokens (distributed.sequence_parallel).

    q, k, v: (B, keep + L/N, heads, head_dim), this rank's tokens; the first `keep` rows (CogVideoX's text prefix)
    are the same on every rank. One all-to-all trades the sequence shard for a head shard, (B, keep + L, heads/N,
    head_dim) with the padding of an L not divisible by N dropped, `attention` runs over all tokens for those heads,
    one all-to-all trades back (the prefix rows, whole on every rank, are head-sliced locally and their output
    all-gathered over heads). Returns
    (B, keep + L/N, heads * head_dim), equal to this rank's rows of `attention` on the gathered sequence.
    identity_from: as `attention`, a global query index. Outside sequence parallel (N = 1): exactly `attention`.
    Raises ValueError if the heads are not divisible by N.
    """
    n = distributed.sp_world()
    if n == 1:
        return attention(q, k, v, identity_from)
    distributed.check_sp(n, q.shape[2])
    tokens, per = distributed.sp_tokens()  # L, and each rank's ceil(L/N) (padded at the end)

    def to_heads(x):  # (B, keep + ceil(L/N), heads, hd) -> (B, keep + L, heads/N, hd), the padding dropped
        prefix = x[:, :keep].chunk(n, 2)[distributed.sp_rank()]
        return torch.cat([prefix, distributed.all_to_all(x[:, keep:], 2, 1)[:, :tokens]], 1)

    out = attention(to_heads(q), to_heads(k), to_heads(v), identity_from).unflatten(2, (q.shape[2] // n, -1))
    video = out[:, keep:]  # (B, L, heads/N, hd)
    if n * per > tokens:  # padded back to N ceil(L/N) tokens
        video = torch.cat([video, video.new_zeros(video.shape[0], n * per - tokens, *video.shape[2:])], 1)
    out_video = distributed.all_to_all(video, 1, 2)  # (B, ceil(L/N), heads, hd)
    if keep:  # the prefix rows: all heads, the same on every rank
        out_video = torch.cat([distributed.all_gather(out[:, :keep], dim=2), out_video], 1)
    return out_video.flatten(2)  # (B, keep + ceil(L/N), heads * head_dim)
