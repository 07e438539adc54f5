"""The one attention function of minivdit. Every attention-level intervention has its home here: the identity
attention map (STG-A, PAG) and the blurred queries of SEG."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import distributed

SEG_INF = 9999.0  # SEG: a blur sigma above this is infinite, the query is replaced by its mean (official threshold)


def gaussian_kernel(sigma: float, n: int) -> torch.Tensor:
    """SEG's 1-D Gaussian (official SEG-SDXL `gaussian_blur_2d`): size k = ceil(6 sigma) + 1 made odd, capped at the
    axis length n (n + 1 for even n, so the reflect padding k // 2 stays < n), pdf exp(-(x / sigma)^2 / 2) on
    linspace(-(k - 1) / 2, (k - 1) / 2, k), normalised to sum 1. Returns (k,) float32."""
    k = math.ceil(6 * sigma) + 1
    k = min(k - (1 - k % 2), n - (n % 2 - 1))  # odd, and at most the (odd-rounded) axis length
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def blur_queries(q: torch.Tensor, sigma: float, grid: tuple[int, int, int], start: int = 0) -> torch.Tensor:
    """SEG (Hong 2024; official SEG-SDXL `SEGCFGSelfAttnProcessor`): the video queries blurred with a Gaussian of
    `sigma` tokens over the token grid, **spatially within each token frame** (frames are never mixed); sigma >=
    SEG_INF: every query of a frame becomes the frame's mean query.

    q: (B, L, heads, head_dim); rows start.. are the F * H * W video tokens of `grid` = (F, H, W) in (f, h, w) order
    (rows < start, CogVideoX's text prefix, are left as they are). Per channel (heads x head_dim), separable
    Gaussian (gaussian_kernel per axis), reflect padding, as the official 2-D blur. Returns q's shape and dtype.
    """
    f, h, w = grid
    x = q[:, start:].unflatten(1, (f, h, w))  # (B, F, H, W, heads, head_dim)
    if sigma >= SEG_INF:
        x = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    else:
        b, heads, d = x.shape[0], x.shape[4], x.shape[5]
        img = x.permute(0, 1, 4, 5, 2, 3).reshape(b * f, heads * d, h, w).float()  # (B F, heads d, H, W)
        kh, kw = gaussian_kernel(sigma, h).to(img.device), gaussian_kernel(sigma, w).to(img.device)
        kernel = (kh[:, None] * kw[None, :]).expand(heads * d, 1, -1, -1)  # depthwise (heads d, 1, kh, kw)
        img = F.pad(img, (len(kw) // 2, len(kw) // 2, len(kh) // 2, len(kh) // 2), mode="reflect")
        img = F.conv2d(img, kernel, groups=heads * d).to(q.dtype)  # (B F, heads d, H, W)
        x = img.reshape(b, f, heads, d, h, w).permute(0, 1, 4, 5, 2, 3)  # (B, F, H, W, heads, head_dim)
    return torch.cat([q[:, :start], x.flatten(1, 3)], dim=1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, identity_from: int | None = None,
              blur: tuple | None = None) -> torch.Tensor:
    """Multi-head scaled-dot-product attention, softmax scale 1/sqrt(head_dim), no mask, non-causal.

    q: (B, Lq, heads, head_dim); k, v: (B, Lk, heads, head_dim) -> (B, Lq, heads * head_dim).
    identity_from: None, or a query index n: query rows >= n get the identity attention map, i.e. their output is
    their own value vector (STG-A, STG paper appendix; PAG; requires Lq == Lk). Rows < n (CogVideoX's text prefix)
    attend as usual. Wan uses n = 0.
    blur: None, or (sigma, grid, start): SEG's blurred queries (`blur_queries`) before the softmax; keys and values
    are unchanged.
    """
    if blur is not None:
        q = blur_queries(q, *blur)
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
                      keep: int = 0, blur: tuple | None = None) -> torch.Tensor:
    """`attention` over the full sequence when each rank holds 1/N of the tokens (distributed.sequence_parallel).

    q, k, v: (B, keep + L/N, heads, head_dim), this rank's tokens; the first `keep` rows (CogVideoX's text prefix)
    are the same on every rank. One all-to-all trades the sequence shard for a head shard, (B, keep + L, heads/N,
    head_dim) with the padding of an L not divisible by N dropped, `attention` runs over all tokens for those heads,
    one all-to-all trades back (the prefix rows, whole on every rank, are head-sliced locally and their output
    all-gathered over heads). Returns
    (B, keep + L/N, heads * head_dim), equal to this rank's rows of `attention` on the gathered sequence.
    identity_from, blur: as `attention` (a global query index; SEG's blur runs on the gathered sequence, so its grid
    is the whole video's). Outside sequence parallel (N = 1): exactly `attention`.
    Raises ValueError if the heads are not divisible by N.
    """
    n = distributed.sp_world()
    if n == 1:
        return attention(q, k, v, identity_from, blur)
    distributed.check_sp(n, q.shape[2])
    tokens, per = distributed.sp_tokens()  # L, and each rank's ceil(L/N) (padded at the end)

    def to_heads(x):  # (B, keep + ceil(L/N), heads, hd) -> (B, keep + L, heads/N, hd), the padding dropped
        prefix = x[:, :keep].chunk(n, 2)[distributed.sp_rank()]
        return torch.cat([prefix, distributed.all_to_all(x[:, keep:], 2, 1)[:, :tokens]], 1)

    out = attention(to_heads(q), to_heads(k), to_heads(v), identity_from, blur).unflatten(2, (q.shape[2] // n, -1))
    video = out[:, keep:]  # (B, L, heads/N, hd)
    if n * per > tokens:  # padded back to N ceil(L/N) tokens
        video = torch.cat([video, video.new_zeros(video.shape[0], n * per - tokens, *video.shape[2:])], 1)
    out_video = distributed.all_to_all(video, 1, 2)  # (B, ceil(L/N), heads, hd)
    if keep:  # the prefix rows: all heads, the same on every rank
        out_video = torch.cat([distributed.all_gather(out[:, :keep], dim=2), out_video], 1)
    return out_video.flatten(2)  # (B, keep + ceil(L/N), heads * head_dim)
