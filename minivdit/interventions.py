"""What a model pass changes: token layout, STAS steering, DG channel zeroing, STG block skip / identity attention.

A pass differs from a clean pass only through a `Perturb`, a frozen (hashable) description checked by the model's
block loop at named points:

    before block i:  i in skip           -> the block is skipped: its output is its input      (STG-R, AutoGuidance)
                     i in identity_attn  -> its self-attention map is the identity            (STG-A, PAG)
                     i in blur_attn      -> its self-attention queries are blurred (sigma)    (SEG)
    after block i:   steer.block == i    -> STAS Eq. 3-5 on the block output
                     zero.block == i     -> DG's degraded model: MA channels set to 0
                     capture             -> capture(i, h) is called with every block output

Block indices are 0-based indices into the model's block list; "the output of block m" is the residual stream
after `blocks[m]`. References: STAS (Sec. 5, Eq. 3-5, Alg. 1), DG (Eq. 4-5), STG (appendix, Alg. 1-4).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.utils.checkpoint

from . import distributed

TOKEN_SETS = ("first", "boundary", "first+boundary")
RULES = ("max", "scaling")


@dataclass(frozen=True)
class TokenLayout:
    """Where each token sits in a DiT's sequence.

    frames: latent frames F; height, width: the token grid per frame (latent size / patch size), so each token frame
    holds n = height * width tokens in row-major (h, w) order; text_len: tokens before the video (CogVideoX's
    226-token text prefix, 0 for Wan); patch_t: latent frames per token frame (2 for CogVideoX1.5).

    Rounding: the boundary width of a token frame is k = floor(p / 100 * n) tokens at its head and k at its tail,
    so p = 0 gives no boundary tokens and p = 50 covers the whole frame (its middle token stays interior if n is odd).
    """
    frames: int
    height: int
    width: int
    text_len: int = 0
    patch_t: int = 1

    @property
    def n(self) -> int:
        return self.height * self.width

    @property
    def token_frames(self) -> int:
        return self.frames // self.patch_t

    @property
    def num_tokens(self) -> int:
        return self.text_len + self.token_frames * self.n

    def boundary_width(self, p: float) -> int:
        if not 0 <= p <= 50:
            raise ValueError(f"boundary ratio p={p} must be in [0, 50] (percent of a frame's tokens per side)")
        return math.floor(p / 100 * self.n + 1e-9)

    def first(self) -> torch.Tensor:
        """F0: the tokens of the first (token) frame, as sequence indices (|F0| = n)."""
        return torch.arange(self.text_len, self.text_len + self.n)

    def boundary(self, p: float) -> torch.Tensor:
        """B(p): the head and tail k = floor(p% n) tokens of every token frame, as sorted sequence indices."""
        k = self.boundary_width(p)
        j = torch.arange(self.n)
        in_frame = (j < k) | (j >= self.n - k)  # (n,)
        starts = self.text_len + self.n * torch.arange(self.token_frames)
        return (starts[:, None] + j[in_frame][None]).flatten()

    def tokens(self, which: str, p: float) -> torch.Tensor:
        """The STAS target set S: 'first' (F0), 'boundary' (B(p)) or 'first+boundary' (F0 ∪ B(p)), sorted."""
        if which not in TOKEN_SETS:
            raise ValueError(f"unknown token set {which!r}; choose one of {TOKEN_SETS}")
        sets = {"first": [self.first()], "boundary": [self.boundary(p)],
                "first+boundary": [self.first(), self.boundary(p)]}[which]
        return torch.unique(torch.cat(sets))

    def partition(self, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Disjoint (first frame, boundary outside the first frame, interior) sets covering all video tokens."""
        video = torch.arange(self.text_len, self.num_tokens)
        first, boundary = self.first(), self.boundary(p)
        boundary = boundary[boundary >= self.text_len + self.n]
        rest = torch.ones(self.num_tokens, dtype=torch.bool)
        rest[: self.text_len] = False
        rest[first] = False
        rest[boundary] = False
        return first, boundary, video[rest[self.text_len:]]


@lru_cache(maxsize=64)
def _tokens(layout: TokenLayout, which: str, p: float) -> torch.Tensor:
    return layout.tokens(which, p)


@dataclass(frozen=True)
class Steer:
    """STAS: at the output of block `block`, for channels `dims` and tokens S, replace h[i, d] (STAS Eq. 3-5;
    docs/methods.md#stas).

    rule 'max':     h[i, d] <- alpha * max_j |h[j, d]| * sign(h[i, d])   (the max over the video tokens j of the
                    same sample -- a text prefix, CogVideoX's 226 tokens, is left out -- so a batched pass equals
                    sequential passes);
    rule 'scaling': h[i, d] <- (1 + omega) * h[i, d] (Table 5's ablation; the paper gives no omega: the default 1.5
                    is our choice, the 2.5x amplification of Fig. 3d-e; omega <= 0 is refused, 0 being no steering).
    tokens: 'first' (F0), 'boundary' (B(p)) or 'first+boundary' (F0 ∪ B(p), the paper's S); p in percent [0, 50].
    """
    block: int
    dims: tuple[int, ...]
    alpha: float = 2.5
    p: float = 8.0
    tokens: str = "first+boundary"
    rule: str = "max"
    omega: float = 1.5

    def __post_init__(self):
        if self.alpha < 0:
            raise ValueError(f"STAS alpha={self.alpha} must be >= 0")
        if self.rule == "scaling" and self.omega <= 0:
            raise ValueError(f"STAS scaling rule omega={self.omega}: (1 + omega) h needs omega > 0 (omega = 0 leaves "
                             "h unchanged); the default 1.5 amplifies 2.5x as in STAS Fig. 3")
        if self.rule not in RULES:
            raise ValueError(f"unknown STAS rule {self.rule!r}; choose one of {RULES}")
        if self.tokens not in TOKEN_SETS:
            raise ValueError(f"unknown STAS token set {self.tokens!r}; choose one of {TOKEN_SETS}")
        if not 0 <= self.p <= 50:
            raise ValueError(f"STAS boundary ratio p={self.p} must be in [0, 50] percent")

    def __call__(self, h: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """h: (B, L, D) block output -> (B, L, D) with only the S x M entries changed."""
        if not self.dims:
            return h
        s, m = _tokens(layout, self.tokens, self.p).to(h.device), list(self.dims)
        s = distributed.local_index(s, layout.text_len)  # sequence parallel: the rows of S this rank holds
        hm = h[:, :, m]  # (B, L, |M|)
        if self.rule == "max":
            video = hm[:, layout.text_len:].abs()  # (B, L, |M|) (sequence parallel: this rank's tokens, padding 0)
            if distributed.sp_world() > 1:
                video[:, distributed.sp_valid():] = 0
            # (B, 1, |M|): per sample and channel, over the video tokens only (sequence parallel: over all ranks')
            peak = distributed.all_max(video.amax(dim=1, keepdim=True))
            new = self.alpha * peak * torch.sign(hm[:, s])  # (B, |S|, |M|)
        else:
            new = (1 + self.omega) * hm[:, s]
        h = h.clone()
        h[:, s[:, None], torch.tensor(m, device=h.device)] = new.to(h.dtype)
        return h


@dataclass(frozen=True)
class Zero:
    """DG's degraded model: at the output of block `block`, set channels `dims` to 0 for all tokens (DG Eq. 4;
    docs/methods.md#dg)."""
    block: int
    dims: tuple[int, ...]

    def __call__(self, h: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        h = h.clone()
        h[:, :, list(self.dims)] = 0
        return h


@dataclass(frozen=True)
class Perturb:
    """What one model pass changes; `Perturb()` is a clean pass. See the module docstring for the named points."""
    steer: Steer | None = None
    zero: Zero | None = None
    skip: frozenset[int] = frozenset()
    identity_attn: frozenset[int] = frozenset()
    blur_attn: frozenset[int] = frozenset()
    blur_sigma: float = math.inf
    checkpoint: bool = field(default=False, compare=False)  # recompute each block in backward (FlowMo's gradients)
    capture: Callable[[int, torch.Tensor], None] | None = field(default=None, compare=False)

    def validate(self, num_layers: int, dim: int) -> None:
        """Raise ValueError for a block index out of range or a channel index >= the hidden size."""
        blocks = set(self.skip) | set(self.identity_attn) | set(self.blur_attn)
        for e in (self.steer, self.zero):
            if e is not None:
                blocks.add(e.block)
                bad = [d for d in e.dims if not 0 <= d < dim]
                if bad:
                    raise ValueError(f"channel indices {bad} out of range: the hidden size is {dim}")
        bad = sorted(b for b in blocks if not 0 <= b < num_layers)
        if bad:
            raise ValueError(f"block indices {bad} out of range: the model has blocks 0..{num_layers - 1}")

    def inside(self, i: int) -> tuple[bool, bool, float | None]:
        """What changes inside block i: (skipped, identity attention, SEG query blur sigma or None)."""
        return i in self.skip, i in self.identity_attn, self.blur_sigma if i in self.blur_attn else None

    def edits(self, i: int) -> tuple:
        """The edits applied to the output of block i, in order."""
        return tuple(e for e in (self.steer, self.zero) if e is not None and e.block == i)

    def after(self, i: int, h: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Apply this pass's edits to the output h (B, L, D) of block i, then capture it."""
        for edit in self.edits(i):
            h = edit(h, layout)
        if self.capture is not None:  # sequence parallel: the whole sequence, gathered from all ranks
            self.capture(i, distributed.gather(h, keep=layout.text_len))
        return h


def branch_point(parent: Perturb, child: Perturb, num_layers: int) -> tuple[int, int]:
    """Where `child` first differs from `parent`: (i, 0) = before block i, (i, 1) = after block i, before its edits.

    Passes that share the input and differ only from there on can run the blocks before it once (shared prefix).
    """
    for i in range(num_layers):
        if parent.inside(i) != child.inside(i):
            return i, 0
        if parent.edits(i) != child.edits(i):
            return i, 1
    return num_layers, 0


def run_blocks(block, num_layers: int, h: torch.Tensor, cond: tuple[torch.Tensor, ...], perturb: Perturb,
               branches: tuple[tuple[int, Perturb], ...], layout: TokenLayout):
    """The block loop of a DiT with the perturbation points and shared-prefix branches (used by every family).

    block(i, h, cond, identity_attn, blur_sigma) -> h runs blocks[i] on the residual stream h (B', L, D) with the per-row
    conditioning `cond` (a tuple of tensors with B' rows: time embeddings, text context, ...). `perturb` is checked
    before and after every block (Perturb.inside / Perturb.after). Each branch (row, Perturb) copies input row `row`
    at its branch_point and follows its own Perturb from there; the blocks before run once (shared prefix).
    Returns (h, cond) for all rows: the B input rows, then one row per branch in the order of `branches`.
    """
    groups = [[h, cond, perturb]]  # a group = rows that follow one Perturb
    points = [branch_point(perturb, p, num_layers) for _, p in branches]
    order = []  # branch index of groups[1:]

    def spawn(i, phase):
        for j, ((row, p), point) in enumerate(zip(branches, points)):
            if point == (i, phase):
                h0, cond0 = groups[0][:2]
                groups.append([h0[row:row + 1], tuple(c[row:row + 1] for c in cond0), p])
                order.append(j)

    for i in range(num_layers):
        spawn(i, 0)
        for g in groups:
            skipped, identity, blur = g[2].inside(i)
            if skipped:  # STG-R: a skipped block's output is its input
                continue
            if g[2].checkpoint and torch.is_grad_enabled():  # activation checkpointing: memory of one block
                g[0] = torch.utils.checkpoint.checkpoint(block, i, g[0], g[1], identity, blur, use_reentrant=False)
            else:
                g[0] = block(i, g[0], g[1], identity, blur)
        spawn(i, 1)
        for g in groups:
            g[0] = g[2].after(i, g[0], layout)
    spawn(num_layers, 0)
    groups = groups[:1] + [groups[1 + order.index(j)] for j in range(len(branches))]
    return torch.cat([g[0] for g in groups]), tuple(torch.cat(c) for c in zip(*(g[1] for g in groups)))
