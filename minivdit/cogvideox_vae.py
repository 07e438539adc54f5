"""CogVideoX causal video VAE: 3x8x8 -> 16-channel latents, 4x time and 8x8 space compression, streaming decode.

A from-scratch re-implementation of diffusers `AutoencoderKLCogVideoX` (`models/autoencoders/
autoencoder_kl_cogvideox.py`, `models/downsampling.py` CogVideoXDownsample3D, `models/upsampling.py`
CogVideoXUpsample3D) with its parameter names, since the official CogVideoX release is diffusers-format. Facts:
`reference/models.md` section 3.5.

What makes it differ from the Wan VAE:
* causal 3D convs pad time by **replicating the first frame** (k - 1 = 2 times), not with zeros;
* the decoder's norms are spatially conditioned (SpatialNorm3D): `GroupNorm(f) * conv_y(zq) + conv_b(zq)`, zq being
  the decoder's input latent resized (nearest) to the feature size;
* time is compressed by average pooling frame pairs (first frame of an odd count kept) and expanded by nearest
  interpolation, with no time convs;
* encode and decode run in **frame batches** (8 frames / 2 latent frames, the remainder joined to the first batch).
  Every causal 3D conv keeps the last 2 frames of its padded input (an explicit cache dict, one per encode / decode
  call) and prepends them on the next batch. Pooling, interpolation and the GroupNorms work within a batch only, so
  the batching is part of the numerics: a streaming decode must keep exactly these batches (and does).

Latent scaling is the pipelines' (diffusers `pipeline_cogvideox.py`): `encode` returns
`posterior mode * scaling_factor`, `decode` takes such a latent and multiplies by `1 / scaling_factor` first.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .checkpoints import CheckpointError, load_strict, read_state_dict, strip_prefix

Cache = dict  # {causal conv: last 2 frames of its padded input}; one per encode / decode call

# per-model VAE scaling (models.md section 3.5): 2B 1.15258426; 5B and 1.5 0.7; 1.5 also `invert_scale_latents`
SCALING_FACTORS = {"cogvideox-2b": 1.15258426, "cogvideox-5b": 0.7, "cogvideox1.5-5b": 0.7}
ENCODE_FRAME_BATCH = 8  # diffusers `num_sample_frames_batch_size`
DECODE_LATENT_BATCH = 2  # diffusers `num_latent_frames_batch_size`


@dataclass(frozen=True)
class Tiling:
    """Spatial tiling of the decode, diffusers `enable_tiling()` defaults (what CogVideo's `cli_demo` turns on):
    tiles of `tile` = (H, W) pixels (sample_height // 2, sample_width // 2 of the VAE config: 240 x 360), started
    every (1 - overlap) of a tile, blended linearly over overlap * tile pixels. Changes the output (each tile has its
    own GroupNorm statistics); off unless asked for."""
    tile: tuple[int, int] = (240, 360)
    overlap: tuple[float, float] = (1 / 6, 1 / 5)


@dataclass(frozen=True)
class CogVideoXVAEConfig:
    """Architecture and latent scaling; field names and defaults are diffusers' `AutoencoderKLCogVideoX` config
    (CogVideoX-2B values; 5B and 1.5 use scaling_factor 0.7, 1.5 also invert_scale_latents=True)."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    scaling_factor: float = 1.15258426
    invert_scale_latents: bool = False


# ----------------------------------------------------------------------------------------------------------
# building blocks


class CausalConv3d(nn.Module):
    """3D conv, spatial zero padding k//2, causal in time by replicating frame 0 k-1 times (`CogVideoXCausalConv3d`).

    With a cache, the last k-1 frames of the previous call's padded input replace the replicated frames.
    The wrapped conv is `.conv`, as in the checkpoint (`...conv_in.conv.weight`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.time_pad = kernel_size - 1
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, kernel_size // 2, kernel_size // 2))

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """x (B, C, T, H, W) -> (B, C', T, H, W)."""
        if self.time_pad:
            prev = cache.get(self) if cache is not None else None  # (B, C, 2, H, W) from the previous batch
            front = prev if prev is not None else x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([front, x], dim=2)  # (B, C, T + 2, H, W)
            if cache is not None:
                cache[self] = x[:, :, -self.time_pad:].clone()
        return self.conv(x)


class SpatialNorm3D(nn.Module):
    """GroupNorm(f) * conv_y(zq) + conv_b(zq), zq resized (nearest) to f's (T, H, W) (`CogVideoXSpatialNorm3D`,
    Zhu et al. 2022, arXiv:2209.09002). With an odd T > 1, zq's first frame and the rest are resized separately,
    so frame 0 of the features always sees latent frame 0 alone."""

    def __init__(self, f_channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, f_channels, eps=1e-6)
        self.conv_y = CausalConv3d(zq_channels, f_channels, 1)
        self.conv_b = CausalConv3d(zq_channels, f_channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """f (B, C, T, H, W), zq (B, z, t, h, w) -> (B, C, T, H, W)."""
        t, size = f.shape[2], f.shape[3:]
        if t > 1 and t % 2 == 1:
            zq = torch.cat([F.interpolate(zq[:, :, :1], size=(1, *size)),
                            F.interpolate(zq[:, :, 1:], size=(t - 1, *size))], dim=2)  # (B, z, T, H, W)
        else:
            zq = F.interpolate(zq, size=(t, *size))
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)  # 1x1x1 convs: no time mixing, no cache


class ResnetBlock3D(nn.Module):
    """norm-SiLU-causal conv3 twice, plus a 1x1x1 conv shortcut when channels change (`CogVideoXResnetBlock3D`).
    Encoder: GroupNorm; decoder (zq_channels given): SpatialNorm3D conditioned on the latent."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, zq_channels: int | None = None):
        super().__init__()
        if zq_channels is None:
            self.norm1, self.norm2 = nn.GroupNorm(groups, in_channels, eps=eps), nn.GroupNorm(groups, out_channels, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(in_channels, zq_channels, groups)
            self.norm2 = SpatialNorm3D(out_channels, zq_channels, groups)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)  # (dropout 0 before it: nothing at inference)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _norm(self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
        return norm(x) if zq is None else norm(x, zq)

    def forward(self, x: torch.Tensor, cache: Cache, zq: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in, T, H, W) -> (B, out, T, H, W)."""
        h = self.conv1(F.silu(self._norm(self.norm1, x, zq)), cache)
        h = self.conv2(F.silu(self._norm(self.norm2, h, zq)), cache)
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample3D(nn.Module):
    """Optional 2x time pooling, then pad (0,1,0,1) and a stride-2 3x3 Conv2d per frame (`CogVideoXDownsample3D`).

    Time (compress_time, before the spatial conv): an odd T keeps frame 0 and averages the pairs of the rest
    (T -> 1 + (T-1)/2); an even T averages all pairs (T -> T/2). Within the batch only: no cache.
    """

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W) -> (B, C, T', H/2, W/2)."""
        t = x.shape[2]
        if self.compress_time and t % 2 == 1:
            if t > 1:
                x = torch.cat([x[:, :, :1], F.avg_pool3d(x[:, :, 1:], (2, 1, 1))], dim=2)  # (B, C, 1 + (T-1)/2, H, W)
        elif self.compress_time:
            x = F.avg_pool3d(x, (2, 1, 1))  # (B, C, T/2, H, W)
        b = x.shape[0]
        x = self.conv(F.pad(rearrange(x, "b c t h w -> (b t) c h w"), (0, 1, 0, 1)))  # (B*T', C, H/2, W/2)
        return rearrange(x, "(b t) c h w -> b c t h w", b=b)


class Upsample3D(nn.Module):
    """Nearest 2x (with compress_time: time too), then a 3x3 Conv2d per frame (`CogVideoXUpsample3D`).

    Time (compress_time): an odd T > 1 keeps frame 0 single and doubles the rest (T -> 1 + 2(T-1)); an even T
    doubles all (T -> 2T); T = 1 stays 1. Without compress_time only H and W double. Within the batch only.
    """

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W) -> (B, C, T', 2H, 2W)."""
        t = x.shape[2]
        if self.compress_time and t > 1 and t % 2 == 1:
            x = torch.cat([F.interpolate(x[:, :, :1], scale_factor=(1.0, 2.0, 2.0)),
                           F.interpolate(x[:, :, 1:], scale_factor=2.0)], dim=2)  # (B, C, 1 + 2(T-1), 2H, 2W)
        elif self.compress_time and t > 1:
            x = F.interpolate(x, scale_factor=2.0)  # (B, C, 2T, 2H, 2W)
        else:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0))  # (B, C, T, 2H, 2W)
        b = x.shape[0]
        x = self.conv(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(x, "(b t) c h w -> b c t h w", b=b)


class Stage(nn.Module):
    """Resnets, then an optional resampler: diffusers' down / mid / up block under its parameter names
    (`resnets.i`, `downsamplers.0`, `upsamplers.0`)."""

    def __init__(self, resnets: Sequence[nn.Module], downsample: nn.Module | None = None,
                 upsample: nn.Module | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if downsample is not None:
            self.downsamplers = nn.ModuleList([downsample])
        if upsample is not None:
            self.upsamplers = nn.ModuleList([upsample])

    def forward(self, x: torch.Tensor, cache: Cache, zq: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache, zq)
        for resample in (*getattr(self, "downsamplers", ()), *getattr(self, "upsamplers", ())):
            x = resample(x)
        return x


# ----------------------------------------------------------------------------------------------------------
# encoder, decoder, VAE


class Encoder3D(nn.Module):
    """Pixels (B, 3, T, H, W) -> posterior (mean, logvar) (B, 2z, T_lat, H/8, W/8) per frame batch
    (`CogVideoXEncoder3D`). Stages i < log2(temporal ratio) also halve time."""

    def __init__(self, c: CogVideoXVAEConfig):
        super().__init__()
        ch, g, eps = c.block_out_channels, c.norm_num_groups, c.norm_eps
        time_levels = int(math.log2(c.temporal_compression_ratio))
        self.conv_in = CausalConv3d(c.in_channels, ch[0], 3)
        self.down_blocks = nn.ModuleList()
        for i, out in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            resnets = [ResnetBlock3D(cin if j == 0 else out, out, g, eps) for j in range(c.layers_per_block)]
            down = Downsample3D(out, compress_time=i < time_levels) if i < len(ch) - 1 else None
            self.down_blocks.append(Stage(resnets, downsample=down))
        self.mid_block = Stage([ResnetBlock3D(ch[-1], ch[-1], g, eps) for _ in range(2)])
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * c.latent_channels, 3)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One frame batch (9 or 8 frames, or all when fewer) -> its latent frames (3 or 2)."""
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class Decoder3D(nn.Module):
    """Latent (B, z, t, h, w) -> pixels (B, 3, T, 8h, 8w) per latent batch (`CogVideoXDecoder3D`); every norm is a
    SpatialNorm3D conditioned on this batch's input latent. Stages i < log2(temporal ratio) also double time."""

    def __init__(self, c: CogVideoXVAEConfig):
        super().__init__()
        ch, g, eps, z = tuple(reversed(c.block_out_channels)), c.norm_num_groups, c.norm_eps, c.latent_channels
        time_levels = int(math.log2(c.temporal_compression_ratio))
        self.conv_in = CausalConv3d(z, ch[0], 3)
        self.mid_block = Stage([ResnetBlock3D(ch[0], ch[0], g, eps, z) for _ in range(2)])
        self.up_blocks = nn.ModuleList()
        for i, out in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            resnets = [ResnetBlock3D(cin if j == 0 else out, out, g, eps, z) for j in range(c.layers_per_block + 1)]
            up = Upsample3D(out, compress_time=i < time_levels) if i < len(ch) - 1 else None
            self.up_blocks.append(Stage(resnets, upsample=up))
        self.norm_out = SpatialNorm3D(ch[-1], z, g)
        self.conv_out = CausalConv3d(ch[-1], c.out_channels, 3)

    def forward(self, z: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One latent batch (3, 2 or 1 latent frames) -> 9, 8 or 1 frames (odd t: 1 + 4(t-1); even t: 4t)."""
        x = self.mid_block(self.conv_in(z, cache), cache, z)
        for block in self.up_blocks:
            x = block(x, cache, z)
        return self.conv_out(F.silu(self.norm_out(x, z)), cache)


def frame_batches(n: int, size: int) -> list[slice]:
    """diffusers' frame batches: max(n // size, 1) batches of `size` frames, the remainder n % size joined to the
    first (49 frames / 8: 9, 8, 8, 8, 8, 8; 13 latents / 2: 3, 2, 2, 2, 2, 2; fewer than `size`: one batch)."""
    r = n % size
    return [slice(0 if i == 0 else size * i + r, size * (i + 1) + r) for i in range(max(n // size, 1))]


class CogVideoXVAE(nn.Module):
    """CogVideoX VAE (diffusers `AutoencoderKLCogVideoX`, its parameter names; no quant convs) with latent scaling."""

    def __init__(self, config: CogVideoXVAEConfig = CogVideoXVAEConfig()):
        super().__init__()
        self.config = config
        self.z_dim = config.latent_channels
        self.scaling_factor = config.scaling_factor
        self.time_factor = config.temporal_compression_ratio  # 4
        self.space_factor = 2 ** (len(config.block_out_channels) - 1)  # 8
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.conv.weight.dtype

    @torch.no_grad()
    def encode(self, video: torch.Tensor, image_condition: bool = False) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1], T = 4k+1, H and W multiples of 8 -> scaled latent
        (B, 16, 1 + (T-1)/4, H/8, W/8) = posterior mode (mean) * scaling_factor, encoded in diffusers' 8-frame batches.

        image_condition: scale as the I2V pipelines scale their image latent, i.e. by 1 / scaling_factor when the
        config has `invert_scale_latents` (CogVideoX1.5), by scaling_factor otherwise (diffusers
        `pipeline_cogvideox_image2video.py`). The video is cast to the VAE's dtype; it must be on its device.
        """
        b, c, t, h, w = _shape5(video, "video")
        tf, sf = self.time_factor, self.space_factor
        if c != self.config.in_channels:
            raise ValueError(f"video must have 3 (RGB) channels in dim 1, shaped (B, 3, T, H, W); got {tuple(video.shape)}")
        if (t - 1) % tf:
            raise ValueError(f"video must have 1 + {tf}k frames (1, 5, 9, ..., 49); got T={t}: trim it to "
                             f"{1 + (t - 1) // tf * tf} frames")
        if h % sf or w % sf:
            raise ValueError(f"video height and width must be multiples of {sf}; got {h}x{w}")
        x = video.to(self.dtype)
        cache: Cache = {}
        moments = torch.cat([self.encoder(x[:, :, s], cache) for s in frame_batches(t, ENCODE_FRAME_BATCH)], dim=2)
        mean = moments[:, : self.z_dim]  # (B, z, T_lat, H/8, W/8); the logvar half is not needed for the mode
        scale = 1 / self.scaling_factor if image_condition and self.config.invert_scale_latents else self.scaling_factor
        return scale * mean

    def decode_frames(self, latent: torch.Tensor, tiling: Tiling | None = None) -> Iterator[torch.Tensor]:
        """Scaled latent (B, 16, T_lat, h, w) -> an iterator of pixel chunks (B, 3, t, 8h, 8w), not clamped
        (diffusers' range, about [-1, 1]): one chunk per diffusers latent batch, so t = 9 (or 1 for T_lat = 1) for
        the first and 8 for each later one. Only one batch of decoder activations and the 2-frame conv caches are
        alive at a time. `tiling`: decode in overlapping H x W tiles as diffusers' `tiled_decode` does (when the
        latent is larger than one tile), still streaming in time. Input checks run at once, not at the first `next`."""
        _, c, _, _, _ = _shape5(latent, "latent")
        if c != self.z_dim:
            raise ValueError(f"latent must have {self.z_dim} channels in dim 1, shaped (B, {self.z_dim}, T, h, w); "
                             f"got {tuple(latent.shape)}")
        if tiling is not None:
            for n, o in zip(tiling.tile, tiling.overlap):  # tiles must abut after cropping, or the size changes
                if n % self.space_factor or int(n // self.space_factor * (1 - o)) * self.space_factor != n - int(n * o):
                    raise ValueError(f"tiling {tiling}: a {n}-pixel tile with overlap {o:.4g} does not tile evenly "
                                     f"(tile a multiple of {self.space_factor}, (1 - overlap) * tile in whole latents)")
        return self._decode_frames(latent, tiling)

    @torch.no_grad()
    def _decode_frames(self, latent: torch.Tensor, tiling: Tiling | None) -> Iterator[torch.Tensor]:
        """Generator behind `decode_frames` (diffusers `AutoencoderKLCogVideoX._decode` / `tiled_decode`)."""
        z = (1 / self.scaling_factor) * latent.to(self.dtype)  # as the pipelines write it (`1 / sf * latents`)
        h, w = z.shape[3:]
        if tiling is not None:  # tile size in latent pixels, as diffusers rounds it
            th, tw = int(tiling.tile[0] / self.space_factor), int(tiling.tile[1] / self.space_factor)
        if tiling is None or (h <= th and w <= tw):
            cache: Cache = {}
            for s in frame_batches(z.shape[2], DECODE_LATENT_BATCH):
                yield self.decoder(z[:, :, s], cache)
            return
        (oh, ow), (ph, pw) = tiling.overlap, tiling.tile
        rows, cols = range(0, h, int(th * (1 - oh))), range(0, w, int(tw * (1 - ow)))
        caches = {(i, j): {} for i in rows for j in cols}  # each tile streams through time with its own conv cache
        for s in frame_batches(z.shape[2], DECODE_LATENT_BATCH):
            tiles = [[self.decoder(z[:, :, s, i : i + th, j : j + tw], caches[i, j]) for j in cols] for i in rows]
            yield _blend_tiles(tiles, int(ph * oh), int(pw * ow), ph - int(ph * oh), pw - int(pw * ow))

    def num_frames(self, latent_frames: int) -> int:
        """Frames decoded from `latent_frames`: 1 + 4(T_lat - 1) for odd T_lat, 4 T_lat for even (models.md pitfall 17)."""
        return 1 + self.time_factor * (latent_frames - 1) if latent_frames % 2 else self.time_factor * latent_frames

    def decode(self, latent: torch.Tensor, tiling: Tiling | None = None) -> torch.Tensor:
        """Scaled latent (B, 16, T_lat, h, w) -> video (B, 3, num_frames(T_lat), 8h, 8w), not clamped.
        Streams through `decode_frames` into one preallocated output tensor."""
        frames = self.decode_frames(latent, tiling)
        b, _, t, h, w = latent.shape
        out = torch.empty(b, 3, self.num_frames(t), h * self.space_factor, w * self.space_factor, dtype=self.dtype,
                          device=latent.device)
        i = 0
        for chunk in frames:
            out[:, :, i : i + chunk.shape[2]] = chunk
            i += chunk.shape[2]
        return out


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Fade b's first `extent` rows along `dim` in from a's last ones, linearly, in place (diffusers blend_v/h)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for y in range(extent):
        b.select(dim, y).copy_(a.select(dim, y - extent) * (1 - y / extent) + b.select(dim, y) * (y / extent))
    return b


def _blend_tiles(tiles: list[list[torch.Tensor]], blend_h: int, blend_w: int, keep_h: int, keep_w: int) -> torch.Tensor:
    """Decoded tiles (rows of (B, 3, t, H_tile, W_tile)) -> one (B, 3, t, H, W) chunk, as diffusers' tiled_decode:
    each tile, in order, is blended in place with its upper and then its left neighbour (already blended), then
    cropped to keep_h x keep_w."""
    out_rows = []
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(tiles[i - 1][j], tile, blend_h, dim=3)
            if j > 0:
                _blend(row[j - 1], tile, blend_w, dim=4)
        out_rows.append(torch.cat([tile[:, :, :, :keep_h, :keep_w] for tile in row], dim=4))
    return torch.cat(out_rows, dim=3)


def _shape5(x: torch.Tensor, name: str) -> tuple[int, ...]:
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        raise ValueError(f"{name} must be a 5D tensor (B, C, T, H, W); got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    return tuple(x.shape)


# ----------------------------------------------------------------------------------------------------------
# loading

_WAN_KEYS = ("decoder.conv1.weight", "conv1.weight", "decoder.conv_in.weight", "quant_conv.weight",
             "encoder.conv_in.weight")  # native Wan2.1 / Wan2.2 keys and diffusers AutoencoderKLWan keys


def _config_from_json(path: Path, **overrides) -> CogVideoXVAEConfig:
    """diffusers `vae/config.json` -> config (unknown fields such as sample_height are ignored)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable config.json ({e}).") from None
    if raw.get("use_quant_conv") or raw.get("use_post_quant_conv"):
        raise CheckpointError(f"{path}: use_quant_conv / use_post_quant_conv are set; no CogVideoX release uses them "
                              "and this VAE does not implement them.")
    if raw.get("_class_name", "AutoencoderKLCogVideoX") != "AutoencoderKLCogVideoX":
        raise CheckpointError(f"{path}: config is for {raw['_class_name']}, not AutoencoderKLCogVideoX"
                              + (": this is a Wan VAE, load it with minivdit.wan_vae.load_wan_vae"
                                 if "Wan" in raw["_class_name"] else ""))
    names = {f.name for f in fields(CogVideoXVAEConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return CogVideoXVAEConfig(**kw)


def _config_from_shapes(sd: Mapping, path, **overrides) -> CogVideoXVAEConfig:
    """Architecture read from the tensor shapes of a single file (groups, eps and time ratio: the defaults)."""
    shape = sd.shape if hasattr(sd, "shape") else (lambda k: tuple(sd[k].shape))
    ch, i = [], 0
    while f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight" in sd:
        ch.append(shape(f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight")[0])
        i += 1
    layers = sum(1 for k in sd if k.startswith("encoder.down_blocks.0.resnets.") and k.endswith(".conv1.conv.weight"))
    kw = dict(block_out_channels=tuple(ch), layers_per_block=layers,
              latent_channels=shape("decoder.conv_in.conv.weight")[1],
              in_channels=shape("encoder.conv_in.conv.weight")[1], out_channels=shape("decoder.conv_out.conv.weight")[0])
    if overrides.get("scaling_factor") is None:
        raise CheckpointError(f"{path}: a single-file CogVideoX VAE carries no scaling factor; pass scaling_factor= "
                              f"(CogVideoX-2B {SCALING_FACTORS['cogvideox-2b']}, 5B and 1.5 0.7) or load the "
                              "diffusers vae/ folder with its config.json")
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return CogVideoXVAEConfig(**kw)


def load_cogvideox_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", scaling_factor: float | None = None,
                       invert_scale_latents: bool | None = None) -> CogVideoXVAE:
    """Load a CogVideoX VAE in eval mode from a diffusers `vae/` folder (config.json + safetensors) or a single
    diffusers-key safetensors file (a `vae.` or `first_stage_model.` prefix is stripped; the architecture is read
    from the shapes and `scaling_factor` must be passed). `scaling_factor` / `invert_scale_latents` override the
    config. Raises `CheckpointError` naming the file, the layout and any missing / unexpected / mis-shaped keys, and
    a clear one for a Wan VAE."""
    path = Path(path)
    sd = strip_prefix(read_state_dict(path))
    keys = list(sd)
    if "encoder.conv_in.conv.weight" not in sd or "decoder.conv_in.conv.weight" not in sd:
        wan = [k for k in _WAN_KEYS if k in sd]
        if wan:
            raise CheckpointError(f"{path}: this is a Wan VAE (keys {', '.join(wan)}), not a CogVideoX VAE: load it "
                                  "with minivdit.wan_vae.load_wan_vae, or pick the CogVideoX vae/ folder")
        raise CheckpointError(f"{path}: not a CogVideoX VAE checkpoint: no encoder.conv_in.conv.weight / "
                              f"decoder.conv_in.conv.weight; first keys: {keys[:5]}")
    overrides = dict(scaling_factor=scaling_factor, invert_scale_latents=invert_scale_latents)
    config_json = (path if path.is_dir() else path.parent) / "config.json"
    if config_json.exists():
        config = _config_from_json(config_json, **overrides)
    else:
        config = _config_from_shapes(sd, path, **overrides)
    with torch.device("meta"):
        vae = CogVideoXVAE(config)
    load_strict(vae, sd, file=path, layout="diffusers", dtype=dtype)
    return vae.to(device).eval()


def config_dict(config: CogVideoXVAEConfig) -> dict:
    """The config as diffusers' `AutoencoderKLCogVideoX(**kwargs)` takes it (for writing reference checkpoints)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
