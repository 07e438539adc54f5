"""Text to video with Wan2.1: a prompt in, an mp4 and its JSON sidecar out.

    python samplers/t2v.py                                   # embedded tiny default (noise-like, checks the machinery)
    python samplers/t2v.py --ckpt weights/Wan2.1-T2V-1.3B --prompt "A cat walks on the grass" \
        --frames 33 --height 480 --width 832 --output outputs/cat.mp4
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from minivdit.guidance import METHODS, OPTIONS, STG_RESCALE_ON, Guidance, from_preset  # noqa: E402
from minivdit.pipeline import (DTYPES, SampleConfig, WanPipeline, encode_prompts, find_checkpoint,  # noqa: E402
                               sidecar, tiny_checkpoint)
from minivdit.text import NEGATIVE_PROMPT  # noqa: E402
from minivdit.video import check_output, to_uint8, write_json, write_mp4  # noqa: E402
from minivdit.wan import PRESETS, open_wan  # noqa: E402


def add_guidance_args(p):
    """Every guidance option of guidance.OPTIONS (also used by compare.py); None means the preset's value."""
    g = p.add_argument_group("guidance parameters (default: the preset's settings; each belongs to one method)")
    for name, typ, group, what in OPTIONS:
        extra = dict(nargs="?", const=STG_RESCALE_ON) if name == "stg_rescale" else {}
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"[{group}] {what}", **extra)


def guidance_from_args(args, preset, method: str, stas: bool) -> Guidance:
    """The Guidance the guidance arguments describe, on top of the preset's settings (options of other methods
    than `method` are refused by from_preset)."""
    return from_preset(preset, method, stas=stas, guidance_scale=args.guidance_scale,
                       **{name: getattr(args, name) for name, *_ in OPTIONS})


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="A red fox trots through fresh snow in a pine forest at dawn.")
    p.add_argument("--negative-prompt", default=None, help="default: the official Wan negative prompt")
    p.add_argument("--ckpt", default=None, help="checkpoint folder (native or diffusers) or a ComfyUI DiT file; "
                                                "default: the embedded tiny checkpoint, made on first use")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="default: detected from the weights")
    p.add_argument("--vae", default=None, help="VAE file (with a single-file --ckpt)")
    p.add_argument("--text-encoder", default=None, help="umt5 file or folder (with a single-file --ckpt)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (with a single-file --ckpt)")
    for name, typ in (("frames", int), ("height", int), ("width", int), ("steps", int), ("shift", float),
                      ("guidance-scale", float), ("fps", int)):
        p.add_argument(f"--{name}", type=typ, default=None, help="default: the preset's")
    p.add_argument("--solver", default="unipc", choices=["unipc", "dpm++", "euler"])
    p.add_argument("--method", default="cfg", choices=METHODS, help="guidance method (docs/methods.md)")
    p.add_argument("--stas", action="store_true", help="add STAS (steer MA channels on F0 and B(p) tokens)")
    add_guidance_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="DiT weights dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="outputs/t2v.mp4")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    ckpt = args.ckpt or tiny_checkpoint()
    found = find_checkpoint(ckpt, args.vae, args.text_encoder, args.tokenizer)  # cheap checks first
    _, _, preset, _ = open_wan(found["transformer"], args.preset)
    defaults = PRESETS[preset]
    run = SampleConfig.from_preset(defaults, args.prompt, negative_prompt=args.negative_prompt, frames=args.frames,
                                   height=args.height, width=args.width, steps=args.steps, shift=args.shift,
                                   solver=args.solver, seed=args.seed, fps=args.fps)
    run.check()
    guidance = guidance_from_args(args, defaults, args.method, args.stas)
    guidance.check(run.steps, defaults.config.num_layers, defaults.config.dim)
    out = check_output(args.output, args.overwrite)

    start = time.perf_counter()
    negative = NEGATIVE_PROMPT if run.negative_prompt is None else run.negative_prompt
    context = encode_prompts(found, preset, [run.prompt, negative], device=args.device)  # text encoder freed after
    pipe = WanPipeline.load(ckpt, preset, args.vae, args.text_encoder, args.tokenizer, dtype=DTYPES[args.dtype],
                            device=args.device, with_text_encoder=False)
    video = pipe(run, guidance, context=context)
    seconds = time.perf_counter() - start
    write_mp4(out, to_uint8(video), run.fps, overwrite=args.overwrite)
    write_json(out.with_suffix(".json"), sidecar(pipe, run, guidance, seconds))
    print(f"wrote {out} ({run.frames} frames, {run.height}x{run.width}, {seconds:.1f} s) and its .json sidecar")
    return out


if __name__ == "__main__":
    main()
