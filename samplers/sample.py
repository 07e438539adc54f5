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
import math
import os
import secrets
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from minivdit import cli, conditioning, distributed  # noqa: E402
from minivdit.checkpoints import LazySafetensors  # noqa: E402
from minivdit.guidance import METHODS, OPTIONS, STG_RESCALE_ON, Guidance  # noqa: E402
from minivdit.pipeline import (COG_PRESETS, COG_SOLVERS, COG_TINY_DIR, DTYPES, SOLVERS, Pipeline,  # noqa: E402
                               SampleConfig, check_vae, detect_preset, encode_prompts, family_of, find_checkpoint,
                               guidance_for, prompt_tokens, sidecar, tiny_checkpoint, tiny_cogvideox_checkpoint)
from minivdit.specs import parse_specs  # noqa: E402
from minivdit.text import load_tokenizer  # noqa: E402
from minivdit.video import check_output, numbered, to_uint8, write_json, write_mp4  # noqa: E402
from minivdit.wan import PRESETS, find_transformer  # noqa: E402


def finite(s: str) -> float:
    """argparse type: a finite float ('nan' and 'inf' are refused, never passed on)."""
    v = float(s)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def add_guidance_args(p):
    """Every guidance option of guidance.OPTIONS (also used by compare.py); None means the preset's value."""
    g = p.add_argument_group("guidance parameters (default: the preset's settings; each belongs to one method, "
                             "giving one without its method is an error)")
    for name, typ, group, what in OPTIONS:
        extra = dict(nargs="?", const=STG_RESCALE_ON) if name == "stg_rescale" else {}
        g.add_argument("--" + name.replace("_", "-"), type=finite if typ is float else typ, default=None,
                       help=f"[{group}] {what}", **extra)


def guidance_from_args(args, preset) -> Guidance | dict[str, Guidance]:
    """The Guidance the guidance arguments describe, on top of the preset's settings (A14B: one per expert); options
    of another method than --method are refused by guidance.from_preset, --steer-experts without A14B or without a
    method that steers (STAS, DG) here."""
    steer = tuple(args.steer_experts.split(",")) if getattr(args, "steer_experts", None) else None
    if steer is not None and not preset.experts:
        raise ValueError("--steer-experts applies to two-expert models (Wan2.2 A14B) only; drop it")
    runs = parse_specs(args.method)  # a method spec (minivdit/specs.py): one run, its parameters over the flags
    if len(runs) != 1:
        raise ValueError(f"--method {args.method!r} describes {len(runs)} runs; sample.py makes one video (sweeps: "
                         "samplers/compare.py)")
    stas = args.stas or runs[0].stas
    if steer is not None and not (stas or runs[0].method == "dg"):
        raise ValueError("--steer-experts picks the experts STAS / DG steer: add --stas or --method dg, or drop it")
    flags = {name: getattr(args, name) for name, *_ in OPTIONS}
    return guidance_for(preset, runs[0].method, stas=stas, steer=steer,
                        **{"guidance_scale": args.guidance_scale, **flags, **runs[0].params})


SEED_MAX = 2**63 - 1
DEFAULT_OUTPUT = "outputs/sample.mp4"


def seed(s: str) -> int | None:
    """argparse type: an integer seed in [0, 2^63 - 1], or 'random' / -1 for a random one (None here; drawn and
    recorded by main)."""
    if s in ("random", "-1"):
        return None
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: a seed is an integer in [0, {SEED_MAX}], or 'random' / -1") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{v} is out of range: a seed is in [0, {SEED_MAX}] (or 'random' / -1)")
    return v


def add_run_args(p):
    """The sampling options shared with compare.py: size, frames, steps, shift, guidance scale, fps, solver."""
    for name, typ, what in (("frames", int, "frames, 4k+1 (default: the preset's)"),
                            ("height", int, "pixels, a multiple of 16 (32 for TI2V-5B) (default: the preset's)"),
                            ("width", int, "pixels, a multiple of 16 (32 for TI2V-5B) (default: the preset's)"),
                            ("steps", int, "sampling steps >= 1 (default: the preset's)"),
                            ("shift", finite, "Wan flow shift > 0 (default: the preset's; CogVideoX has none)"),
                            ("guidance-scale", finite, "CFG scale g >= 0 (default: the preset's)"),
                            ("fps", int, "frames per second of the mp4, >= 1 (default: the preset's)")):
        p.add_argument(f"--{name}", type=typ, default=None, help=what)
    p.add_argument("--solver", default=None, choices=[*SOLVERS, *COG_SOLVERS],
                   help="default: the family's (Wan unipc; CogVideoX the preset's: ddim for 2B, dpm for 5B / 1.5)")
    p.add_argument("--dynamic-cfg", action=argparse.BooleanOptionalAction, default=None,
                   help="CogVideoX dynamic CFG (default: the preset's, on; refused for Wan)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks: faster steps after a "
                   "first call that compiles (tens of seconds per intervention structure on CPU; README: Speed) "
                   "(default: off, eager)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="A red fox trots through fresh snow in a pine forest at dawn.",
                   help="the text prompt (default: %(default)r); longer than the encoder's window (umt5 512 tokens, "
                        "CogVideoX T5 226) it is truncated with a warning")
    p.add_argument("--negative-prompt", default=None, help="default: the official Wan negative prompt; \"\" for "
                                                           "CogVideoX (as diffusers)")
    p.add_argument("--ckpt", default=None, help="checkpoint folder (native or diffusers) or a ComfyUI DiT file; "
                                                "default: the embedded tiny checkpoint, made on first use")
    p.add_argument("--preset", default=None, choices=[*PRESETS, *COG_PRESETS], help="default: detected from the "
                   "weights; without --ckpt a tiny preset picks its embedded checkpoint (cogvideox-tiny)")
    p.add_argument("--vae", default=None, help="VAE file or folder (default: the checkpoint's; needed with a "
                                               "single-file --ckpt)")
    p.add_argument("--text-encoder", default=None, help="umt5 / T5 file or folder (default: the checkpoint's; "
                                                        "needed with a single-file --ckpt)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's; needed with a "
                                                     "single-file --ckpt)")
    p.add_argument("--image", default=None, help="image to video: the first frame (Wan2.2 TI2V-5B, I2V-A14B only; "
                                                 "default: none, text to video)")
    p.add_argument("--ckpt-high", default=None, help="A14B high-noise expert file (ComfyUI), with --ckpt-low "
                                                      "(default: none)")
    p.add_argument("--ckpt-low", default=None, help="A14B low-noise expert file (ComfyUI), with --ckpt-high "
                                                     "(default: none)")
    p.add_argument("--keep-experts", action="store_true", help="A14B only: keep both experts loaded (default: only "
                                                               "the running one is resident)")
    p.add_argument("--steer-experts", default=None, help="A14B with --stas or --method dg: the experts STAS / DG "
                                                         "steer, comma separated, e.g. high (default: all)")
    add_run_args(p)
    p.add_argument("--method", default="cfg", metavar="SPEC", help=f"guidance method, one of {', '.join(METHODS)}, "
                   "or one method spec with parameters, e.g. 'stg:mode=A,blocks=2', 'cfg+stas:alpha=2' (grammar: "
                   "samplers/compare.py --help; docs/methods.md) (default: %(default)s)")
    p.add_argument("--stas", action="store_true", help="add STAS (steer MA channels on F0 and B(p) tokens; "
                                                       "default: off)")
    add_guidance_args(p)
    p.add_argument("--seed", type=seed, default=0, help=f"noise seed, an integer in [0, {SEED_MAX}], or 'random' / "
                                                        "-1 for a random seed that is printed and recorded in the "
                                                        "sidecar (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="DiT weights dtype (default: "
                                                                            "%(default)s)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if a GPU "
                                                  "is visible, else cpu)")
    p.add_argument("--output", default=None, help=f"the mp4 to write, its .json sidecar beside it (default: "
                                                  f"{DEFAULT_OUTPUT}, or sample-1.mp4, sample-2.mp4, ... if taken)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (default: refuse)")
    p.add_argument("--sp", type=int, default=1, help="sequence parallel: split the video's tokens over N ranks "
                   "(Ulysses); run under `torchrun --nproc-per-node N`; rank 0 writes (README: Many processes) "
                   "(default: 1, one process)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (default: off)")
    return p


def parse(argv=None):
    return parser().parse_args(argv)


def check_device(name: str | None) -> str:
    """The device to run on: name, or cuda if a GPU is visible else cpu. Raises ValueError for a device torch does
    not know or cannot see (e.g. --device cuda on a machine without a GPU), before any heavy work."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to torch on this machine; run on the CPU with "
                         "--device cpu (or leave --device out)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1}")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: minivdit runs on cpu or cuda")
    return name


CPU_FLOPS = 1e11  # a rough CPU throughput (FLOP/s) for the estimate; a busy or small machine is slower
WARN_SECONDS = 600


def estimate(found: dict, preset, run: SampleConfig, guidance, family, dtype: torch.dtype) -> dict:
    """A rough cost of the run from the DiT's header (parameters) and the run's tokens: {'tokens', 'params',
    'peak_gb' (weights + one block's activations for every pass), 'tflop' (all steps), 'passes'}."""
    files = [f for d in (found["experts"] or {"dit": found["transformer"]}).values() for f in find_transformer(d)]
    sd = LazySafetensors(files)
    params = sum(math.prod(sd.shape(k)) for k in sd) // (2 if found["experts"] else 1)  # one expert resident
    shape, _ = family.latent(run, preset)
    c = preset.config
    dim = getattr(c, "dim", None) or c.num_attention_heads * c.attention_head_dim
    tokens = math.prod(shape[2:]) // 4 // (getattr(c, "patch_size_t", None) or 1)
    passes = max(g.passes_per_step() for g in (guidance.values() if isinstance(guidance, dict) else [guidance]))
    flop = passes * run.steps * (2 * params * tokens + 4 * tokens**2 * dim * c.num_layers)
    peak = params * torch.finfo(dtype).bits // 8 + passes * tokens * dim * 4 * 16
    return dict(tokens=tokens, params=params, peak_gb=peak / 1e9, tflop=flop / 1e12, passes=passes)


def warn_if_large(cost: dict, device: str) -> None:
    """On the CPU, print the estimate before starting when it implies more than WARN_SECONDS at CPU_FLOPS or more
    than half the machine's memory."""
    if not device.startswith("cpu"):
        return
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    seconds = cost["tflop"] * 1e12 / CPU_FLOPS
    if seconds > WARN_SECONDS or cost["peak_gb"] > ram / 2:
        print(f"note: a large run for the CPU: {cost['tokens']} video tokens, {cost['passes']} passes per step, "
              f"about {cost['tflop']:.0f} TFLOP in all (roughly {seconds / 3600:.1f} h at {CPU_FLOPS / 1e9:.0f} "
              f"GFLOP/s) and a peak of about {cost['peak_gb']:.1f} GB ({ram:.0f} GB here). Fewer frames, a smaller "
              "size or a GPU (--device cuda) make it cheaper; Ctrl-C stops it cleanly.", file=sys.stderr)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    device = check_device(args.device)
    if args.seed is None:
        args.seed = secrets.randbelow(SEED_MAX + 1)
        print(f"seed: {args.seed} (random; recorded in the sidecar)", file=sys.stderr)
    ckpt = args.ckpt or (None if args.ckpt_high or args.ckpt_low else tiny_default(args.preset))
    found = find_checkpoint(ckpt, args.vae, args.text_encoder, args.tokenizer, args.ckpt_high, args.ckpt_low)
    preset = detect_preset(found, args.preset)  # cheap checks first: headers only
    family = family_of(preset)
    defaults = family.presets[preset]
    if args.keep_experts and not defaults.experts:
        raise ValueError(f"--keep-experts applies to two-expert models (Wan2.2 A14B); {preset} has one DiT: drop it")
    run = SampleConfig.from_preset(defaults, args.prompt, negative_prompt=args.negative_prompt, frames=args.frames,
                                   height=args.height, width=args.width, steps=args.steps, shift=args.shift,
                                   solver=args.solver, seed=args.seed, fps=args.fps, dynamic_cfg=args.dynamic_cfg)
    image = None
    if args.image is not None or defaults.image == "concat":
        image, run = load_image_for(args.image, preset, run)
    run.check(family.stride(defaults), family)
    if args.sp != 1:
        device = start_sp(args.sp, defaults, device)
    rank = distributed.sp_rank() if args.sp > 1 else 0
    guidance = guidance_from_args(args, defaults)
    for g in (guidance.values() if isinstance(guidance, dict) else [guidance]):
        g.check(run.steps, defaults.config.num_layers, defaults.config.dim)
        family.check_guidance(g)
    check_vae(found, preset)
    out = check_output(args.output or numbered(DEFAULT_OUTPUT), args.overwrite)
    negative = family.negative(run)
    tokens = prompt_tokens(preset, [run.prompt, negative], load_tokenizer(found["tokenizer"]))  # warns if truncated
    warn_if_large(estimate(found, defaults, run, guidance, family, DTYPES[args.dtype]), device)

    start = time.perf_counter()
    context, = encode_prompts(found, preset, [(run.prompt, negative)], device=device)  # text encoder freed after
    pipe = Pipeline.load(ckpt, preset, args.vae, args.text_encoder, args.tokenizer, dtype=DTYPES[args.dtype],
                         device=device, with_text_encoder=False, ckpt_high=args.ckpt_high,
                         ckpt_low=args.ckpt_low, keep_experts=args.keep_experts, compile=args.compile)
    cond = {}
    if image is not None and defaults.image == "first_frame":
        cond["first_frame"] = conditioning.first_frame_latent(pipe.vae, image.to(pipe.device))
    elif image is not None:
        cond["concat"] = conditioning.i2v_condition(pipe.vae, image.to(pipe.device), run.frames)
    with distributed.sequence_parallel() if args.sp > 1 else contextlib.nullcontext():
        video = pipe(run, guidance, context=context, progress=rank == 0, **cond)
    seconds = time.perf_counter() - start
    extra = {"image": str(Path(args.image).resolve())} if args.image else {}
    if args.sp > 1:
        torch.distributed.destroy_process_group()
    if rank != 0:  # every rank holds the same video; rank 0 writes it
        return out
    record = sidecar(pipe, run, guidance, seconds, sp=args.sp, prompt_tokens=dict(zip(("prompt", "negative_prompt"), tokens)),
                     command=shlex.join(["python", "samplers/sample.py", *argv]), **extra)
    write_mp4(out, to_uint8(video), run.fps, overwrite=args.overwrite)
    try:
        write_json(out.with_suffix(".json"), record)
    except BaseException:  # an interrupt or error between the two writes: no video without its sidecar
        out.unlink(missing_ok=True)
        raise
    print(f"wrote {out} ({run.frames} frames, {run.height}x{run.width}, {seconds:.1f} s) and its .json sidecar")
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
    cli.run(main)
