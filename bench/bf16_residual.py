"""bfloat16 error of the Wan DiT forward against float32 when one residual channel is massive (~1,000).

    python bench/bf16_residual.py                  # real Wan2.1-1.3B config, seeded random weights, 320 tokens

Massive activations (MA), the object STAS steers, live in the residual stream. The official Wan code in bf16 keeps
that stream (and the norms, modulation and head) in float32 and runs only the large matrix products and attention
in bf16 (reference/models.md §0.1). This bench builds the real 1.3B architecture with seeded random weights, makes
channel --dim massive (block --block's cross-attention output projection adds --ma to it at every token, weighted
by a random row so tokens differ, as real MAs do), and prints max|v_bf16 - v_fp32| / max|v_fp32| of the output
velocity and the relative error of the MA channel itself at the last block, for the forward of the checked-out
minivdit. Run it at two commits to compare two forms of the block (the note of issue 14 has both numbers).
"""
import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from minivdit.interventions import Perturb  # noqa: E402
from minivdit.wan import PRESETS, WanModel  # noqa: E402


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        return " ".join(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx2", "avx512f")))
    except (OSError, StopIteration):
        return "?"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--latent", default="5,16,16", help="latent F,H,W (tokens = F*H/2*W/2)")
    p.add_argument("--dim", type=int, default=1188, help="the channel made massive")
    p.add_argument("--block", type=int, default=3, help="the block whose cross-attention output feeds it")
    p.add_argument("--ma", type=float, default=1000.0, help="size of the massive channel")
    args = p.parse_args(argv)
    print(f"{platform.processor() or platform.machine()} | {cpu_flags()} | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    torch.manual_seed(0)
    c = PRESETS[args.preset].config
    model = WanModel(c).eval().requires_grad_(False)
    with torch.no_grad():
        o = model.blocks[args.block].cross_attn.o
        o.bias[args.dim] = args.ma
        o.weight[args.dim] *= 50
    f, h, w = (int(v) for v in args.latent.split(","))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, c.in_dim, f, h, w, generator=g)
    ctx = torch.zeros(1, c.text_len, c.text_dim)
    ctx[:, :24] = torch.randn(1, 24, c.text_dim, generator=g)
    t = torch.tensor([700])
    taps = {}
    capture = lambda i, hid: taps.__setitem__(i, hid[0, :, args.dim].float().clone())
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = model if dtype == torch.float32 else model.to(dtype)
        for name, prm in m.named_parameters():  # what the loader keeps in float32 at any dtype
            if any(s in name for s in WanModel.keep_fp32):
                prm.data = prm.data.float()
        start = time.perf_counter()
        with torch.no_grad():
            out[dtype] = m(x, t, ctx, Perturb(capture=capture))
        out[dtype, "ma"] = taps[c.num_layers - 1]
        print(f"{str(dtype):15s} forward {time.perf_counter() - start:6.1f} s, MA channel at the last block: "
              f"max |h| = {out[dtype, 'ma'].abs().max():.1f}")
    ref, ma = out[torch.float32], out[torch.float32, "ma"]
    err = (out[torch.bfloat16] - ref).abs().max() / ref.abs().max()
    ma_err = (out[torch.bfloat16, "ma"] - ma).abs().max() / ma.abs().max()
    print(f"tokens {f * h * w // 4}: output max rel error {err:.3e}; MA channel max rel error {ma_err:.3e}")


if __name__ == "__main__":
    main()
