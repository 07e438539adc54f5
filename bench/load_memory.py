"""Peak RSS of loading a Wan DiT checkpoint, against the size of its weights, and against diffusers in the same run.

    python bench/make_reference_checkpoint.py --out weights/wan2.1-1.3b-random     # once
    python bench/load_memory.py --ckpt weights/wan2.1-1.3b-random

Each load runs in a fresh subprocess; peak RSS is the child's ru_maxrss, minus the RSS it had after imports, measured
after every weight has been read once (memory-mapped weights only count once their pages are touched).
    python bench/load_memory.py --ckpt weights/wan2.1-1.3b-random --dtype bfloat16     # with dtype conversion
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
kind, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
from minivdit.wan import load_wan
from diffusers import WanTransformer3DModel
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
if kind == "minivdit":
    model, _, _ = load_wan(path, dtype=dtype)
else:
    model = WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype)
seconds = time.perf_counter() - t0
with torch.no_grad():  # touch every weight: memory-mapped tensors count once their pages are read
    for p in model.parameters():
        p.sum()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(kind=kind, seconds=seconds, base=base, peak=peak, params=params)))
"""


def run(kind, path, dtype):
    code = CHILD.format(root=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, "-c", code, kind, str(path), dtype], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="output folder of make_reference_checkpoint.py")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    root = Path(args.ckpt)
    native = root / "native" / "diffusion_pytorch_model.safetensors"
    size = native.stat().st_size
    rows = [run("minivdit", root / "native", args.dtype), run("minivdit", root / "diffusers", args.dtype),
            run("diffusers", root / "diffusers" / "transformer", args.dtype)]
    gb = 1e9
    print(f"weights file: {size / gb:.2f} GB ({native}); load dtype {args.dtype}")
    print("| loader | layout | seconds | peak RSS - base (GB) | params in memory (GB) | peak / file size |")
    print("|---|---|---|---|---|---|")
    for r, layout in zip(rows, ("native", "diffusers", "diffusers")):
        extra = r["peak"] - r["base"]
        print(f"| {r['kind']} | {layout} | {r['seconds']:.1f} | {extra / gb:.2f} | {r['params'] / gb:.2f} "
              f"| {extra / size:.2f} |")
    print(f"minivdit / diffusers peak ratio: {(rows[1]['peak'] - rows[1]['base']) / (rows[2]['peak'] - rows[2]['base']):.2f}")


if __name__ == "__main__":
    main()
