"""Seconds per sampling step of CFG, CFG+STAS, CFG+DG, CFG+STG-R, CFG+STG-A and the comparators (PAG, SEG, FDG, TCFG,
MAG, AutoGuidance, CFG++, FlowMo with and without activation checkpointing) on this CPU, real Wan2.1-1.3B size.

    nohup python bench/guidance_speed.py > outputs/guidance_speed.txt 2>&1 &        # bfloat16, as asked
    nohup python bench/guidance_speed.py --dtype float32 --reps 1 --warmup 0 > outputs/guidance_speed.txt 2>&1 &
    python bench/guidance_speed.py --preset wan2.1-tiny --frames 3 --height 16 --width 16 --reps 1   # smoke run
    python bench/guidance_speed.py --reps 2                         # issue 15's table: 30 blocks, bf16 (~45 min)
    python bench/guidance_speed.py --memory                         # FlowMo's peak memory at 30 blocks (~5 min)
    python bench/guidance_speed.py --preset cogvideox-5b --frames 3 --height 30 --width 44 \
        --methods cfg,cfg+stas,cfg+dg,cfg+stg-R,cfg+stg-A --reps 2  # CogVideoX-5B, 42 blocks, 990 + 226 tokens

On a CPU without native bfloat16 matmuls (AVX2 only: no AVX512-BF16 / AMX) a bfloat16 GEMM runs ~7x slower than
float32 (measured here: 3 vs 21 GFLOP/s per thread), so one bfloat16 forward of 1,600 tokens takes tens of minutes
and --dtype float32 is the practical choice; the ratios between methods are what this bench is for.

The real Wan2.1-T2V-1.3B architecture (PRESETS["wan2.1-t2v-1.3b"].config) with seeded random weights in bfloat16
(no checkpoint needed), a latent (1, 16, F, H, W) of F * H/2 * W/2 tokens (default 5 * 16 * 20 = 1,600) and a
context (2, 512, 4096). --preset cogvideox-5b (STAS Table A3's preset, joint [226 text | video] attention) times
the methods CogVideoX defines (cfg, cfg+stas, cfg+dg, cfg+stg-R, cfg+stg-A, PAG, SEG, ...; pick a latent such as
--frames 3 --height 30 --width 44 = 990 video tokens) at step 0 of its 50-step trailing grid (t = 999); its forward
against diffusers is bench/speed.py's. Each method is timed through the pipeline's own denoiser (Pipeline.denoiser):
one batched model call of the [cond, uncond] rows plus the method's branch passes, then the guidance combine; the
median of --reps calls after --warmup calls, at step 0 (inside STAS's first K steps). Guidance settings: the preset's.

What is compared. A branch pass that forks at a block runs only the blocks from its branch point on, on one row,
while CFG runs all N blocks on two rows. With b = the number of blocks the branch runs (DG at m = 9, 0-based: the
zeroing is after block 9, the branch runs blocks 10..29, b = 20 = N - m - 1; STG-R skipping block l = 2: blocks
3..29, b = 27; STG-A at l = 2: blocks 2..29 with block 2's attention map the identity, b = 28), the ideal extra
cost over CFG is b / N of one forward, i.e. a ratio to CFG of 1 + (b / N) / 2. The table prints the measured extra
(ratio - 1) against that ideal (b / N) / 2 and their quotient (the goal: within 5 % of the ideal; STAS: ratio
<= 1.01). The diffusers WanTransformer3DModel forward with the same weights and inputs is a reference point for the
plain [cond, uncond] forward (ours / diffusers).

FlowMo is timed as its optimised step (step 0, t = 999, an official FlowMo timestep): the denoise call plus the
solver's update hook (Pipeline.flowmo_update: two forwards with gradients and their backward). --memory instead prints
FlowMo's peak resident memory above the resident model for one update, without and with activation checkpointing
over blocks (Linux: /proc/self/clear_refs resets the peak, VmHWM reads it; each in a fresh process, so allocator
caches of one run do not hide the other's).
"""
import argparse
import multiprocessing
from dataclasses import replace
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from minivdit import solvers  # noqa: E402
from minivdit.cogvideox import PRESETS as COG_PRESETS, CogVideoXModel  # noqa: E402
from minivdit.guidance import from_preset  # noqa: E402
from minivdit.interventions import branch_point  # noqa: E402
from minivdit.pipeline import SOLVERS, Pipeline  # noqa: E402
from minivdit.wan import PRESETS, WanModel, from_diffusers  # noqa: E402

METHODS = {  # label -> (method, stas, Guidance overrides)
    "cfg": ("cfg", False, {}),
    "cfg+stas": ("cfg", True, {}),
    "cfg+dg": ("dg", False, {}),
    "cfg+stg-R": ("stg", False, {"stg_mode": "R"}),
    "cfg+stg-A": ("stg", False, {"stg_mode": "A"}),
    "pag": ("pag", False, {}),
    "seg": ("seg", False, {}),
    "fdg": ("fdg", False, {}),
    "tcfg": ("tcfg", False, {}),
    "mag": ("mag", False, {}),
    "autoguidance": ("autoguidance", False, {}),
    "cfgpp": ("cfgpp", False, {}),
    "flowmo": ("flowmo", False, {}),
    "flowmo+ckpt": ("flowmo", False, {"flowmo_checkpoint": True}),
}


def peak_rss_mib(fn) -> float:
    """Peak resident memory (MiB) during fn() above the resident memory before it (Linux /proc)."""
    status = lambda key: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key)))  # noqa
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = status("VmRSS:")
    fn()
    return (status("VmHWM:") - before) / 1024


def flowmo_memory(label: str, argv: list[str], queue) -> None:
    """In a fresh process: build the bench model and report the peak RSS of one FlowMo step (denoise + update)."""
    fns, _, _ = setup(parse(argv), [label])
    queue.put(peak_rss_mib(fns[label]))


def median_seconds(fns: dict, reps: int, warmup: int) -> dict:
    """{label: fn} -> {label: (median wall-clock seconds, median process CPU seconds)} of one fn() call.

    Each fn runs `warmup` untimed calls first; the timed calls are interleaved (rep 1 of every fn, then rep 2, ...)
    so that load from other processes on a shared machine falls on all of them alike. CPU seconds are summed over
    threads, so they are ~threads x wall when the machine is otherwise idle and rise less than wall under contention.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
            print(f"  {k}: {wall[k][-1]:.2f} s wall, {cpu[k][-1]:.2f} s CPU", flush=True)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def branch_blocks(guidance, num_layers: int) -> int:
    """How many blocks the branch pass of step 0 runs (0 without a branch): from its branch point on, minus skips."""
    base, branches, _ = guidance.passes(0)
    if not branches:
        return 0
    p = branches[0][1]
    start = branch_point(base, p, num_layers)
    first = start[0] + start[1]  # (i, 1): forks after block i, so it runs from block i + 1
    return sum(1 for i in range(first, num_layers) if not p.inside(i)[0])


def build(make, dtype: torch.dtype) -> torch.nn.Module:
    """make() with parameters created directly in dtype (no float32 copy of 1.3B weights on the way)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return make()
    finally:
        torch.set_default_dtype(default)


def cast(module: torch.nn.Module, dtype: torch.dtype, keep_fp32) -> torch.nn.Module:
    """Cast parameters and buffers to dtype except those `keep_fp32(name)` keeps float32, as each loader does."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if keep_fp32(name) else dtype)
    return module.eval().requires_grad_(False)


def diffusers_reference(model: WanModel, dtype: torch.dtype):
    """diffusers' WanTransformer3DModel of the same config, holding our weights (native -> diffusers names)."""
    from diffusers import WanTransformer3DModel

    c = model.config
    ref = build(lambda: WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.dim // c.num_heads,
        in_channels=c.in_dim, out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim,
        num_layers=c.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=c.eps), dtype)
    ours = model.state_dict()
    ref.load_state_dict({k: ours[from_diffusers(k)] for k in ref.state_dict()}, strict=True)  # copies, casting
    keep = ref._keep_in_fp32_modules  # what diffusers' from_pretrained(torch_dtype=...) keeps float32
    return cast(ref, dtype, lambda name: any(m in name.split(".") for m in keep))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b", choices=[*PRESETS, *COG_PRESETS],
                   help="a Wan or CogVideoX preset (CogVideoX: no diffusers forward here, see bench/speed.py)")
    p.add_argument("--frames", type=int, default=5, help="latent frames F")
    p.add_argument("--height", type=int, default=32, help="latent height (pixels / 8); tokens = F * H/2 * W/2")
    p.add_argument("--width", type=int, default=40, help="latent width (pixels / 8)")
    p.add_argument("--reps", type=int, default=3, help="timed calls per method (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per method first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers reference forward")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma subset of {', '.join(METHODS)}")
    p.add_argument("--layers", type=int, default=None, help="blocks to build (default: the preset's); a per-block "
                                                             "ratio at real width for models too big for this machine")
    p.add_argument("--memory", action="store_true", help="instead of timing: FlowMo's peak memory with / without "
                                                              "checkpointing (each in a fresh process)")
    return p.parse_args(argv)


def setup(args, labels):
    """Build the model and {label: fn() running one step of the method} (+ 'forward'); returns (fns, guidances, c)."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cog = args.preset in COG_PRESETS
    preset = (COG_PRESETS if cog else PRESETS)[args.preset]
    c = preset.config if args.layers is None else replace(preset.config, num_layers=args.layers)

    torch.manual_seed(0)
    if cog:  # CogVideoX loads every tensor in the load dtype (cogvideox.load_cogvideox)
        model = cast(build(lambda: CogVideoXModel(c), dtype), dtype, lambda name: False)
        in_dim, text = c.in_channels, (c.max_text_seq_length, c.text_embed_dim)
        args.no_diffusers = True
    else:
        keep = lambda name: any(s in name for s in WanModel.keep_fp32)  # what load_wan keeps float32
        model = cast(build(lambda: WanModel(c), dtype), dtype, keep)
        in_dim, text = c.in_dim, (c.text_len, c.text_dim)
    pipe = Pipeline(model, None, None, None, args.preset, {})  # the denoiser needs only the DiT
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, in_dim, args.frames, args.height, args.width, generator=g)  # (1, C, F, H, W)
    context = torch.randn(2, *text, generator=g)  # (2, text_len, text_dim): [cond, uncond]
    # the preset's own grid (Wan: official UniPC sigmas, step 0 = t 999; CogVideoX: trailing timesteps, 999 first)
    sigmas = solvers.cogvideox_timesteps(preset.steps) if cog else SOLVERS["unipc"][1](preset.steps, preset.shift)
    tokens = model.layout(x.shape).num_tokens
    dim = c.num_attention_heads * c.attention_head_dim if cog else c.dim
    print(f"{args.preset}: {c.num_layers} blocks, dim {dim}, {args.dtype}; latent {tuple(x.shape)} = {tokens} "
          f"tokens; context {tuple(context.shape)}; {torch.get_num_threads()} threads; median of {args.reps} after "
          f"{args.warmup} warm-up", flush=True)

    guidances = {label: from_preset(preset, *METHODS[label][:2], **METHODS[label][2]) for label in labels}
    t2 = torch.full((2,), 999, dtype=torch.int64)
    x2 = x.expand(2, *x.shape[1:])  # (2, C, F, H, W): the [cond, uncond] rows
    fns = {}
    for label, guidance in guidances.items():
        denoise = pipe.denoiser(context, guidance, sigmas)
        update = pipe.flowmo_update(context, guidance, sigmas)  # None but for FlowMo

        def step(denoise=denoise, update=update):
            with torch.no_grad():
                denoise(x, sigmas[0].item())
                if update is not None:
                    update(x, sigmas[0].item())
        fns[label] = step
    fns["forward"] = torch.no_grad()(lambda: model(x2, t2, context))
    if not args.no_diffusers:
        ref = diffusers_reference(model, dtype)
        xr, cr = x2.to(dtype), context.to(dtype)  # diffusers' WanPipeline casts latents and embeds so
        fns["diffusers"] = torch.no_grad()(
            lambda: ref(hidden_states=xr, timestep=t2, encoder_hidden_states=cr, return_dict=False))
    return fns, guidances, c


def main(argv=None):
    args = parse(argv)
    if args.memory:  # FlowMo's peak memory, each setting in a fresh process (this one holds no model meanwhile)
        ctx = multiprocessing.get_context("spawn")
        argv = [*(argv if argv is not None else sys.argv[1:]), "--no-diffusers"]
        print("| FlowMo step | peak RSS above the resident model (MiB) |\n|---|---|")
        for label in ("flowmo", "flowmo+ckpt"):
            queue = ctx.Queue()
            proc = ctx.Process(target=flowmo_memory, args=(label, argv, queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                sys.exit(f"{label}: the measuring process died (exit code {proc.exitcode}; out of memory?)")
            mib = queue.get()
            print(f"| {label} | {mib:.0f} |", flush=True)
        return None
    fns, guidances, c = setup(args, args.methods.split(","))
    times = median_seconds(fns, args.reps, args.warmup)
    rows = [(label, g.passes_per_step(), *times[label], branch_blocks(g, c.num_layers))
            for label, g in guidances.items()]
    cfg_wall, cfg_cpu = rows[0][2:4]
    print("\n| method | passes/step | s/step | ratio to CFG | extra = ratio - 1 | ideal extra = b/N/2 | "
          "extra / ideal | CPU s/step | CPU ratio |\n|---|---|---|---|---|---|---|---|---|")
    for label, passes, wall, cpu, b in rows:
        extra, ideal = wall / cfg_wall - 1, b / c.num_layers / 2
        cmp = f"{extra:+.4f} | {ideal:.4f} (b={b}) | {extra / ideal:.3f}" if b else f"{extra:+.4f} | - | -"
        print(f"| {label} | {passes} | {wall:.2f} | {wall / cfg_wall:.4f} | {cmp} | {cpu:.2f} | {cpu / cfg_cpu:.4f} |")
    ours = times["forward"][0]
    line = f"\nplain [cond, uncond] forward: ours {ours:.2f} s"
    if "diffusers" in times:
        ref_s = times["diffusers"][0]
        line += f", diffusers {ref_s:.2f} s, ours / diffusers = {ours / ref_s:.3f}"
    print(line)
    return rows, times


if __name__ == "__main__":
    main()
