"""Text (and image) to video with Wan2.1 / Wan2.2 and CogVideoX: a prompt in, an mp4 and its JSON sidecar out.

    python samplers/sample.py                                   # embedded tiny default (noise-like, checks the machinery)
    python samplers/sample.py --preset cogvideox-tiny           # the embedded tiny CogVideoX (diffusers layout)
    python samplers/sample.py --ckpt weights/CogVideoX-5b --frames 49 --height 480 --width 720   # diffusers folder
    python samplers/sample.py --ckpt weights/Wan2.1-T2V-1.3B --prompt "A cat walks on the grass" \
        --frames 33 --height 480 --width 832 --output outputs/cat.mp4
    python samplers/sample.py --ckpt weights/Wan2.2-TI2V-5B --image cat.jpg ...        # TI2V: image as frame 0
    python samplers/sample.py --ckpt weights/Wan2.2-T2V-A14B ...                       # two experts, one resident
    python samplers/sample.py --ckpt-high high.safetensors --ckpt-low low.safetensors --vae ... --text-encoder ... \
        --tokenizer ...                                                             # ComfyUI expert files
    torchrun --nproc-per-node 2 samplers/sample.py --sp 2 ...    # one video's tokens split over 2 ranks (Ulysses)
"""
import argparse
import contextlib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from minivdit import conditioning, distributed  # noqa: E402
from minivdit.guidance import METHODS, OPTIONS, STG_RESCALE_ON, Guidance  # noqa: E402
from minivdit.pipeline import (COG_PRESETS, COG_SOLVERS, COG_TINY_DIR, DTYPES, SOLVERS, Pipeline,  # noqa: E402
                               SampleConfig, check_vae, detect_preset, encode_prompts, family_of, find_checkpoint,
                               guidance_for, sidecar, tiny_checkpoint, tiny_cogvideox_checkpoint)
from minivdit.specs import parse_specs  # noqa: E402
from minivdit.video import check_output, to_uint8, write_json, write_mp4  # noqa: E402
from minivdit.wan import PRESETS  # noqa: E402


def add_guidance_args(p):
    """Every guidance option of guidance.OPTIONS (also used by compare.py); None means the preset's value."""
    g = p.add_argument_group("guidance parameters (default: the preset's settings; each belongs to one method)")
    for name, typ, group, what in OPTIONS:
        extra = dict(nargs="?", const=STG_RESCALE_ON) if name == "stg_rescale" else {}
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"[{group}] {what}", **extra)


def guidance_from_args(args, preset) -> Guidance | dict[str, Guidance]:
    """The Guidance the guidance arguments describe, on top of the preset's settings (A14B: one per expert); options
    of another method than --method are refused by guidance.from_preset."""
    steer = tuple(args.steer_experts.split(",")) if getattr(args, "steer_experts", None) else None
    runs = parse_specs(args.method)  # a method spec (minivdit/specs.py): one run, its parameters over the flags
    if len(runs) != 1:
        raise ValueError(f"--method {args.method!r} describes {len(runs)} runs; sample.py makes one video (sweeps: "
                         "samplers/compare.py)")
    flags = {name: getattr(args, name) for name, *_ in OPTIONS}
    return guidance_for(preset, runs[0].method, stas=args.stas or runs[0].stas, steer=steer,
                        **{"guidance_scale": args.guidance_scale, **flags, **runs[0].params})


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="A red fox trots through fresh snow in a pine forest at dawn.")
    p.add_argument("--negative-prompt", default=None, help="default: the official Wan negative prompt; \"\" for "
                                                           "CogVideoX (as diffusers)")
    p.add_argument("--ckpt", default=None, help="checkpoint folder (native or diffusers) or a ComfyUI DiT file; "
                                                "default: the embedded tiny checkpoint, made on first use")
    p.add_argument("--preset", default=None, choices=[*PRESETS, *COG_PRESETS], help="default: detected from the "
                   "weights; without --ckpt a tiny preset picks its embedded checkpoint (cogvideox-tiny)")
    p.add_argument("--vae", default=None, help="VAE file (with a single-file --ckpt)")
    p.add_argument("--text-encoder", default=None, help="umt5 file or folder (with a single-file --ckpt)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (with a single-file --ckpt)")
    p.add_argument("--image", default=None, help="image to video: the first frame (Wan2.2 TI2V-5B, I2V-A14B only)")
    p.add_argument("--ckpt-high", default=None, help="A14B high-noise expert file (ComfyUI), with --ckpt-low")
    p.add_argument("--ckpt-low", default=None, help="A14B low-noise expert file (ComfyUI), with --ckpt-high")
    p.add_argument("--keep-experts", action="store_true", help="A14B: keep both experts loaded (default: only "
                                                               "the running one is resident)")
    p.add_argument("--steer-experts", default=None, help="A14B: experts STAS / DG steer, e.g. high (default: all)")
    for name, typ in (("frames", int), ("height", int), ("width", int), ("steps", int), ("shift", float),
                      ("guidance-scale", float), ("fps", int)):
        p.add_argument(f"--{name}", type=typ, default=None, help="default: the preset's")
    p.add_argument("--solver", default=None, choices=[*SOLVERS, *COG_SOLVERS],
                   help="default: the family's (Wan unipc; CogVideoX the preset's: ddim for 2B, dpm for 5B / 1.5)")
    p.add_argument("--dynamic-cfg", action=argparse.BooleanOptionalAction, default=None,
                   help="CogVideoX dynamic CFG (default: the preset's, on)")
    p.add_argument("--method", default="cfg", metavar="SPEC", help=f"guidance method, one of {', '.join(METHODS)}, "
                   "or one method spec with parameters, e.g. 'stg:mode=A,blocks=2', 'cfg+stas:alpha=2' (grammar: "
                   "samplers/compare.py --help; docs/methods.md)")
    p.add_argument("--stas", action="store_true", help="add STAS (steer MA channels on F0 and B(p) tokens)")
    add_guidance_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="DiT weights dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="outputs/sample.mp4")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--sp", type=int, default=1, help="sequence parallel: split the video's tokens over N ranks "
                   "(Ulysses); run under `torchrun --nproc-per-node N`; rank 0 writes (README: Many processes)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    ckpt = args.ckpt or (None if args.ckpt_high or args.ckpt_low else tiny_default(args.preset))
    found = find_checkpoint(ckpt, args.vae, args.text_encoder, args.tokenizer, args.ckpt_high, args.ckpt_low)
    preset = detect_preset(found, args.preset)  # cheap checks first: headers only
    family = family_of(preset)
    defaults = family.presets[preset]
    run = SampleConfig.from_preset(defaults, args.prompt, negative_prompt=args.negative_prompt, frames=args.frames,
                                   height=args.height, width=args.width, steps=args.steps, shift=args.shift,
                                   solver=args.solver, seed=args.seed, fps=args.fps, dynamic_cfg=args.dynamic_cfg)
    image = None
    if args.image is not None or defaults.image == "concat":
        image, run = load_image_for(args.image, preset, run)
    run.check(family.stride(defaults), family)
    guidance = guidance_from_args(args, defaults)
    for g in (guidance.values() if isinstance(guidance, dict) else [guidance]):
        g.check(run.steps, defaults.config.num_layers, defaults.config.dim)
        family.check_guidance(g)
    check_vae(found, preset)
    out = check_output(args.output, args.overwrite)
    if args.sp > 1:
        args.device = start_sp(args.sp, defaults, args.device)
    rank = distributed.sp_rank() if args.sp > 1 else 0

    start = time.perf_counter()
    negative = family.negative_prompt if run.negative_prompt is None else run.negative_prompt
    context = encode_prompts(found, preset, [run.prompt, negative], device=args.device)  # text encoder freed after
    pipe = Pipeline.load(ckpt, preset, args.vae, args.text_encoder, args.tokenizer, dtype=DTYPES[args.dtype],
                            device=args.device, with_text_encoder=False, ckpt_high=args.ckpt_high,
                            ckpt_low=args.ckpt_low, keep_experts=args.keep_experts)
    cond = {}
    if image is not None and defaults.image == "first_frame":
        cond["first_frame"] = conditioning.first_frame_latent(pipe.vae, image.to(pipe.device))
    elif image is not None:
        cond["concat"] = conditioning.i2v_condition(pipe.vae, image.to(pipe.device), run.frames)
    with distributed.sequence_parallel() if args.sp > 1 else contextlib.nullcontext():
        video = pipe(run, guidance, context=context, progress=rank == 0, **cond)
    seconds = time.perf_counter() - start
    if rank == 0:  # every rank holds the same video; one writes it
        write_mp4(out, to_uint8(video), run.fps, overwrite=args.overwrite)
        extra = {"image": str(Path(args.image).resolve())} if args.image else {}
        write_json(out.with_suffix(".json"), sidecar(pipe, run, guidance, seconds, sp=args.sp, **extra))
        print(f"wrote {out} ({run.frames} frames, {run.height}x{run.width}, {seconds:.1f} s) and its .json sidecar")
    if args.sp > 1:
        torch.distributed.destroy_process_group()
    return out


def start_sp(n: int, defaults, device: str) -> str:
    """Check that N ranks can split this model's heads, then join the torchrun process group of N ranks; returns this
    rank's device. Raises ValueError before any model is loaded."""
    c = defaults.config
    distributed.check_sp(n, getattr(c, "num_heads", None) or c.num_attention_heads)
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--sp {n} needs torchrun: torchrun --nproc-per-node {n} samplers/sample.py --sp {n} ...")
    if int(os.environ["WORLD_SIZE"]) != n:
        raise ValueError(f"--sp {n} under torchrun with {os.environ['WORLD_SIZE']} processes: start "
                         f"--nproc-per-node {n} (one rank per sequence shard)")
    return distributed.init(device)  # gloo on CPU, nccl on CUDA (cuda -> cuda:LOCAL_RANK)


def tiny_default(preset: str | None) -> Path:
    """The embedded checkpoint used without --ckpt: the tiny Wan, or for a tiny CogVideoX preset
    (cogvideox-tiny, cogvideox-tiny-rope, cogvideox1.5-tiny) its own tiny diffusers folder in weights/<preset>."""
    if preset in COG_PRESETS and "tiny" in preset:
        return tiny_cogvideox_checkpoint(COG_TINY_DIR.parent / preset, preset=preset)
    return tiny_checkpoint()


def load_image_for(path, preset: str, run: SampleConfig):
    """Read and size the conditioning image for a preset; the run takes the image's output size (TI2V:
    best_output_size for the run's area; I2V-A14B: the official area-preserving size). Returns (image (3, H, W)
    in [-1, 1], run). Raises ValueError for a model without image conditioning or a missing / unreadable file."""
    p = family_of(preset).presets[preset]
    if p.image is None:
        raise ValueError(f"--image: {preset} is a text-to-video model; image conditioning needs wan2.2-ti2v-5b or "
                         "wan2.2-i2v-a14b")
    if path is None:
        raise ValueError(f"{preset} is an image-to-video model: pass --image PATH")
    img = conditioning.open_image(path)
    stride = family_of(preset).stride(p)
    if p.image == "first_frame":
        x = conditioning.ti2v_image(img, run.height, run.width, stride)
    else:
        x = conditioning.i2v_image(img, run.height, run.width, p.vae_stride[1])
    return x, replace(run, height=x.shape[1], width=x.shape[2])


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileExistsError) as e:  # CheckpointError is a ValueError
        sys.exit(f"error: {e}")
