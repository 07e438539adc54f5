"""Wan2.1 causal video VAE: 3x8x8 -> 16-channel latents, 4x time and 8x8 space compression, streaming decode.

A from-scratch re-implementation of the official `wan/modules/vae.py` (Wan-Video/Wan2.1) with its native
parameter names (those of `Wan2.1_VAE.pth`), checked against diffusers `AutoencoderKLWan`
(`models/autoencoders/autoencoder_kl_wan.py`). Facts: `reference/models.md` section 2.5.

How the causal cache works (official `feat_cache`, here an explicit dict threaded through the calls):
* every causal 3D conv with time kernel 3 keeps the last `CACHE_T = 2` frames of its *input*; on the next call
  they are prepended in time in place of the front zero padding, so running the network chunk by chunk equals
  running it on the whole video causally;
* encode runs on `[frame 0]`, then 4-frame chunks `[1:5]`, `[5:9]`, ... -> one latent frame each;
* decode runs one latent frame at a time -> 1 frame, then 4 frames each (the "Rep" rule below).
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
from einops import rearrange

from .checkpoints import CheckpointError, Renamed, load_strict, read_state_dict

CACHE_T = 2  # frames of history each causal conv keeps (official CACHE_T)

# official 16-channel latent statistics, `z = (mu - mean) / std` (W21:vae, models.md section 2.5)
WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

Cache = dict  # {module: tensor of its last input frames}; one per encode / decode call


# ----------------------------------------------------------------------------------------------------------
# building blocks


class CausalConv3d(nn.Conv3d):
    """3D conv padded causally in time: 2p zero frames in front, none behind (official `CausalConv3d`)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0):
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad, self.space_pad = 2 * pt, (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """x (B, C, T, H, W) -> (B, C', T', H', W'); with `cache`, cached frames replace the zero padding."""
        time_pad = self.time_pad
        if cache is not None and time_pad > 0:
            prev = cache.get(self)  # (B, C, <=2, H, W) or None on the first chunk
            if prev is not None:
                x = torch.cat([prev, x], dim=2)
                time_pad -= prev.shape[2]
            cache[self] = x[:, :, -CACHE_T:].clone()  # history for the next call (input frames, pre-conv)
        x = F.pad(x, (*self.space_pad, time_pad, 0))
        return super().forward(x)


class RMS_norm(nn.Module):
    """`F.normalize` over channels times sqrt(C) * gamma, no bias; computed in float32 (official `RMS_norm`)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, ...) -> same shape; an L2 normalize (eps 1e-12), not an RMS with eps."""
        return F.normalize(x.float(), dim=1).type_as(x) * self.scale * self.gamma


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

    upsample: Wan2.1's conv halves the channels (C -> C/2); downsample keeps them.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        else:
            raise ValueError(f"unknown Resample mode {mode!r}")
        if mode == "upsample3d":  # makes 2 frames from each frame: 2C channels interleaved in time
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":  # 1 cached frame + T frames -> T/2 frames
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """x (B, C, T, H, W) -> (B, C or C/2, T' , 2H or H/2, 2W or W/2); T' = 2T, T/2 or T (see modes)."""
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
            x = self.resample[1](self.resample[0](x.float()).type_as(x))  # (B*T, C/2, 2H, 2W)
        else:
            x = self.resample(x)  # (B*T, C, H/2, W/2)
        x = rearrange(x, "(b t) c h w -> b c t h w", b=b)
        if self.mode == "downsample3d":
            prev = cache.get(self.time_conv)  # (B, C, 1, H, W): last frame of the previous chunk
            cache[self.time_conv] = x[:, :, -1:].clone()
            if prev is not None:  # the first chunk (1 frame) passes through: 1 frame -> 1 frame
                x = self.time_conv(torch.cat([prev, x], dim=2))  # (B, C, T/2, H, W)
        return x


def _run(layers: nn.Sequential, x: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Apply `layers` in order, handing the cache to the causal ones."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)) else layer(x)
    return x


# ----------------------------------------------------------------------------------------------------------
# encoder, decoder, VAE


class Encoder3d(nn.Module):
    """Pixels (B, 3, T, H, W) -> (B, z_dim, T_lat, H/8, W/8) per chunk (official `Encoder3d`, attn_scales=[])."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temperal_downsample: Sequence[bool]):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]  # 96, 96, 192, 384, 384
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim))
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One chunk: 1 frame (first) or 4 frames -> 1 latent frame."""
        x = self.conv1(x, cache)
        return _run(self.head, _run(self.middle, _run(self.downsamples, x, cache), cache), cache)


class Decoder3d(nn.Module):
    """Latent (B, z_dim, 1, h, w) -> pixels (B, 3, 1 or 4, 8h, 8w) per latent frame (official `Decoder3d`)."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temperal_upsample: Sequence[bool]):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *reversed(dim_mult))]  # 384, 384, 384, 192, 96
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # Wan2.1: the previous stage's upsample conv halved the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One latent frame -> 1 frame (the first call on `cache`) or 4 frames (every later call)."""
        x = self.conv1(x, cache)
        return _run(self.head, _run(self.upsamples, _run(self.middle, x, cache), cache), cache)


class WanVAE(nn.Module):
    """Wan2.1 VAE (official `WanVAE_`, parameter names of `Wan2.1_VAE.pth`), with latent normalization.

    `latents_mean` / `latents_std` (z_dim floats each; None: the official Wan2.1 values) are plain Python
    tuples, not buffers, so nothing but the 194 checkpoint tensors needs loading.
    """

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, temperal_downsample: Sequence[bool] = (False, True, True),
                 latents_mean: Sequence[float] | None = None, latents_std: Sequence[float] | None = None):
        super().__init__()
        self.z_dim = z_dim
        self.latents_mean = tuple(WAN21_LATENT_MEAN if latents_mean is None else latents_mean)
        self.latents_std = tuple(WAN21_LATENT_STD if latents_std is None else latents_std)
        if not len(self.latents_mean) == len(self.latents_std) == z_dim:
            raise ValueError(f"latents_mean / latents_std need z_dim={z_dim} values each, got "
                             f"{len(self.latents_mean)} / {len(self.latents_std)}")
        self.time_factor = 2 ** sum(temperal_downsample)  # 4
        self.space_factor = 2 ** (len(dim_mult) - 1)  # 8
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, temperal_downsample)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)  # encoder output -> (mu, log_var)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)  # latent -> decoder input
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, temperal_downsample[::-1])

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and std as (1, z_dim, 1, 1, 1) tensors on `like`'s device and dtype."""
        mean, std = (torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
                     for v in (self.latents_mean, self.latents_std))
        return mean, std

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1], T = 4k+1, H and W multiples of 8 -> normalized latent
        (B, 16, 1 + (T-1)//4, H/8, W/8) = (mu - mean) / std. The posterior mean is used, never a sample.
        The video is cast to the VAE's dtype; it must be on the VAE's device."""
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
        cache: Cache = {}
        chunks = [x[:, :, :1]] + [x[:, :, i : i + tf] for i in range(1, t, tf)]  # frame 0, then 4-frame chunks
        h = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)  # (B, 2*z_dim, T_lat, H/8, W/8)
        mu, _log_var = self.conv1(h).chunk(2, dim=1)
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def decode_frames(self, latent: torch.Tensor) -> Iterator[torch.Tensor]:
        """Normalized latent (B, 16, T_lat, h, w) -> an iterator of pixel chunks (B, 3, t, 8h, 8w) in [-1, 1]:
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
            yield self.decoder(z[:, :, i : i + 1], cache).clamp_(-1, 1)  # (B, 3, 1 or 4, 8h, 8w)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalized latent (B, 16, T_lat, h, w) -> video (B, 3, 1 + 4(T_lat-1), 8h, 8w) clamped to [-1, 1].
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


def _shape5(x: torch.Tensor, name: str) -> tuple[int, ...]:
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        raise ValueError(f"{name} must be a 5D tensor (B, C, T, H, W); got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    return tuple(x.shape)


# ----------------------------------------------------------------------------------------------------------
# rename table: diffusers AutoencoderKLWan -> native (D:sf `convert_wan_vae_to_diffusers`, run backwards)

_RESNET_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                 "conv_shortcut": "shortcut"}
_DIFFUSERS_RULES = [  # (pattern, replacement), applied in order to each key
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
    (r"^encoder\.down_blocks\.", "encoder.downsamples."),  # same flat index 0..10
    (r"\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.", lambda m: f".{m[1]}.{_RESNET_PARTS[m[2]]}."),
]


def vae_key_from_diffusers(key: str, num_res_blocks: int = 2) -> str:
    """One diffusers `AutoencoderKLWan` key -> the native `Wan2.1_VAE.pth` key (models.md section 2.5 table)."""
    stage = num_res_blocks + 2  # decoder stage i = num_res_blocks + 1 resnets, then an upsampler
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                 lambda m: f"decoder.upsamples.{int(m[1]) * stage + int(m[2])}.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.upsamples.{int(m[1]) * stage + stage - 1}.", key)
    for pattern, repl in _DIFFUSERS_RULES:
        key = re.sub(pattern, repl, key)
    return key


def vae_from_diffusers(sd: Mapping[str, torch.Tensor], num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """Diffusers `AutoencoderKLWan` state dict -> native Wan2.1 state dict (194 tensors at the real config)."""
    return {vae_key_from_diffusers(k, num_res_blocks): v for k, v in sd.items()}


def load_wan_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> WanVAE:
    """Load a Wan2.1 VAE in eval mode from the native `Wan2.1_VAE.pth`, a native-key safetensors (ComfyUI
    `wan_2.1_vae.safetensors`, a `vae.` or `first_stage_model.` prefix is stripped) or a diffusers `vae/`
    folder / `diffusion_pytorch_model.safetensors`. `dim` and `z_dim` are read from the tensor shapes.
    Raises `CheckpointError` naming the file, the layout and any missing / unexpected / mis-shaped keys."""
    sd = read_state_dict(path)
    keys = list(sd)
    for prefix in ("vae.", "first_stage_model."):
        if keys and all(k.startswith(prefix) for k in keys):
            keys = [k[len(prefix):] for k in keys]
            sd = Renamed(sd, lambda k, n=len(prefix): k[n:])
            break
    if "decoder.conv_in.weight" in keys or "quant_conv.weight" in keys:
        layout = "diffusers"
        sd = Renamed(sd, vae_key_from_diffusers)
    elif "decoder.conv1.weight" in keys or "conv1.weight" in keys:
        layout = "native"
    else:
        raise CheckpointError(f"{path}: not a Wan VAE checkpoint: found neither diffusers keys "
                              f"(decoder.conv_in.weight, quant_conv.weight) nor native keys (decoder.conv1.weight, "
                              f"conv1.weight); first keys: {keys[:5]}")
    for k in ("encoder.conv1.weight", "conv2.weight"):
        if k not in sd:
            raise CheckpointError(f"{path}: {layout} Wan VAE checkpoint without {k}; cannot infer the model size")
    enc_in = sd["encoder.conv1.weight"].shape  # (dim, 3, 3, 3, 3)
    if enc_in[1] != 3:
        raise CheckpointError(f"{path}: encoder input has {enc_in[1]} channels, not 3: this looks like the "
                              "Wan2.2 VAE (12 channels after 2x2 patchify), which this Wan2.1 VAE cannot load")
    with torch.device("meta"):
        vae = WanVAE(dim=enc_in[0], z_dim=sd["conv2.weight"].shape[0])
    load_strict(vae, sd, file=Path(path), layout=layout, dtype=dtype)
    return vae.to(device).eval()
