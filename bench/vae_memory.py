"""Peak memory and time of VAE decoding: minivdit's streaming decode against diffusers (Wan2.1, Wan2.2, CogVideoX).

    python bench/vae_memory.py                      # Wan2.1: latent 16x16 (128x128 pixels), 5 and 21 latent frames
    python bench/vae_memory.py --size 8 --frames 5 21 41
    python bench/vae_memory.py --vae wan2.2         # Wan2.2: latent 4x4 (64x64 pixels), 5 and 21 latent frames
    python bench/vae_memory.py --vae cogvideox      # CogVideoX (215.6 M), latent 8x8 (64x64), 3 and 13 latent frames
    python bench/vae_memory.py --vae cogvideox --mmap-threshold 1048576   # peak RSS = live memory (see --help)

Real configs (Wan2.1: dim 96, 126.9 M params, 508 MB; Wan2.2: dim 160 / dec_dim 256, 704.7 M params, 2.8 GB;
CogVideoX: 215.6 M params, 2B scaling), random weights, float32, CPU. Each measurement runs in a fresh subprocess
that builds the model, makes a seeded latent, decodes it once and reports its peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and its resident size just before decoding (`base`: interpreter,
torch and the weights). "peak - out" subtracts the output video; "decode extra" = peak - base - out is what
decoding held beyond its result: for a streaming decoder it stays flat as the number of frames grows. "seconds" is
wall time, "cpu s" the process's user + system time over all its threads, the fairer measure when other work shares
the machine (check the load). The two implementations alternate per frame count, so a change in machine load hits
both alike.

Measured (2026-12-02, AMD EPYC, AVX-512, 2 threads, machine shared with other jobs):
- CogVideoX, latent 8x8, `--vae cogvideox --mmap-threshold 1048576`: decode extra minivdit 232 MB at 3 latent frames
  and 263 MB at 13 (flat), diffusers 291 -> 381-386 MB; peak RSS minivdit 1281 / 1314 MB vs diffusers 1548 / 1640 MB.
  Without the threshold glibc's heap fragmentation adds noise (minivdit 302 / 603 MB, diffusers 328 / 950 MB). Time
  ratios swung with the machine's load; one decoder batch profiled back to back took 9.7-10.5 s (minivdit) vs
  14.6-15.5 s (diffusers).
- Wan2.2, latent 4x4, `--vae wan2.2`: peak RSS minivdit / diffusers 0.95x at 5 and 0.94x at 21 latent frames
  (3252 -> 3258 MB: flat), CPU time 1.03x / 1.01x.
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
DEFAULTS = {"wan2.1": (16, [5, 21]), "wan2.2": (4, [5, 21]), "cogvideox": (8, [3, 13])}  # latent size, frames


def decoder(impl: str, vae: str):
    """The decode of each implementation as its pipeline calls it, on the latent the DiT produces, and the latent
    channel count."""
    if vae == "cogvideox":
        from minivdit.cogvideox_vae import CogVideoXVAE

        if impl == "minivdit":
            return CogVideoXVAE().eval().decode, 16
        from diffusers import AutoencoderKLCogVideoX

        ref = AutoencoderKLCogVideoX().eval()
        return (lambda z: ref.decode(1 / ref.config.scaling_factor * z).sample), 16  # pipeline `decode_latents`
    from minivdit.wan_vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WAN22_LATENT_MEAN, WAN22_LATENT_STD, WanVAE, WanVAE22

    wan22 = vae == "wan2.2"
    if impl == "minivdit":
        return (WanVAE22() if wan22 else WanVAE()).eval().decode, 48 if wan22 else 16
    from diffusers import AutoencoderKLWan

    ref = (AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16) if wan22
           else AutoencoderKLWan()).eval()
    mean = torch.tensor(WAN22_LATENT_MEAN if wan22 else WAN21_LATENT_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN22_LATENT_STD if wan22 else WAN21_LATENT_STD).view(1, -1, 1, 1, 1)
    return (lambda z: ref.decode(z * std + mean).sample), 48 if wan22 else 16


def child(impl: str, latent_frames: int, size: int, vae: str) -> dict:
    """Build one VAE, decode one latent, return memory numbers in MB (runs in its own process)."""
    sys.path.insert(0, str(ROOT))
    torch.manual_seed(0)
    decode, channels = decoder(impl, vae)
    latent = torch.randn(1, channels, latent_frames, size, size)
    base = psutil.Process().memory_info().rss
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    with torch.no_grad():
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
    """CPU model, its SIMD flags, cores, torch's kernel capability and threads (timings mean little without)."""
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
    return (f"{model}; {psutil.cpu_count()} cores, torch {torch.__version__} (capability "
            f"{torch.backends.cpu.get_cpu_capability()}) with {torch.get_num_threads()} threads; "
            f"flags: {' '.join(flags) or 'unknown'}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", choices=list(DEFAULTS), default="wan2.1", help="which VAE (real config)")
    p.add_argument("--size", type=int, default=None, help="latent height = width (default: 16 / 4 / 8)")
    p.add_argument("--frames", type=int, nargs="+", default=None, help="latent frame counts (default 5 21 / 3 13)")
    p.add_argument("--impl", nargs="+", default=["minivdit", "diffusers"], choices=["minivdit", "diffusers"])
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="set MALLOC_MMAP_THRESHOLD_ in the children (e.g. 1048576): glibc then returns every freed "
                        "large buffer to the OS, so peak RSS measures live memory, not heap fragmentation")
    p.add_argument("--child", nargs=4, metavar=("IMPL", "FRAMES", "SIZE", "VAE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])))
        return
    size, frames = args.size or DEFAULTS[args.vae][0], args.frames or DEFAULTS[args.vae][1]
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}))

    rows = []
    for f in frames:
        for impl in args.impl:
            cmd = [sys.executable, __file__, "--child", impl, str(f), str(size), args.vae]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout))
            r = rows[-1]
            print(f"  done {impl} {f} latent frames in {r['seconds']:.1f} s ({r['cpu']:.1f} CPU s)", file=sys.stderr)

    px = (16 if args.vae == "wan2.2" else 8) * size
    print(f"{args.vae} VAE decode, real config, float32, latent {size}x{size} -> {px}x{px} pixels"
          + (f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else ""))
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
