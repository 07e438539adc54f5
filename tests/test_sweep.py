"""Method specs (minivdit/specs.py) and resumable sweeps in samplers/compare.py, in one process: the grammar, its
errors before any model is loaded, spec parameters reaching the runs, the pass-balanced job split, and a re-run
that finishes only the missing jobs."""
import json

import numpy as np
import pytest

from minivdit import distributed
from minivdit.guidance import METHODS, OPTIONS, uses
from minivdit.pipeline import tiny_checkpoint
from minivdit.specs import names, parse_specs
from samplers import compare

SMALL = ["--steps", "2", "--frames", "5", "--height", "32", "--width", "32", "--prompt", "a red ball rolls",
         "--seeds", "1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))


def test_grammar_expands_cross_products_with_readable_labels():
    runs = parse_specs(["stg:mode=R,blocks=2", "cfg+stas:alpha=1|2|3,p=8;dg:scale=1|2,block=1"])
    assert [r.label for r in runs] == ["stg_mode=R_blocks=2", "cfg+stas_alpha=1_p=8", "cfg+stas_alpha=2_p=8",
                                       "cfg+stas_alpha=3_p=8", "dg_scale=1_block=1", "dg_scale=2_block=1"]
    assert runs[0].params == {"stg_mode": "R", "stg_blocks": (2,)} and runs[2].params == {"stas_alpha": 2.0,
                                                                                          "stas_p": 8.0}
    assert (runs[1].method, runs[1].stas, runs[4].method, runs[4].stas) == ("cfg", True, "dg", False)
    grid = parse_specs("stg:blocks=1,2|3,mode=R|A")  # a list value, and 2 x 2 runs
    assert [(r.label, r.params["stg_blocks"], r.params["stg_mode"]) for r in grid] == [
        ("stg_blocks=1-2_mode=R", (1, 2), "R"), ("stg_blocks=1-2_mode=A", (1, 2), "A"),
        ("stg_blocks=3_mode=R", (3,), "R"), ("stg_blocks=3_mode=A", (3,), "A")]
    assert [r.label for r in parse_specs("cfg,cfg+stas,cfg-zero*")] == ["cfg", "cfg+stas", "cfg-zero*"]
    assert parse_specs("dg+stas:dg_block=2,stas_block=1")[0].params == {"dg_block": 2, "stas_block": 1}
    assert parse_specs("apg:guidance_scale=3")[0].params == {"guidance_scale": 3.0}


def test_every_option_is_a_spec_parameter():
    """The spec names come from guidance.OPTIONS alone: each option, full and short, for a run that uses it."""
    for name, _, group, _ in OPTIONS:
        method = next(m for m in METHODS if uses(m, group == "stas", group))
        table = names(method, group == "stas")
        assert table[name] == name
        short = name.removeprefix(group.replace("-", "_") + "_")
        assert table[short] in (name, None)  # None: ambiguous in this run, refused with a message


@pytest.mark.parametrize("spec, match", [
    ("foo", "unknown method 'foo'"),
    ("dg+cfg", "unknown method 'dg\\+cfg'"),
    ("cfg:omega=2", "cfg has no parameter 'omega'; it belongs to method 'stas'"),
    ("cfg:alpha=2", "cfg has no parameter 'alpha'; it belongs to method 'mag' / 'stas'"),
    ("dg:mode=R", "it belongs to method 'stg'"),
    ("dg:what=1", "no parameter 'what'; known for dg: .*scale"),
    ("dg+stas:block=2", "'block' is ambiguous in dg\\+stas; write one of"),
    ("dg:scale=x", "bad value 'x' for dg_scale"),
    ("stg:blocks=1|a", "bad value 'a' for stg_blocks"),
    ("cfg;dg;cfg", "duplicate run labels \\['cfg'\\]"),
    ("stg:mode=R;stg:mode=R|A", "duplicate run labels \\['stg_mode=R'\\]"),
    ("stg:2", "'2' is not NAME=VALUE"),
    ("dg:scale=1,scale=2", "'scale' given twice"),
])
def test_bad_specs_fail_before_loading(ckpt, tmp_path, monkeypatch, spec, match):
    monkeypatch.setattr(compare.WanPipeline, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(compare, "find_checkpoint", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match=match):
        compare.main(["--ckpt", ckpt, "--method", spec, "--out", str(tmp_path / "o"), *SMALL])
    assert not (tmp_path / "o").exists()


def test_bad_spec_value_for_the_model_fails_before_loading(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(compare.WanPipeline, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="stg_mode"):
        compare.main(["--ckpt", ckpt, "--method", "stg:mode=R|X", "--out", str(tmp_path / "o"), *SMALL])
    with pytest.raises(ValueError, match="block indices"):
        compare.main(["--ckpt", ckpt, "--method", "dg:block=1|99", "--out", str(tmp_path / "o"), *SMALL])


def test_shard_balances_passes_not_job_count():
    assert distributed.assign([5, 1, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1, 1]  # 5 vs 5 passes, 1 vs 5 jobs
    owner = distributed.assign([2, 3, 2, 3, 2, 3, 2, 3], 2)
    assert [sum(c for c, r in zip([2, 3] * 4, owner) if r == k) for k in (0, 1)] == [10, 10]
    assert distributed.assign([1, 1, 1], 1) == [0, 0, 0] and distributed.assign([], 3) == []


def test_spec_sweep_runs_and_resumes(ckpt, tmp_path, monkeypatch):
    """Spec parameters reach each run (and win over a flag); a re-run after a lost and a half-written job runs
    exactly those two, writes the same bytes, and leaves the finished jobs alone."""
    out = tmp_path / "sweep"
    cmd = ["--ckpt", ckpt, "--method", "cfg+stas:alpha=1|3", "--method", "stg:mode=R|A,scale=1", "--stg-scale", "0",
           "--stas-steps", "1", "--out", str(out), *SMALL]
    ran = []
    sample_jobs = compare.sample_jobs
    monkeypatch.setattr(compare, "sample_jobs", lambda mine, *a: (ran.append([j.label for j in mine]),
                                                                  sample_jobs(mine, *a)))
    rows = compare.main(cmd)
    labels = ["cfg", "cfg+stas_alpha=1", "cfg+stas_alpha=3", "stg_mode=R_scale=1", "stg_mode=A_scale=1"]
    assert ran == [labels] and [r["method"] for r in rows] == labels
    folder = out / "p0_s1"
    side = {m: json.loads((folder / f"{m}.json").read_text()) for m in labels}
    assert [side[m]["guidance"]["stas"]["alpha"] for m in labels[1:3]] == [1.0, 3.0]
    assert [side[m]["guidance"]["stg_mode"] for m in labels[3:]] == ["R", "A"]
    assert all(side[m]["guidance"]["stg_scale"] == 1.0 and side[m]["passes_per_step"] == 3 for m in labels[3:])
    assert all(side[m]["method_label"] == m for m in labels)
    videos = {m: (folder / f"{m}.mp4").read_bytes() for m in labels}
    assert len(set(videos.values())) == 5  # every setting changes the video
    assert rows[2]["psnr_vs_cfg"] < 100 and rows[0]["psnr_vs_cfg"] is None

    (folder / "cfg+stas_alpha=3.mp4").unlink()
    (folder / "cfg+stas_alpha=3.json").unlink()  # lost
    (folder / "stg_mode=A_scale=1.json").unlink()  # killed after its mp4, before its sidecar
    kept = (folder / "cfg.json").read_bytes()
    ran.clear()
    again = compare.main(cmd)
    assert ran == [["cfg+stas_alpha=3", "stg_mode=A_scale=1"]]
    assert {m: (folder / f"{m}.mp4").read_bytes() for m in labels} == videos and (folder / "cfg.json").read_bytes() == kept
    drop = ("seconds_per_step", "overhead_vs_cfg", "video", "curves")
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert np.isfinite(again[4]["psnr_vs_cfg"])


def test_sample_takes_one_spec_or_the_old_flags():
    from minivdit.wan import PRESETS
    from samplers import sample

    g = lambda *argv: sample.guidance_from_args(sample.parse(list(argv)), PRESETS["wan2.1-tiny"])  # noqa: E731
    assert g("--method", "cfg+stas:alpha=3") == g("--method", "cfg", "--stas", "--stas-alpha", "3")
    assert g("--method", "cfg+stas:alpha=3").stas.alpha == 3.0
    assert g("--method", "stg:mode=A,scale=0.5") == g("--method", "stg", "--stg-mode", "A", "--stg-scale", "0.5")
    assert g("--method", "stg:mode=A").stg_scale == 2.0 and g("--method", "dg:scale=2").dg_scale == 2.0
    with pytest.raises(ValueError, match="describes 2 runs; sample.py makes one video"):
        g("--method", "stg:mode=A|R")
    with pytest.raises(ValueError, match="it belongs to method 'stas'"):
        g("--method", "cfg:omega=1")
