"""minivdit against diffusers, side by side in one process: DiT forward (eager and --compile) and VAE decode, per
family and dtype, on this CPU (issue 10; results kept in bench/RESULTS.md).

    python bench/speed.py                                     # everything below (~1 h on 2 cores)
    python bench/speed.py --models wan2.1-t2v-1.3b --dtypes bfloat16 --no-vae      # one row
    python bench/speed.py --models wan2.1-t2v-1.3b --latent 21 30 52 --no-compile --no-vae   # 8,190 tokens

Forward: the real architecture of each model at real width with --layers blocks (default 2: the ratio is per block,
the embeddings and head are <1 % of a 30-block forward), seeded random weights, the same weights copied into
diffusers' model (WanTransformer3DModel / CogVideoXTransformer3DModel) in the same dtype with the same float32
exceptions each loader makes, batch 2 ([cond, uncond]), timestep 999, a random context of the full text length.
Default latents: Wan (5, 30, 52) = 1,950 tokens (TI2V-5B: 48 channels), CogVideoX-5B (3, 30, 44) = 990 video + 226 text
tokens. "compiled" is minivdit with `--compile` (pipeline.compile_blocks, inductor) after its compile call (its
first-call time is printed). VAE: one decode of a seeded latent (Wan2.1 / Wan2.2 / CogVideoX VAE, real configs,
float32 as the pipelines run them) as each pipeline calls it (bench/vae_memory.decoder).

Every timing is the median of --reps calls after --warmup calls, the implementations interleaved (rep 1 of each,
then rep 2, ...) so that other load on the machine falls on all alike; the spread (min-max) is printed. Ratios < 1:
minivdit is faster. Read them only from a quiet machine (the load average is printed).
"""
import argparse
import copy
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench helpers
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from guidance_speed import build, cast, diffusers_reference  # noqa: E402
from vae_memory import decoder, machine  # noqa: E402
from minivdit.cogvideox import PRESETS as COG_PRESETS, CogVideoXModel, diffusers_config  # noqa: E402
from minivdit.pipeline import compile_blocks  # noqa: E402
from minivdit.wan import PRESETS, WanModel  # noqa: E402

LATENTS = {"wan2.1-t2v-1.3b": (5, 30, 52), "wan2.2-ti2v-5b": (5, 30, 52), "cogvideox-5b": (3, 30, 44)}
VAE_LATENTS = {"wan2.1": (5, 30, 52), "wan2.2": (5, 16, 24), "cogvideox": (3, 30, 44)}


def timed(fns: dict, reps: int, warmup: int) -> dict:
    """{label: fn} -> {label: sorted wall-clock seconds of `reps` calls}, after `warmup` calls each, interleaved."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v) for k, v in times.items()}


def median(v):
    return v[len(v) // 2]


def forward_fns(name: str, dtype: torch.dtype, layers: int, latent, compile: bool) -> tuple[dict, str]:
    """{'ours', 'diffusers'[, 'compiled']: fn() running one batched [cond, uncond] forward} and a size note."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    f, h, w = latent
    if name in COG_PRESETS:
        from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

        c = replace(COG_PRESETS[name].config, num_layers=layers)
        model = cast(build(lambda: CogVideoXModel(c), dtype), dtype, lambda n: False)
        ref = cast(build(lambda: CogVideoXTransformer3DModel(**diffusers_config(c)), dtype), dtype, lambda n: False)
        ref.load_state_dict(model.state_dict(), strict=True)
        x = torch.randn(2, f, c.in_channels, h, w, generator=g).to(dtype)  # diffusers' (B, F, C, H, W)
        ctx = torch.randn(2, c.max_text_seq_length, c.text_embed_dim, generator=g).to(dtype)
        t = torch.tensor([999, 999])
        rope = None
        if c.use_rotary_positional_embeddings:  # prepared outside the transformer, as CogVideoXPipeline does
            pipe = SimpleNamespace(vae_scale_factor_spatial=8, transformer=ref)
            rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, h * 8, w * 8, f, torch.device("cpu"))
        xo = x.transpose(1, 2)  # minivdit's (B, C, F, H, W)
        fns = {"ours": lambda: model(xo, t, ctx),
               "diffusers": lambda: ref(hidden_states=x, encoder_hidden_states=ctx, timestep=t, image_rotary_emb=rope)}
        tokens = f * (h // 2) * (w // 2)
        note = f"latent {latent} = {tokens} video + {c.max_text_seq_length} text tokens"
    else:
        c = replace(PRESETS[name].config, num_layers=layers)
        keep = lambda n: any(s in n for s in WanModel.keep_fp32)  # noqa: E731 -- what load_wan keeps float32
        model = cast(build(lambda: WanModel(c), dtype), dtype, keep)
        ref = diffusers_reference(model, dtype)
        x = torch.randn(2, c.in_dim, f, h, w, generator=g)
        ctx = torch.randn(2, c.text_len, c.text_dim, generator=g)
        t = torch.tensor([999, 999])
        xr, cr = x.to(dtype), ctx.to(dtype)  # diffusers' WanPipeline casts latents and embeddings so
        fns = {"ours": lambda: model(x, t, ctx),
               "diffusers": lambda: ref(hidden_states=xr, timestep=t, encoder_hidden_states=cr, return_dict=False)}
        note = f"latent {latent} = {f * (h // 2) * (w // 2)} tokens"
    fns = {k: torch.no_grad()(fn) for k, fn in fns.items()}
    if compile:
        compiled = compile_blocks(copy.deepcopy(model))
        inputs = (xo, t, ctx) if name in COG_PRESETS else (x, t, ctx)
        fns["compiled"] = torch.no_grad()(lambda: compiled(*inputs))
        t0 = time.perf_counter()
        fns["compiled"]()
        note += f"; compile call {time.perf_counter() - t0:.0f} s"
    return fns, note


def vae_fns(vae: str, latent) -> dict:
    """{'ours', 'diffusers': fn() decoding one seeded latent (1, z, F, H, W)}, float32."""
    out = {}
    for impl, label in (("minivdit", "ours"), ("diffusers", "diffusers")):
        torch.manual_seed(0)
        decode, channels = decoder(impl, vae)
        z = torch.randn(1, channels, *latent, generator=torch.Generator().manual_seed(2))
        out[label] = torch.no_grad()(lambda decode=decode, z=z: decode(z))
    return out


def row(label: str, times: dict) -> str:
    """A markdown row: medians (spread), ours / diffusers, compiled / diffusers."""
    ref = median(times["diffusers"])
    cells = [f"{median(v):.2f} ({v[0]:.2f}-{v[-1]:.2f})" for v in times.values()]
    ratios = [f"{median(times[k]) / ref:.3f}" for k in ("ours", "compiled") if k in times]
    return f"| {label} | {' | '.join(cells)} | {' | '.join(ratios)} |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(LATENTS), help="comma list of presets (default: %(default)s)")
    bf16 = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") or "avx512_bf16" in machine()
    p.add_argument("--dtypes", default="bfloat16,float32" if bf16 else "float32",
                   help="comma list (default: bfloat16,float32 on a CPU with native bf16, else float32)")
    p.add_argument("--layers", type=int, default=2, help="blocks per model, at real width (default: %(default)s)")
    p.add_argument("--latent", type=int, nargs=3, default=None, metavar=("F", "H", "W"),
                   help="latent size for every model (default: per model, see above)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled mode")
    p.add_argument("--no-vae", action="store_true", help="skip the VAE decodes")
    p.add_argument("--vaes", default=",".join(VAE_LATENTS), help="comma list (default: %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# bench/speed.py, {time.strftime('%Y-%m-%d %H:%M')}\n\n{machine()}\nload average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; median (min-max) of {args.reps} after {args.warmup} "
          f"warm-up, seconds; ratios < 1: minivdit faster\n", flush=True)
    compile = not args.no_compile
    print("| DiT forward | ours | diffusers |" + (" compiled |" if compile else "") + " ours / diffusers |"
          + (" compiled / diffusers |" if compile else "") + "\n|---|---|---|" + "---|" * (3 if compile else 1))
    notes = []
    for name in args.models.split(","):
        for dt in args.dtypes.split(","):
            dtype = getattr(torch, dt)
            fns, note = forward_fns(name, dtype, args.layers, args.latent or LATENTS[name], compile)
            times = timed({k: fns[k] for k in ("ours", "diffusers", "compiled") if k in fns}, args.reps, args.warmup)
            print(row(f"{name}, {args.layers} blocks, {dt}", times), flush=True)
            notes.append(f"{name} {dt}: {note}")
            del fns
    print("\n" + "\n".join(f"- {n}" for n in notes))
    if not args.no_vae:
        print("\n| VAE decode, float32 | ours | diffusers | ours / diffusers |\n|---|---|---|---|")
        for vae in args.vaes.split(","):
            latent = VAE_LATENTS[vae]
            print(row(f"{vae}, latent {latent}", timed(vae_fns(vae, latent), args.reps, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
