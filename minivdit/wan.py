"""Wan2.1 / Wan2.2 diffusion transformer, with the official native parameter names.

Sources: Wan-Video/Wan2.1 `wan/modules/model.py` (WanModel), Wan-Video/Wan2.2 `wan/modules/model.py` (per-token
timesteps), diffusers `transformer_wan.py` (WanTransformer3DModel, the reference our parity tests run against).
Facts: reference/models.md §2.1-2.4.

One prediction: `WanModel(x, t, context, perturb)` maps a latent (B, C, F, H, W), timesteps on the 0..1000 scale and
zero-padded text embeddings (B, 512, 4096) to the flow velocity v = noise - x0, (B, C, F, H, W), float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from . import distributed
from .attention import attention, ulysses_attention
from .checkpoints import CheckpointError, LazySafetensors, Renamed, load_strict, safetensors_files, shape_of
from .interventions import Perturb, TokenLayout, run_blocks

# ----------------------------------------------------------------------------------------------------------
# helpers


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep sinusoid [cos(t w), sin(t w)], w_i = 10000^(-i/(dim/2)), cos first; float64 as official. (..., dim)"""
    half = dim // 2
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_angles(grid: tuple[int, int, int], head_dim: int, device=None, theta: float = 10000.0) -> torch.Tensor:
    """3D RoPE rotations exp(i pos w) as complex64 (L, head_dim/2), from the integer token grid positions (f, h, w).

    The head dim is split t | h | w = head_dim - 4(head_dim//6) | 2(head_dim//6) | 2(head_dim//6) (44/42/42 for 128);
    axis a of width D_a rotates pair j by pos * theta^(-2j/D_a). Angles in float64 (official `rope_params`), the
    rotation applied in complex64, i.e. float32 products, as diffusers (the official code multiplies in complex128).
    """
    sizes = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    axes = []
    for n, d in zip(grid, sizes):
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        axes.append(torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv_freq))  # (n, d/2)
    f, h, w = grid
    angles = torch.cat([axes[0][:, None, None].expand(f, h, w, -1),
                        axes[1][None, :, None].expand(f, h, w, -1),
                        axes[2][None, None, :].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, -1)  # (L, hd/2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of x (B, L, heads, head_dim) as complex numbers by rope (L, head_dim/2)
    complex64 (official `rope_apply`): one complex product in float32, no stack / flatten copies; returns x's dtype."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, L, heads, hd/2) complex64, a view
    return torch.view_as_real(pairs * rope[:, None]).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------------------
# norms and attention


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, times weight (Wan's WanRMSNorm). F.rms_norm without a weight
    computes in float32 and rounds once to x's dtype, so it equals the official two-step form bitwise, in one pass."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


class Attention(nn.Module):
    """Wan attention with RMS q/k norms across all heads (before the head split).

    Self-attention (context None): q, k, v from x, 3D RoPE on q and k. Cross-attention: q from x, k and v from the
    512 text tokens, no RoPE, no mask. Native names: blocks.{i}.self_attn / cross_attn.{q,k,v,o,norm_q,norm_k}.
    """

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, context=None, rope=None, identity: bool = False, blur: tuple | None = None):
        """x: (B, L, dim), context: (B, L_text, dim) or None -> (B, L, dim).

        identity: the self-attention map is the identity (STG-A, PAG), so each token's output is o(its value vector).
        blur: SEG's (sigma, token grid, 0): the queries entering the softmax (after norm and RoPE) are blurred.
        """
        split = lambda t: rearrange(t, "b l (n d) -> b l n d", n=self.num_heads)  # (B, L, heads, head_dim)
        kv = x if context is None else context
        v = split(self.v(kv))
        if identity:
            return self.o(v.flatten(2))
        q, k = split(self.norm_q(self.q(x))), split(self.norm_k(self.k(kv)))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if context is not None:  # cross-attention to the text: local to each token, also under sequence parallel
            return self.o(attention(q, k, v))
        return self.o(ulysses_attention(q, k, v, blur=blur))  # over all video tokens (one rank: = attention)


# ----------------------------------------------------------------------------------------------------------
# block


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift, computed in float32 and written straight in `dtype` (the dtype of the
    next matrix product): one fused pass instead of a multiply, an add and a cast. x: (B, L, dim) float32; shift,
    scale: (B, 1 or L, dim) float32. Returns (B, L, dim) in dtype."""
    if dtype == x.dtype or torch.is_grad_enabled():  # nothing to cast, or autograd (FlowMo), which out= lacks
        return torch.addcmul(shift, x, 1 + scale).to(dtype)
    return torch.addcmul(shift, x, 1 + scale, out=x.new_empty(x.shape, dtype=dtype))


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated FFN (native names: norm3 = cross-attn LN)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = Attention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = Attention(dim, num_heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e0, context, rope, identity_attn: bool = False, blur: tuple | None = None):
        """x: (B, L, dim) float32 residual stream; e0: (B, 1 or L, 6, dim) float32 time projection; context:
        (B, L_text, dim) in the parameter dtype. Precision as the official bf16 autocast (models.md §0.1): the residual
        stream, norms and modulation stay float32, only the matrix products and attention run in the parameter
        dtype (bf16 keeps massive activations, ~1e3, to 3 significant digits: bench/bf16_residual.py)."""
        dtype = self.self_attn.q.weight.dtype
        shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn = (self.modulation.float() + e0).unbind(2)
        # each update is one pass over the tokens: addcmul fuses the multiply-add of the modulation and of the gated
        # residual, and reads the parameter-dtype branch output as float32 on the fly (no separate cast)
        h = modulate(self.norm1(x), shift_sa, scale_sa, dtype)
        x = torch.addcmul(x, self.self_attn(h, rope=rope, identity=identity_attn, blur=blur), gate_sa)
        x = x + self.cross_attn(self.norm3(x).to(dtype), context)  # float32 + dtype -> float32, one pass
        h = modulate(self.norm2(x), shift_ffn, scale_ffn, dtype)
        return torch.addcmul(x, self.ffn(h), gate_ffn)


class Head(nn.Module):
    """Output head, modulated by the time embedding e (no SiLU, no projection): LN -> shift/scale -> Linear."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x, e):
        """x: (B, L, dim) float32, e: (B, 1 or L, dim) float32 -> (B, L, out_features) float32 (the official head
        runs wholly in float32; its Linear is kept float32 at any load dtype)."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)  # (B, 1 or L, dim) each
        return self.head(modulate(self.norm(x), shift, scale, self.head.weight.dtype))


# ----------------------------------------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class WanConfig:
    """Wan DiT architecture, official native field names (WanModel constructor / config.json)."""
    model_type: str = "t2v"
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6


def native_config(c: WanConfig) -> dict:
    """The official native `config.json` of a Wan DiT (the keys WanModel.from_pretrained reads)."""
    keys = ("model_type", "dim", "eps", "ffn_dim", "freq_dim", "in_dim", "num_heads", "num_layers", "out_dim",
            "text_len")
    return {"_class_name": "WanModel", **{k: getattr(c, k) for k in keys}}


class WanModel(nn.Module):
    """Wan DiT: patch embedding, time/text embeddings, a block loop with perturbation points, head, unpatchify."""

    keep_fp32 = ("modulation", "time_embedding", "time_projection", "norm3", "head.")  # float32 at any load dtype

    def __init__(self, config: WanConfig):
        super().__init__()
        c = self.config = config
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(WanBlock(c.dim, c.ffn_dim, c.num_heads, c.eps) for _ in range(c.num_layers))
        self.head = Head(c.dim, math.prod(c.patch_size) * c.out_dim, c.eps)

    def layout(self, latent_shape) -> TokenLayout:
        """The token layout of a latent (B, C, F, H, W)."""
        pt, ph, pw = self.config.patch_size
        _, _, f, h, w = latent_shape
        return TokenLayout(frames=f // pt, height=h // ph, width=w // pw)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, perturb: Perturb | None = None,
                branches: tuple[tuple[int, Perturb], ...] = ()) -> torch.Tensor:
        """Predict the flow velocity v.

        x: (B, in_dim, F, H, W) latent, H and W multiples of the patch size; t: (B,) timesteps on the 0..1000 scale,
        or (B, L) per-token timesteps (Wan2.2); context: (B, text_len, text_dim) text embeddings, zero rows after each
        prompt's real length (text.encode_text). perturb: what this pass changes (interventions.Perturb; None = a
        clean pass). branches: extra passes ((row, Perturb), ...): each copies input row `row` and follows its own
        Perturb from the first point where it differs from `perturb`; the blocks before that run once (shared
        prefix). Returns v: (B + len(branches), out_dim, F, H, W) float32; branch outputs follow the B rows in order.
        Inside distributed.sequence_parallel() each rank runs the blocks on its 1/N of the tokens and every rank
        returns the whole v (README: Many processes).
        """
        c, perturb = self.config, perturb or Perturb()
        b = x.shape[0]
        layout = self.layout(x.shape)
        grid = (layout.frames, layout.height, layout.width)
        for p in (perturb, *(p for _, p in branches)):
            p.validate(c.num_layers, c.dim)

        dtype = self.patch_embedding.weight.dtype  # the parameter dtype of the matrix products
        h = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2)  # (B, L, dim), a transposed view
        h = h.contiguous().float()  # the float32 residual stream, token-major: element-wise ops keep their
        # input's memory layout, so a transposed stream would make every norm, cast and matmul input strided
        t, index = torch.unique(t.reshape(b, -1), return_inverse=True)  # the distinct timesteps (TI2V: 0 and t)
        index = distributed.shard(index) if index.shape[1] > 1 else index  # per-token t: this rank's tokens
        e = self.time_embedding(sinusoidal_embedding(t, c.freq_dim).float())  # (U, dim) float32
        e0 = self.time_projection(e).unflatten(-1, (6, c.dim))  # (U, 6, dim)
        e, e0 = e[index], e0[index]  # (B, 1 or L, dim), (B, 1 or L, 6, dim): the time MLP ran once per distinct t
        context = self.text_embedding(context.to(dtype))  # (B, text_len, dim)
        rope = rope_angles(grid, c.dim // c.num_heads, device=x.device)
        # sequence parallel: this rank's tokens and their global positions (one process: unchanged)
        h, rope = distributed.shard(h), distributed.shard(rope, dim=0)

        def run(i, h, cond, identity, blur):
            e, e0, context = cond
            return self.blocks[i](h, e0, context, rope, identity_attn=identity,
                                  blur=None if blur is None else (blur, grid, 0))

        h, (e, _, _) = run_blocks(run, len(self.blocks), h, (e, e0, context), perturb, branches, layout)
        out = distributed.gather(self.head(h, e))  # (B + branches, L, prod(patch) * out_dim), all ranks' tokens
        pt, ph, pw = c.patch_size
        out = rearrange(out, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
                        f=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw)  # (B', out_dim, F, H, W)
        return out.float()


# ----------------------------------------------------------------------------------------------------------
# presets


@dataclass(frozen=True)
class Expert:
    """One DiT of a Wan2.2 A14B mixture of experts (models.md §2.11): it runs every step whose integer timestep t is
    >= `boundary` (the first expert in the preset's order that t reaches), with its own CFG scale. folder: its
    sub-folder in the native layout (diffusers: transformer/ = high, transformer_2/ = low; see find_experts).
    The STAS paper has no A14B row, so experts carry no STAS / DG settings: steering is given per run, one
    Guidance per expert (pipeline.guidance_per_expert; an expert given no steering is not steered)."""
    name: str
    boundary: int
    guidance_scale: float
    folder: str


@dataclass(frozen=True)
class Preset:
    """A named Wan model: architecture, companion VAE / text encoder sizes, official sampling defaults, and the
    papers' method settings (STAS Tables A2-A3; channel / block indices are 0-based).

    vae / vae_stride: the VAE family the DiT's latents belong to and its (t, h, w) stride (it will move to the VAE
    object once the Wan2.2 VAE lands). per_token_t: the model is called with timesteps (B, L), one per token (TI2V,
    official `textimage2video.py`); image: how an image conditions it ('first_frame': TI2V's clean first latent
    frame, its tokens at t = 0; 'concat': I2V-A14B's mask + image latent channels; None: text only). experts: the
    A14B experts, highest boundary first (empty: one DiT).
    """
    config: WanConfig
    vae_dim: int = 96
    vae: str = "wan2.1"
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    per_token_t: bool = False
    image: str | None = None
    experts: tuple[Expert, ...] = ()
    text_encoder: str = "umt5-xxl"
    steps: int = 50
    shift: float = 5.0
    guidance_scale: float = 5.0
    frames: int = 81
    height: int = 480
    width: int = 832
    fps: int = 16
    stas: dict = field(default_factory=dict)
    dg: dict = field(default_factory=dict)
    stg: dict = field(default_factory=dict)


# STAS Tables A2-A3 (MA channel, block m as a 0-based index into the block list, alpha, p in %, K steps); the Wan2.2
# and CogVideoX rows are stored for the model families that plug in later.
STAS_TABLE = {"wan2.1-t2v-1.3b": dict(dims=(1188,), block=9, alpha=2.5, p=8.0, steps=20),
              "wan2.2-ti2v-5b": dict(dims=(1938,), block=9, alpha=2.0, p=12.0, steps=20)}

PRESETS = {
    # STAS: Tables A2-A3. DG: the STAS MA channel zeroed at the STAS block, w = 1 (our choice: the DG paper has no
    # video model; w = 1 is its Table 5 CFG+DG weight). STG: block 2 skipped (STG-R), the default block of the
    # official STGuidance Wan pipeline; the scale is not a preset value (guidance.STG_SCALE: the STG appendix's
    # 1.0 for STG-R, 2.0 for STG-A; the official pipeline's default scale is 0 = off, its one Wan example uses 2.0).
    "wan2.1-t2v-1.3b": Preset(WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
                              stas=STAS_TABLE["wan2.1-t2v-1.3b"],
                              dg=dict(dims=(1188,), block=9, scale=1.0),
                              stg=dict(blocks=(2,), mode="R")),
    "wan2.1-t2v-14b": Preset(WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
                             height=720, width=1280, stg=dict(blocks=(2,), mode="R")),
    # Wan2.2 TI2V-5B (models.md §2.9-2.10): Wan2.2 VAE (z 48, stride 4x16x16), per-token timesteps, an optional image
    # as the clean first latent frame. STAS: Table A3; DG on the same channel / block, w = 1; STG block 2.
    "wan2.2-ti2v-5b": Preset(WanConfig(model_type="ti2v", dim=3072, ffn_dim=14336, num_heads=24, num_layers=30,
                                       in_dim=48, out_dim=48),
                             vae_dim=160, vae="wan2.2", vae_stride=(4, 16, 16), per_token_t=True, image="first_frame",
                             frames=121, height=704, width=1280, fps=24, stas=STAS_TABLE["wan2.2-ti2v-5b"],
                             dg=dict(dims=(1938,), block=9, scale=1.0), stg=dict(blocks=(2,), mode="R")),
    # Wan2.2 A14B (models.md §2.11): two 14B experts split at a boundary timestep; guidance (low, high). No STAS row in
    # the paper, so no STAS / DG settings: find channels with samplers/analyze.py.
    "wan2.2-t2v-a14b": Preset(WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
                              steps=40, shift=12.0, guidance_scale=3.0, height=720, width=1280,
                              experts=(Expert("high", 875, 4.0, "high_noise_model"),
                                       Expert("low", 0, 3.0, "low_noise_model")),
                              stg=dict(blocks=(2,), mode="R")),
    # I2V-A14B: in_dim 36 = 16 noise + 4 mask + 16 image-latent channels (channel concat, no CLIP).
    "wan2.2-i2v-a14b": Preset(WanConfig(model_type="i2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                                        in_dim=36, out_dim=16),
                              steps=40, shift=5.0, guidance_scale=3.5, height=720, width=1280, image="concat",
                              experts=(Expert("high", 900, 3.5, "high_noise_model"),
                                       Expert("low", 0, 3.5, "low_noise_model")),
                              stg=dict(blocks=(2,), mode="R")),
    # the embedded default: a tiny Wan-architecture model, random weights (see pipeline.tiny_checkpoint)
    "wan2.1-tiny": Preset(WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=32),
                          vae_dim=8, text_encoder="tiny", steps=8, frames=9, height=64, width=64, fps=8,
                          stas=dict(dims=(3,), block=1, alpha=2.5, p=8.0, steps=4),
                          dg=dict(dims=(3,), block=1, scale=1.0), stg=dict(blocks=(2,), mode="R")),
    # tiny Wan2.2 variants for tests (random weights): TI2V with 48 latent channels, A14B T2V / I2V with two experts
    "wan2.2-ti2v-tiny": Preset(WanConfig(model_type="ti2v", dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=32,
                                         in_dim=48, out_dim=48),
                               vae_dim=8, text_encoder="tiny", vae="wan2.2", vae_stride=(4, 16, 16), per_token_t=True,
                               image="first_frame", steps=8, frames=9, height=64, width=64, fps=8,
                               stas=dict(dims=(3,), block=1, alpha=2.0, p=12.0, steps=4),
                               dg=dict(dims=(3,), block=1, scale=1.0), stg=dict(blocks=(2,), mode="R")),
    "wan2.2-t2v-a14b-tiny": Preset(WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=32),
                                   vae_dim=8, text_encoder="tiny", steps=8, shift=12.0, guidance_scale=3.0, frames=9,
                                   height=64, width=64, fps=8,
                                   experts=(Expert("high", 875, 4.0, "high_noise_model"),
                                            Expert("low", 0, 3.0, "low_noise_model")),
                                   stg=dict(blocks=(2,), mode="R")),
    "wan2.2-i2v-a14b-tiny": Preset(WanConfig(model_type="i2v", dim=64, ffn_dim=128, num_heads=4, num_layers=4,
                                             text_dim=32, in_dim=36, out_dim=16),
                                   vae_dim=8, text_encoder="tiny", steps=8, shift=5.0, guidance_scale=3.5, frames=9,
                                   height=64, width=64, fps=8, image="concat",
                                   experts=(Expert("high", 900, 3.5, "high_noise_model"),
                                            Expert("low", 0, 3.5, "low_noise_model")),
                                   stg=dict(blocks=(2,), mode="R")),
}


# ----------------------------------------------------------------------------------------------------------
# loading


def from_diffusers(key: str) -> str:
    """Rename one diffusers WanTransformer3DModel key to the native Wan key (models.md §2.4)."""
    for old, new in (("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
                     ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
                     ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
                     ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
                     ("condition_embedder.time_proj", "time_projection.1"),
                     (".attn1.to_out.0.", ".self_attn.o."), (".attn2.to_out.0.", ".cross_attn.o."),
                     (".attn1.to_", ".self_attn."), (".attn2.to_", ".cross_attn."),
                     (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
                     (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
                     (".norm2.", ".norm3."),  # diffusers norm2 is the cross-attn LN, native norm3
                     (".scale_shift_table", ".modulation"), ("proj_out.", "head.head.")):
        key = key.replace(old, new)
    return "head.modulation" if key == "scale_shift_table" else key


def detect_layout(keys) -> str:
    """'native', 'comfy' (native keys with the `model.diffusion_model.` prefix) or 'diffusers', from the keys."""
    keys = set(keys)
    if "head.modulation" in keys:
        return "native"
    if "model.diffusion_model.head.modulation" in keys:
        return "comfy"
    if "scale_shift_table" in keys and "condition_embedder.time_proj.weight" in keys:
        return "diffusers"
    return "unknown"


def find_transformer(path) -> list[Path]:
    """The DiT weight files in a checkpoint folder (native root, diffusers `transformer/`) or a single file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder.")
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    if path.is_dir():
        index = sorted(path.glob("diffusion_pytorch_model*.safetensors.index.json"))
        files = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        if not index and not files:
            raise CheckpointError(f"{path}: no diffusion_pytorch_model*.safetensors here. Expected the native Wan "
                                  "layout (Wan-AI/Wan2.1-T2V-1.3B), a diffusers folder with transformer/, or a "
                                  "ComfyUI .safetensors file; see weights/README.md.")
        return safetensors_files(index[0] if index else files[0] if len(files) == 1 else path)
    return safetensors_files(path)


def find_experts(path=None, high=None, low=None) -> dict[str, Path] | None:
    """The two expert DiTs of a Wan2.2 A14B checkpoint as {'high': path, 'low': path}, or None for a one-DiT checkpoint.

    high / low: expert files or folders given one by one (ComfyUI `wan2.2_t2v_{high,low}_noise_14B_*.safetensors`);
    else path: a native folder with high_noise_model/ and low_noise_model/, or a diffusers folder with transformer/
    (high) and transformer_2/ (low). Raises CheckpointError if only one expert is there.
    """
    if high is not None or low is not None:
        if high is None or low is None:
            raise CheckpointError(f"two-expert checkpoint: --ckpt-high and --ckpt-low go together; only "
                                  f"--ckpt-{'high' if low is None else 'low'} was given")
        return {"high": Path(high), "low": Path(low)}
    path = Path(path) if path is not None else None
    if path is None or not path.is_dir():
        return None
    for high_dir, low_dir in (("high_noise_model", "low_noise_model"), ("transformer", "transformer_2")):
        found = [(path / d).is_dir() for d in (high_dir, low_dir)]
        if all(found):
            return {"high": path / high_dir, "low": path / low_dir}
        if found[0] != found[1] and high_dir == "high_noise_model":
            missing = low_dir if found[0] else high_dir
            raise CheckpointError(f"{path}: two-expert (Wan2.2 A14B) checkpoint with {missing}/ missing; both "
                                  "high_noise_model/ and low_noise_model/ are needed (or pass --ckpt-high / "
                                  "--ckpt-low)")
    return None


def preset_from_state(sd, experts: bool = False) -> str | None:
    """The preset whose shapes match a native state dict (dim, layers, in_dim), or None. experts: the weights are
    one expert of a two-expert (A14B) checkpoint, whose shapes equal Wan2.1-14B's; the layout tells them apart."""
    dim, in_dim = shape_of(sd, "patch_embedding.weight")[:2]
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for name, p in PRESETS.items():
        if (p.config.dim, p.config.in_dim, p.config.num_layers) == (dim, in_dim, layers) and bool(p.experts) == experts:
            return name
    return None


def open_wan(path, preset: str | None = None, experts: bool = False, required: bool = True):
    """Read a Wan DiT checkpoint's keys and shapes (no weights yet): (lazy native-named state dict, layout, preset,
    file). Detects the layout from the keys and, if preset is None, the preset from the shapes (experts: the file is
    one expert of an A14B pair; required=False: no match gives preset None instead of an error)."""
    files = find_transformer(path)
    where = files[0] if len(files) == 1 else files[0].parent
    raw = LazySafetensors(files)
    layout = detect_layout(raw.keys())
    if layout == "unknown":
        raise CheckpointError(f"{where}: not a Wan DiT checkpoint (no head.modulation / scale_shift_table key; "
                              f"first keys: {list(raw.keys())[:5]}). Layout detected: unknown.")
    rename = {"native": lambda k: k, "comfy": lambda k: k.removeprefix("model.diffusion_model."),
              "diffusers": from_diffusers}[layout]
    sd = Renamed(raw, rename)
    if preset is None:
        preset = preset_from_state(sd, experts)
        if preset is None and required:
            raise CheckpointError(f"{where}: no preset matches these weights (layout {layout}, patch_embedding "
                                  f"{shape_of(sd, 'patch_embedding.weight')}); pass --preset. Known: {list(PRESETS)}")
    elif preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    return sd, layout, preset, where


def load_wan(path, preset: str | None = None, dtype: torch.dtype | None = None, device="cpu"):
    """Load a Wan DiT from the native, diffusers or ComfyUI layout; returns (model, preset name, layout).

    path: a checkpoint folder (native root with diffusion_pytorch_model*.safetensors [+ index], or a diffusers root /
    `transformer/` folder) or a single .safetensors file (ComfyUI; keys with or without `model.diffusion_model.`).
    preset: a key of PRESETS; None detects it from the weight shapes. dtype: parameter dtype (None: as stored;
    modulation, time MLP and norms stay float32). Raises CheckpointError naming the file, the layout detected and
    the missing / unexpected / mis-shaped keys.
    """
    sd, layout, preset, where = open_wan(path, preset)
    with torch.device("meta"):
        model = WanModel(PRESETS[preset].config)
    load_strict(model, sd, file=where, layout=layout, dtype=dtype, keep_fp32=WanModel.keep_fp32)
    return model.to(device).eval().requires_grad_(False), preset, layout
