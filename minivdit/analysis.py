"""Measurements for the STAS paper: frame-to-frame consistency across latent chunks, massive-activation statistics.

frame_consistency: consecutive-frame similarity split into cross-chunk / within-chunk transitions (STAS Sec. 4,
Fig. 4, Table 2). MAStats: streaming massive-activation statistics over prompts, steps and blocks (STAS Appendix
A.1-A.2, Table A1; the positional split of Fig. 1e, 2a, 2b).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------
# frame-to-frame consistency (STAS Sec. 4, Fig. 4, Table 2)


def wan_latent_frame(j: int) -> int:
    """The latent frame pixel frame j decodes from (Wan / CogVideoX VAE, 4x temporal): 0 -> 0, 4k-3..4k -> k."""
    return (j + 3) // 4


def _frames01(video) -> torch.Tensor:
    """(T, H, W, 3) uint8 numpy or (3, T, H, W) float tensor in [-1, 1] -> (T, 3, H, W) float64 in [0, 1]."""
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise ValueError(f"numpy video must be (T, H, W, 3) uint8, got {video.shape} {video.dtype}")
        return torch.from_numpy(video).permute(0, 3, 1, 2).double() / 255
    if not torch.is_tensor(video) or video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"tensor video must be (3, T, H, W) in [-1, 1], got {getattr(video, 'shape', type(video))}")
    return ((video.detach().double().cpu().clamp(-1, 1) + 1) / 2).permute(1, 0, 2, 3)


def pixel_features(frames: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3 H W) float64: each frame flattened and mean-centred (cosine = Pearson correlation)."""
    f = frames.double().flatten(1)
    return f - f.mean(dim=1, keepdim=True)


def frame_consistency(video, latent_frame_of: Callable[[int], int] | Sequence[int] | None = None,
                      features: Callable[[torch.Tensor], torch.Tensor] | None = None, batch: int = 16) -> dict:
    """Cosine similarity of consecutive frames, split at latent-chunk seams (STAS Fig. 4, Table 2).

    video: (T, H, W, 3) uint8 numpy or (3, T, H, W) float tensor in [-1, 1], T >= 2. latent_frame_of: frame index ->
    latent frame index, a callable or a length-T sequence (None: Wan's 1 + 4k layout, `wan_latent_frame`); the
    transition j -> j+1 is cross-chunk if the two frames decode from different latent frames (Wan: 0->1, 4->5, ...).
    features: frames (N, 3, H, W) float in [0, 1] -> (N, D) embeddings, called on `batch` frames at a time (None:
    `pixel_features`; see `hf_image_features` for DINO / CLIP). Two all-zero features count as identical (1.0).
    Returns {"cross_chunk", "within_chunk", "all": mean similarity (None if there is no such transition),
    "per_transition": [T - 1 floats], "cross": [bool per transition]}.
    """
    frames = _frames01(video)  # (T, 3, H, W)
    t = frames.shape[0]
    if t < 2:
        raise ValueError(f"need at least 2 frames, got {t}")
    if latent_frame_of is None:
        latent = [wan_latent_frame(j) for j in range(t)]
    elif callable(latent_frame_of):
        latent = [int(latent_frame_of(j)) for j in range(t)]
    else:
        latent = [int(k) for k in latent_frame_of]
        if len(latent) != t:
            raise ValueError(f"latent_frame_of has {len(latent)} entries for {t} frames")
    embed = features or pixel_features
    with torch.no_grad():
        f = torch.cat([embed(frames[i:i + batch]).double().cpu() for i in range(0, t, batch)])  # (T, D)
    norm = f.norm(dim=1)  # (T,)
    dot = (f[:-1] * f[1:]).sum(dim=1)  # (T - 1,)
    den = norm[:-1] * norm[1:]
    both_zero = (norm[:-1] == 0) & (norm[1:] == 0)
    sim = torch.where(den > 0, dot / den.clamp_min(1e-300), both_zero.double())  # (T - 1,)
    cross = [latent[j] != latent[j + 1] for j in range(t - 1)]
    mean = lambda xs: float(np.mean(xs)) if xs else None
    s = sim.tolist()
    return {"cross_chunk": mean([x for x, c in zip(s, cross) if c]),
            "within_chunk": mean([x for x, c in zip(s, cross) if not c]),
            "all": mean(s), "per_transition": s, "cross": cross}


def hf_image_features(path: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> Callable[[torch.Tensor], torch.Tensor]:
    """A `features` callable from LOCAL transformers weights (never a hub): CLIP -> get_image_features (the
    projected image embedding); any other vision model (DINO: ViTModel, Dinov2Model) -> the CLS token of
    last_hidden_state. path: a folder holding the model and its image processor (save_pretrained layout).
    The callable maps frames (N, 3, H, W) float in [0, 1] -> (N, D) float32 on the CPU.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPModel

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder (hf_image_features reads local weights only)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    is_clip = config.model_type == "clip"
    model = (CLIPModel if is_clip else AutoModel).from_pretrained(path, local_files_only=True, dtype=dtype)
    model = model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def features(frames: torch.Tensor) -> torch.Tensor:
        images = list((frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, dtype)  # (N, 3, h, w)
        if is_clip:
            out = model.get_image_features(pixel_values=pixels)
            out = out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a model output
        else:
            out = model(pixel_values=pixels).last_hidden_state[:, 0]  # (N, D): the CLS token
        return out.float().cpu()

    return features
