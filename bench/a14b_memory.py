"""Peak memory of a Wan2.2 A14B run: only one expert resident (default) vs both (--keep-experts), at the real 14B
width with few layers (the real experts do not fit twice in this machine's 24 GiB).

    python bench/a14b_memory.py                    # 2 layers per expert, 4 steps across the expert switch

Two experts of the T2V-A14B architecture (dim 5120, ffn 13824, 40 heads) with --layers blocks each and seeded random
weights are written in the native layout (high_noise_model/, low_noise_model/). Each measurement runs in a fresh
subprocess: it records its resident size (`base`: interpreter and torch), runs `WanPipeline.sample` over a grid whose
steps fall on both experts (experts loaded by `load_wan` from the files, float32), and reports its peak resident set
size. "run / expert" = (peak - base) / the bytes of one expert's file: ~1 when one expert is resident at a time,
~2 with both kept.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from minivdit.wan import PRESETS  # noqa: E402

NAME = "wan2.2-t2v-a14b"


def preset(layers: int) -> str:
    """Register (in this process) the A14B preset with `layers` blocks per expert; returns its name."""
    name = f"{NAME}-{layers}-layers"
    p = PRESETS[NAME]
    PRESETS[name] = replace(p, config=replace(p.config, num_layers=layers))
    return name


def child(root: str, layers: int, keep: bool) -> dict:
    from minivdit.guidance import Guidance
    from minivdit.pipeline import SampleConfig, WanPipeline, guidance_per_expert
    from minivdit.wan import load_wan

    name = preset(layers)
    base = psutil.Process().memory_info().rss
    loaders = {e: (lambda e=e: load_wan(Path(root) / f"{e}_noise_model", preset=name)[0]) for e in ("high", "low")}
    pipe = WanPipeline(None, None, None, None, name, {}, experts=loaders, keep_experts=keep)
    c = PRESETS[name].config
    ctx = torch.randn(2, c.text_len, c.text_dim, generator=torch.Generator().manual_seed(0))
    run = SampleConfig("", frames=5, height=64, width=64, steps=4, shift=5.0)
    pipe.sample(run, guidance_per_expert(PRESETS[name], Guidance()), context=ctx, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"keep_experts": keep, "base": base, "peak": peak, "loads": pipe.loads, "steps": pipe.expert_steps}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2] == "keep")))
        return
    from safetensors.torch import save_file

    from minivdit.wan import WanModel, native_config

    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as root:
        c = PRESETS[preset(args.layers)].config
        sizes = []
        for k, e in enumerate(("high", "low")):
            torch.manual_seed(k)
            folder = Path(root) / f"{e}_noise_model"
            folder.mkdir()
            save_file({n: t.contiguous() for n, t in WanModel(c).state_dict().items()},
                      folder / "diffusion_pytorch_model.safetensors")
            (folder / "config.json").write_text(json.dumps(native_config(c)))
            sizes.append((folder / "diffusion_pytorch_model.safetensors").stat().st_size)
        expert = sizes[0]
        print(f"A14B width, {args.layers} layers per expert: one expert file = {expert / 2**30:.2f} GiB")
        for keep in ("one", "keep"):
            r = json.loads(subprocess.run([sys.executable, __file__, "--child", root, str(args.layers), keep],
                                          check=True, capture_output=True, text=True).stdout)
            print(f"keep_experts={r['keep_experts']!s:5}: experts loaded {r['loads']}, steps {r['steps']}; peak - base "
                  f"= {(r['peak'] - r['base']) / 2**30:.2f} GiB = {(r['peak'] - r['base']) / expert:.2f} x one expert")


if __name__ == "__main__":
    main()
