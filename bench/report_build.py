"""Build time and page weight of report.html for a sweep of 24 videos (4 prompt x seed rows of 6 method settings),
laid out from one compare.py output folder by copying its videos and sidecars under new labels.

    python samplers/compare.py --methods cfg,dg --seeds 0 --steps 2 --out outputs/cmp-tiny
    python bench/report_build.py outputs/cmp-tiny --out outputs/report-bench
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minivdit.report import write_report  # noqa: E402
from minivdit.video import write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a compare.py output folder")
    p.add_argument("--out", required=True, help="the fake sweep folder (must not exist)")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--per-row", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    src, out = Path(args.source), Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out")
    sides = sorted(s for s in src.rglob("*.json") if "method_label" in json.loads(s.read_text()))
    for r in range(args.rows):
        for k in range(args.per_row):
            side = sides[k % len(sides)]
            data = json.loads(side.read_text())
            data.update(method_label=f"{data['method_label']}:alpha={k}", prompt=f"prompt {r // 2}", seed=r % 2)
            job = out / f"p{r // 2}_s{r % 2}" / f"job{k}"
            job.mkdir(parents=True)
            write_json(job / "video.json", data)
            shutil.copy(side.with_suffix(".mp4"), job / "video.mp4")
    for name in ("results.csv", "summary.csv", "transitions.png", "summary.png"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        page = write_report(out)
        times.append(time.perf_counter() - start)
    videos = sum(f.stat().st_size for f in out.rglob("*.mp4"))
    pngs = sum(f.stat().st_size for f in out.glob("*.png"))
    print(f"{args.rows * args.per_row} videos: build {min(times):.3f} s (best of {args.repeats}; median "
          f"{sorted(times)[len(times) // 2]:.3f} s); report.html {page.stat().st_size / 1024:.1f} KiB, + plots "
          f"{pngs / 1024:.1f} KiB (videos {videos / 1024:.1f} KiB, not counted)")


if __name__ == "__main__":
    main()
