"""Data parallel over torchrun ranks (CPU, gloo, 2 processes started by the test, one thread each): a 2-rank sweep
writes the same mp4s, grids and tables as one process, a sweep interrupted (outputs deleted, a job left without its
sidecar) finishes only the missing jobs, and a 2-rank analyze.py report equals the 1-process report."""
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minivdit.pipeline import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--steps", "2", "--frames", "5", "--height", "32", "--width", "32"]
TIMING = ("seconds_per_step", "overhead_vs_cfg")


def launch(script, args, ranks):
    """Run a sampler script with `ranks` processes (torchrun --standalone: a free port) or plainly with one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks > 1 else [sys.executable]
    done = subprocess.run([*cmd, str(ROOT / "samplers" / script), *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))


def table(path, drop=()):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in csv.DictReader(f)]


def videos(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.mp4"))}


def ran(log):
    """Jobs the ranks ran, summed over the ranks' '[rank r/w] J jobs, D done, M to run here' lines."""
    return sum(int(m) for m in re.findall(r"\[rank \d+/\d+\] \d+ jobs, \d+ done, (\d+) to run here", log))


def test_two_rank_sweep_equals_one_and_resumes(ckpt, tmp_path):
    args = ["--ckpt", ckpt, "--method", "cfg;dg:scale=0|1;stg", "--seeds", "0,1", "--prompt", "a red ball rolls",
            *SMALL]
    one, two = tmp_path / "one", tmp_path / "two"
    assert ran(launch("compare.py", [*args, "--out", str(one)], 1)) == 8
    assert ran(launch("compare.py", [*args, "--out", str(two)], 2)) == 8
    assert len(videos(one)) == 8 + 2 and videos(two) == videos(one)  # 8 jobs + 2 grids, byte for byte
    for name in ("results.csv", "summary.csv"):
        assert table(two / name, TIMING) == table(one / name, TIMING)
    sides = {p: json.loads(p.read_text()) for p in two.rglob("*.json")}
    assert {s["rank"] for s in sides.values()} == {0, 1}  # both ranks ran jobs
    passes = {r: sum(s["passes_per_step"] for s in sides.values() if s["rank"] == r) for r in (0, 1)}
    assert passes[0] == passes[1] == 10  # cfg 2, dg w=0 2, dg w=1 3, stg 3 per seed: balanced passes

    # interrupted: one job lost its outputs, one was killed between its mp4 and its sidecar
    (two / "p0_s0" / "stg.mp4").unlink()
    (two / "p0_s0" / "stg.json").unlink()
    (two / "p0_s1" / "dg_scale=1.json").unlink()
    kept = (two / "p0_s1" / "cfg.json").read_bytes()
    assert ran(launch("compare.py", [*args, "--out", str(two)], 2)) == 2
    assert videos(two) == videos(one) and (two / "p0_s1" / "cfg.json").read_bytes() == kept
    for name in ("results.csv", "summary.csv"):
        assert table(two / name, TIMING) == table(one / name, TIMING)


def close(a, b, path="report"):
    """JSON values equal, floats to 1e-6 relative."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{k}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-300), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_two_rank_analyze_equals_one(ckpt, tmp_path):
    args = ["--ckpt", ckpt, "--prompt", "a red ball rolls", "--prompt", "a cat", "--prompt", "snow falls", *SMALL,
            "--a1", "1:2", "--device", "cpu"]
    launch("analyze.py", [*args, "--out", str(tmp_path / "one")], 1)
    log = launch("analyze.py", [*args, "--out", str(tmp_path / "two")], 2)
    assert "[rank 1/2] [2/3] a cat" in log  # prompt 1 ran on rank 1
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert one["protocol"]["prompts"] == 3 and one["slots"][0]["rows"] == 6
    close(two, one)
