"""CogVideoX diffusion transformer (CogVideoX-2B, -5B, CogVideoX1.5-5B; text-to-video), diffusers parameter names.

Sources (read, not copied): diffusers 0.42 `models/transformers/cogvideox_transformer_3d.py`
(CogVideoXTransformer3DModel, the reference our parity tests run against), `models/embeddings.py`
(CogVideoXPatchEmbed, get_3d_sincos_pos_embed, get_3d_rotary_pos_embed, apply_rotary_emb),
`models/attention_processor.py` (CogVideoXAttnProcessor2_0), `models/normalization.py` (CogVideoXLayerNormZero, AdaLayerNorm),
`pipelines/cogvideo/pipeline_cogvideox.py` (_prepare_rotary_positional_embeddings, the 1.5 latent-frame padding);
THUDM/CogVideo `sat/dit_video_concat.py`. Facts: reference/models.md §3.1-3.4, §3.8-3.9.

One prediction: `CogVideoXModel(x, t, context, perturb, branches)` maps a latent (B, C, F, H, W) -- channels before
frames as everywhere in minivdit; diffusers' own tensor is (B, F, C, H, W) -- integer DDPM timesteps (B,) in 0..999 and
T5 embeddings (B, 226, 4096) to the v-prediction (B, C, F, H, W) float32.

The sequence is [226 text tokens | video tokens], text first; text and video share every weight of a block and differ
only in their adaptive-LayerNorm shift / scale / gate ("expert adaLN"). The residual stream the intervention points see
is this joint sequence (B, 226 + L, dim), so STAS token sets are offset by the text prefix (TokenLayout.text_len).
Positions: CogVideoX-2B adds a fixed 3D sin-cos table to the video tokens; 5B and 1.5 rotate q and k of the video
tokens (3D RoPE). Both are computed in `forward` from the latent grid, never stored.

Precision follows diffusers (models.md §0.1): everything runs in the parameter dtype, except the timestep sinusoid
(float32, cast to the parameter dtype before the time MLP) and RoPE (applied in float32, cast back).

CogVideoX1.5 packs patch_size_t = 2 latent frames per token: F must be even. The DiT does not pad: like the diffusers
pipeline, the sampler draws noise for `latent_frames(frames, config)[0]` latent frames (one extra frame in front when
the count is odd) and drops the first `[1]` latent frames of the result before decoding.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from . import distributed
from .attention import ulysses_attention
from .checkpoints import CheckpointError, LazySafetensors, check_keys, load_strict, safetensors_files, shape_of
from .interventions import Perturb, TokenLayout, run_blocks

# ----------------------------------------------------------------------------------------------------------
# helpers: timestep sinusoid, 3D sin-cos table (2B), 3D RoPE (5B, 1.5)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers Timesteps(dim, flip_sin_to_cos=True, freq_shift=0): [cos(t w), sin(t w)], w_i = e^(-ln(1e4) i/half),
    in float32 (as diffusers). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(pos w) | cos(pos w)], w_i = 10000^(-i/(dim/2)), sin first, float64. pos: (n,) -> (n, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    angles = torch.outer(pos.double(), omega)  # (n, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def sincos_table(grid: tuple[int, int, int], dim: int, spatial_scale: float, temporal_scale: float,
                 device=None) -> torch.Tensor:
    """CogVideoX-2B's fixed positions (L, dim) float64 for the token grid (f, h, w), t-major then h then w: per token
    [t (dim/4) | w (3dim/8) | h (3dim/8)]; positions are index / interpolation scale (1.875 spatial, 1.0 temporal)
    in float32. The first spatial half encodes w (diffusers get_3d_sincos_pos_embed's meshgrid, "xy")."""
    f, h, w = grid
    pos = lambda n, s: torch.arange(n, dtype=torch.float32, device=device) / s  # noqa: E731
    ds = 3 * dim // 4
    emb_t = sincos_1d(dim // 4, pos(f, temporal_scale))  # (f, dim/4)
    emb_w = sincos_1d(ds // 2, pos(w, spatial_scale))  # (w, 3dim/8)
    emb_h = sincos_1d(ds // 2, pos(h, spatial_scale))  # (h, 3dim/8)
    return torch.cat([emb_t[:, None, None].expand(f, h, w, -1), emb_w[None, None].expand(f, h, w, -1),
                      emb_h[None, :, None].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, dim)


def resize_crop_region(grid: tuple[int, int], base_w: int, base_h: int):
    """diffusers get_resize_crop_region_for_grid: the (top, left), (bottom, right) box the token grid (h, w) covers
    when fitted (aspect kept, rounded) into the base grid base_h x base_w and centred."""
    h, w = grid
    if h / w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / h * w))
    else:
        rw, rh = base_w, int(round(base_w / w * h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_cos_sin(grid: tuple[int, int, int], head_dim: int, base_hw: tuple[int, int], sliced: bool, device=None):
    """3D RoPE (cos, sin), each (L, head_dim) float32, pairs interleaved, as diffusers' pipeline computes them
    (_prepare_rotary_positional_embeddings + get_3d_rotary_pos_embed), for the token grid (f, h, w).

    head_dim is split t | h | w = head_dim/4 | 3 head_dim/8 | 3 head_dim/8 (16/24/24); axis a of width D_a turns pair j
    by pos * 10000^(-2j/D_a). Positions: CogVideoX 1.0 spreads the grid over its crop of the base grid base_hw
    (config sample size / patch) with linspace -- exactly arange at the default 480x720; 1.5 (sliced) uses arange,
    bounded by the base grid. All in float32, as diffusers.
    """
    f, h, w = grid
    base_h, base_w = base_hw
    f32 = dict(dtype=torch.float32, device=device)
    if sliced:
        if h > base_h or w > base_w:
            raise ValueError(f"token grid {h}x{w} exceeds the RoPE table {base_h}x{base_w} of this CogVideoX1.5 "
                             "config (sample_height, sample_width / patch_size)")
        pos = (torch.arange(f, **f32), torch.arange(h, **f32), torch.arange(w, **f32))
    else:
        (top, left), (bottom, right) = resize_crop_region((h, w), base_w, base_h)
        pos = (torch.linspace(0, f * (f - 1) / f, f, **f32), torch.linspace(top, bottom * (h - 1) / h, h, **f32),
               torch.linspace(left, right * (w - 1) / w, w, **f32))
    axes = []
    for p, d in zip(pos, (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)):
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, **f32) / d)
        axes.append(torch.outer(p, inv_freq))  # (n, d/2)
    angles = torch.cat([axes[0][:, None, None].expand(f, h, w, -1), axes[1][None, :, None].expand(f, h, w, -1),
                        axes[2][None, None].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, -1)  # (L, hd/2)
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)  # (L, head_dim) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2j], x[2j+1]) of x (B, L, heads, head_dim) in float32; returns x's dtype."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, heads, hd/2) each
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)  # (B, L, heads, hd)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# norms, attention, feed-forward


class LayerNormZero(nn.Module):
    """diffusers CogVideoXLayerNormZero: one LayerNorm for both streams, each modulated by its own shift / scale; the
    gates come back for the residual update. linear: SiLU(emb) -> [shift, scale, gate, enc_shift, enc_scale,
    enc_gate] (video first, `enc_` = text)."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)

    def forward(self, h, emb, text_len: int):
        """h: (B, T + L, dim) joint [text | video]; emb: (B, time_embed_dim) -> modulated h, video gate, text gate."""
        shift, scale, gate, enc_shift, enc_scale, enc_gate = self.linear(F.silu(emb))[:, None].chunk(6, dim=-1)
        n = self.norm(h)
        x = torch.cat([n[:, :text_len] * (1 + enc_scale) + enc_shift, n[:, text_len:] * (1 + scale) + shift], dim=1)
        return x, gate, enc_gate  # (B, T + L, dim), (B, 1, dim), (B, 1, dim)


def gated(y, gate, enc_gate, text_len: int):
    """The residual update [enc_gate * y_text | gate * y_video] of a joint (B, T + L, dim) output."""
    return torch.cat([enc_gate * y[:, :text_len], gate * y[:, text_len:]], dim=1)


class Attention(nn.Module):
    """Joint self-attention over [text | video] (diffusers Attention + CogVideoXAttnProcessor2_0): to_q/k/v, a per-head
    LayerNorm on q and k (eps 1e-6, affine), RoPE on the video rows of q and k only, SDPA (scale 1/sqrt(head_dim)),
    to_out.0."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.norm_q, self.norm_k = nn.LayerNorm(head_dim, eps=1e-6), nn.LayerNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])  # to_out.1 is diffusers' dropout

    def forward(self, x, text_len: int, rope=None, identity: bool = False, blur: tuple | None = None):
        """x: (B, T + L, dim) -> (B, T + L, dim). identity: the video rows' attention map is the identity (STG-A, PAG:
        each video token's output is to_out(its value vector)); the text rows attend as usual. blur: SEG's (sigma,
        token grid, text_len): the video queries entering the softmax (after norm and RoPE) are blurred."""
        split = lambda t: t.unflatten(-1, (self.heads, -1))  # noqa: E731  (B, T + L, heads, head_dim)
        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:  # video rows only: the text prefix has no position
            q = torch.cat([q[:, :text_len], apply_rope(q[:, text_len:], *rope)], dim=1)
            k = torch.cat([k[:, :text_len], apply_rope(k[:, text_len:], *rope)], dim=1)
        # the text rows are on every rank, the video rows split under sequence parallel (= attention on 1 rank)
        return self.to_out[0](ulysses_attention(q, k, v, identity_from=text_len if identity else None, keep=text_len,
                                                blur=blur))


class GELU(nn.Module):
    """diffusers GELU(approximate='tanh'): a Linear, then tanh-approximated GELU (name `proj`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear(dim -> 4 dim) -> GELU(tanh) -> Linear(4 dim -> dim); names ff.net.0.proj, ff.net.2 (net.1: dropout)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = nn.Sequential(GELU(dim, inner_dim), nn.Dropout(0.0), nn.Linear(inner_dim, dim))

    def forward(self, x):
        return self.net(x)


# ----------------------------------------------------------------------------------------------------------
# block


class CogVideoXBlock(nn.Module):
    """One block: modulated joint attention, then a modulated FFN over [text | video], each stream with its gates."""

    def __init__(self, dim: int, heads: int, head_dim: int, time_embed_dim: int, eps: float):
        super().__init__()
        self.norm1 = LayerNormZero(time_embed_dim, dim, eps)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = LayerNormZero(time_embed_dim, dim, eps)
        self.ff = FeedForward(dim, 4 * dim)

    def forward(self, h, emb, text_len: int, rope=None, identity_attn: bool = False, blur: tuple | None = None):
        """h: (B, T + L, dim) joint stream, emb: (B, time_embed_dim), rope: (cos, sin) of the L video tokens or None."""
        x, gate_msa, enc_gate_msa = self.norm1(h, emb, text_len)
        h = h + gated(self.attn1(x, text_len, rope, identity_attn, blur), gate_msa, enc_gate_msa, text_len)
        x, gate_ff, enc_gate_ff = self.norm2(h, emb, text_len)
        return h + gated(self.ff(x), gate_ff, enc_gate_ff, text_len)


# ----------------------------------------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class CogVideoXConfig:
    """CogVideoX DiT architecture, diffusers `config.json` field names (the official HF repos are diffusers-format).
    sample_height / sample_width (latent pixels) define the RoPE base grid; patch_size_t = 2 marks CogVideoX1.5."""
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    num_layers: int = 30
    sample_width: int = 90
    sample_height: int = 60
    patch_size: int = 2
    patch_size_t: int | None = None
    max_text_seq_length: int = 226
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    patch_bias: bool = True

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# config.json values every supported (text-to-video) checkpoint has; anything else is another model
FIXED_CONFIG = dict(flip_sin_to_cos=True, freq_shift=0, ofs_embed_dim=None, activation_fn="gelu-approximate",
                    timestep_activation_fn="silu", attention_bias=True, norm_elementwise_affine=True,
                    use_learned_positional_embeddings=False)


def diffusers_config(c: CogVideoXConfig) -> dict:
    """The diffusers `config.json` fields of a CogVideoX DiT (CogVideoXTransformer3DModel(**diffusers_config(c)))."""
    return {**asdict(c), **FIXED_CONFIG}


def latent_frames(frames: int, config: CogVideoXConfig, temporal_stride: int = 4) -> tuple[int, int]:
    """(latent frames the DiT runs on, padded latent frames in front): T = (frames - 1)/4 + 1, padded up to a multiple
    of patch_size_t as the diffusers pipeline does (81 frames -> 21 -> (22, 1) for 1.5); the sampler drops the first
    `padded` latent frames before decoding."""
    t = (frames - 1) // temporal_stride + 1
    pt = config.patch_size_t or 1
    pad = (pt - t % pt) % pt
    return t + pad, pad


class PatchEmbed(nn.Module):
    """diffusers CogVideoXPatchEmbed: text_proj for the T5 tokens; proj = Conv2d(k=s=patch) per latent frame (1.0) or
    Linear over (c, pt, ph, pw) patches, c slowest (1.5)."""

    def __init__(self, c: CogVideoXConfig):
        super().__init__()
        p = c.patch_size
        if c.patch_size_t is None:
            self.proj = nn.Conv2d(c.in_channels, c.dim, kernel_size=p, stride=p, bias=c.patch_bias)
        else:  # 1.5: a Linear, with bias whatever patch_bias says (as diffusers)
            self.proj = nn.Linear(c.in_channels * p * p * c.patch_size_t, c.dim)
        self.text_proj = nn.Linear(c.text_embed_dim, c.dim)
        self.p, self.pt = p, c.patch_size_t

    def forward(self, x, context):
        """x: (B, C, F, H, W), context: (B, T, text_embed_dim) -> [text | video] tokens (B, T + L, dim)."""
        if self.pt is None:
            v = self.proj(rearrange(x, "b c f h w -> (b f) c h w"))  # (B F, dim, H/p, W/p)
            v = rearrange(v, "(b f) d h w -> b (f h w) d", b=x.shape[0])  # (B, L, dim)
        else:
            v = self.proj(rearrange(x, "b c (f pt) (h ph) (w pw) -> b (f h w) (c pt ph pw)",
                                    pt=self.pt, ph=self.p, pw=self.p))  # (B, L, dim)
        return torch.cat([self.text_proj(context), v], dim=1)


class AdaLayerNorm(nn.Module):
    """The output norm (diffusers AdaLayerNorm, chunk_dim=1): LN(x) * (1 + scale) + shift, (shift, scale) from
    Linear(SiLU(emb))."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)

    def forward(self, x, emb):
        shift, scale = self.linear(F.silu(emb))[:, None].chunk(2, dim=-1)  # (B, 1, dim) each
        return self.norm(x) * (1 + scale) + shift


class TimestepEmbedding(nn.Module):
    """Linear(dim -> 512) -> SiLU -> Linear(512 -> 512) (diffusers names linear_1, linear_2)."""

    def __init__(self, dim: int, time_embed_dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim, time_embed_dim), nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class CogVideoXModel(nn.Module):
    """CogVideoX DiT: time / text / patch embeddings, positions, a block loop with perturbation points, output norm,
    projection, unpatchify."""

    keep_fp32 = ()  # diffusers runs every weight in the load dtype (WanModel keeps some in float32)

    def __init__(self, config: CogVideoXConfig):
        super().__init__()
        c = self.config = config
        self.patch_embed = PatchEmbed(c)
        self.time_embedding = TimestepEmbedding(c.dim, c.time_embed_dim)
        self.transformer_blocks = nn.ModuleList(
            CogVideoXBlock(c.dim, c.num_attention_heads, c.attention_head_dim, c.time_embed_dim, c.norm_eps)
            for _ in range(c.num_layers))
        self.norm_final = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.norm_out = AdaLayerNorm(c.time_embed_dim, c.dim, c.norm_eps)
        self.proj_out = nn.Linear(c.dim, c.patch_size ** 2 * (c.patch_size_t or 1) * c.out_channels)

    def layout(self, latent_shape) -> TokenLayout:
        """The token layout of a latent (B, C, F, H, W): the 226-token text prefix, then F / patch_t token frames."""
        c = self.config
        _, _, f, h, w = latent_shape
        pt = c.patch_size_t or 1
        if f % pt or h % c.patch_size or w % c.patch_size:
            raise ValueError(f"latent (F, H, W) = {(f, h, w)} must be multiples of the patch ({pt}, {c.patch_size}, "
                             f"{c.patch_size}); CogVideoX1.5 needs an even latent frame count: pad in front as "
                             "cogvideox.latent_frames says")
        return TokenLayout(frames=f, height=h // c.patch_size, width=w // c.patch_size,
                           text_len=c.max_text_seq_length, patch_t=pt)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, perturb: Perturb | None = None,
                branches: tuple[tuple[int, Perturb], ...] = ()) -> torch.Tensor:
        """Predict v (CogVideoX's v-prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v).

        x: (B, in_channels, F, H, W) latent (F even for 1.5); t: (B,) or scalar integer DDPM timesteps 0..999 (any
        dtype; the sinusoid is float32); context: (B, 226, text_embed_dim) T5 embeddings (text.encode_t5: no trimming,
        no zero rows). perturb / branches: as WanModel (interventions.run_blocks); the intervention points see the
        joint [text | video] stream. Returns v: (B + len(branches), out_channels, F, H, W) float32.
        Inside distributed.sequence_parallel() each rank holds the text and 1/N of the video tokens and every rank
        returns the whole v (README: Many processes).
        """
        c, perturb = self.config, perturb or Perturb()
        b = x.shape[0]
        layout = self.layout(x.shape)
        if context.shape[1] != c.max_text_seq_length:
            raise ValueError(f"context has {context.shape[1]} tokens; CogVideoX takes exactly "
                             f"{c.max_text_seq_length} T5 tokens (text.encode_t5)")
        for p in (perturb, *(p for _, p in branches)):
            p.validate(len(self.transformer_blocks), c.dim)

        dtype = self.proj_out.weight.dtype  # the parameter dtype: diffusers runs the whole DiT in it
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        emb = self.time_embedding(timestep_embedding(t, c.dim).to(dtype))  # (B, time_embed_dim)
        h = self.patch_embed(x.to(dtype), context.to(dtype))  # (B, T + L, dim)
        grid = (layout.token_frames, layout.height, layout.width)
        rope = None
        if c.use_rotary_positional_embeddings:
            base = (c.sample_height // c.patch_size, c.sample_width // c.patch_size)
            rope = rope_cos_sin(grid, c.attention_head_dim, base, sliced=c.patch_size_t is not None, device=x.device)
        else:  # 2B: the fixed table, added to the video tokens (its text rows are 0)
            table = sincos_table(grid, c.dim, c.spatial_interpolation_scale, c.temporal_interpolation_scale, x.device)
            h = torch.cat([h[:, :layout.text_len], h[:, layout.text_len:] + table.to(dtype)], dim=1)

        # sequence parallel: the text on every rank, this rank's video tokens and their global positions
        h = distributed.shard(h, keep=layout.text_len)
        rope = None if rope is None else tuple(distributed.shard(r, dim=0) for r in rope)

        def run(i, h, cond, identity, blur):
            return self.transformer_blocks[i](h, cond[0], layout.text_len, rope, identity_attn=identity,
                                              blur=None if blur is None else (blur, grid, layout.text_len))

        h, (emb,) = run_blocks(run, len(self.transformer_blocks), h, (emb,), perturb, branches, layout)
        v = self.norm_out(self.norm_final(h[:, layout.text_len:]), emb)  # video tokens only: the text is dropped
        out = self.proj_out(v)  # (B', L, out_channels * pt * p * p), features (c, pt, ph, pw), c slowest
        out = distributed.gather(out)  # sequence parallel: all ranks' video tokens (one process: unchanged)
        p = c.patch_size
        out = rearrange(out, "b (f h w) (c pt ph pw) -> b c (f pt) (h ph) (w pw)", f=grid[0], h=grid[1], w=grid[2],
                        pt=layout.patch_t, ph=p, pw=p)  # (B', out_channels, F, H, W)
        return out.float()


# ----------------------------------------------------------------------------------------------------------
# presets


@dataclass(frozen=True)
class Preset:
    """A named CogVideoX model: architecture, companion VAE / scheduler facts, official sampling defaults (models.md
    §3.7-3.8) and the papers' method settings (channel / block indices 0-based). Shares wan.Preset's fields config,
    text_encoder, steps, guidance_scale, frames, height, width, fps, stas, dg, stg; has no flow `shift` and no
    `vae_dim`; adds the VAE scaling factor, the scheduler's SNR shift, the recommended solver and dynamic CFG."""
    config: CogVideoXConfig
    text_encoder: str = "t5-v1_1-xxl"
    vae_scaling_factor: float = 0.7
    snr_shift_scale: float = 1.0
    solver: str = "dpm"  # cli_demo's recommendation: DDIM for 2B, DPM for 5B and 1.5
    dynamic_cfg: bool = True  # as cli_demo (w(t) = 1 + g (1 - cos(pi ((N - t)/N)^5))/2, raw timestep t)
    steps: int = 50
    guidance_scale: float = 6.0
    frames: int = 49
    height: int = 480
    width: int = 720
    fps: int = 8
    stas: dict = field(default_factory=dict)
    dg: dict = field(default_factory=dict)
    stg: dict = field(default_factory=dict)
    # the fields the one sampling loop reads from every preset (pipeline.py), with CogVideoX's values: text-to-video
    # only, one DiT, one timestep per sample, VAE stride (t, h, w) = (4, 8, 8)
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    per_token_t: bool = False
    image: str | None = None
    experts: tuple = ()


# STAS Table A3 (MA channel, block m 0-based, alpha, p in %, K steps); DG zeroes the
# same channel at the same block, w = 1 (as the Wan presets). No STAS row exists for 2B or 1.5. STG: block 30 of 5B,
# the one CogVideoX example of the official STGuidance code (junhahyung/STGuidance CogVideoX/inference.py: CogVideoX-5b,
# layer 30, scale 4.0, rescaling on). Its example says "STG-A", but its pipeline only skips the block for the perturbed
# rows (text and video alike), which is STG-R, so the preset says mode "R"; the scale is not a preset value (see
# guidance.STG_SCALE). No official STG block for 2B (30 layers: block 30 does not exist) or 1.5.
STAS_5B = dict(dims=(1982,), block=8, alpha=1.2, p=8.0, steps=20)
TINY = dict(num_attention_heads=4, attention_head_dim=16, time_embed_dim=32, text_embed_dim=32)
TINY_SAMPLING = dict(text_encoder="tiny", steps=8, frames=9, height=64, width=96,
                     stas=dict(dims=(3,), block=1, alpha=1.2, p=8.0, steps=4), dg=dict(dims=(3,), block=1, scale=1.0),
                     stg=dict(blocks=(2,), mode="R"))

PRESETS = {
    "cogvideox-2b": Preset(CogVideoXConfig(num_attention_heads=30, num_layers=30), vae_scaling_factor=1.15258426,
                           snr_shift_scale=3.0, solver="ddim"),
    "cogvideox-5b": Preset(CogVideoXConfig(num_attention_heads=48, num_layers=42,
                                           use_rotary_positional_embeddings=True),
                           stas=STAS_5B, dg=dict(dims=(1982,), block=8, scale=1.0), stg=dict(blocks=(30,), mode="R")),
    "cogvideox1.5-5b": Preset(CogVideoXConfig(num_attention_heads=48, num_layers=42, sample_width=300,
                                              sample_height=300, patch_size_t=2, patch_bias=False,
                                              use_rotary_positional_embeddings=True),
                              frames=81, height=768, width=1360, fps=16),
    # tiny random-weight architectures for tests and demos: 2B-style (sin-cos), 5B-style (RoPE), 1.5-style (patch_t 2)
    "cogvideox-tiny": Preset(CogVideoXConfig(**TINY, num_layers=3, sample_height=8, sample_width=12),
                             vae_scaling_factor=1.15258426, snr_shift_scale=3.0, solver="ddim", **TINY_SAMPLING),
    "cogvideox-tiny-rope": Preset(CogVideoXConfig(**TINY, num_layers=4, sample_height=8, sample_width=12,
                                                  use_rotary_positional_embeddings=True), **TINY_SAMPLING),
    "cogvideox1.5-tiny": Preset(CogVideoXConfig(**TINY, num_layers=3, sample_height=16, sample_width=16,
                                                patch_size_t=2, patch_bias=False,
                                                use_rotary_positional_embeddings=True), fps=16, **TINY_SAMPLING),
}


# ----------------------------------------------------------------------------------------------------------
# loading

SAT_HELP = ("SAT-format CogVideoX weights are not supported: the official Hugging Face repos THUDM/CogVideoX-2b, "
            "THUDM/CogVideoX-5b and THUDM/CogVideoX1.5-5B (also under zai-org/) are diffusers-format -- pass that "
            "folder (or its transformer/), or convert with diffusers' scripts/convert_cogvideox_to_diffusers.py.")


def detect_layout(keys) -> str:
    """'diffusers', 'sat' (SAT / CogVideo names) or 'unknown', from the key names."""
    keys = list(keys)
    if any(k.startswith(("model.diffusion_model.", "mixins.", "transformer.layers.")) for k in keys):
        return "sat"
    if "proj_out.weight" in keys and "patch_embed.proj.weight" in keys:
        return "diffusers"
    return "unknown"


def find_transformer(path) -> tuple[list[Path], dict | None]:
    """The DiT weight files in a diffusers folder (root with transformer/, or transformer/ itself; sharded with an
    index or not) or a single .safetensors file, and the folder's config.json (None for a single file)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder.")
    sat_states = path.is_dir() and any(path.rglob("mp_rank_*_model_states.pt"))  # SAT: transformer/1000/...
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin") or sat_states:
        raise CheckpointError(f"{path}: {SAT_HELP}")
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    if not path.is_dir():
        return safetensors_files(path), None
    index = sorted(path.glob("diffusion_pytorch_model*.safetensors.index.json"))
    files = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
    if not index and not files:
        raise CheckpointError(f"{path}: no diffusion_pytorch_model*.safetensors here. Expected a diffusers CogVideoX "
                              "folder (THUDM/CogVideoX-2b: transformer/ with config.json and safetensors) or a single "
                              ".safetensors file; see weights/README.md.")
    config = path / "config.json"
    return (safetensors_files(index[0] if index else files[0] if len(files) == 1 else path),
            json.loads(config.read_text()) if config.exists() else None)


def check_config(config_json: dict, c: CogVideoXConfig, where, preset: str) -> None:
    """Raise CheckpointError if a config.json field disagrees with the preset's architecture (or is not T2V)."""
    ignore = set()  # fields that do not change this architecture's output
    if c.patch_size_t is not None:
        ignore.add("patch_bias")  # 1.5's Linear has a bias whatever it says
    if c.use_rotary_positional_embeddings:
        ignore |= {"spatial_interpolation_scale", "temporal_interpolation_scale"}  # sin-cos only
    if not (c.use_rotary_positional_embeddings and c.patch_size_t is None):
        ignore |= {"sample_height", "sample_width"}  # they place 1.0 RoPE only (1.5: a bound; an old 1.5 says 96x170)
    bad = [f"{k}={config_json[k]!r} (preset {preset}: {v!r})" for k, v in diffusers_config(c).items()
           if k in config_json and config_json[k] != v and k not in ignore]
    if bad:
        raise CheckpointError(f"{where}: config.json does not match preset {preset}: {', '.join(bad)}. Only the "
                              f"text-to-video CogVideoX DiTs are supported: {[k for k in PRESETS if 'tiny' not in k]}")


def preset_from_state(sd, config_json: dict | None) -> list[str]:
    """The presets whose shapes (patch embedding kind and size, layers, text dim, output) match a state dict and,
    when a config.json is given, whose architecture agrees with it."""
    proj = shape_of(sd, "patch_embed.proj.weight")
    layers = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")), default=-1)
    found = []
    for name, p in PRESETS.items():
        c = p.config
        want_proj = ((c.dim, c.in_channels, c.patch_size, c.patch_size) if c.patch_size_t is None
                     else (c.dim, c.in_channels * c.patch_size ** 2 * c.patch_size_t))
        if (proj, layers, shape_of(sd, "patch_embed.text_proj.weight"), shape_of(sd, "proj_out.weight")) != (
                want_proj, c.num_layers, (c.dim, c.text_embed_dim),
                (c.patch_size ** 2 * (c.patch_size_t or 1) * c.out_channels, c.dim)):
            continue
        try:
            if config_json is not None:
                check_config(config_json, c, "", name)
        except CheckpointError:
            continue
        found.append(name)
    return found


def open_cogvideox(path, preset: str | None = None):
    """Read a CogVideoX DiT checkpoint's keys and shapes (no weights yet): (lazy state dict, layout, preset, file,
    config.json as a dict or None). Detects the preset from the shapes (and config.json) if preset is None; refuses SAT files and image-to-video
    checkpoints."""
    files, config_json = find_transformer(path)
    where = files[0] if len(files) == 1 else files[0].parent
    sd = LazySafetensors(files)
    layout = detect_layout(sd.keys())
    if layout == "sat":
        raise CheckpointError(f"{where}: layout detected: sat. {SAT_HELP}")
    if layout == "unknown":
        raise CheckpointError(f"{where}: not a CogVideoX DiT checkpoint (no patch_embed.proj / proj_out keys; first "
                              f"keys: {list(sd.keys())[:5]}). Layout detected: unknown.")
    i2v = [k for k in sd.keys() if k.startswith(("ofs_embedding.", "patch_embed.pos_embedding"))]
    if i2v or (config_json or {}).get("in_channels", 16) != 16:
        raise CheckpointError(f"{where}: an image-to-video CogVideoX checkpoint ({i2v or 'in_channels 32'}); only the "
                              "text-to-video DiTs are supported.")
    if preset is None:
        found = preset_from_state(sd, config_json)
        if len(found) != 1:
            raise CheckpointError(
                f"{where}: {'no preset matches' if not found else f'several presets match ({found})'} these weights "
                f"(layout {layout}, patch_embed.proj.weight {shape_of(sd, 'patch_embed.proj.weight')}); pass "
                f"--preset. Known: {list(PRESETS)}")
        preset = found[0]
    elif preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    return sd, layout, preset, where, config_json


def load_cogvideox(path, preset: str | None = None, dtype: torch.dtype | None = None, device="cpu"):
    """Load a CogVideoX DiT (text-to-video) from a diffusers folder or a single .safetensors file; returns (model,
    preset name, layout).

    path: a diffusers root (with transformer/), a transformer/ folder (config.json +
    diffusion_pytorch_model*.safetensors [+ index]) or a single .safetensors file with diffusers names.
    preset: a key of PRESETS; None detects it from the weight shapes and config.json. dtype: parameter dtype (None: as stored; every tensor, as diffusers). Raises
    CheckpointError naming the file, the layout detected and the missing / unexpected / mis-shaped keys.
    """
    sd, layout, preset, where, config_json = open_cogvideox(path, preset)
    with torch.device("meta"):
        model = CogVideoXModel(PRESETS[preset].config)
    check_keys(model, sd, file=where, layout=layout)  # first: a forced preset's error names the mis-shaped keys
    if config_json is not None:
        check_config(config_json, PRESETS[preset].config, where, preset)
    load_strict(model, sd, file=where, layout=layout, dtype=dtype, keep_fp32=CogVideoXModel.keep_fp32)
    return model.to(device).eval().requires_grad_(False), preset, layout
