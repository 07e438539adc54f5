"""Seconds per video of each metric of minivdit.metrics on a synthetic Wan-size video (81 frames, 480x832), on this CPU.

    python bench/metrics_cost.py                      # 81 x 480 x 832, flow at the default 416 px and at full size
    python bench/metrics_cost.py --frames 17 --height 240 --width 416 --full-flow 0   # a quick run

The video: a smooth random texture moving 2 px right and 1 px down per frame, with per-frame noise (std 3 gray
levels) so that flicker, flow and SSIM do real work; the "baseline" for PSNR / SSIM is the same video with other
noise. The median of --reps runs of each metric. DINO / CLIP are not timed (they need weights; their cost is one
ViT-B forward per frame).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402

from minivdit.metrics import (fidelity, frame_consistency, frame_difference_energy, temporal_flickering,  # noqa: E402
                              warping_error)


def synthetic(frames: int, h: int, w: int, seed: int = 0, noise_seed: int = 1) -> np.ndarray:
    """(T, H, W, 3) uint8: a blurred-noise texture shifted by (2, 1) px per frame, plus N(0, 3^2) noise per frame."""
    import cv2

    m = 2 * frames + 8
    rng = np.random.default_rng(seed)
    big = cv2.GaussianBlur(rng.random((h + 2 * m, w + 2 * m, 3)).astype(np.float32), (0, 0), 3)
    big = (big - big.min()) / (big.max() - big.min()) * 255
    noise = np.random.default_rng(noise_seed)
    out = [big[m - k:m - k + h, m - 2 * k:m - 2 * k + w] + noise.normal(0, 3, (h, w, 3)) for k in range(frames)]
    return np.clip(np.stack(out), 0, 255).round().astype(np.uint8)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--flow-size", type=int, default=416, help="the compare.py default")
    p.add_argument("--full-flow", type=int, default=1, help="also time the flow at full size (1) or not (0)")
    p.add_argument("--reps", type=int, default=1)
    args = p.parse_args(argv)
    video = synthetic(args.frames, args.height, args.width)
    baseline = synthetic(args.frames, args.height, args.width, noise_seed=2)
    jobs = {"temporal_flickering": lambda: temporal_flickering(video),
            "frame_difference_energy": lambda: frame_difference_energy(video),
            f"warping_error (flow at {args.flow_size} px)": lambda: warping_error(video, size=args.flow_size),
            "frame_consistency (pixel cosine)": lambda: frame_consistency(video),
            "fidelity (PSNR + SSIM vs baseline)": lambda: fidelity(video, baseline)}
    if args.full_flow:
        jobs["warping_error (flow at full size)"] = lambda: warping_error(video, size=None)
    print(f"video {video.shape} uint8; median of {args.reps} run(s) each")
    total = 0.0
    for name, job in jobs.items():
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            job()
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        total += s if "full size" not in name else 0.0
        print(f"{name:42s} {s:7.2f} s")
    print(f"{'all, as compare.py computes them':42s} {total:7.2f} s  (full-size flow not included)")


if __name__ == "__main__":
    main()
