"""The study page: one self-contained report.html per output folder of compare.py (any sweep layout) or analyze.py,
rebuilt from what is on disk, so that it always describes the files that are there.

    python -m minivdit.report outputs/compare          # rebuild outputs/compare/report.html alone

Comparison: every mp4 with a JSON sidecar holding "method_label" beside it, anywhere under the folder, is a video of
the page; videos are grouped in one row per (prompt, seed) that plays, pauses, steps and scrubs in lockstep from one
control, with the latent-chunk boundaries (sidecar metrics "cross", else the VAE temporal stride) marked on the
scrubber. Then the tables of results.csv / summary.csv (sortable; the best value per column marked where a direction
is better; a footnote per column from minivdit.metrics), the folder's PNG plots and every sidecar in full.
Analysis: report.json of analyze.py (one report, or {"experts": {name: report}} with plots in name/) gives the MA
channels, the suggested STAS / DG flags to copy, the per-(step, block) and positional tables and the plots.

The page is offline: inline CSS and JavaScript from the Jinja2 template beside this module (templates/report.html,
every value escaped), no network, relative links only, so the folder can be opened as a file, copied or served.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from urllib.parse import quote

import jinja2

from .metrics import FIDELITY_METRICS, TRANSITION_METRICS, cross_chunk
from .video import write_text

COST = {  # column -> (what it is, which direction is better), beside metrics.TRANSITION_METRICS / FIDELITY_METRICS
    "passes_per_step": ("model forward passes per sampling step", "lower = cheaper"),
    "seconds_per_step": ("mean wall seconds per sampling step (step 1 excluded as warm-up when there are several)",
                         "lower = faster"),
    "overhead_vs_cfg": ("seconds per step / seconds per step of cfg on the same prompt and seed", "lower = cheaper"),
}
SPLITS = {"_cross": "over cross-chunk transitions only (the two frames decode from different latent frames)",
          "_within": "over within-chunk transitions only (both frames decode from one latent frame)"}


def describe(column: str) -> tuple[str, str] | None:
    """(what a table column is, which direction is better) from COST and minivdit.metrics; None if unknown."""
    base, split = column, ""
    for suffix in SPLITS:
        if column.endswith(suffix):
            base, split = column[:-len(suffix)], suffix
    found = {**COST, **TRANSITION_METRICS, **FIDELITY_METRICS}.get(base)
    return None if found is None else (found[0] + (f"; {SPLITS[split]}" if split else ""), found[1])


def _number(text: str) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def table(rows: list[dict], best: bool = True) -> dict | None:
    """CSV rows -> the template's table: columns (a column X_std is shown as '± std' in column X), numeric columns
    sortable by value, with their footnote and, if `best` and a direction is better, the best cells marked."""
    if not rows:
        return None
    names = [c for c in rows[0] if not (c.endswith("_std") and c[:-4] in rows[0])]
    columns, cells, notes = [], [[] for _ in rows], 0
    for c in names:
        values = [_number(r[c]) for r in rows]
        numeric = any(v is not None for v in values) and all(v is not None or r[c] in ("", "n/a", "nan", "None")
                                                              for v, r in zip(values, rows))
        doc = describe(c) if numeric else None
        better = doc and ("max" if doc[1].startswith("higher") else "min" if doc[1].startswith("lower") else None)
        found = [v for v in values if v is not None]
        top = (max if better == "max" else min)(found) if best and better and len(set(found)) > 1 else None
        notes += bool(doc)
        columns.append({"name": c, "numeric": numeric, "doc": doc, "better": better, "note": notes if doc else None})
        for k, (v, r) in enumerate(zip(values, rows)):
            std = _number(r.get(f"{c}_std"))
            text = r[c] if not numeric else "n/a" if v is None else f"{v:.4g}" + (f" ± {std:.2g}" if std else "")
            cells[k].append({"text": text, "sort": "" if v is None else repr(v) if numeric else r[c],
                             "best": top is not None and v == top, "numeric": numeric})
    return {"columns": columns, "rows": cells, "notes": [c for c in columns if c["doc"]]}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def find_videos(folder: Path) -> list[dict]:
    """Every mp4 under `folder` with a sidecar (same stem, .json) holding "method_label", as a dict for the
    template; files whose name starts with '.' (an atomic write in progress) are skipped."""
    videos = []
    for side in sorted(folder.rglob("*.json")):
        mp4 = side.with_suffix(".mp4")
        if side.name.startswith(".") or not mp4.is_file():
            continue
        data = json.loads(side.read_text())
        if not isinstance(data, dict) or "method_label" not in data:
            continue
        metrics = data.get("metrics") or {}
        cross = metrics.get("cross") or cross_chunk(int(data.get("frames") or 1), int(metrics.get("stride") or 4))
        frames = len(cross) + 1  # one flag per transition j -> j + 1
        videos.append({"label": str(data["method_label"]), "prompt": str(data.get("prompt", "")),
                       "seed": data.get("seed"), "fps": float(data.get("fps") or 16), "frames": frames,
                       "bounds": [j + 1 for j, c in enumerate(cross) if c],  # first frame of each new latent frame
                       "src": quote(mp4.relative_to(folder).as_posix()), "path": side.relative_to(folder).as_posix(),
                       "sidecar": json.dumps(data, indent=2, ensure_ascii=False), "data": data})
    return videos


def group(videos: list[dict], order: list[str]) -> list[dict]:
    """One row per (prompt, seed) in order of appearance; in a row, the methods in `order` (results.csv), then the
    rest in path order."""
    rows = {}
    for v in videos:
        rows.setdefault((v["prompt"], v["seed"]), []).append(v)
    rank = {m: k for k, m in enumerate(order)}
    out = []
    for (prompt, seed), vs in rows.items():
        vs = sorted(vs, key=lambda v: rank.get(v["label"], len(rank)))
        fps, frames = vs[0]["fps"], max(v["frames"] for v in vs)
        out.append({"prompt": prompt, "seed": seed, "videos": vs, "fps": fps, "frames": frames,
                    "marks": [{"frame": b, "at": 100 * b / max(frames - 1, 1)} for b in vs[0]["bounds"]
                              if b < frames]})
    return out


def sidecar_rows(videos: list[dict]) -> list[dict]:
    """The per-video table when there is no results.csv: keys, cost and metric columns of every sidecar."""
    rows = [{"method": v["label"], "prompt": v["prompt"], "seed": v["seed"],
             **{c: v["data"].get(c) for c in ("passes_per_step", "seconds_per_step")},
             **(v["data"].get("metrics") or {}).get("columns", {})} for v in videos]
    return [{k: "n/a" if x is None else str(x) for k, x in r.items()} for r in rows]


def analysis(folder: Path) -> list[dict] | None:
    """analyze.py's report.json as one entry per expert ("" for a single network), with its plots, or None."""
    path = folder / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    if not isinstance(report, dict) or not ("experts" in report or "ma_channels" in report):
        return None
    experts = report["experts"] if "experts" in report else {"": report}
    fmt = lambda xs: ", ".join("n/a" if x is None else f"{x:.3g}" for x in xs)  # noqa: E731
    out = []
    for name, r in experts.items():
        ma = lambda found: ", ".join(f"{e['dim']} ({e['peak_to_mean']:.3g}x)" if e.get("peak_to_mean") is not None
                                     else str(e["dim"]) for e in found) or "-"  # noqa: E731
        slots = [{"step": s["step"], "block": s["block"], "ma": ma(s["ma"]), "weak": ma(s["weak_ma"]),
                  "top": ma(s["top"])} for s in r.get("slots", [])]
        a1 = [{"step": s["step"], "block": s["block"], "prompts": s["prompts"], "ma": ma(s["ma"]),
               "weak": ma(s["weak_ma"])} for s in r.get("a1", [])]
        positional = [{"block": b, "dim": p["dim"], "steps": ", ".join(map(str, p["steps"])),
                       "first": fmt(p["first"]), "boundary": fmt(p["boundary"]), "interior": fmt(p["interior"]),
                       "b_to_i": fmt(p["boundary_to_interior"]), "f_to_i": fmt(p["first_to_interior"])}
                      for b, p in r.get("positional", {}).items()]
        steer = f" --steer-experts {name}" if name else ""
        flags = [(k, r[f"{k.lower()}_flags"] + steer) for k in ("STAS", "DG") if r.get(f"{k.lower()}_flags")]
        out.append({"name": name, "report": r, "flags": flags, "slots": slots, "a1": a1, "positional": positional,
                    "protocol": json.dumps(r.get("protocol"), ensure_ascii=False),
                    "run": json.dumps(r.get("run"), indent=2, ensure_ascii=False),
                    "plots": [p.relative_to(folder).as_posix() for p in sorted((folder / name).glob("*.png"))]})
    return out


def render(folder: str | Path) -> str:
    """The report page of `folder` as HTML text. Raises FileNotFoundError if the folder holds no video with a sidecar
    and no analysis report.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the --out folder of compare.py or analyze.py")
    videos, ma = find_videos(folder), analysis(folder)
    if not videos and not ma:
        raise FileNotFoundError(f"{folder} holds no mp4 with a JSON sidecar (a 'method_label' key) and no analysis "
                                "report.json; pass the --out folder of compare.py or analyze.py")
    results = read_csv(folder / "results.csv") if (folder / "results.csv").is_file() else sidecar_rows(videos)
    summary = read_csv(folder / "summary.csv") if (folder / "summary.csv").is_file() else []
    order = list(dict.fromkeys([r.get("method") for r in results] + [r.get("method") for r in summary]))
    claimed = {p for e in ma or [] for p in e["plots"]}
    env = jinja2.Environment(loader=jinja2.PackageLoader("minivdit", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html").render(
        title=folder.resolve().name, rows=group(videos, order), videos=videos, analysis=ma,
        summary=table(summary), results=table(results, best=False) if videos else None,
        plots=[p.name for p in sorted(folder.glob("*.png")) if p.name not in claimed])


def write_report(folder: str | Path) -> Path:
    """Rebuild folder/report.html from the files in `folder` (atomically; it is a view of the folder, so it is
    always replaced). Returns its path."""
    return write_text(Path(folder) / "report.html", render(folder))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="output folders of compare.py or analyze.py")
    for folder in p.parse_args(argv).folders:
        print(f"wrote {write_report(folder)}")


if __name__ == "__main__":
    main()
