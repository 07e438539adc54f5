"""Video metrics for guidance studies: weight-free temporal measures split at latent-chunk seams, fidelity to a
baseline video, DINO / CLIP frame-pair similarity from local weights, plots, and a VBench export.

Videos are (T, H, W, 3) uint8 numpy arrays or (3, T, H, W) float tensors in [-1, 1] (what the VAE decodes). A
transition j is the frame pair (j, j + 1); it is cross-chunk when the two frames decode from different latent frames.
The causal video VAEs of Wan2.1 / Wan2.2 / CogVideoX decode latent frame 0 to pixel frame 0 alone and every later
latent frame to `stride` = 4 pixel frames (their temporal compression), so with stride s the cross-chunk transitions
are j = 0, s, 2s, ... (STAS Sec. 4, Fig. 4, Table 2).

References:
  VBench (Huang et al., CVPR 2024), `vbench/temporal_flickering.py`: score = (255 - mean_t MAE(frame_t, frame_t+1))
    / 255 on uint8 frames, MAE the mean absolute difference over all pixels and channels.
  Lai et al., "Learning Blind Video Temporal Consistency", ECCV 2018: warping error, the masked difference between a
    frame and its flow-warped neighbour; occlusion mask by forward-backward consistency (Sundaram et al. 2010, the
    criterion of Ruder et al. 2016).
  Farneback, "Two-Frame Motion Estimation Based on Polynomial Expansion", SCIA 2003 (cv2.calcOpticalFlowFarneback).
  Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity", TIP 2004 (SSIM, through
    scikit-image); PSNR = 10 log10(255^2 / MSE) (scikit-image).
  STAS (Table 2, Fig. 4): DINO ViT-B/16 and CLIP ViT-B/32 cosine similarity of adjacent frames, split cross- / within-
    chunk; the backbones of VBench's subject / background consistency.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .video import atomic_write, to_uint8, write_figure, write_text

# ----------------------------------------------------------------------------------------------------------
# video formats and the latent-chunk layout


def latent_frame(j: int, stride: int = 4) -> int:
    """The latent frame pixel frame j decodes from in a causal VAE of temporal stride s: 0 -> 0, then
    1..s -> 1, s+1..2s -> 2, ... (Wan2.1 / Wan2.2 / CogVideoX: s = 4)."""
    if stride < 1 or j < 0:
        raise ValueError(f"need stride >= 1 and frame index >= 0, got stride={stride}, j={j}")
    return (j + stride - 1) // stride


def cross_chunk(frames: int, stride: int = 4) -> np.ndarray:
    """(T - 1,) bool: transition j (frames j -> j + 1) crosses a latent-frame boundary; True at j = 0, s, 2s, ..."""
    return np.array([latent_frame(j, stride) != latent_frame(j + 1, stride) for j in range(frames - 1)], dtype=bool)


def video_uint8(video) -> np.ndarray:
    """(T, H, W, 3) uint8 numpy, returned as is, or (3, T, H, W) float tensor in [-1, 1] -> (T, H, W, 3) uint8 by
    round((x + 1) / 2 * 255), the quantization of the mp4 writer (video.to_uint8)."""
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise ValueError(f"numpy video must be (T, H, W, 3) uint8, got {video.shape} {video.dtype}")
        return video
    if not torch.is_tensor(video) or video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"tensor video must be (3, T, H, W) in [-1, 1], got {getattr(video, 'shape', type(video))}")
    return to_uint8(video.detach())


def _frames01(video, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Frames start:stop of a (T, H, W, 3) uint8 numpy or (3, T, H, W) float tensor in [-1, 1] video -> (N, 3, H, W)
    float64 in [0, 1] (a float video is not quantized)."""
    if isinstance(video, np.ndarray):
        frames = np.ascontiguousarray(video_uint8(video)[start:stop].transpose(0, 3, 1, 2))  # uint8: a cheap copy
        return torch.from_numpy(frames).double().div_(255)
    video_uint8(video[:, :1])  # shape check only
    return ((video[:, start:stop].detach().double().cpu().clamp(-1, 1) + 1) / 2).permute(1, 0, 2, 3)


def split(per_transition: Sequence[float], cross: Sequence[bool]) -> dict:
    """Means of per-transition values over all / cross-chunk / within-chunk transitions (NaN entries are skipped; a
    mean over nothing is None). Returns {"all", "cross_chunk", "within_chunk", "per_transition", "cross"}."""
    v, c = np.asarray(per_transition, dtype=np.float64), np.asarray(cross, dtype=bool)
    if v.shape != c.shape:
        raise ValueError(f"{v.size} values for {c.size} transitions")

    def mean(x):
        x = x[~np.isnan(x)]
        return float(x.mean()) if x.size else None

    return {"all": mean(v), "cross_chunk": mean(v[c]), "within_chunk": mean(v[~c]),
            "per_transition": [None if math.isnan(x) else float(x) for x in v], "cross": c.tolist()}


def _map(fn, items, workers: int | None = None) -> list:
    """[fn(x) for x in items] on a thread pool (OpenCV and scikit-image release the GIL): the same results in the same
    order as a loop, faster on a multi-core CPU. workers None: min(8, the CPUs this process may use)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = workers or min(8, cpus)
    if workers == 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _need_two(video: np.ndarray) -> None:
    if video.shape[0] < 2:
        raise ValueError(f"need at least 2 frames, got {video.shape[0]}")


# ----------------------------------------------------------------------------------------------------------
# weight-free temporal metrics


def temporal_flickering(video, stride: int = 4) -> dict:
    """VBench temporal flickering per transition: (255 - mean |frame_t - frame_t+1|) / 255 over all pixels and
    channels of uint8 frames, in [0, 1]; 1 = identical frames, higher = less flicker (and less motion: VBench scores it
    on static-camera videos only). VBench's video score is the mean over transitions = `split(...)["all"]` (VBench,
    `temporal_flickering.py`: (255 - mean(MAE)) / 255). Returns `split`'s dict."""
    v = video_uint8(video)
    _need_two(v)
    mae = np.array([np.abs(v[j + 1].astype(np.int16) - v[j]).mean() for j in range(len(v) - 1)])  # (T - 1,) in [0, 255]
    return split((255 - mae) / 255, cross_chunk(len(v), stride))


def frame_difference_energy(video, stride: int = 4) -> dict:
    """Frame-difference energy per transition: mean (frame_t+1 - frame_t)^2 over pixels and channels, frames in
    [0, 1]; in [0, 1], 0 = static. A motion-amount proxy (it grows with motion and with flicker alike; with the
    warping error it tells "less flicker" from "less motion"); no direction is better. Returns `split`'s dict."""
    v = video_uint8(video)
    _need_two(v)
    e = [(((v[j + 1].astype(np.float64) - v[j]) / 255) ** 2).mean() for j in range(len(v) - 1)]
    return split(e, cross_chunk(len(v), stride))


def dense_flow(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Farneback dense optical flow (OpenCV; pyramid 0.5 x 3 levels, window 15, 3 iterations, poly_n 5, sigma 1.2)
    between two (H, W) uint8 grayscale frames -> (H, W, 2) float32 in pixels, flow[y, x] = (dx, dy) with
    src[y, x] ~ dst[y + dy, x + dx]."""
    import cv2

    return cv2.calcOpticalFlowFarneback(src, dst, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def _remap(image: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """image sampled at p + flow(p) (bilinear), and the (H, W) bool mask of p + flow(p) inside the frame."""
    import cv2

    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mx, my = gx + flow[..., 0], gy + flow[..., 1]
    inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    return cv2.remap(image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), inside


def warping_error(video, stride: int = 4, size: int | None = 416, workers: int | None = None) -> dict:
    """Optical-flow warping error (Lai et al. 2018) and flow magnitude per transition.

    Frames are first resized (cv2.INTER_AREA) so that the longer side is at most `size` pixels (None: full size;
    480x832 -> 240x416 at the default: ~7 s per 81 frames on a busy 2-core CPU, ~25 s at full size). For each
    transition the backward flow F_b = flow(frame_t+1 -> frame_t) and the forward flow F_f = flow(frame_t ->
    frame_t+1) are computed with `dense_flow` (Farneback) on grayscale; frame t warped onto t+1 is
    W(p) = frame_t(p + F_b(p)). The error is the mean |W(p) - frame_t+1(p)| over channels and valid pixels, frames in
    [0, 1] (so in [0, 1]; lower = changes better explained by motion, less flicker). Valid: p + F_b(p) lies in the
    frame and F_b passes the forward-backward check |F_b + F_f(p + F_b)|^2 <= 0.01 (|F_b|^2 + |F_f(p + F_b)|^2) + 0.5
    (Sundaram et al. 2010, Ruder et al. 2016; occluded pixels excluded). NaN if no pixel is valid.

    Returns {"warp_error": split dict, "flow_magnitude": split dict of the mean |F_f| over all pixels, in pixels of
    the full-size video per frame (motion amount; no direction is better), "valid_fraction": [per transition],
    "size": (h, w) the flow ran at}. Transitions run on `workers` threads (`_map`).
    """
    import cv2

    v = video_uint8(video)
    _need_two(v)
    t, h, w, _ = v.shape
    scale = max(h, w) / size if size and max(h, w) > size else 1.0
    hs, ws = (max(1, round(h / scale)), max(1, round(w / scale))) if scale > 1 else (h, w)
    frames = [cv2.resize(f, (ws, hs), interpolation=cv2.INTER_AREA) if scale > 1 else f for f in v]
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    sq = lambda x: (x ** 2).sum(axis=-1)

    def transition(j):
        fb = dense_flow(gray[j + 1], gray[j])  # (hs, ws, 2): frame_t+1(p) ~ frame_t(p + fb(p))
        ff = dense_flow(gray[j], gray[j + 1])  # (hs, ws, 2): frame_t(p) ~ frame_t+1(p + ff(p))
        warped, inside = _remap(frames[j].astype(np.float32), fb)  # (hs, ws, 3)
        ff_at, _ = _remap(ff, fb)  # F_f at p + F_b(p)
        ok = inside & (sq(fb + ff_at) <= 0.01 * (sq(fb) + sq(ff_at)) + 0.5)
        diff = np.abs(warped - frames[j + 1].astype(np.float32)).mean(axis=-1) / 255  # (hs, ws)
        return (float(diff[ok].mean()) if ok.any() else math.nan, float(np.sqrt(sq(ff)).mean() * (w / ws)),
                float(ok.mean()))

    err, mag, valid = zip(*_map(transition, range(t - 1), workers))
    cross = cross_chunk(t, stride)
    return {"warp_error": split(err, cross), "flow_magnitude": split(mag, cross), "valid_fraction": list(valid),
            "size": (hs, ws)}


# ----------------------------------------------------------------------------------------------------------
# fidelity to a baseline video (same prompt, same noise)


def fidelity(video, reference, workers: int | None = None) -> dict:
    """PSNR and SSIM of every frame against the same frame of `reference` (e.g. the CFG video of the same prompt and
    seed), both (T, H, W, 3) uint8 or (3, T, H, W) float in [-1, 1] of the same shape. PSNR = 10 log10(255^2 / MSE) in
    dB, inf for an identical frame; SSIM (Wang et al. 2004; scikit-image, 7x7 uniform window, per RGB channel, frames
    as float32 with data range 255) in [-1, 1], 1 = identical. Higher = closer to the reference, which measures
    deviation from the baseline, not quality. SSIM runs on `workers` threads (`_map`). Returns {"psnr", "ssim": means
    over frames, "psnr_per_frame", "ssim_per_frame"}."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = video_uint8(video), video_uint8(reference)
    if a.shape != b.shape:
        raise ValueError(f"video {a.shape} and reference {b.shape} differ in shape")
    with np.errstate(divide="ignore"):  # identical frames: MSE 0 -> PSNR inf
        psnr = [float(peak_signal_noise_ratio(r, x, data_range=255)) for x, r in zip(a, b)]
    ssim = _map(lambda k: float(structural_similarity(b[k].astype(np.float32), a[k].astype(np.float32),
                                                      channel_axis=-1, data_range=255)), range(len(a)), workers)
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "psnr_per_frame": psnr,
            "ssim_per_frame": ssim}


# ----------------------------------------------------------------------------------------------------------
# frame-pair similarity of embeddings (STAS Sec. 4, Fig. 4, Table 2)


def pixel_features(frames: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3 H W) float64: each frame flattened and mean-centred (cosine = Pearson correlation)."""
    f = frames.double().flatten(1)
    return f - f.mean(dim=1, keepdim=True)


def frame_consistency(video, stride: int = 4, features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      batch: int = 16) -> dict:
    """Cosine similarity of the embeddings of adjacent frames, split at latent-chunk seams (STAS Fig. 4, Table 2:
    adjacent pairs only, not VBench's extra first-frame term). Higher = more consistent.

    video: (T, H, W, 3) uint8 numpy or (3, T, H, W) float tensor in [-1, 1], T >= 2. stride: the VAE's temporal
    stride (`cross_chunk`). features: frames (N, 3, H, W) float in [0, 1] -> (N, D) embeddings, called on `batch`
    frames at a time (None: `pixel_features`; `load_backbone` gives DINO / CLIP). Two all-zero embeddings count as
    identical (1.0). Returns `split`'s dict of the T - 1 cosines in [-1, 1].
    """
    _frames01(video, 0, 1)  # format check
    t = len(video) if isinstance(video, np.ndarray) else video.shape[1]
    if t < 2:
        raise ValueError(f"need at least 2 frames, got {t}")
    embed = features or pixel_features
    sims, prev = [], None
    with torch.no_grad():  # `batch` frames at a time (plus the last one before), never the whole video
        for i in range(0, t, batch):
            f = embed(_frames01(video, i, i + batch)).double().cpu()  # (n, D)
            f = f if prev is None else torch.cat([prev, f])
            norm = f.norm(dim=1)  # (n,)
            dot = (f[:-1] * f[1:]).sum(dim=1)  # (n - 1,)
            den = norm[:-1] * norm[1:]
            both_zero = (norm[:-1] == 0) & (norm[1:] == 0)
            sims.append(torch.where(den > 0, dot / den.clamp_min(1e-300), both_zero.double()))
            prev = f[-1:]
    sim = torch.cat(sims)  # (T - 1,)
    return split(sim.tolist(), cross_chunk(t, stride))


BACKBONES = {  # --kind: (transformers model_type, patch size, what STAS / VBench use)
    "dino": ("vit", 16, "DINO ViT-B/16 (facebook/dino-vitb16, VBench's subject-consistency backbone)"),
    "clip": ("clip", 32, "CLIP ViT-B/32 (openai/clip-vit-base-patch32, VBench's background-consistency backbone)"),
}


def load_backbone(kind: str, path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Callable[[torch.Tensor], torch.Tensor]:
    """A `features` callable for `frame_consistency` from LOCAL transformers weights (never a hub download).

    kind "dino": a ViTModel folder (model_type "vit", patch 16) -> the CLS token of last_hidden_state (DINO's output:
    the final LayerNorm applied; the pooler is not used). kind "clip": a CLIPModel folder (model_type "clip", vision
    patch 32) -> get_image_features, the projected image embedding. path: a save_pretrained folder with config.json,
    the weights and preprocessor_config.json; frames go through that image processor (its resize, crop and
    normalization). The callable maps frames (N, 3, H, W) float in [0, 1] -> (N, D) float32 on the CPU.
    Raises FileNotFoundError for a missing folder and ValueError for a folder that is not the named model.
    """
    from transformers import AutoConfig, AutoImageProcessor, CLIPModel, ViTModel

    if kind not in BACKBONES:
        raise ValueError(f"unknown backbone {kind!r}; choose one of {list(BACKBONES)}")
    model_type, patch, what = BACKBONES[kind]
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--{kind} {path}: no such folder; save {what} there (config.json, weights, "
                                "preprocessor_config.json); minivdit reads local weights only")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--{kind} {path}: no readable transformers config.json ({e}); expected {what}") from e
    if config.model_type != model_type:
        raise ValueError(f"--{kind} {path} holds a {config.model_type!r} model; expected {what}, model_type "
                         f"{model_type!r}")
    got = (config.vision_config if kind == "clip" else config).patch_size
    if got != patch:
        raise ValueError(f"--{kind} {path} has patch size {got}; expected {what}, patch size {patch}")
    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--{kind} {path}: no image processor (preprocessor_config.json) beside the model") from e
    if kind == "clip":
        model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    else:
        model = ViTModel.from_pretrained(path, local_files_only=True, dtype=dtype, add_pooling_layer=False)
    model = model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def features(frames: torch.Tensor) -> torch.Tensor:
        images = list((frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, dtype)  # (N, 3, h, w)
        if kind == "clip":
            out = model.get_image_features(pixel_values=pixels)
            out = out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a model output
        else:
            out = model(pixel_values=pixels).last_hidden_state[:, 0]  # (N, D): the CLS token
        return out.float().cpu()

    return features


# ----------------------------------------------------------------------------------------------------------
# all metrics of one video, as table columns

TRANSITION_METRICS = {  # column -> (what it is, which direction is better); each also as _cross and _within
    "flicker": ("VBench temporal flickering (255 - mean |frame_t - frame_t+1|) / 255 on uint8 frames, 1 = static "
                "(VBench temporal_flickering.py)", "higher = less flicker, but also less motion"),
    "diff_energy": ("frame-difference energy: mean (frame_t+1 - frame_t)^2, frames in [0, 1]", "a motion-amount "
                    "proxy, no better direction; read it beside flicker and warp error"),
    "warp_error": ("optical-flow warping error: mean |frame_t warped by Farneback flow - frame_t+1| over valid "
                   "(in-frame, forward-backward consistent) pixels, frames in [0, 1] (Lai et al. 2018)",
                   "lower = frame changes better explained by motion"),
    "flow_mag": ("mean Farneback flow magnitude, pixels of the full-size frame per frame", "motion amount, no "
                 "better direction"),
    "pixel_cos": ("cosine of adjacent mean-centred RGB frames (Pearson correlation)", "higher = more similar"),
    "dino": ("cosine of adjacent frames' DINO ViT-B/16 CLS embeddings (STAS Table 2)", "higher = more similar"),
    "clip": ("cosine of adjacent frames' CLIP ViT-B/32 image embeddings (STAS Table 2)", "higher = more similar"),
}
FIDELITY_METRICS = {
    "psnr_vs_cfg": ("PSNR (dB) per frame against the cfg video of the same prompt and seed, mean over frames; inf "
                    "for identical frames, n/a for cfg itself", "higher = closer to cfg (deviation, not quality)"),
    "ssim_vs_cfg": ("SSIM (scikit-image, 7x7 window, RGB) per frame against that cfg video, mean over frames",
                    "higher = closer to cfg (deviation, not quality)"),
}


def transition_columns(names: Sequence[str]) -> list[str]:
    """['flicker'] -> ['flicker', 'flicker_cross', 'flicker_within']: overall, cross-chunk, within-chunk."""
    return [f"{n}{s}" for n in names for s in ("", "_cross", "_within")]


def video_metrics(video, stride: int = 4, reference=None, backbones: dict | None = None,
                  flow_size: int | None = 416) -> dict:
    """Every metric of one video: {"columns": {column: float or None}, "curves": {metric: per-transition list},
    "cross": [bool per transition], "details": {...}}.

    video: (T, H, W, 3) uint8 or (3, T, H, W) float in [-1, 1], T >= 2. stride: the VAE's temporal stride. reference:
    the baseline video for PSNR / SSIM (None: those columns are None). backbones: {"dino": features, "clip":
    features} from `load_backbone` (optional). flow_size: the longer side the flow runs at (`warping_error`).
    """
    v = video_uint8(video)
    found = {"flicker": temporal_flickering(v, stride), "diff_energy": frame_difference_energy(v, stride)}
    warp = warping_error(v, stride, flow_size)
    found["warp_error"], found["flow_mag"] = warp["warp_error"], warp["flow_magnitude"]
    found["pixel_cos"] = frame_consistency(video, stride)
    for name, features in (backbones or {}).items():
        found[name] = frame_consistency(video, stride, features=features)
    columns = {}
    for name, r in found.items():
        columns.update({name: r["all"], f"{name}_cross": r["cross_chunk"], f"{name}_within": r["within_chunk"]})
    fid = fidelity(v, reference) if reference is not None else None
    columns["psnr_vs_cfg"] = fid["psnr"] if fid else None
    columns["ssim_vs_cfg"] = fid["ssim"] if fid else None
    return {"columns": columns, "curves": {n: r["per_transition"] for n, r in found.items()},
            "cross": cross_chunk(len(v), stride).tolist(),
            "details": {"flow_size": list(warp["size"]), "warp_valid_fraction": warp["valid_fraction"],
                        **({"psnr_per_frame": fid["psnr_per_frame"], "ssim_per_frame": fid["ssim_per_frame"]}
                           if fid else {})}}


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1) of finite-or-inf values; None where undefined (an empty list or
    a None in it: mean None; fewer than 2 values or a non-finite mean: std None)."""
    if not values or any(x is None for x in values):
        return None, None
    x = np.asarray(values, dtype=np.float64)
    m = float(x.mean())
    return m, (float(x.std(ddof=1)) if len(x) > 1 and math.isfinite(m) else None)


# ----------------------------------------------------------------------------------------------------------
# plots (matplotlib)


def plot_transitions(curves: dict[str, dict[str, Sequence[float]]], cross: Sequence[bool], path,
                     title: str = "") -> Path:
    """One PNG: a panel per metric, a line per method over transition index j (frames j -> j + 1), cross-chunk
    transitions shaded (STAS Fig. 4). curves: {method: {metric: per-transition values}}, e.g. averaged over prompts
    and seeds; every method must have the same metrics and T - 1 values."""
    metrics = list(next(iter(curves.values())))
    j = np.arange(len(cross))

    def draw(fig):
        axes = np.atleast_1d(fig.subplots(len(metrics), 1, sharex=True))
        for ax, name in zip(axes, metrics):
            for k in j[np.asarray(cross, dtype=bool)]:
                ax.axvspan(k - 0.5, k + 0.5, color="gold", alpha=0.3, lw=0)
            for method, c in curves.items():
                ax.plot(j, [np.nan if x is None else x for x in c[name]], marker="o", ms=2.5, lw=1, label=method)
            ax.set_ylabel(name, fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0].legend(fontsize=7, ncol=min(len(curves), 4), loc="best")
        axes[0].set_title(title or "per-transition metrics (cross-chunk transitions shaded)", fontsize=9)
        axes[-1].set_xlabel("transition j (frame j -> j + 1)")

    return write_figure(path, draw, figsize=(9, 1.9 * len(metrics) + 0.6))


def plot_summary(summary: Sequence[dict], columns: Sequence[str], path) -> Path:
    """One PNG: a bar panel per column, a bar per method at its mean with the standard deviation over seeds as the
    error bar (summary rows: {"method", col: mean, col + "_std": std or None}); a None / inf mean draws no bar."""
    methods = [r["method"] for r in summary]
    cols = min(3, len(columns))
    rows = -(-len(columns) // cols)

    def draw(fig):
        axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
        for ax, c in zip(axes, columns):
            fin = lambda v: v is not None and math.isfinite(v)
            means = [r[c] if fin(r[c]) else np.nan for r in summary]
            stds = [r.get(f"{c}_std") if fin(r.get(f"{c}_std")) else 0.0 for r in summary]
            ax.bar(np.arange(len(methods)), means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(methods))])
            ax.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right", fontsize=7)
            ax.set_title(c, fontsize=8)
            ax.tick_params(labelsize=7)
            if any(np.isfinite(means)):  # near-ceiling metrics: zoom on the differences (STAS Table 2's regime)
                lo, hi = np.nanmin(means), np.nanmax(means)
                pad = max((hi - lo) * 0.5, max(stds) * 1.5, abs(hi) * 1e-3, 1e-12)
                bottom = 0.0 if lo >= 0 and lo - pad <= 0 else lo - pad
                ax.set_ylim(bottom, hi + pad)
                if bottom != 0:
                    ax.set_title(f"{c} (y axis not from 0)", fontsize=8)
        for ax in axes[len(columns):]:
            ax.set_visible(False)

    return write_figure(path, draw, figsize=(3.2 * cols, 2.6 * rows))


# ----------------------------------------------------------------------------------------------------------
# VBench export (custom_input mode)

VBENCH_DIMENSIONS = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
                     "dynamic_degree", "aesthetic_quality", "imaging_quality")  # VBench's quality dimensions


def vbench_stem(prompt: str, limit: int = 180) -> str:
    """A file-name stem for a prompt: the prompt itself (what VBench reads from '{prompt}-{i}.mp4'), with '/' and
    control characters replaced by spaces and cut to `limit` UTF-8 bytes."""
    stem = re.sub(r"[/\\\x00-\x1f]", " ", prompt).strip() or "prompt"
    while len(stem.encode()) > limit:
        stem = stem[:-1]
    return stem.rstrip()


def export_vbench(dest: str | Path, videos: Sequence[dict], dimensions: Sequence[str] = VBENCH_DIMENSIONS,
                  overwrite: bool = False) -> list[str]:
    """Lay videos out for `vbench evaluate --mode=custom_input` and return one command per method.

    videos: dicts {"method", "prompt", "sample" (the sample index of the prompt: the seed's position, 0..n-1),
    "path" (an mp4)}. Writes DEST/<method>/<prompt>-<sample>.mp4 (VBench's naming: it reads the prompt from the file
    name, minus '-<sample>'), DEST/<method>/prompts.json ({file name: full prompt}, for --prompt_file, exact even when
    a long prompt or a '/' had to be cut from the file name), DEST/prompts.txt (the prompt list) and
    DEST/run_vbench.sh (the commands: a bash loop per method over `dimensions`, one `vbench evaluate` call per
    dimension, results in DEST/results/<method>). '*' in a method name becomes 'star'. Run them in a separate
    environment with vbench installed; it downloads its own scorers.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"{dest} exists and is not empty; choose another --vbench-export or pass --overwrite")
    prompts = list(dict.fromkeys(v["prompt"] for v in videos))
    stems: dict[str, str] = {}
    for k, p in enumerate(prompts):  # distinct prompts get distinct stems even when cut to the same text
        s = vbench_stem(p)
        stems[p] = s if s not in stems.values() else f"{s} ~{k}"
    commands, by_method = [], {}
    for v in videos:
        by_method.setdefault(v["method"], []).append(v)
    for method, items in by_method.items():
        folder = dest / method.replace("*", "star")
        folder.mkdir(parents=True, exist_ok=True)
        mapping = {}
        for v in items:
            name = f"{stems[v['prompt']]}-{int(v['sample'])}.mp4"
            atomic_write(folder / name, lambda tmp, src=v["path"]: shutil.copyfile(src, tmp))
            mapping[name] = v["prompt"]
        write_text(folder / "prompts.json", json.dumps(mapping, indent=2, ensure_ascii=False) + "\n")
        # one dimension per call: `vbench evaluate` takes --dimension as a single string
        commands.append(" ".join([f"for d in {' '.join(dimensions)}; do vbench evaluate --mode=custom_input",
                                  "--videos_path", shlex.quote(str(folder.resolve())),
                                  "--prompt_file", shlex.quote(str((folder / "prompts.json").resolve())),
                                  "--output_path", shlex.quote(str((dest / "results" / folder.name).resolve())),
                                  '--dimension "$d"; done']))
    write_text(dest / "prompts.txt", "".join(p.replace("\n", " ") + "\n" for p in prompts))
    write_text(dest / "run_vbench.sh", "#!/usr/bin/env bash\n# Run in an environment with vbench installed "
               "(pip install vbench; it pins its own transformers and downloads its scorers).\nset -e\n"
               + "\n".join(commands) + "\n")
    return commands
