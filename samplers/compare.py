r"""Compare guidance methods on identical noise and solver: a sweep of method specs x prompts x seeds -> mp4s,
labelled grids, tables, metrics and plots; resumable, and data parallel under torchrun.

    python samplers/compare.py --method 'cfg;cfg+stas;dg;stg' --out outputs/compare      # embedded tiny default
    python samplers/compare.py --method 'stg:mode=R|A' --method 'cfg+stas:alpha=1|2|3,p=8' --seeds 0,1 --out o/sw
    torchrun --nproc-per-node 8 samplers/compare.py --ckpt weights/Wan2.1-T2V-1.3B --prompts prompts.txt \
        --method 'cfg;cfg+stas;dg;stg;stg-official;cfg-zero*;apg' --frames 81 --dino weights/dino-vitb16 \
        --clip weights/clip-vit-base-patch32 --vbench-export outputs/cmp-vbench --out outputs/cmp

Method specs (--method, repeatable; ';' separates specs):
{grammar}

NAME: a guidance flag below without '--' and its method prefix (alpha = --stas-alpha, scale under dg = --dg-scale,
mode under stg = --stg-mode), or in full with '_' (stas_block, dg_block: needed where a run has both), or
guidance_scale. Labels (file names, grid captions, table rows): the method and its parameters as written,
'cfg+stas:alpha=1|2' -> cfg+stas_alpha=1, cfg+stas_alpha=2. cfg is always run, as the overhead and fidelity
baseline of each (prompt, seed). Guidance flags (--stas-steps, --dg-scale, ...) apply to every run whose method uses
them; a spec's parameter overrides the flag for its runs; a flag no run uses is an error naming its method.

The sweep is a list of jobs (prompt k, seed s, run label). Job outputs in OUT/p{{k}}_s{{s}}/: LABEL.mp4 + LABEL.json
(the sidecar: settings, the job it belongs to, per-step times, every metric, per transition too; cfg-zero* ->
cfg-zerostar) and grid.mp4 (all runs of the prompt and seed side by side, labelled). Re-running the same command skips
every job whose sidecar matches (resume after Ctrl-C or a lost node); a sidecar written with other settings is an
error unless --overwrite, which redoes the jobs. OUT/results.csv (one row per job), summary.csv (mean over prompts and
seeds, standard deviation over seeds), results.md (both tables, a footnote on every column), transitions.png and
summary.png are rebuilt from the sidecars on disk at the end of every run.

Many processes: under `torchrun --nproc-per-node N` each rank loads the model once, encodes only its prompts and runs
its share of the jobs (distributed.assign: balanced model passes); after a barrier the ranks compute PSNR / SSIM vs
cfg and the grids, and rank 0 writes the tables. Without torchrun: the same code with one process.
Metrics (minivdit.metrics) need no downloaded model; --dino / --clip add STAS Table 2's DINO / CLIP frame-pair
similarity from local folders. A study follows the STAS protocol: 5 seeds per prompt (the default --seeds 0,1,2,3,4).
--vbench-export DIR lays the videos out for VBench's custom_input mode and prints the `vbench evaluate` commands.
"""
import argparse
import csv
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import imageio.v2 as imageio  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from minivdit import distributed  # noqa: E402
from minivdit.guidance import OPTIONS, uses  # noqa: E402
from minivdit.metrics import (BACKBONES, FIDELITY_METRICS, TRANSITION_METRICS, export_vbench,  # noqa: E402
                              fidelity, load_backbone, mean_std, plot_summary, plot_transitions, transition_columns,
                              video_metrics)
from minivdit.pipeline import (DTYPES, FAMILIES, SampleConfig, WanPipeline,  # noqa: E402
                               check_vae, detect_preset, encode_prompts, family_of, find_checkpoint,
                               guidance_for, prompt_tokens, sidecar, tiny_checkpoint)
from minivdit.report import write_report  # noqa: E402
from minivdit.specs import GRAMMAR, Spec, filename, parse_specs  # noqa: E402
from minivdit.text import load_tokenizer, read_prompts  # noqa: E402
from minivdit.video import grid, to_uint8, write_json, write_mp4, write_text  # noqa: E402
from samplers.sample import add_guidance_args, add_run_args, check_device  # noqa: E402

KEYS = ("method", "prompt", "seed")
COST = ("passes_per_step", "seconds_per_step", "overhead_vs_cfg")
DEFAULT_METHODS = "cfg;cfg+stas;dg;stg"


def metric_columns(backbones=()) -> list[str]:
    """The metric columns of the tables: each transition metric overall / cross-chunk / within-chunk, then fidelity."""
    return transition_columns(["flicker", "diff_energy", "warp_error", "flow_mag", "pixel_cos", *backbones]) + \
        list(FIDELITY_METRICS)


def parse_methods(texts) -> list[Spec]:
    """Method specs (minivdit.specs) -> the sweep's runs, a plain 'cfg' run first (added if missing: the baseline).
    Raises ValueError for an unknown method or parameter, a bad value, duplicate labels."""
    runs = parse_specs(texts)
    base = [r for r in runs if r.label == "cfg"]
    return base + [r for r in runs if r.label != "cfg"] if base else [Spec("cfg", "cfg"), *runs]


def options_for(run: Spec, args) -> dict:
    """The guidance flags of `args` that the run's method uses (guidance.OPTIONS), overridden by its spec's
    parameters."""
    flags = {name: getattr(args, name) for name, _, group, _ in OPTIONS if uses(run.method, run.stas, group)}
    return {**flags, **run.params}


def check_flags(runs: list[Spec], args) -> None:
    """Raise ValueError for a guidance flag that no run of the sweep uses, naming the method it belongs to."""
    unused = [(name, group) for name, _, group, _ in OPTIONS if getattr(args, name) is not None
              and not any(uses(r.method, r.stas, group) for r in runs)]
    if unused:
        raise ValueError("; ".join(f"--{n.replace('_', '-')} belongs to method {g!r}" + (" (add +stas to a method)"
                                   if g == "stas" else "") for n, g in unused) +
                         f", which no run of this sweep uses (runs: {', '.join(r.label for r in runs)}); add it to "
                         "--method or drop the option")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.format(grammar=GRAMMAR),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", "--methods", dest="methods", action="append", default=None, metavar="SPEC",
                   help=f"method specs (grammar above), repeatable, ';' separates specs (default: {DEFAULT_METHODS})")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: one fox prompt if neither --prompt nor --prompts)")
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line, # comments (default: none)")
    p.add_argument("--negative-prompt", default=None, help="default: the family's (Wan: the official negative prompt; CogVideoX: \"\")")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma list of noise seeds, integers >= 0 (default: %(default)s, the STAS protocol's 5)")
    p.add_argument("--ckpt", default=None, help="checkpoint folder (default: the embedded tiny checkpoint)")
    p.add_argument("--preset", default=None, choices=[n for f in FAMILIES.values() for n in f.presets],
                   help="default: detected from the weights")
    add_run_args(p)  # as in sample.py
    add_guidance_args(p)  # every option of guidance.OPTIONS, as in sample.py; each goes to the runs that use it
    for kind, (_, _, what) in BACKBONES.items():
        p.add_argument(f"--{kind}", default=None, metavar="DIR", help=f"local {what} folder: adds its frame-pair "
                                                                       "similarity (STAS Table 2) (default: none)")
    p.add_argument("--flow-size", type=int, default=416, help="longer side in pixels the optical flow and warping "
                                                              "error run at (frames resized; 0: full size) (default: %(default)s)")
    p.add_argument("--vbench-export", default=None, metavar="DIR", help="also lay the videos out for VBench's "
                                                                        "custom_input mode and print the commands (default: none)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="DiT weights dtype (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:N; under torchrun cuda means cuda:LOCAL_RANK (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--out", default="outputs/compare", help="output folder; a re-run resumes in it (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="redo every job, also those done with other settings "
                                                            "(default: skip done jobs, refuse changed ones)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (default: off)")
    return p


def parse(argv=None):
    return parser().parse_args(argv)


@dataclass(frozen=True)
class Job:
    """One video of the sweep: prompt k, seed (its index `sample` among the seeds), run label."""
    k: int
    prompt: str
    seed: int
    sample: int
    label: str

    def folder(self, out: Path) -> Path:
        return out / f"p{self.k}_s{self.seed}"

    def path(self, out: Path) -> Path:
        return self.folder(out) / f"{filename(self.label)}.mp4"


def as_json(x):
    return json.loads(json.dumps(x, default=str))


def job_key(job: Job, run: SampleConfig, guidance, ckpt, preset: str, dtype: str) -> dict:
    """What a job's sidecar must record to count as done: the run label, checkpoint, preset, dtype, sampling settings
    and guidance (device and timings may differ)."""
    g = {k: asdict(v) for k, v in guidance.items()} if isinstance(guidance, dict) else asdict(guidance)
    return as_json({"label": job.label, "checkpoint": str(Path(ckpt).resolve()), "preset": preset, "dtype": dtype,
                    "run": asdict(replace(run, prompt=job.prompt, seed=job.seed)), "guidance": g})


def read_sidecar(path: Path) -> dict | None:
    try:
        return json.loads(path.with_suffix(".json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def frames_of(path: Path) -> np.ndarray:
    """The (T, H, W, 3) uint8 frames of an mp4 as decoded from disk."""
    return np.stack(imageio.mimread(path, memtest=False))


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
    timing = ("the median over the run's steps of the wall seconds per step (per-step callback times), step 1 excluded "
              "(warm-up): a median holds against a few steps slowed down by other work on the machine; under "
              "torchrun each rank times its own jobs while the other ranks run theirs" if steps > 1
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
          *[f"- {head(c)}: {what}; {better}." for c, (what, better) in FIDELITY_METRICS.items()],
          "- PSNR / SSIM vs cfg compare the frames as decoded from both mp4 files (the cfg video may have been made by "
          "another process), so they include H.264 coding differences.", ""]
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
    device = distributed.init(check_device(args.device))  # torchrun: join the group (cuda -> cuda:LOCAL_RANK)
    runs = parse_methods(args.methods or [DEFAULT_METHODS])  # before anything is read
    labels = [r.label for r in runs]
    check_flags(runs, args)
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
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
    run = replace(run, negative_prompt=family.negative(run))
    guidances = {}  # label -> Guidance (A14B: one per expert)
    for r in runs:
        o = options_for(r, args)
        guidances[r.label] = guidance_for(d, r.method, stas=r.stas, **{"guidance_scale": args.guidance_scale, **o})
    experts = lambda g: list(g.values()) if isinstance(g, dict) else [g]  # noqa: E731
    for g in guidances.values():
        for e in experts(g):
            e.check(run.steps, c.num_layers, c.dim)
            family.check_guidance(e)
    out, export = Path(args.out), Path(args.vbench_export) if args.vbench_export else None
    if export and export.exists() and any(export.iterdir()) and not (export / "run_vbench.sh").exists() \
            and not args.overwrite:
        raise FileExistsError(f"{export} is not empty and holds no earlier VBench export; choose another "
                              "--vbench-export or pass --overwrite")
    backbones = {kind: load_backbone(kind, getattr(args, kind), device=device)
                 for kind in BACKBONES if getattr(args, kind)}  # before the DiT: a wrong folder fails early
    columns = metric_columns(backbones)

    # the jobs, and which of them are done (their sidecar records the same job); every rank reads the same disk
    jobs = [Job(k, p, seed, i, m) for k, p in enumerate(prompts) for i, seed in enumerate(seeds) for m in labels]
    keys = {j: job_key(j, run, guidances[j.label], ckpt, preset, args.dtype) for j in jobs}
    sides = {j: read_sidecar(j.path(out)) for j in jobs}
    stale = [j for j in jobs if sides[j] is not None and sides[j].get("job") != keys[j]]
    if stale and not args.overwrite:
        raise FileExistsError(f"{len(stale)} job(s) in {out} were run with other settings (e.g. "
                              f"{stale[0].path(out).with_suffix('.json')}); pass --overwrite to redo them or choose "
                              "another --out")
    todo = [j for j in jobs if args.overwrite or sides[j] is None]
    base = lambda j: Job(j.k, j.prompt, j.seed, j.sample, "cfg")  # noqa: E731
    refit = [j for j in jobs if j.label != "cfg" and (j in todo or base(j) in todo or
                                                       "fidelity" not in (sides[j] or {}))]
    regrid = sorted({(j.k, j.seed) for j in jobs if j in todo or not (j.folder(out) / "grid.mp4").exists()})

    rank, world = distributed.rank(), distributed.world()
    distributed.barrier()  # every rank has read the disk before any rank writes
    owner = distributed.assign([experts(guidances[j.label])[0].passes_per_step() for j in todo], world)
    mine = [j for j, r in zip(todo, owner) if r == rank]
    print(f"[rank {rank}/{world}] {len(jobs)} jobs, {len(jobs) - len(todo)} done, {len(mine)} to run here")
    if mine:
        sample_jobs(mine, args, found, ckpt, preset, run, guidances, keys, out, device, columns, backbones)
    distributed.barrier()

    # PSNR / SSIM vs cfg (needs the cfg video of the same prompt and seed, wherever it ran) and the grids
    for j, r in zip(refit, distributed.assign([1] * len(refit), world)):
        if r == rank:
            add_fidelity(j.path(out), base(j).path(out))
    for (k, seed), r in zip(regrid, distributed.assign([1] * len(regrid), world)):
        if r == rank:
            group = [j for j in jobs if (j.k, j.seed) == (k, seed)]
            write_mp4(group[0].folder(out) / "grid.mp4", grid([frames_of(j.path(out)) for j in group], labels),
                      run.fps, overwrite=True)
    distributed.barrier()
    if not distributed.is_main():
        return None

    rows = rows_from_sidecars(out, jobs)
    summary = write_tables(out, rows, labels, run.steps, columns, args.flow_size or None)
    write_plots(out, rows, labels, summary, columns)
    write_report(out)  # report.html: the videos in lockstep, tables, plots, sidecars
    print(f"{len(rows)} videos ({len(todo)} run now on {world} rank(s)), grids, results.csv / summary.csv / "
          f"results.md, transitions.png, summary.png and report.html in {out}")
    if export:
        commands = export_vbench(export, [{"method": r["method"], "prompt": r["prompt"], "sample": r["sample"],
                                           "path": r["video"]} for r in rows], overwrite=True)
        print(f"VBench layout in {export} (custom_input mode). In an environment with vbench installed "
              f"(not a minivdit dependency), run {export / 'run_vbench.sh'}:\n" + "\n".join(commands))
    return rows


def sample_jobs(mine, args, found, ckpt, preset, run, guidances, keys, out, device, columns, backbones) -> None:
    """Run this rank's jobs: encode their prompts (each with the negative prompt, as sample.py does, so a context
    never depends on which prompts share a rank), load the model once, sample, write mp4 + sidecar (temporal
    metrics on the uint8 frames before mp4 encoding)."""
    prompts = sorted({(j.k, j.prompt) for j in mine})
    prompt_tokens(preset, [*dict.fromkeys(p for _, p in prompts), run.negative_prompt],  # warns if truncated
                  load_tokenizer(found["tokenizer"]))
    contexts = dict(zip((k for k, _ in prompts), encode_prompts(  # text encoder freed before the DiT is loaded
        found, preset, [(p, run.negative_prompt) for _, p in prompts], device=device)))
    pipe = WanPipeline.load(ckpt, preset, dtype=DTYPES[args.dtype], device=device, with_text_encoder=False,
                            compile=args.compile)
    stride = pipe.vae.time_factor  # the VAE's temporal stride: where the latent-chunk seams are
    rank, world = distributed.rank(), distributed.world()
    for j in tqdm(mine, desc=f"jobs (rank {rank}/{world})", unit="job", position=rank):
        r, g = replace(run, prompt=j.prompt, seed=j.seed), guidances[j.label]
        stamps = [time.perf_counter()]
        latent = pipe.sample(r, g, context=contexts[j.k], progress=True,  # noise from r.seed: the same for every run
                             callback=lambda info: stamps.append(time.perf_counter()))
        per_step = np.diff(stamps)
        timed = per_step[1:] if r.steps > 1 else per_step  # step 1 is warm-up
        video = to_uint8(pipe.decode(latent, progress=False)[0])  # (T, H, W, 3) uint8; refuses NaN / inf
        path = write_mp4(j.path(out), video, r.fps, overwrite=True)  # a job without a sidecar is unfinished
        start = time.perf_counter()
        score = video_metrics(video, stride, backbones=backbones, flow_size=args.flow_size or None) \
            if len(video) > 1 else {"columns": dict.fromkeys(columns)}
        g0 = g if not isinstance(g, dict) else next(iter(g.values()))
        write_json(path.with_suffix(".json"), {
            **sidecar(pipe, r, g, stamps[-1] - stamps[0]), "method_label": j.label, "job": keys[j],
            "passes_per_step": g0.passes_per_step(), "seconds_per_step": float(np.median(timed)),
            "step_seconds": [round(float(t), 4) for t in per_step], "rank": rank, "world_size": world,
            "metrics": {**score, "stride": stride, "seconds": time.perf_counter() - start}})
        tqdm.write(f"[p{j.k} s{j.seed}] {j.label}: {float(np.median(timed)):.3f} s/step (median), flicker "
                   f"{score['columns']['flicker']}, warp error {score['columns']['warp_error']}")


def add_fidelity(path: Path, cfg_path: Path) -> None:
    """PSNR / SSIM of a job's video against the cfg video of its prompt and seed, both as decoded from their mp4
    files (the run that made cfg may be another rank's), written into the job's sidecar."""
    side = read_sidecar(path)
    fid = fidelity(frames_of(path), frames_of(cfg_path))
    m = side["metrics"]
    m.setdefault("columns", {}).update(psnr_vs_cfg=fid["psnr"], ssim_vs_cfg=fid["ssim"])
    m.setdefault("details", {}).update(psnr_per_frame=fid["psnr_per_frame"], ssim_per_frame=fid["ssim_per_frame"])
    side["fidelity"] = {"reference": str(cfg_path.name), "frames": "decoded from both mp4 files"}
    write_json(path.with_suffix(".json"), side)


def rows_from_sidecars(out: Path, jobs: list[Job]) -> list[dict]:
    """The table rows, read from the jobs' sidecars (so the tables describe what is on disk); overhead vs cfg = the
    job's median s/step over that of the cfg job of its prompt and seed."""
    rows, base = [], {}
    for j in jobs:
        side = read_sidecar(j.path(out))
        m = side["metrics"]
        rows.append({"method": j.label, "prompt": j.prompt, "seed": j.seed, "sample": j.sample,
                     "video": j.path(out), "passes_per_step": side["passes_per_step"],
                     "seconds_per_step": side["seconds_per_step"], **m["columns"],
                     "curves": m.get("curves"), "cross": m.get("cross")})
        if j.label == "cfg":
            rows[-1].update(psnr_vs_cfg=None, ssim_vs_cfg=None)
            base[j.k, j.seed] = side["seconds_per_step"]
    for j, r in zip(jobs, rows):
        r["overhead_vs_cfg"] = r["seconds_per_step"] / base[j.k, j.seed]
    return rows


if __name__ == "__main__":
    from minivdit import cli
    cli.run(main)
