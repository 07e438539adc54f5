"""Cost of the sampling loop's NaN / inf checks (pipeline.check_finite: one `torch.isfinite(x).all()` of the latent
per step, one of the decoded video) against one sampling step, side by side in one run.

    python bench/finite_check.py                  # tiny Wan at its default size, Wan2.1-1.3B width at 33 x 240 x 416
    python bench/finite_check.py --device cuda

A step = one batched DiT forward over [cond, uncond] (what every CFG step runs; the solver's arithmetic is extra).
The real-width model has the 1.3B block width (dim 1536, ffn 8960, 12 heads) with --layers of its 30 blocks and seeded
random weights, so the ratio printed is an upper bound for the full model (30 blocks: 30 / layers times the step).
Times are medians of --repeats, interleaved (check, step, check, step, ...) so a busy machine slows both alike.
"""
import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from minivdit.pipeline import SampleConfig, check_finite  # noqa: E402
from minivdit.wan import PRESETS, WanModel  # noqa: E402


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(config, run: SampleConfig, device: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = WanModel(config).to(device).eval()
    x = torch.randn(run.latent_shape(config.out_dim), device=device)
    context = torch.randn(2, config.text_len, config.text_dim, device=device)
    t = torch.tensor([500, 500], device=device)
    step, check = [], []
    with torch.no_grad():
        model(x.expand(2, *x.shape[1:]), t, context)  # warm-up
        for _ in range(repeats):
            sync(device)
            s = time.perf_counter()
            check_finite(x, "bench")
            sync(device)
            check.append(time.perf_counter() - s)
            s = time.perf_counter()
            model(x.expand(2, *x.shape[1:]), t, context)
            sync(device)
            step.append(time.perf_counter() - s)
    step, check = statistics.median(step), statistics.median(check)
    return dict(step=step, check=check, ratio=check / step, latent=tuple(x.shape))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=2, help="blocks of the real-width model (default: 2 of 30)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    tiny = PRESETS["wan2.1-tiny"]
    real = replace(PRESETS["wan2.1-t2v-1.3b"].config, num_layers=a.layers)
    cases = [("tiny (dim 64, 4 blocks), 9 x 64 x 64", tiny.config, SampleConfig("", frames=9, height=64, width=64)),
             (f"1.3B width ({a.layers} of 30 blocks), 33 x 240 x 416", real,
              SampleConfig("", frames=33, height=240, width=416))]
    print("| model, frames x H x W | latent | step (s) | latent check (s) | check / step |\n|---|---|---|---|---|")
    for name, config, run in cases:
        r = measure(config, run, a.device, a.repeats)
        print(f"| {name} | {r['latent']} | {r['step']:.4g} | {r['check']:.3g} | {100 * r['ratio']:.3f} % |")


if __name__ == "__main__":
    main()
