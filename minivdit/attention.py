"""The one attention function of minivdit. Every attention-level intervention (STG-A) has its home here."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
