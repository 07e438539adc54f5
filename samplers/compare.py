"""Compare guidance methods on identical noise and solver: methods x prompts x seeds -> mp4s, labelled grids, tables,
metrics and plots.

    python samplers/compare.py --methods cfg,cfg+stas,dg,stg --out outputs/compare       # embedded tiny default
    python samplers/compare.py --ckpt weights/Wan2.1-T2V-1.3B --prompts prompts.txt --seeds 0,1,2,3,4 --frames 81 \
        --methods 'cfg,cfg+stas,dg,stg,stg-official,cfg-zero*,apg' --dino weights/dino-vitb16 \
        --clip weights/clip-vit-base-patch32 --vbench-export outputs/cmp-vbench --out outputs/cmp

Per (prompt k, seed s), in OUT/p{k}_s{s}/: an mp4 + JSON sidecar per method (cfg-zero* -> cfg-zerostar.mp4; the
sidecar holds every metric, per transition too) and grid.mp4 (all methods side by side, labelled).
In OUT: results.csv (one row per method, prompt, seed), summary.csv (mean over prompts and seeds, and the standard
deviation over seeds), results.md (both tables, with a footnote on every column), transitions.png (per-transition
metric curves, cross-chunk transitions shaded) and summary.png (bars with seed error bars). "X+stas" is method X
with STAS added from the preset; cfg is always run, as the overhead and fidelity baseline. Metrics (minivdit.metrics)
need no downloaded model; --dino / --clip add STAS Table 2's DINO / CLIP frame-pair similarity from local folders.
A study follows the STAS protocol: 5 seeds per prompt (the default --seeds 0,1,2,3,4). --vbench-export DIR lays the
videos out for VBench's custom_input mode and prints the `vbench evaluate` commands (run them in another environment).
"""
import argparse
import csv
import io
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from minivdit.guidance import METHODS, OPTIONS, uses  # noqa: E402
from minivdit.metrics import (BACKBONES, FIDELITY_METRICS, TRANSITION_METRICS, export_vbench,  # noqa: E402
                              load_backbone, mean_std, plot_summary, plot_transitions, transition_columns,
                              video_metrics)
from minivdit.pipeline import (COG_SOLVERS, DTYPES, FAMILIES, SOLVERS, SampleConfig, WanPipeline,  # noqa: E402
                               check_vae, detect_preset, encode_prompts, family_of, find_checkpoint, guidance_for,
                               sidecar, tiny_checkpoint)
from minivdit.video import grid, to_uint8, write_json, write_mp4, write_text  # noqa: E402
from samplers.sample import add_guidance_args  # noqa: E402

KEYS = ("method", "prompt", "seed")
COST = ("passes_per_step", "seconds_per_step", "overhead_vs_cfg")


def metric_columns(backbones=()) -> list[str]:
    """The metric columns of the tables: each transition metric overall / cross-chunk / within-chunk, then fidelity."""
    return transition_columns(["flicker", "diff_energy", "warp_error", "flow_mag", "pixel_cos", *backbones]) + \
        list(FIDELITY_METRICS)


def parse_methods(spec: str) -> list[str]:
    """'cfg,dg+stas' -> ['cfg', 'dg+stas']; cfg is put first if missing. Raises ValueError for an unknown name."""
    labels = [s.strip() for s in spec.split(",") if s.strip()]
    for label in labels:
        method, plus, extra = label.partition("+")
        if method not in METHODS or (plus and extra != "stas"):
            raise ValueError(f"unknown method {label!r} in --methods; choose from {', '.join(METHODS)}, each "
                             "optionally with '+stas' (e.g. cfg+stas)")
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"--methods {spec!r}: give each method once")
    return labels if "cfg" in labels else ["cfg", *labels]


def options_for(label: str, args) -> dict:
    """The guidance options of `args` that the method label ('dg', 'cfg+stas', ...) uses (guidance.OPTIONS)."""
    method, _, stas = label.partition("+")
    return {name: getattr(args, name) for name, _, group, _ in OPTIONS if uses(method, bool(stas), group)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="cfg,cfg+stas,dg,stg", help=f"comma list of {', '.join(METHODS)}, "
                                                                     "each optionally with +stas")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line")
    p.add_argument("--negative-prompt", default=None, help="default: the official Wan negative prompt")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma list of noise seeds (default: 5, the STAS protocol)")
    p.add_argument("--ckpt", default=None, help="checkpoint folder; default: the embedded tiny checkpoint")
    p.add_argument("--preset", default=None, choices=[n for f in FAMILIES.values() for n in f.presets],
                   help="default: detected from the weights")
    for name, typ in (("frames", int), ("height", int), ("width", int), ("steps", int), ("shift", float),
                      ("fps", int), ("guidance-scale", float)):
        p.add_argument(f"--{name}", type=typ, default=None, help="default: the preset's")
    p.add_argument("--solver", default=None, choices=[*SOLVERS, *COG_SOLVERS],
                   help="default: the preset's (Wan: unipc; CogVideoX: ddim for 2B, dpm for 5B / 1.5)")
    p.add_argument("--dynamic-cfg", action=argparse.BooleanOptionalAction, default=None,
                   help="CogVideoX: dynamic CFG (default: the preset's)")
    add_guidance_args(p)  # every option of guidance.OPTIONS, as in sample.py; each goes to the methods that use it
    for kind, (_, _, what) in BACKBONES.items():
        p.add_argument(f"--{kind}", default=None, metavar="DIR", help=f"local {what} folder: adds its frame-pair "
                                                                       "similarity (STAS Table 2)")
    p.add_argument("--flow-size", type=int, default=416, help="longer side in pixels the optical flow and warping "
                                                              "error run at (frames resized; 0: full size)")
    p.add_argument("--vbench-export", default=None, metavar="DIR", help="also lay the videos out for VBench's "
                                                                        "custom_input mode and print the commands")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="DiT weights dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="outputs/compare")
    p.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --out")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_args(argv)


def summarize(rows: list[dict], labels: list[str], columns: list[str]) -> list[dict]:
    """Per method: each column's mean over prompts and seeds and its standard deviation over seeds (of the per-seed
    means over prompts; sample std, None with one seed)."""
    summary = []
    for m in labels:
        mine = [r for r in rows if r["method"] == m]
        seeds = list(dict.fromkeys(r["seed"] for r in mine))
        row = {"method": m}
        for c in columns:
            per_seed = [mean_std([r[c] for r in mine if r["seed"] == s])[0] for s in seeds]
            row[c], row[f"{c}_std"] = mean_std(per_seed)
        summary.append(row)
    return summary


def write_tables(out: Path, rows: list[dict], labels: list[str], steps: int, columns: list[str],
                 flow_size: int | None = None) -> list[dict]:
    """results.csv, summary.csv (mean and std over seeds per method) and results.md with both tables and a footnote
    on every column. Returns the summary rows."""
    columns = [*COST, *columns]
    summary = summarize(rows, labels, columns)
    with_std = [x for c in columns for x in (c, f"{c}_std")]
    for name, table, cols in (("results", rows, (*KEYS, *columns)), ("summary", summary, ("method", *with_std))):
        f = io.StringIO()
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: "n/a" if r[k] is None else r[k] for k in cols} for r in table)
        write_text(out / f"{name}.csv", f.getvalue())
    timing = ("mean wall seconds per step from the per-step callback times, step 1 excluded (warm-up)" if steps > 1
              else "wall seconds of the single step (no warm-up step to exclude)")
    num = lambda v: "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/")[:48]
    cell = lambda r, c: num(r[c]) + ("" if r.get(f"{c}_std") is None or c == "passes_per_step"
                                     else f" ± {r[f'{c}_std']:.2g}")
    heads = {"passes_per_step": "passes/step", "seconds_per_step": "s/step", "overhead_vs_cfg": "overhead vs cfg",
             "psnr_vs_cfg": "PSNR vs cfg", "ssim_vs_cfg": "SSIM vs cfg"}
    head = lambda c: heads.get(c, c.replace("_cross", " (cross)").replace("_within", " (within)"))
    table = lambda cols, table, fmt: ["| " + " | ".join(head(c) for c in cols) + " |", "|" + "---|" * len(cols)] + \
        ["| " + " | ".join(fmt(r, c) for c in cols) + " |" for r in table] + [""]
    seeds = len({r["seed"] for r in rows})
    fidelity = [c for c in columns if c in FIDELITY_METRICS]
    temporal = [c for c in columns if c not in COST and c not in fidelity]
    md = [f"# Guidance comparison\n\n{len({r['prompt'] for r in rows})} prompt(s) x {seeds} seed(s). Summary cells: "
          "mean over prompts and seeds ± the standard deviation over seeds of the per-seed means (sample std; none "
          "with one seed).\n",
          "## Summary: cost and fidelity to cfg\n", *table(["method", *COST, *fidelity], summary, cell),
          "## Summary: temporal metrics (all transitions, cross-chunk, within-chunk)\n",
          *table(["method", *temporal], summary, cell),
          "## All runs\n", *table([*KEYS, *columns], rows, lambda r, c: num(r[c])),
          "## Columns\n",
          f"- s/step: {timing}; overhead vs cfg: s/step / s/step of cfg on the same prompt and seed; passes/step: "
          "model forward passes per sampling step.",
          "- Every temporal metric is computed on the transitions j -> j + 1 of the uint8 frames (before mp4 "
          "encoding): the column is the mean over all transitions, (cross) over cross-chunk transitions (frames "
          "decoded from different latent frames of the VAE: j = 0, s, 2s, ... for temporal stride s), (within) over "
          "the rest (minivdit.metrics).",
          *[f"- {c}: {what}; {better}." for c, (what, better) in TRANSITION_METRICS.items() if c in temporal],
          *([f"- flow_mag and warp_error are computed on frames resized to a longer side of {flow_size} px "
             "(cv2.INTER_AREA) when the video is larger; flow_mag is scaled back to full-size pixels."]
            if flow_size else []),
          *[f"- {head(c)}: {what}; {better}." for c, (what, better) in FIDELITY_METRICS.items()], ""]
    write_text(out / "results.md", "\n".join(md))
    return summary


def write_plots(out: Path, rows: list[dict], labels: list[str], summary: list[dict], columns: list[str]) -> None:
    """transitions.png: per-transition curves per method (mean over prompts and seeds); summary.png: the summary's
    overall and cross-chunk metric columns and fidelity, as bars with seed error bars."""
    curves = {}
    for m in labels:
        mine = [r["curves"] for r in rows if r["method"] == m and r.get("curves")]
        if mine:
            curves[m] = {k: np.nanmean([[np.nan if x is None else x for x in c[k]] for c in mine], axis=0).tolist()
                         for k in mine[0]}
    if curves:
        plot_transitions(curves, next(r["cross"] for r in rows if r.get("cross")), out / "transitions.png")
    shown = [c for c in columns if not c.endswith("_within")]
    plot_summary(summary, ["seconds_per_step", *shown], out / "summary.png")


def main(argv=None):
    args = parse(argv)
    labels = parse_methods(args.methods)  # before anything is read
    prompts = list(args.prompt) + ([s.strip() for s in Path(args.prompts).read_text().splitlines() if s.strip()]
                                   if args.prompts else [])
    prompts = prompts or ["A red fox trots through fresh snow in a pine forest at dawn."]
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {args.seeds}: give each seed once")
    ckpt = args.ckpt or tiny_checkpoint()
    found = find_checkpoint(ckpt)  # cheap checks first
    preset = detect_preset(found, args.preset)  # from the DiT headers (A14B: both experts)
    family = family_of(preset)
    d, c = family.presets[preset], family.presets[preset].config
    run = SampleConfig.from_preset(d, "", negative_prompt=args.negative_prompt, frames=args.frames,
                                   height=args.height, width=args.width, steps=args.steps, shift=args.shift,
                                   solver=args.solver, fps=args.fps, dynamic_cfg=args.dynamic_cfg)
    run.check(family.stride(d), family)
    check_vae(found, preset)
    given = [name for name, *_ in OPTIONS if getattr(args, name) is not None]
    unused = [n for n in given if all(options_for(m, args).get(n) is None for m in labels)]
    if unused:
        raise ValueError(f"{['--' + n.replace('_', '-') for n in unused]} given, but no method in --methods uses "
                         f"{'it' if len(unused) == 1 else 'them'} (see --help: each option names its method)")
    guidances = {m: guidance_for(d, m.partition("+")[0], stas=m.endswith("+stas"), guidance_scale=args.guidance_scale,
                                 **options_for(m, args)) for m in labels}  # A14B: one Guidance per expert
    experts = lambda g: g.values() if isinstance(g, dict) else [g]  # noqa: E731
    for g in guidances.values():
        for e in experts(g):
            e.check(run.steps, c.num_layers, c.dim)
            family.check_guidance(e)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    export = Path(args.vbench_export) if args.vbench_export else None
    if export and export.exists() and any(export.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{export} exists and is not empty; choose another --vbench-export or pass --overwrite")
    backbones = {kind: load_backbone(kind, getattr(args, kind), device=args.device)
                 for kind in BACKBONES if getattr(args, kind)}  # before the DiT: a wrong folder fails early
    columns = metric_columns(backbones)

    negative = family.negative_prompt if args.negative_prompt is None else args.negative_prompt
    contexts = encode_prompts(found, preset, [*prompts, negative], device=args.device)  # (P + 1, 512, text_dim)
    pipe = WanPipeline.load(ckpt, preset, dtype=DTYPES[args.dtype], device=args.device, with_text_encoder=False)
    stride = pipe.vae.time_factor  # the VAE's temporal stride: where the latent-chunk seams are
    rows = []
    for k, prompt in enumerate(prompts):
        context = torch.stack([contexts[k], contexts[-1]])  # (2, 512, text_dim): [cond, uncond], shared by methods
        for sample, seed in enumerate(seeds):
            r = replace(run, prompt=prompt, seed=seed)
            folder, videos, runs = out / f"p{k}_s{seed}", {}, []
            for m, g in guidances.items():
                stamps = [time.perf_counter()]
                latent = pipe.sample(r, g, context=context, progress=False,  # noise from r.seed: the same for every method
                                     callback=lambda info: stamps.append(time.perf_counter()))
                per_step = np.diff(stamps)[1 if r.steps > 1 else 0:]  # step 1 is warm-up
                videos[m] = to_uint8(pipe.vae.decode(latent)[0])  # (T, H, W, 3) uint8
                path = write_mp4(folder / f"{m.replace('*', 'star')}.mp4", videos[m], r.fps, args.overwrite)
                runs.append((m, g, path, stamps[-1] - stamps[0]))
                rows.append({"method": m, "prompt": prompt, "seed": seed, "sample": sample, "video": path,
                             "passes_per_step": next(iter(experts(g))).passes_per_step(), "seconds_per_step": float(per_step.mean()),
                             "overhead_vs_cfg": None})
            write_mp4(folder / "grid.mp4", grid(list(videos.values()), list(guidances)), r.fps, args.overwrite)
            base = next(row for row in rows[-len(labels):] if row["method"] == "cfg")["seconds_per_step"]
            for row, (m, g, path, seconds) in zip(rows[-len(labels):], runs):
                row["overhead_vs_cfg"] = row["seconds_per_step"] / base
                start = time.perf_counter()
                score = video_metrics(videos[m], stride, reference=None if m == "cfg" else videos["cfg"],
                                      backbones=backbones, flow_size=args.flow_size or None) \
                    if len(videos[m]) > 1 else {"columns": dict.fromkeys(columns)}
                row.update(score["columns"], curves=score.get("curves"), cross=score.get("cross"))
                write_json(path.with_suffix(".json"), {**sidecar(pipe, r, g, seconds), "method_label": m,
                                                       "passes_per_step": row["passes_per_step"],
                                                       "seconds_per_step": row["seconds_per_step"],
                                                       "metrics": {**score, "stride": stride,
                                                                   "seconds": time.perf_counter() - start}})
                print(f"[p{k} s{seed}] {m}: {row['seconds_per_step']:.3f} s/step, flicker {row['flicker']}, "
                      f"warp error {row['warp_error']}, PSNR vs cfg {row['psnr_vs_cfg']}")
    summary = write_tables(out, rows, labels, run.steps, columns, args.flow_size or None)
    write_plots(out, rows, labels, summary, columns)
    print(f"wrote {len(rows)} videos, grids, results.csv / summary.csv / results.md, transitions.png and summary.png "
          f"in {out}")
    if export:
        commands = export_vbench(export, [{"method": r["method"], "prompt": r["prompt"], "sample": r["sample"],
                                           "path": r["video"]} for r in rows], overwrite=args.overwrite)
        print(f"VBench layout in {export} (custom_input mode). In an environment with vbench installed "
              f"(not a minivdit dependency), run {export / 'run_vbench.sh'}:\n" + "\n".join(commands))
    return rows


if __name__ == "__main__":
    from minivdit import cli
    cli.run(main)
