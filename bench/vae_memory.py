"""Peak memory of VAE decoding: minivdit's streaming decode against diffusers (Wan2.1 or CogVideoX).

    python bench/vae_memory.py                      # Wan2.1, latent 16x16 (128x128 pixels), 5 and 21 latent frames
    python bench/vae_memory.py --size 8 --frames 5 21 41
    python bench/vae_memory.py --family cogvideox   # CogVideoX (215.6 M), latent 8x8 (64x64), 3 and 13 latent frames
    python bench/vae_memory.py --family cogvideox --mmap-threshold 1048576   # peak RSS = live memory (see --help)

Real config (Wan2.1: dim 96, 126.9 M params; CogVideoX: 215.6 M params, 2B scaling), random weights, float32, CPU. Each measurement runs in a fresh
subprocess that builds the model, makes a seeded latent, decodes it once and reports its peak resident set
size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and its resident size just before decoding (`base`:
interpreter, torch and the 508 MB of weights). "peak - out" subtracts the output video; "decode extra" =
peak - base - out is what decoding held beyond its result: for a streaming decoder it stays flat as the
number of frames grows.

Measured (2026-12-02, AMD EPYC, AVX-512, 2 threads, machine shared with other jobs; CogVideoX, latent 8x8,
`--family cogvideox --mmap-threshold 1048576`): decode extra minivdit 232 MB at 3 latent frames and 263 MB at 13
(flat), diffusers 291 -> 381-386 MB; peak RSS 1281 / 1314 MB vs 1548 / 1640 MB (diffusers / minivdit 1.21x, 1.25x).
Without the threshold glibc's heap fragmentation adds noise: minivdit 302 / 603 MB, diffusers 328 / 950 MB. Time
ratios swung with the machine's load (diffusers / minivdit 0.72-1.14x at 3 latents, 0.32-0.91x at 13); one decoder
batch profiled back to back took 9.7-10.5 s (minivdit) vs 14.6-15.5 s (diffusers).
"""
import argparse
import json
import os
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


def cogvideox_decoder(impl: str):
    """The CogVideoX decode as each implementation's pipeline calls it, on a scaled latent."""
    from minivdit.cogvideox_vae import CogVideoXVAE

    if impl == "minivdit":
        return CogVideoXVAE().eval().decode
    from diffusers import AutoencoderKLCogVideoX

    ref = AutoencoderKLCogVideoX().eval()

    def decode(z):
        with torch.no_grad():
            return ref.decode(1 / ref.config.scaling_factor * z).sample  # pipeline_cogvideox `decode_latents`
    return decode


def cpu_info() -> str:
    """CPU model, the SIMD flags that matter for torch, torch's kernel capability and thread count."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), model)
        flags = next((set(ln.split(":", 1)[1].split()) for ln in info if ln.startswith("flags")), flags)
    except OSError:
        pass
    simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
            if f in flags]
    return (f"CPU: {model}; flags: {' '.join(simd) or 'n/a'}; torch {torch.__version__} capability "
            f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")


def child(impl: str, latent_frames: int, size: int, family: str = "wan") -> dict:
    """Build one VAE, decode one latent, return memory numbers in MB (runs in its own process)."""
    sys.path.insert(0, str(ROOT))
    from minivdit.wan_vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAE

    torch.manual_seed(0)
    if family == "cogvideox":
        decode = cogvideox_decoder(impl)
    elif impl == "minivdit":
        decode = WanVAE().eval().decode
    else:
        from diffusers import AutoencoderKLWan

        ref = AutoencoderKLWan().eval()
        mean = torch.tensor(WAN21_LATENT_MEAN).view(1, -1, 1, 1, 1)
        std = torch.tensor(WAN21_LATENT_STD).view(1, -1, 1, 1, 1)

        def decode(z):
            with torch.no_grad():
                return ref.decode(z * std + mean).sample

    latent = torch.randn(1, 16, latent_frames, size, size)
    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    video = decode(latent)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"impl": impl, "latent_frames": latent_frames, "frames": video.shape[2], "base": base / MB,
            "peak": peak / MB, "out": video.numel() * video.element_size() / MB, "seconds": seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="wan", choices=["wan", "cogvideox"], help="which VAE")
    p.add_argument("--size", type=int, default=None, help="latent height = width (pixels: 8x); wan 16, cogvideox 8")
    p.add_argument("--frames", type=int, nargs="+", default=None,
                   help="latent frame counts; wan 5 21, cogvideox 3 13")
    p.add_argument("--impl", nargs="+", default=["minivdit", "diffusers"], choices=["minivdit", "diffusers"])
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="set MALLOC_MMAP_THRESHOLD_ in the children (e.g. 1048576): glibc then returns every freed "
                        "large buffer to the OS, so peak RSS measures live memory, not heap fragmentation")
    p.add_argument("--child", nargs=4, metavar=("IMPL", "FRAMES", "SIZE", "FAMILY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])))
        return
    cog = args.family == "cogvideox"
    args.size = args.size or (8 if cog else 16)
    args.frames = args.frames or ([3, 13] if cog else [5, 21])

    rows = []
    for impl in args.impl:
        for f in args.frames:
            cmd = [sys.executable, __file__, "--child", impl, str(f), str(args.size), args.family]
            env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}))
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout))
            r = rows[-1]
            print(f"  done {impl} {f} latent frames in {r['seconds']:.1f} s", file=sys.stderr)

    px = 8 * args.size
    name = "CogVideoX VAE (diffusers frame batches, 2 latents)" if cog else "Wan2.1 VAE"
    print(cpu_info())
    print(f"{name} decode, real config, float32, latent {args.size}x{args.size} -> {px}x{px} pixels"
          + (f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else ""))
    print(f"{'impl':<10} {'lat T':>5} {'out T':>5} {'base MB':>8} {'peak MB':>8} {'out MB':>7} "
          f"{'peak-out':>9} {'decode extra':>12} {'seconds':>8}")
    for r in rows:
        print(f"{r['impl']:<10} {r['latent_frames']:>5} {r['frames']:>5} {r['base']:>8.0f} {r['peak']:>8.0f} "
              f"{r['out']:>7.1f} {r['peak'] - r['out']:>9.0f} {r['peak'] - r['base'] - r['out']:>12.0f} "
              f"{r['seconds']:>8.1f}")
    ours = {r["latent_frames"]: r for r in rows if r["impl"] == "minivdit"}
    for r in rows:
        if r["impl"] == "diffusers" and r["latent_frames"] in ours:
            o = ours[r["latent_frames"]]
            extra = lambda x: x["peak"] - x["base"] - x["out"]  # noqa: E731
            print(f"diffusers / minivdit at {r['latent_frames']} latent frames: peak {r['peak'] / o['peak']:.2f}x, "
                  f"decode extra {extra(r) / max(extra(o), 1e-9):.2f}x, time {r['seconds'] / o['seconds']:.2f}x")


if __name__ == "__main__":
    main()
