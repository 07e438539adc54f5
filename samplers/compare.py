"""Compare guidance methods on identical noise and solver: methods x prompts x seeds -> mp4s, labelled grids, tables.

    python samplers/compare.py --methods cfg,cfg+stas,dg,stg --out outputs/compare       # embedded tiny default
    python samplers/compare.py --ckpt weights/Wan2.1-T2V-1.3B --prompts prompts.txt --seeds 0,1 --frames 33 \
        --methods 'cfg,cfg+stas,dg,stg,stg-official,cfg-zero*,apg' --features weights/dinov2-base --out outputs/cmp

Per (prompt k, seed s), in OUT/p{k}_s{s}/: an mp4 + JSON sidecar per method (cfg-zero* -> cfg-zerostar.mp4) and
grid.mp4 (all methods side by side, labelled).
In OUT: results.csv (one row per method, prompt, seed), summary.csv (averaged over prompts and seeds) and results.md
(both tables). "X+stas" is method X with STAS added from the preset; cfg is always run, as the overhead baseline.
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

from minivdit.analysis import frame_consistency, hf_image_features  # noqa: E402
from minivdit.guidance import METHODS, OPTIONS, from_preset, uses  # noqa: E402
from minivdit.pipeline import (DTYPES, SOLVERS, SampleConfig, WanPipeline, encode_prompts,  # noqa: E402
                               find_checkpoint, noise, sidecar, tiny_checkpoint)
from minivdit.text import NEGATIVE_PROMPT  # noqa: E402
from minivdit.video import grid, to_uint8, write_json, write_mp4, write_text  # noqa: E402
from minivdit.wan import PRESETS, open_wan  # noqa: E402
from samplers.t2v import add_guidance_args  # noqa: E402

COLUMNS = ("method", "prompt", "seed", "passes_per_step", "seconds_per_step", "overhead_vs_cfg", "cross_chunk",
           "within_chunk", "all")


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
    p.add_argument("--seeds", default="0", help="comma list of noise seeds")
    p.add_argument("--ckpt", default=None, help="checkpoint folder; default: the embedded tiny checkpoint")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="default: detected from the weights")
    for name, typ in (("frames", int), ("height", int), ("width", int), ("steps", int), ("shift", float),
                      ("fps", int), ("guidance-scale", float)):
        p.add_argument(f"--{name}", type=typ, default=None, help="default: the preset's")
    p.add_argument("--solver", default="unipc", choices=list(SOLVERS))
    add_guidance_args(p)  # every option of guidance.OPTIONS, as in t2v.py; each goes to the methods that use it
    p.add_argument("--features", default=None, help="local DINO / CLIP folder for frame consistency (default: pixels)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="DiT weights dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="outputs/compare")
    p.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --out")
    return p.parse_args(argv)


def write_tables(out: Path, rows: list[dict], labels: list[str], steps: int) -> None:
    """results.csv, summary.csv (means over prompts and seeds per method) and results.md with both tables."""
    mean = lambda xs: float(np.mean(xs)) if xs and None not in xs else None
    summary = [{"method": m, **{k: mean([r[k] for r in rows if r["method"] == m]) for k in COLUMNS[3:]}}
               for m in labels]
    for name, table, cols in (("results", rows, COLUMNS), ("summary", summary, ("method", *COLUMNS[3:]))):
        f = io.StringIO()
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: "n/a" if r[k] is None else r[k] for k in cols} for r in table)
        write_text(out / f"{name}.csv", f.getvalue())
    timing = ("mean wall seconds per step from the per-step callback times, step 1 excluded (warm-up)" if steps > 1
              else "wall seconds of the single step (no warm-up step to exclude)")
    cell = lambda v: "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/")[:48]
    md = [f"# Guidance comparison\n\ns/step: {timing}. overhead: s/step / s/step of cfg on the same prompt and "
          "seed. cross / within / all: mean cosine similarity of consecutive frames across latent-chunk seams, "
          "inside chunks, and overall (minivdit.analysis.frame_consistency).\n"]
    heads = {"passes_per_step": "passes/step", "seconds_per_step": "s/step", "overhead_vs_cfg": "overhead vs cfg",
             "cross_chunk": "cross-chunk", "within_chunk": "within-chunk"}
    for title, table, cols in (("Summary (mean over prompts and seeds)", summary, ("method", *COLUMNS[3:])),
                               ("All runs", rows, COLUMNS)):
        md += [f"## {title}\n", "| " + " | ".join(heads.get(c, c) for c in cols) + " |",
               "|" + "---|" * len(cols)] + ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in table] + [""]
    write_text(out / "results.md", "\n".join(md))


def main(argv=None):
    args = parse(argv)
    labels = parse_methods(args.methods)  # before anything is read
    prompts = list(args.prompt) + ([s.strip() for s in Path(args.prompts).read_text().splitlines() if s.strip()]
                                   if args.prompts else [])
    prompts = prompts or ["A red fox trots through fresh snow in a pine forest at dawn."]
    seeds = [int(s) for s in args.seeds.split(",")]
    ckpt = args.ckpt or tiny_checkpoint()
    found = find_checkpoint(ckpt)  # cheap checks first
    _, _, preset, _ = open_wan(found["transformer"], args.preset)
    d, c = PRESETS[preset], PRESETS[preset].config
    run = SampleConfig.from_preset(d, "", negative_prompt=args.negative_prompt, frames=args.frames,
                                   height=args.height, width=args.width, steps=args.steps, shift=args.shift,
                                   solver=args.solver, fps=args.fps)
    run.check()
    given = [name for name, *_ in OPTIONS if getattr(args, name) is not None]
    unused = [n for n in given if all(options_for(m, args).get(n) is None for m in labels)]
    if unused:
        raise ValueError(f"{['--' + n.replace('_', '-') for n in unused]} given, but no method in --methods uses "
                         f"{'it' if len(unused) == 1 else 'them'} (see --help: each option names its method)")
    guidances = {m: from_preset(d, m.partition("+")[0], stas=m.endswith("+stas"), guidance_scale=args.guidance_scale,
                                **options_for(m, args)) for m in labels}
    for g in guidances.values():
        g.check(run.steps, c.num_layers, c.dim)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")

    negative = NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
    contexts = encode_prompts(found, preset, [*prompts, negative], device=args.device)  # (P + 1, 512, text_dim)
    pipe = WanPipeline.load(ckpt, preset, dtype=DTYPES[args.dtype], device=args.device, with_text_encoder=False)
    features = hf_image_features(args.features, device=args.device) if args.features else None
    rows = []
    for k, prompt in enumerate(prompts):
        context = torch.stack([contexts[k], contexts[-1]])  # (2, 512, text_dim): [cond, uncond], shared by methods
        for seed in seeds:
            r = replace(run, prompt=prompt, seed=seed)
            x = noise(r.latent_shape(c.in_dim), seed)  # the same initial noise for every method
            folder, videos = out / f"p{k}_s{seed}", []
            for m, g in guidances.items():
                stamps = [time.perf_counter()]
                latent = pipe.sample(r, g, context=context, x=x.clone(), progress=False,
                                     callback=lambda info: stamps.append(time.perf_counter()))
                per_step = np.diff(stamps)[1 if r.steps > 1 else 0:]  # step 1 is warm-up
                video = pipe.vae.decode(latent)[0]  # (3, T, H, W) in [-1, 1]
                score = frame_consistency(video, features=features) if video.shape[1] > 1 else {}
                videos.append(to_uint8(video))
                path = write_mp4(folder / f"{m.replace('*', 'star')}.mp4", videos[-1], r.fps, args.overwrite)
                rows.append({"method": m, "prompt": prompt, "seed": seed, "passes_per_step": g.passes_per_step(),
                             "seconds_per_step": float(per_step.mean()), "overhead_vs_cfg": None,
                             **{key: score.get(key) for key in ("cross_chunk", "within_chunk", "all")}})
                write_json(path.with_suffix(".json"), {**sidecar(pipe, r, g, stamps[-1] - stamps[0]),
                                                       "method_label": m, "passes_per_step": g.passes_per_step(),
                                                       "seconds_per_step": rows[-1]["seconds_per_step"],
                                                       "consistency": score})
                print(f"[p{k} s{seed}] {m}: {rows[-1]['seconds_per_step']:.3f} s/step, consistency {score.get('all')}")
            write_mp4(folder / "grid.mp4", grid(videos, list(guidances)), r.fps, args.overwrite)
            base = next(row for row in rows[-len(labels):] if row["method"] == "cfg")["seconds_per_step"]
            for row in rows[-len(labels):]:
                row["overhead_vs_cfg"] = row["seconds_per_step"] / base
    write_tables(out, rows, labels, run.steps)
    print(f"wrote {len(rows)} videos, grids and results.csv / summary.csv / results.md in {out}")
    return rows


if __name__ == "__main__":
    main()
