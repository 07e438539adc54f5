"""Sequence parallel (Ulysses, `--sp 2`) forward time against one process, and its share spent in the all-to-all.

    python bench/sp_speed.py                     # Wan2.1-1.3B width (dim 1536, 12 heads), 2 blocks, 1,560 tokens
    python bench/sp_speed.py --layers 1 --frames 2 --height 16 --width 16 --reps 1 --warmup 0   # smoke run

The Wan2.1-T2V-1.3B block (PRESETS["wan2.1-t2v-1.3b"].config, float32, seeded random weights, no checkpoint) with
--layers blocks, a latent (--batch, 16, F, H, W) of F * H/2 * W/2 tokens (default 4 * 15 * 26 = 1,560) and a context
(--batch, 512, 4096). Timed in one run, side by side: one process with 1 thread and with 2 threads, then 2 gloo
ranks of 1 thread each (spawned here, `distributed.sequence_parallel()`): the median wall seconds of --reps forwards
after --warmup, each rank starting its forward after a barrier. The all-to-all share: wall seconds inside
distributed.all_to_all (the four exchanges of every self-attention; waiting for the other rank included) over the
forward's, on each rank; the final gather after the head is reported apart. Bytes: what one rank sends to the
other per forward (its N-1 of N pieces).

On a CPU the ranks share the cores and gloo copies through memory, so this measures overhead, not the speed-up of
N accelerators (README "Many processes" has the on-paper table for 8 GPUs). On a machine shared with other jobs,
wall times move with their load: read the ratios of one run.
"""
import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from minivdit import distributed  # noqa: E402
from minivdit.wan import PRESETS, WanModel  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="rows per forward (2: CFG's cond and uncond)")
    p.add_argument("--frames", type=int, default=4, help="latent frames")
    p.add_argument("--height", type=int, default=30, help="latent height")
    p.add_argument("--width", type=int, default=52, help="latent width")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    return p.parse_args(argv)


def setup(args):
    """(model, x, t, context), the same in every process."""
    torch.manual_seed(0)
    model = WanModel(replace(PRESETS["wan2.1-t2v-1.3b"].config, num_layers=args.layers)).eval().requires_grad_(False)
    x = torch.randn(args.batch, 16, args.frames, args.height, args.width)
    return model, x, torch.full((args.batch,), 700.0), torch.randn(args.batch, 512, 4096)


def forwards(model, inputs, args, before=lambda: None) -> list[float]:
    """Wall seconds of each of --reps forwards (after --warmup untimed ones); before() runs ahead of each."""
    seconds = []
    for i in range(args.warmup + args.reps):
        before()
        start = time.perf_counter()
        model(*inputs)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


class Timed:
    """Wraps a function of `distributed`, adding up its wall seconds and the bytes it sends to other ranks."""

    def __init__(self, fn):
        self.fn, self.seconds, self.bytes = fn, 0.0, 0

    def __call__(self, x, *rest, **kw):
        start = time.perf_counter()
        out = self.fn(x, *rest, **kw)
        self.seconds += time.perf_counter() - start
        n = distributed.sp_world()
        self.bytes += x.numel() * x.element_size() * (n - 1) // n
        return out


def rank_main(rank, args, store, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model, *inputs = setup(args)
    a2a, gather = Timed(distributed.all_to_all), Timed(distributed.gather)
    distributed.all_to_all, distributed.gather = a2a, gather  # bench only: count what the forward spends in them
    marks = []

    def before():
        dist.barrier()
        marks.append((a2a.seconds, gather.seconds, a2a.bytes))

    with distributed.sequence_parallel():
        seconds = forwards(model, inputs, args, before)
    marks.append((a2a.seconds, gather.seconds, a2a.bytes))
    per = [[b - a for a, b in zip(marks[i], marks[i + 1])] for i in range(args.warmup, args.warmup + args.reps)]
    torch.save({"seconds": seconds, "a2a": [p[0] for p in per], "gather": [p[1] for p in per],
                "bytes": per[0][2]}, Path(results) / f"rank{rank}.pt")
    dist.destroy_process_group()


def main(argv=None):
    args = parse(argv)
    model, *inputs = setup(args)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"Wan2.1-1.3B width, {args.layers} blocks, batch {args.batch}, {tokens} tokens, float32; median of "
          f"{args.reps} forwards after {args.warmup}")
    rows = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rows[f"1 process, {threads} thread{'s' * (threads > 1)}"] = statistics.median(forwards(model, inputs, args))
    del model
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(rank_main, args=(args, f"{tmp}/store", tmp), nprocs=2,
                                              start_method="spawn")
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    sp = max(statistics.median(r["seconds"]) for r in ranks)
    rows["--sp 2 (2 ranks x 1 thread, gloo)"] = sp
    base = rows["1 process, 2 threads"]
    print(f"{'configuration':38s} {'s/forward':>10s} {'vs 1 process, 2 threads':>24s}")
    for name, s in rows.items():
        print(f"{name:38s} {s:10.3f} {s / base:23.2f}x")
    for r, res in enumerate(ranks):
        total = statistics.median(res["seconds"])
        print(f"rank {r}: all-to-all {statistics.median(res['a2a']):.3f} s = "
              f"{statistics.median(res['a2a']) / total:.1%} of its forward, final gather "
              f"{statistics.median(res['gather']):.3f} s; sends {res['bytes'] / 2**20:.1f} MiB per forward in "
              f"all-to-all ({4 * args.layers} exchanges)")


if __name__ == "__main__":
    main()
