"""Massive-activation analysis of a Wan DiT (STAS Appendix A.1-A.2): streaming statistics over prompts, a JSON
report and Fig. 1e / 2a / 2b-style plots, plus the flags that feed the MA channels found to STAS / DG.

    python samplers/analyze.py --out outputs/ma-tiny                 # embedded tiny default (random weights)
    python samplers/analyze.py --ckpt weights/Wan2.1-T2V-1.3B --prompts prompts.txt --frames 81 --out outputs/ma
    torchrun --nproc-per-node 4 samplers/analyze.py --ckpt weights/Wan2.1-T2V-1.3B --prompts prompts.txt --out o/ma

Under torchrun the prompts are split over the ranks (prompt k keeps seed + k); each rank streams its statistics and
they are summed over ranks with all_reduce before rank 0 writes the report (MAStats.reduce: every statistic is a sum
or a count, so N ranks give the one-process report up to float64 summation order).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dataclasses import replace  # noqa: E402


from minivdit import distributed  # noqa: E402
from minivdit.analysis import MAStats, write_plots  # noqa: E402
from minivdit.guidance import Guidance  # noqa: E402
from minivdit.pipeline import (SampleConfig, WanPipeline, detect_preset, encode_prompts, family_of,  # noqa: E402
                               find_checkpoint, tiny_checkpoint)
from minivdit.report import write_report  # noqa: E402
from minivdit.text import read_prompts  # noqa: E402
from minivdit.video import write_json  # noqa: E402
from samplers.sample import check_device  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint folder (default: the embedded tiny checkpoint)")
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line, # comments (default: none)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: one fox prompt if neither --prompt nor --prompts)")
    for name, what in (("frames", "frames, 4k+1"), ("height", "pixels, a multiple of the model's stride"),
                       ("width", "pixels, a multiple of the model's stride"), ("steps", "sampling steps >= 1")):
        p.add_argument(f"--{name}", type=int, default=None, help=f"{what} (default: the preset's)")
    p.add_argument("--shift", type=float, default=None, help="flow shift > 0 (default: the preset's)")
    p.add_argument("--blocks", type=int, nargs="+", default=None, help="blocks to record, 0-based (default: all)")
    p.add_argument("--p", type=float, default=8.0, help="boundary width B(p), percent of a latent frame's tokens per side (default: %(default)s)")
    p.add_argument("--a1", default=None, help="STAS App. A.1-order slots 'step:block,...' (0-based; mean |h| over "
                                              "prompts, then max over tokens: Table A1's columns); default 5:15 "
                                              "when the run has them, 'none' to skip")
    p.add_argument("--seed", type=int, default=0, help="noise seed, an integer >= 0; prompt k uses seed + k (default: %(default)s)")
    p.add_argument("--plot-step", type=int, default=None, help="step (0-based) of the plots (default: min(5, steps - 1))")
    p.add_argument("--plot-block", type=int, default=None, help="block (0-based) of the plots (default: the middle recorded block)")
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:N (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--out", default="outputs/ma-analysis", help="output folder: report.json, PNGs, report.html (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report (default: refuse)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (default: off, eager)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (default: off)")
    return p


def parse(argv=None):
    return parser().parse_args(argv)


def main(argv=None):
    args = parse(argv)
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    prompts = prompts or ["A red fox trots through fresh snow in a pine forest at dawn."]
    out = Path(args.out)
    if (out / "report.json").exists() and not args.overwrite:
        raise FileExistsError(f"{out / 'report.json'} already exists; choose another --out or pass --overwrite")

    ckpt = args.ckpt or tiny_checkpoint()
    found = find_checkpoint(ckpt)
    preset = detect_preset(found)  # every check below runs on the headers, before the load
    family = family_of(preset)
    d, c = family.presets[preset], family.presets[preset].config
    pick = lambda v, default: default if v is None else v
    runs = [SampleConfig.from_preset(d, t, frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                                     shift=args.shift, seed=args.seed + k) for k, t in enumerate(prompts)]
    runs[0].check(family.stride(d), family)
    blocks = pick(args.blocks, list(range(c.num_layers)))
    if any(not 0 <= b < c.num_layers for b in blocks):
        raise ValueError(f"--blocks {blocks}: the model has blocks 0..{c.num_layers - 1}")
    if args.a1 is None:  # Table A1's slot (block 15, step 5) when this run records it
        a1 = [(5, 15)] if runs[0].steps > 5 and 15 in blocks else []
    else:
        a1 = [] if args.a1 == "none" else [tuple(int(v) for v in pair.split(":")) for pair in args.a1.split(",")]
    for step, block in [*a1, (args.plot_step, args.plot_block)]:
        if step is not None and not 0 <= step < runs[0].steps:
            raise ValueError(f"step {step} (--a1 / --plot-step) is outside the run's steps 0..{runs[0].steps - 1}")
        if block is not None and block not in blocks:
            raise ValueError(f"block {block} (--a1 / --plot-block) is not recorded; recorded blocks: {blocks}")
    device = distributed.init(check_device(args.device))
    rank, world = distributed.rank(), distributed.world()
    owner = distributed.assign([1] * len(runs), world)  # equal costs: prompt 0 goes to rank 0
    mine = [k for k in range(len(runs)) if owner[k] == rank or k == 0]  # prompt 0: the profile channels
    # each prompt with the negative prompt, as sample.py encodes it; the text encoder is freed before the DiT loads
    contexts = dict(zip(mine, encode_prompts(found, preset, [(runs[k].prompt, family.negative(runs[k])) for k in mine],
                                             device=device)))
    pipe = WanPipeline.load(ckpt, preset, device=device, with_text_encoder=False, compile=args.compile)
    layout = pipe.model.layout(family.latent(runs[0], d)[0])  # the latent the DiT runs on (CogVideoX1.5: padded)
    names = [e.name for e in d.experts] or [""]  # A14B: one set of statistics per expert (MA channels are per network)
    stats = {n: MAStats(layout, c.dim, blocks, runs[0].steps, p=args.p, a1_slots=a1) for n in names}
    guidance = {e.name: Guidance(method="cfg", guidance_scale=e.guidance_scale, capture=stats[e.name])
                for e in d.experts} or Guidance(method="cfg", guidance_scale=d.guidance_scale, capture=stats[""])
    if world > 1 and owner[0] != rank:  # pick the profile channels from prompt 0, as one process does
        for name, dims in first_capture_dims(pipe, runs[0], contexts[0], guidance, blocks).items():
            stats[name].profile_dims = dims
    for k, run in enumerate(runs):
        if owner[k] != rank:
            continue
        print(f"[rank {rank}/{world}] [{k + 1}/{len(runs)}] {run.prompt[:70]}")
        pipe.sample(run, guidance, context=contexts[k],
                    callback=lambda info: [s.next_step(info) for s in stats.values()])
    for st in stats.values():
        st.reduce()  # sums over ranks (no-op in one process); every rank then holds the totals
    if not distributed.is_main():
        return None

    reports = {}
    for name, st in stats.items():
        if not bool((st.rows > 0).any()):
            print(f"expert {name!r} ran no step of this grid: no statistics")
            continue
        report = reports[name] = st.report()
        report["run"] = {"checkpoint": pipe.info["checkpoint"], "preset": pipe.info["preset"], "prompts": prompts,
                         "frames": runs[0].frames, "height": runs[0].height, "width": runs[0].width,
                         "steps": runs[0].steps, "seed": args.seed, "expert": name or None}
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        pngs = write_plots(st, report, folder, args.plot_step, args.plot_block)
        print(f"{'expert ' + name + ': ' if name else ''}{len(pngs)} plots in {folder}")
        for slot in report["a1"]:
            print(f"A.1 (step {slot['step']}, block {slot['block']}, {slot['prompts']} prompts): " + "; ".join(
                f"{kind} {e['dim']}: max {e['peak']:.4g}, peak/mean {e['peak_to_mean']:.3g}, peak/median "
                f"{e['peak_to_median']:.3g}" for kind in ("ma", "weak_ma") for e in slot[kind]) or "no MA / weak-MA")
        steer = f" --steer-experts {name}" if name else ""
        if report["ma_channels"]:
            print(f"MA channels (peak > {report['protocol']['ratio']:g}x mean peak): {report['ma_channels']}")
            print(f"STAS: {report['stas_flags']}{steer}\nDG:   {report['dg_flags']}{steer}")
        else:
            print(f"no MA channel (peak > {report['protocol']['ratio']:g}x mean peak) found; the strongest channel is "
                  f"{report['lead_dim']} (see report.json)")
    report = reports[""] if names == [""] else {"experts": reports}
    write_json(out / "report.json", report)
    write_report(out)  # report.html: MA tables, plots and the flags to copy
    print(f"wrote {out / 'report.json'}")
    return report


class _Probed(Exception):
    """Stops the probe run once every expert's recorded blocks were captured once."""


def first_capture_dims(pipe, run, context, guidance, blocks) -> dict[str, list[int]]:
    """For a rank that does not sample prompt 0: the profile channel MAStats picks per block (the largest peak of
    the cond row at the block's first capture, i.e. on prompt 0), per expert name ('' for one DiT). Runs prompt 0
    only until every expert has captured every recorded block (one forward for a one-DiT model)."""
    names = list(guidance) if isinstance(guidance, dict) else [""]
    dims: dict[str, dict[int, int]] = {n: {} for n in names}

    def capture(name):
        def record(block, h):
            if block in blocks and block not in dims[name]:
                dims[name][block] = int(h[0].abs().amax(dim=0).argmax())
            if all(len(dims[n]) == len(set(blocks)) for n in names):
                raise _Probed
        return record
    probe = {n: replace(g, capture=capture(n)) for n, g in guidance.items()} if isinstance(guidance, dict) \
        else replace(guidance, capture=capture(""))
    try:
        pipe.sample(run, probe, context=context, progress=False)
    except _Probed:
        pass
    return {n: [dims[n][b] for b in blocks] for n in names}


if __name__ == "__main__":
    from minivdit import cli
    cli.run(main)
