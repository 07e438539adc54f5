"""Wall time of one compare.py sweep on 2 CPU cores: one process with 2 threads vs 2 torchrun ranks with 1 thread
each (the data-parallel path), plus one process with 1 thread as the per-rank reference; side by side in one run.

    python bench/sweep_scale.py                                  # tiny Wan, 8 jobs (4 methods x 2 seeds)
    python bench/sweep_scale.py --frames 9 --size 64 --steps 6 --seeds 0,1,2,3

Each configuration runs the same command (samplers/compare.py on the embedded tiny checkpoint) into a fresh folder,
timed from process start to exit: imports, model and text-encoder loading (once per rank), sampling, metrics and
tables all count. The 2-rank mp4s are checked against the 1-thread process's, byte for byte (the same thread
count per process gives the same numbers). On a machine
shared with other work the numbers move from run to run: rerun on a quiet machine.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(ranks: int, threads: int, args: list[str], out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks > 1 else [sys.executable]
    start = time.perf_counter()
    done = subprocess.run([*launcher, str(ROOT / "samplers" / "compare.py"), *args, "--out", str(out)], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(done.stdout[-2000:] + done.stderr[-2000:])
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="cfg;cfg+stas;dg;stg")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args()
    from minivdit.pipeline import tiny_checkpoint
    args = ["--ckpt", str(tiny_checkpoint()), "--method", a.method, "--seeds", a.seeds, "--frames", str(a.frames),
            "--height", str(a.size), "--width", str(a.size), "--steps", str(a.steps), "--prompt", "a red ball rolls"]
    print(f"sweep: {a.method} x seeds {a.seeds}, {a.frames} frames {a.size}x{a.size}, {a.steps} steps; "
          f"{os.cpu_count()} CPUs visible")
    with tempfile.TemporaryDirectory() as tmp:
        configs = {"1 process x 2 threads": (1, 2), "2 ranks x 1 thread": (2, 1), "1 process x 1 thread": (1, 1)}
        times = {name: run(r, t, args, Path(tmp) / name.replace(" ", "")) for name, (r, t) in configs.items()}
        outs = [Path(tmp) / name.replace(" ", "") for name in configs]
        same = all((outs[1] / f.relative_to(outs[2])).read_bytes() == f.read_bytes() for f in outs[2].rglob("*.mp4"))
    ref = times["1 process x 2 threads"]
    print("| configuration | wall s | ratio to 1 process x 2 threads |\n|---|---|---|")
    for name, s in times.items():
        print(f"| {name} | {s:.1f} | {s / ref:.2f} |")
    print(f"2-rank mp4s byte-identical to 1 process x 1 thread: {same}")


if __name__ == "__main__":
    main()
