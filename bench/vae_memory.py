"""Peak memory and time of Wan VAE decoding: minivdit's streaming decode against diffusers AutoencoderKLWan.

    python bench/vae_memory.py                      # Wan2.1: latent 16x16 (128x128 pixels), 5 and 21 latent frames
    python bench/vae_memory.py --size 8 --frames 5 21 41
    python bench/vae_memory.py --vae 2.2            # Wan2.2: latent 4x4 (64x64 pixels), 5 and 21 latent frames

Real configs (Wan2.1: dim 96, 126.9 M params, 508 MB; Wan2.2: dim 160 / dec_dim 256, 704.7 M params, 2.8 GB),
random weights, float32, CPU. Each measurement runs in a fresh subprocess that builds the model, makes a seeded
latent, decodes it once and reports its peak resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`)
and its resident size just before decoding (`base`: interpreter, torch and the weights). "peak - out"
subtracts the output video; "decode extra" = peak - base - out is what decoding held beyond its result: for a
streaming decoder it stays flat as the number of frames grows. "seconds" is wall time, "cpu s" the process's
user + system time over all its threads, the fairer measure when other work shares the machine (check the
load). The two implementations alternate per frame count, so a change in machine load hits both alike.
"""
import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def child(impl: str, latent_frames: int, size: int, version: str) -> dict:
    """Build one VAE, decode one latent, return memory numbers in MB (runs in its own process)."""
    sys.path.insert(0, str(ROOT))
    from minivdit.wan_vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WAN22_LATENT_MEAN, WAN22_LATENT_STD, WanVAE, WanVAE22

    torch.manual_seed(0)
    wan22 = version == "2.2"
    if impl == "minivdit":
        decode = (WanVAE22() if wan22 else WanVAE()).eval().decode
    else:
        from diffusers import AutoencoderKLWan

        ref = (AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                                out_channels=12, patch_size=2, scale_factor_spatial=16) if wan22
               else AutoencoderKLWan()).eval()
        mean = torch.tensor(WAN22_LATENT_MEAN if wan22 else WAN21_LATENT_MEAN).view(1, -1, 1, 1, 1)
        std = torch.tensor(WAN22_LATENT_STD if wan22 else WAN21_LATENT_STD).view(1, -1, 1, 1, 1)

        def decode(z):
            with torch.no_grad():
                return ref.decode(z * std + mean).sample

    latent = torch.randn(1, 48 if wan22 else 16, latent_frames, size, size)
    base = psutil.Process().memory_info().rss
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    video = decode(latent)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"impl": impl, "latent_frames": latent_frames, "frames": video.shape[2], "base": base / MB,
            "peak": peak / MB, "out": video.numel() * video.element_size() / MB, "seconds": seconds, "cpu": cpu}


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: unlike wall time, barely moved by other processes."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine() -> str:
    """CPU model, its SIMD flags, cores and torch threads (timings mean little without them)."""
    model, flags = platform.processor() or "unknown CPU", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", "unknown CPU", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "sse4"))]
                break
    except OSError:
        pass
    return (f"{model}; {psutil.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
            f"flags: {' '.join(flags) or 'unknown'}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", choices=["2.1", "2.2"], default="2.1", help="Wan VAE version (real config)")
    p.add_argument("--size", type=int, default=None, help="latent height = width (default 16 for 2.1, 4 for 2.2)")
    p.add_argument("--frames", type=int, nargs="+", default=[5, 21], help="latent frame counts")
    p.add_argument("--impl", nargs="+", default=["minivdit", "diffusers"], choices=["minivdit", "diffusers"])
    p.add_argument("--child", nargs=4, metavar=("IMPL", "FRAMES", "SIZE", "VAE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])))
        return
    size = args.size or (4 if args.vae == "2.2" else 16)

    rows = []
    for f in args.frames:
        for impl in args.impl:
            cmd = [sys.executable, __file__, "--child", impl, str(f), str(size), args.vae]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
            r = rows[-1]
            print(f"  done {impl} {f} latent frames in {r['seconds']:.1f} s ({r['cpu']:.1f} CPU s)", file=sys.stderr)

    px = (16 if args.vae == "2.2" else 8) * size
    print(f"Wan{args.vae} VAE decode, real config, float32, latent {size}x{size} -> {px}x{px} pixels")
    print(f"machine: {machine()}")
    print(f"{'impl':<10} {'lat T':>5} {'out T':>5} {'base MB':>8} {'peak MB':>8} {'out MB':>7} "
          f"{'peak-out':>9} {'decode extra':>12} {'seconds':>8} {'cpu s':>8}")
    for r in rows:
        print(f"{r['impl']:<10} {r['latent_frames']:>5} {r['frames']:>5} {r['base']:>8.0f} {r['peak']:>8.0f} "
              f"{r['out']:>7.1f} {r['peak'] - r['out']:>9.0f} {r['peak'] - r['base'] - r['out']:>12.0f} "
              f"{r['seconds']:>8.1f} {r['cpu']:>8.1f}")
    ours = {r["latent_frames"]: r for r in rows if r["impl"] == "minivdit"}
    for r in rows:
        if r["impl"] == "diffusers" and r["latent_frames"] in ours:
            o = ours[r["latent_frames"]]
            extra = lambda x: x["peak"] - x["base"] - x["out"]  # noqa: E731
            print(f"minivdit / diffusers at {r['latent_frames']} latent frames: peak {o['peak'] / r['peak']:.2f}x, "
                  f"decode extra {extra(o) / max(extra(r), 1e-9):.2f}x, time {o['seconds'] / r['seconds']:.2f}x, "
                  f"CPU time {o['cpu'] / r['cpu']:.2f}x")


if __name__ == "__main__":
    main()
