"""Wan causal video VAEs: Wan2.1 (3x8x8 -> 16 channels) and Wan2.2 (3x16x16 -> 48 channels), streaming decode.

From-scratch re-implementations of the official `wan/modules/vae.py` (Wan-Video/Wan2.1; here `WanVAE`) and
`wan/modules/vae2_2.py` (Wan-Video/Wan2.2; here `WanVAE22`) with their native parameter names (those of
`Wan2.1_VAE.pth` / `Wan2.2_VAE.pth`), checked against diffusers `AutoencoderKLWan`
(`models/autoencoders/autoencoder_kl_wan.py`, `is_residual=True` for Wan2.2). Facts: `reference/models.md`
sections 2.5 and 2.6.

Both share every building block and the chunking rules; Wan2.2 adds three things, each a constructor switch:
* `patch_size=2`: 2x2 pixel patchify before the encoder (3 -> 12 channels) and unpatchify after the decoder;
* `residual=True`: each encoder / decoder stage is one block whose input also takes a parameter-free shortcut
  (`AvgDown3D` down, `DupUp3D` up) that is added to the stage output; the upsample convs keep the channels;
* `dec_dim`: a decoder base width other than the encoder's (256 vs 160).

How the causal cache works (official `feat_cache`, here an explicit dict threaded through the calls):
* every causal 3D conv with time kernel 3 keeps the last `CACHE_T = 2` frames of its *input*; on the next call
  they are prepended in time in place of the front zero padding, so running the network chunk by chunk equals
  running it on the whole video causally;
* encode runs on `[frame 0]`, then 4-frame chunks `[1:5]`, `[5:9]`, ... -> one latent frame each;
* decode runs one latent frame at a time -> 1 frame, then 4 frames each (the "Rep" rule below, and for Wan2.2
  the matching `first_chunk` rule of `DupUp3D`).
The cache dict is keyed by the module that owns the entry and lives only for one `encode` / `decode` call.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce, repeat

from .checkpoints import CheckpointError, Renamed, load_strict, read_state_dict, shape_of, strip_prefix

CACHE_T = 2  # frames of history each causal conv keeps (official CACHE_T)

# official 16-channel latent statistics, `z = (mu - mean) / std` (W21:vae, models.md section 2.5)
WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# official 48-channel Wan2.2 latent statistics (W22:vae22, models.md section 2.6)
WAN22_LATENT_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                     0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                     -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                     -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                     0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENT_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)

Cache = dict  # {module: tensor of its last input frames}; one per encode / decode call


# ----------------------------------------------------------------------------------------------------------
# building blocks


class CausalConv3d(nn.Conv3d):
    """3D conv padded causally in time: 2p zero frames in front, none behind (official `CausalConv3d`). The spatial
    zero padding is the convolution's own (no padded copy of the input; the official code pads with F.pad)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0):
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """x (B, C, T, H, W) -> (B, C', T', H', W'); with `cache`, cached frames replace the zero padding."""
        time_pad = self.time_pad
        if cache is not None and time_pad > 0:
            prev = cache.get(self)  # (B, C, <=2, H, W) or None on the first chunk
            if prev is not None:
                x = torch.cat([prev, x], dim=2)
                time_pad -= prev.shape[2]
            cache[self] = x[:, :, -CACHE_T:].clone()  # history for the next call (input frames, pre-conv)
        if time_pad:
            x = F.pad(x, (0, 0, 0, 0, time_pad, 0))
        return super().forward(x)


class RMS_norm(nn.Module):
    """`F.normalize` over channels times sqrt(C) * gamma, no bias; computed in float32 (official `RMS_norm`)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, ...) -> same shape; an L2 normalize (eps 1e-12), not an RMS with eps."""
        return F.normalize(x.float(), dim=1).type_as(x) * (self.scale * self.gamma)  # one multiply pass, not two


class ResidualBlock(nn.Module):
    """norm-SiLU-conv3 twice plus a 1x1x1 conv shortcut when channels change (official `ResidualBlock`)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(  # indices are the checkpoint's: residual.{0,2,3,6}
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """x (B, in_dim, T, H, W) -> (B, out_dim, T, H, W)."""
        return _run(self.residual, x, cache) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, plus residual (official `AttentionBlock`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W) -> same shape."""
        b, c, t, h, w = x.shape
        y = self.norm(rearrange(x, "b c t h w -> (b t) c h w"))
        qkv = rearrange(self.to_qkv(y), "n c3 h w -> n 1 (h w) c3").contiguous()  # (B*T, 1, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # (B*T, 1, HW, C) each, one head
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C)
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))  # (B*T, C, H, W), official memory layout
        return rearrange(y, "(b t) c h w -> b c t h w", b=b) + x


class Resample(nn.Module):
    """2x spatial down/up-sampling per frame, optionally with a 2x causal time conv (official `Resample`).

    upsample: the conv maps C -> `up_dim` channels: C/2 in Wan2.1 (the default), C in Wan2.2. downsample keeps C.
    """

    def __init__(self, dim: int, mode: str, up_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2 if up_dim is None else up_dim, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        else:
            raise ValueError(f"unknown Resample mode {mode!r}")
        if mode == "upsample3d":  # makes 2 frames from each frame: 2C channels interleaved in time
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":  # 1 cached frame + T frames -> T/2 frames
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """x (B, C, T, H, W) -> (B, C or up_dim, T', 2H or H/2, 2W or W/2); T' = 2T, T/2 or T (see modes)."""
        b = x.shape[0]
        if self.mode == "upsample3d":
            if self.time_conv not in cache:
                # "Rep" rule (official `feat_cache[idx] = 'Rep'`): the first latent frame is not doubled in time,
                # and the next call sees zero history, as the official causal zero padding gives it.
                cache[self.time_conv] = x.new_zeros(*x.shape[:2], CACHE_T, *x.shape[3:])
            else:
                x = self.time_conv(x, cache)  # (B, 2C, T, H, W)
                x = rearrange(x, "b (two c) t h w -> b c (t two) h w", two=2)  # frame 2i, 2i+1 from time i
        x = rearrange(x, "b c t h w -> (b t) c h w")
        if self.mode.startswith("up"):  # nearest-exact 2x in float32, then the conv in the VAE's dtype
            x = self.resample[1](self.resample[0](x.float()).type_as(x))  # (B*T, up_dim, 2H, 2W)
        else:
            x = self.resample(x)  # (B*T, C, H/2, W/2)
        x = rearrange(x, "(b t) c h w -> b c t h w", b=b)
        if self.mode == "downsample3d":
            prev = cache.get(self.time_conv)  # (B, C, 1, H, W): last frame of the previous chunk
            cache[self.time_conv] = x[:, :, -1:].clone()
            if prev is not None:  # the first chunk (1 frame) passes through: 1 frame -> 1 frame
                x = self.time_conv(torch.cat([prev, x], dim=2))  # (B, C, T/2, H, W)
        return x


# Wan2.2 only: pixel patchify and the parameter-free stage shortcuts (W22:vae22, models.md section 2.6)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p): channel c*p*p + r*p + q holds pixel (q, r) of each p x p patch,
    q the row (H) offset, r the column (W) offset -- r varies slower (official `patchify`)."""
    return rearrange(x, "b c t (h q) (w r) -> b (c r q) t h w", q=p, r=p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C*p*p, T, h, w) -> (B, C, T, h*p, w*p), the inverse of `patchify`."""
    return rearrange(x, "b (c r q) t h w -> b c t (h q) (w r)", q=p, r=p)


class AvgDown3D(nn.Module):
    """Shortcut of a Wan2.2 encoder stage, no parameters (official `AvgDown3D`): fold each ft x fs x fs block
    of (time, height, width) into channels, then average consecutive groups of channels down to `out_dim`."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.factor_t, self.factor_s = factor_t, factor_s
        if in_dim * factor_t * factor_s**2 % out_dim:
            raise ValueError(f"AvgDown3D: {in_dim} channels x {factor_t * factor_s**2} folded positions is not a "
                             f"multiple of {out_dim} output channels")
        self.group = in_dim * factor_t * factor_s**2 // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W) -> (B, out_dim, ceil(T/ft), H/fs, W/fs). T is zero-padded *in front* to a multiple
        of ft, so the 1-frame first chunk becomes [zeros, frame 0] -> 1 frame."""
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        x = rearrange(x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w", ft=ft, fh=fs, fw=fs)  # (B, C*F, ...)
        return reduce(x, "b (o g) t h w -> b o t h w", "mean", g=self.group)  # channel o = mean of o*g .. o*g+g-1


class DupUp3D(nn.Module):
    """Shortcut of a Wan2.2 decoder stage, no parameters (official `DupUp3D`): the inverse fold of `AvgDown3D`,
    each input channel copied to `out_dim * F / in_dim` consecutive channels, F = ft * fs * fs."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.factor_t, self.factor_s = factor_t, factor_s
        if out_dim * factor_t * factor_s**2 % in_dim:
            raise ValueError(f"DupUp3D: {out_dim} channels x {factor_t * factor_s**2} unfolded positions is not a "
                             f"multiple of {in_dim} input channels")
        self.repeats = out_dim * factor_t * factor_s**2 // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """x (B, C, T, H, W) -> (B, out_dim, T*ft, H*fs, W*fs); on the first latent frame (`first_chunk`) the
        first ft-1 frames are dropped, matching the "Rep" rule of the stage's `upsample3d` (1 frame -> 1 frame)."""
        ft, fs = self.factor_t, self.factor_s
        x = repeat(x, "b c t h w -> b (c k) t h w", k=self.repeats)  # (B, out_dim*F, T, H, W)
        x = rearrange(x, "b (o ft fh fw) t h w -> b o (t ft) (h fh) (w fw)", ft=ft, fh=fs, fw=fs)
        return x[:, :, ft - 1:] if first_chunk else x


class DownBlock(nn.Module):
    """One Wan2.2 encoder stage (official `Down_ResidualBlock`): `num_res_blocks` ResidualBlocks and an optional
    downsampling Resample (`downsamples.{0..}`), plus an `AvgDown3D` shortcut of the stage input."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None):
        super().__init__()
        dims = [in_dim] + [out_dim] * num_res_blocks
        layers = [ResidualBlock(i, o) for i, o in zip(dims[:-1], dims[1:])]
        if mode is not None:
            layers.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*layers)
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if mode == "downsample3d" else 1,
                                      factor_s=1 if mode is None else 2)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """x (B, in_dim, T, H, W) -> (B, out_dim, T', H', W') as the Resample (mode) shapes it."""
        return _run(self.downsamples, x, cache) + self.avg_shortcut(x)


class UpBlock(nn.Module):
    """One Wan2.2 decoder stage (official `Up_ResidualBlock`): `num_res_blocks + 1` ResidualBlocks and an optional
    upsampling Resample with a C -> C conv (`upsamples.{0..}`), plus a `DupUp3D` shortcut when it upsamples."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None):
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        layers = [ResidualBlock(i, o) for i, o in zip(dims[:-1], dims[1:])]
        if mode is not None:
            layers.append(Resample(out_dim, mode, up_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)
        self.avg_shortcut = None if mode is None else DupUp3D(in_dim, out_dim, 2 if mode == "upsample3d" else 1, 2)

    def forward(self, x: torch.Tensor, cache: Cache, first_chunk: bool) -> torch.Tensor:
        """x (B, in_dim, T, H, W) -> (B, out_dim, T', H', W') as the Resample (mode) shapes it."""
        y = _run(self.upsamples, x, cache)
        return y if self.avg_shortcut is None else y + self.avg_shortcut(x, first_chunk)


def _run(layers: nn.Sequential, x: torch.Tensor, cache: Cache, first_chunk: bool = False) -> torch.Tensor:
    """Apply `layers` in order, handing the cache to the causal ones (and `first_chunk` to Wan2.2 up blocks)."""
    for layer in layers:
        if isinstance(layer, UpBlock):
            x = layer(x, cache, first_chunk)
        elif isinstance(layer, (CausalConv3d, ResidualBlock, Resample, DownBlock)):
            x = layer(x, cache)
        else:
            x = layer(x)
    return x


# ----------------------------------------------------------------------------------------------------------
# encoder, decoder, VAE


class Encoder3d(nn.Module):
    """Pixels (B, in_channels, T, H, W) -> (B, z_dim, T_lat, H/8, W/8) per chunk (official `Encoder3d`,
    attn_scales=[]). Wan2.1: a flat list of blocks, in_channels 3; Wan2.2 (`residual`): one `DownBlock` per
    stage, in_channels 12 (patchified pixels)."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temperal_downsample: Sequence[bool], in_channels: int = 3, residual: bool = False):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]  # Wan2.1: 96, 96, 192, 384, 384; Wan2.2: 160, 160, 320, 640, 640
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            mode = (None if i == len(dim_mult) - 1 else "downsample3d" if temperal_downsample[i] else "downsample2d")
            if residual:
                layers.append(DownBlock(in_dim, out_dim, num_res_blocks, mode))
                continue
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if mode is not None:
                layers.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim))
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One chunk: 1 frame (first) or 4 frames -> 1 latent frame."""
        x = self.conv1(x, cache)
        return _run(self.head, _run(self.middle, _run(self.downsamples, x, cache), cache), cache)


class Decoder3d(nn.Module):
    """Latent (B, z_dim, 1, h, w) -> pixels (B, out_channels, 1 or 4, 8h, 8w) per latent frame (official
    `Decoder3d`). Wan2.1: flat blocks, upsample convs halve the channels, out_channels 3; Wan2.2 (`residual`):
    one `UpBlock` per stage, upsample convs keep the channels, out_channels 12 (patchified pixels)."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temperal_upsample: Sequence[bool], out_channels: int = 3, residual: bool = False):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *reversed(dim_mult))]  # 2.1: 384, 384, 384, 192, 96; 2.2: x 256
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            mode = None if i == len(dim_mult) - 1 else "upsample3d" if temperal_upsample[i] else "upsample2d"
            if residual:
                layers.append(UpBlock(in_dim, out_dim, num_res_blocks, mode))
                continue
            if i > 0:
                in_dim //= 2  # Wan2.1: the previous stage's upsample conv halved the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if mode is not None:
                layers.append(Resample(out_dim, mode))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache, first_chunk: bool = False) -> torch.Tensor:
        """One latent frame -> 1 frame (the first call on `cache`, `first_chunk=True`) or 4 frames (later calls)."""
        x = self.conv1(x, cache)
        x = _run(self.upsamples, _run(self.middle, x, cache), cache, first_chunk)
        return _run(self.head, x, cache)


class WanVAE(nn.Module):
    """Wan2.1 VAE (official `WanVAE_`, parameter names of `Wan2.1_VAE.pth`), with latent normalization; with
    `patch_size=2, residual=True` and `dec_dim` it is the Wan2.2 VAE (use `WanVAE22`, which sets them).

    `latents_mean` / `latents_std` (z_dim floats each; None: the official Wan2.1 values) are plain Python
    tuples, not buffers, so nothing but the checkpoint tensors needs loading (194 for Wan2.1).
    Attributes for callers: `z_dim` (latent channels), `stride` = (4, s, s) pixels per latent position with
    s = 8 (Wan2.1) or 16 (Wan2.2), also as `time_factor` and `space_factor`.
    Raises ValueError when the statistics do not have z_dim values.
    """

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, temperal_downsample: Sequence[bool] = (False, True, True),
                 latents_mean: Sequence[float] | None = None, latents_std: Sequence[float] | None = None,
                 dec_dim: int | None = None, patch_size: int = 1, residual: bool = False):
        super().__init__()
        self.z_dim, self.patch_size = z_dim, patch_size
        self.latents_mean = tuple(WAN21_LATENT_MEAN if latents_mean is None else latents_mean)
        self.latents_std = tuple(WAN21_LATENT_STD if latents_std is None else latents_std)
        if not len(self.latents_mean) == len(self.latents_std) == z_dim:
            raise ValueError(f"latents_mean / latents_std need z_dim={z_dim} values each, got "
                             f"{len(self.latents_mean)} / {len(self.latents_std)}")
        self.time_factor = 2 ** sum(temperal_downsample)  # 4
        self.space_factor = patch_size * 2 ** (len(dim_mult) - 1)  # 8 (Wan2.1) or 2 x 8 (Wan2.2)
        self.stride = (self.time_factor, self.space_factor, self.space_factor)
        pixels = 3 * patch_size**2  # channels the encoder sees / the decoder makes: 3, or 12 after 2x2 patchify
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, temperal_downsample, pixels, residual)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)  # encoder output -> (mu, log_var)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)  # latent -> decoder input
        self.decoder = Decoder3d(dim if dec_dim is None else dec_dim, z_dim, dim_mult, num_res_blocks,
                                 temperal_downsample[::-1], pixels, residual)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and std as (1, z_dim, 1, 1, 1) tensors on `like`'s device and dtype."""
        mean, std = (torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
                     for v in (self.latents_mean, self.latents_std))
        return mean, std

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1], T = 4k+1, H and W multiples of s (8, or 16 for Wan2.2) -> normalized
        latent (B, z_dim, 1 + (T-1)//4, H/s, W/s) = (mu - mean) / std. The posterior mean is used, never a
        sample. The video is cast to the VAE's dtype; it must be on the VAE's device. Raises ValueError."""
        b, c, t, h, w = _shape5(video, "video")
        tf, sf = self.time_factor, self.space_factor
        if c != 3:
            raise ValueError(f"video must have 3 (RGB) channels in dim 1, shaped (B, 3, T, H, W); got {tuple(video.shape)}")
        if (t - 1) % tf:
            raise ValueError(f"video must have 1 + {tf}k frames (1, 5, 9, ..., 81); got T={t}: trim it to "
                             f"{1 + (t - 1) // tf * tf} frames")
        if h % sf or w % sf:
            raise ValueError(f"video height and width must be multiples of {sf}; got {h}x{w}")
        x = video.to(self.conv1.weight.dtype)
        if self.patch_size > 1:
            x = patchify(x, self.patch_size)  # (B, 12, T, H/2, W/2)
        cache: Cache = {}
        chunks = [x[:, :, :1]] + [x[:, :, i : i + tf] for i in range(1, t, tf)]  # frame 0, then 4-frame chunks
        h = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)  # (B, 2*z_dim, T_lat, H/s, W/s)
        mu, _log_var = self.conv1(h).chunk(2, dim=1)
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def decode_frames(self, latent: torch.Tensor) -> Iterator[torch.Tensor]:
        """Normalized latent (B, z_dim, T_lat, h, w) -> an iterator of pixel chunks (B, 3, t, s*h, s*w) in [-1, 1]:
        t = 1 for the first latent frame, then 4 per latent frame. Only O(1 latent frame) of decoder
        activations and cache are alive at any time. Input checks run at once, not at the first `next`."""
        _, c, _, _, _ = _shape5(latent, "latent")
        if c != self.z_dim:
            raise ValueError(f"latent must have {self.z_dim} channels in dim 1, shaped (B, {self.z_dim}, T, h, w); "
                             f"got {tuple(latent.shape)}")
        return self._decode_frames(latent)

    @torch.no_grad()
    def _decode_frames(self, latent: torch.Tensor) -> Iterator[torch.Tensor]:
        """Generator behind `decode_frames` (official `WanVAE_.decode`, one latent frame per decoder call)."""
        z = latent.to(self.conv2.weight.dtype)
        mean, std = self._stats(z)
        z = self.conv2(z * std + mean)  # 1x1x1 conv, no time mixing: (B, z_dim, T_lat, h, w)
        cache: Cache = {}
        for i in range(z.shape[2]):
            x = self.decoder(z[:, :, i : i + 1], cache, first_chunk=i == 0)  # (B, 3*p*p, 1 or 4, 8h, 8w)
            if self.patch_size > 1:
                x = unpatchify(x, self.patch_size)  # (B, 3, 1 or 4, 16h, 16w)
            yield x.clamp_(-1, 1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalized latent (B, z_dim, T_lat, h, w) -> video (B, 3, 1 + 4(T_lat-1), s*h, s*w) clamped to [-1, 1].
        Streams through `decode_frames` into one preallocated output tensor."""
        frames = self.decode_frames(latent)
        b, _, t, h, w = latent.shape
        out = torch.empty(b, 3, 1 + self.time_factor * (t - 1), h * self.space_factor, w * self.space_factor,
                          dtype=self.conv2.weight.dtype, device=latent.device)
        i = 0
        for chunk in frames:
            out[:, :, i : i + chunk.shape[2]] = chunk
            i += chunk.shape[2]
        return out


class WanVAE22(WanVAE):
    """Wan2.2 VAE (official `vae2_2.WanVAE_`, parameter names of `Wan2.2_VAE.pth`; models.md section 2.6):
    2x2 pixel patchify, residual stages with `AvgDown3D` / `DupUp3D` shortcuts, decoder width `dec_dim`,
    48-channel latent with its own statistics (None: the official Wan2.2 values). Defaults are the real
    config (704.7 M parameters); `WanVAE22(dim=8, dec_dim=12)` is a tiny one with the same latent space.
    Video (B, 3, T, H, W), H and W multiples of 16 <-> latent (B, 48, 1 + (T-1)/4, H/16, W/16)."""

    def __init__(self, dim: int = 160, dec_dim: int = 256, z_dim: int = 48, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, temperal_downsample: Sequence[bool] = (False, True, True),
                 latents_mean: Sequence[float] | None = None, latents_std: Sequence[float] | None = None):
        super().__init__(dim, z_dim, dim_mult, num_res_blocks, temperal_downsample,
                         WAN22_LATENT_MEAN if latents_mean is None else latents_mean,
                         WAN22_LATENT_STD if latents_std is None else latents_std,
                         dec_dim=dec_dim, patch_size=2, residual=True)


def _shape5(x: torch.Tensor, name: str) -> tuple[int, ...]:
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        raise ValueError(f"{name} must be a 5D tensor (B, C, T, H, W); got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    return tuple(x.shape)


# ----------------------------------------------------------------------------------------------------------
# rename tables: diffusers AutoencoderKLWan -> native (Wan2.1: D:sf `convert_wan_vae_to_diffusers`; Wan2.2:
# DC:wan `convert_vae_22`; both run backwards, models.md sections 2.5 and 2.6)

_RESNET_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                 "conv_shortcut": "shortcut"}
_DIFFUSERS_RULES = [  # (pattern, replacement), applied in order to each key, after the stage renames
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
    (r"^encoder\.down_blocks\.", "encoder.downsamples."),  # Wan2.1: same flat index 0..10
    (r"\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.", lambda m: f".{m[1]}.{_RESNET_PARTS[m[2]]}."),
]


def vae_key_from_diffusers(key: str, num_res_blocks: int = 2, residual: bool = False) -> str:
    """One diffusers `AutoencoderKLWan` key -> the native key: of `Wan2.1_VAE.pth`, or with `residual` (diffusers
    `is_residual`) of `Wan2.2_VAE.pth` (models.md tables in sections 2.5 / 2.6)."""
    if residual:  # Wan2.2: stage b's resnets j, then its resampler, are `{down,up}samples.{b}.{down,up}samples.{j}`
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.downsamples.\1.downsamples.\2.", key)
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsampler\.",
                     lambda m: f"encoder.downsamples.{m[1]}.downsamples.{num_res_blocks}.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.upsamples.\1.upsamples.\2.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsampler\.",
                     lambda m: f"decoder.upsamples.{m[1]}.upsamples.{num_res_blocks + 1}.", key)
    else:  # Wan2.1: decoder stage i = num_res_blocks + 1 resnets, then an upsampler, in one flat Sequential
        stage = num_res_blocks + 2
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.upsamples.{int(m[1]) * stage + int(m[2])}.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.upsamples.{int(m[1]) * stage + stage - 1}.", key)
    for pattern, repl in _DIFFUSERS_RULES:
        key = re.sub(pattern, repl, key)
    return key


def vae_from_diffusers(sd: Mapping[str, torch.Tensor], num_res_blocks: int = 2,
                       residual: bool = False) -> dict[str, torch.Tensor]:
    """Diffusers `AutoencoderKLWan` state dict -> native state dict (194 tensors for Wan2.1, 196 for Wan2.2 with
    `residual=True`, at the real configs)."""
    return {vae_key_from_diffusers(k, num_res_blocks, residual): v for k, v in sd.items()}


def open_wan_vae(path: str | os.PathLike):
    """Read a Wan VAE checkpoint's keys and shapes, no weights: (native-named lazy state dict, layout, version
    'Wan2.1' | 'Wan2.2', dim, z_dim). Files accepted and errors raised: see `load_wan_vae`."""
    sd = strip_prefix(read_state_dict(path))
    keys = list(sd)
    if "decoder.conv_in.weight" in keys or "quant_conv.weight" in keys:
        layout, enc_in, post = "diffusers", "encoder.conv_in.weight", "post_quant_conv.weight"
    elif "decoder.conv1.weight" in keys or "conv1.weight" in keys:
        layout, enc_in, post = "native", "encoder.conv1.weight", "conv2.weight"
    else:
        raise CheckpointError(f"{path}: not a Wan VAE checkpoint: found neither diffusers keys "
                              f"(decoder.conv_in.weight, quant_conv.weight) nor native keys (decoder.conv1.weight, "
                              f"conv1.weight); first keys: {keys[:5]}")
    for k in (enc_in, post):
        if k not in keys:
            raise CheckpointError(f"{path}: {layout} Wan VAE checkpoint without {k}; cannot infer the model size")
    dim, channels = shape_of(sd, enc_in)[:2]  # (dim, 3 or 12, 3, 3, 3)
    z_dim = shape_of(sd, post)[0]
    if channels not in (3, 12):
        raise CheckpointError(f"{path}: {layout} layout, {enc_in} takes {channels} input channels: neither a Wan2.1 "
                              "VAE (3, RGB) nor a Wan2.2 VAE (12, RGB after 2x2 patchify)")
    wan22 = channels == 12
    if layout == "diffusers":
        sd = Renamed(sd, lambda k: vae_key_from_diffusers(k, residual=wan22))
        keys = list(sd)
    version = "Wan2.2" if wan22 else "Wan2.1"
    if wan22 and "decoder.head.2.weight" not in keys:
        raise CheckpointError(f"{path}: {layout} Wan2.2 VAE checkpoint without the decoder head "
                              "(native decoder.head.2.weight, diffusers decoder.conv_out.weight); cannot infer dec_dim")
    return sd, layout, version, dim, z_dim


def load_wan_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> WanVAE:
    """Load a Wan2.1 (`WanVAE`) or Wan2.2 (`WanVAE22`) VAE in eval mode from the native `Wan2.1_VAE.pth` /
    `Wan2.2_VAE.pth`, a native-key safetensors (ComfyUI `wan_2.1_vae.safetensors` / `wan2.2_vae.safetensors`; a
    `vae.` or `first_stage_model.` prefix is stripped) or a diffusers `vae/` folder /
    `diffusion_pytorch_model.safetensors`.

    The version is read from the encoder's input channels (3: Wan2.1; 12 = 3 x 2x2 patch: Wan2.2), `dim`,
    `dec_dim` and `z_dim` from the tensor shapes (header only, no tensor is read twice). Raises
    `CheckpointError` naming the file, the layout and any missing / unexpected / mis-shaped keys, or saying why
    the file is not a Wan VAE.
    """
    sd, layout, version, dim, z_dim = open_wan_vae(path)
    wan22 = version == "Wan2.2"
    try:
        with torch.device("meta"):
            vae = (WanVAE22(dim=dim, dec_dim=shape_of(sd, "decoder.head.2.weight")[1], z_dim=z_dim) if wan22
                   else WanVAE(dim=dim, z_dim=z_dim))
    except ValueError as e:  # a z_dim without official latent statistics
        raise CheckpointError(f"{path}: {layout} {version} VAE with z_dim={z_dim}: {e}") from None
    load_strict(vae, sd, file=Path(path), layout=f"{layout}, {version} VAE", dtype=dtype)
    return vae.to(device).eval()
