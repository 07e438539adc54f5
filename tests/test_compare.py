"""samplers/compare.py end to end on the tiny checkpoint: files, table rows, passes per step, identical noise across
methods, metric columns, plots, the VBench export, and the checks that run before any model is loaded."""
import csv
import json
import math

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from minivdit.pipeline import tiny_checkpoint
from minivdit.metrics import FIDELITY_METRICS, TRANSITION_METRICS, fidelity, temporal_flickering
from samplers import compare

SMALL = ["--steps", "3", "--frames", "5", "--height", "32", "--width", "32", "--prompt", "a red ball rolls"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture
def no_loading(monkeypatch):
    """Make any model or text-encoder load fail loudly, to show an error comes first."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(compare.WanPipeline, "load", boom)
    monkeypatch.setattr(compare, "encode_prompts", boom)  # loads the text encoder


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def frames(path):
    return np.stack(imageio.mimread(path))  # (T, H, W, 3) uint8


def tiny_dino(folder):
    """A randomly initialised ViTModel (DINO's class) with patch 16 and its image processor, saved in `folder`."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16), add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def test_compare_end_to_end(ckpt, tmp_path, capsys):
    out = tmp_path / "cmp"
    rows = compare.main(["--ckpt", ckpt, "--methods", "dg,cfg+stas", "--stas-steps", "2", "--seeds", "3",
                         "--out", str(out), "--vbench-export", str(tmp_path / "vb"),
                         "--dino", tiny_dino(tmp_path / "dino"), *SMALL])
    table = read_csv(out / "results.csv")
    assert [r["method"] for r in table] == ["cfg", "dg", "cfg+stas"]  # cfg added first as the baseline
    assert {r["method"]: int(r["passes_per_step"]) for r in table} == {"cfg": 2, "dg": 3, "cfg+stas": 2}
    assert all(r["prompt"] == "a red ball rolls" and r["seed"] == "3" for r in table)
    assert float(table[0]["overhead_vs_cfg"]) == 1.0
    for r, row in zip(table, rows):
        assert float(r["seconds_per_step"]) > 0
        assert float(r["overhead_vs_cfg"]) == pytest.approx(row["seconds_per_step"] / rows[0]["seconds_per_step"])
        for key in ("pixel_cos", "pixel_cos_cross", "pixel_cos_within", "dino_cross", "dino_within"):  # 5 frames =
            assert -1 <= float(r[key]) <= 1  # latent frames 0,1,1,1,1: both kinds of transition
        for key in ("flicker", "flicker_cross", "flicker_within", "ssim_vs_cfg"):
            assert r[key] == "n/a" if (r["method"], key) == ("cfg", "ssim_vs_cfg") else 0 <= float(r[key]) <= 1
        for key in ("diff_energy", "warp_error", "flow_mag", "psnr_vs_cfg"):
            assert r[key] == "n/a" if (r["method"], key) == ("cfg", "psnr_vs_cfg") else float(r[key]) >= 0
    # the table's numbers are the library's on the written frames (compared to the mp4, up to its compression)
    folder = out / "p0_s3"
    videos = {m: frames(folder / f"{m}.mp4") for m in ("cfg", "dg", "cfg+stas")}
    dg = next(r for r in table if r["method"] == "dg")
    assert float(dg["flicker"]) == pytest.approx(temporal_flickering(videos["dg"])["all"], abs=0.02)
    assert float(dg["ssim_vs_cfg"]) == pytest.approx(fidelity(videos["dg"], videos["cfg"])["ssim"], abs=0.02)
    assert float(dg["ssim_vs_cfg"]) < 0.99 and 20 < float(dg["psnr_vs_cfg"]) < 60  # against cfg, not a copy
    side = json.loads((folder / "dg.json").read_text())
    assert side["metrics"]["stride"] == 4 and side["metrics"]["cross"] == [True, False, False, False]
    assert side["metrics"]["columns"]["flicker"] == rows[1]["flicker"]
    assert len(side["metrics"]["curves"]["warp_error"]) == 4 and len(side["metrics"]["details"]["psnr_per_frame"]) == 5

    summary = read_csv(out / "summary.csv")
    assert [r["method"] for r in summary] == ["cfg", "dg", "cfg+stas"]
    assert "clip" not in summary[0] and "dino" in summary[0]
    for col in compare.metric_columns(["dino"]):
        assert col in summary[0] and f"{col}_std" in summary[0]
    assert summary[1]["flicker_std"] == "n/a"  # one seed: no spread over seeds
    assert float(summary[1]["flicker"]) == pytest.approx(float(dg["flicker"]))
    md = (out / "results.md").read_text()
    assert "step 1 excluded (warm-up)" in md and "| dg | 3 |" in md and "## All runs" in md
    assert "| flicker | flicker (cross) | flicker (within) | diff_energy |" in md and "PSNR vs cfg" in md
    for name, (what, better) in {**TRANSITION_METRICS, **FIDELITY_METRICS}.items():  # the footnote, but for
        assert (f"{what}; {better}." in md) == (name != "clip")                       # a backbone not given
    assert (out / "transitions.png").stat().st_size > 10_000 and (out / "summary.png").stat().st_size > 10_000

    vb = tmp_path / "vb"
    assert sorted(p.name for p in (vb / "cfg+stas").iterdir()) == ["a red ball rolls-0.mp4", "prompts.json"]
    assert (vb / "dg" / "a red ball rolls-0.mp4").read_bytes() == (folder / "dg.mp4").read_bytes()
    assert "vbench evaluate --mode=custom_input" in capsys.readouterr().out

    assert all(v.shape == (5, 32, 32, 3) for v in videos.values())
    assert not np.array_equal(videos["cfg"], videos["dg"])  # DG at w = 1 changes the video
    assert not np.array_equal(videos["cfg"], videos["cfg+stas"])
    side = json.loads((folder / "dg.json").read_text())
    assert (side["method_label"], side["guidance"]["method"], side["seed"], side["passes_per_step"]) == \
        ("dg", "dg", 3, 3)
    assert frames(folder / "grid.mp4").shape == (5, 32 + 14, 3 * 32, 3)  # 3 labelled tiles side by side


def test_same_noise_for_every_method(ckpt, tmp_path):
    """DG with w = 0 runs no branch and is CFG: with the same noise its video is CFG's, byte for byte."""
    out = tmp_path / "cmp"
    rows = compare.main(["--ckpt", ckpt, "--methods", "cfg,dg", "--dg-scale", "0", "--seeds", "3,4",
                         "--out", str(out), *SMALL])
    assert [(r["method"], r["seed"], r["passes_per_step"]) for r in rows] == \
        [("cfg", 3, 2), ("dg", 3, 2), ("cfg", 4, 2), ("dg", 4, 2)]
    for seed in (3, 4):
        assert np.array_equal(frames(out / f"p0_s{seed}" / "cfg.mp4"), frames(out / f"p0_s{seed}" / "dg.mp4"))
    for a, b in ((rows[0], rows[1]), (rows[2], rows[3])):  # a copy of cfg: PSNR inf, SSIM 1, same temporal metrics
        assert (a["psnr_vs_cfg"], a["ssim_vs_cfg"], b["psnr_vs_cfg"], b["ssim_vs_cfg"]) == (None, None, math.inf, 1.0)
        assert all(a[c] == b[c] for c in compare.metric_columns() if c not in FIDELITY_METRICS)
    summary = read_csv(out / "summary.csv")
    cfg_flicker = [r["flicker"] for r in rows if r["method"] == "cfg"]
    assert float(summary[0]["flicker"]) == pytest.approx(np.mean(cfg_flicker))
    assert float(summary[0]["flicker_std"]) == pytest.approx(np.std(cfg_flicker, ddof=1))  # over the 2 seeds
    assert summary[1]["psnr_vs_cfg"] == "inf" and float(summary[1]["ssim_vs_cfg"]) == 1.0
    assert not np.array_equal(frames(out / "p0_s3" / "cfg.mp4"), frames(out / "p0_s4" / "cfg.mp4"))


def test_summary_std_is_over_seeds():
    """2 prompts x 2 seeds: the spread is that of the per-seed means over prompts (2 and 6), not of the 4 runs."""
    rows = [{"method": "cfg", "prompt": p, "seed": s, "x": x, "y": None}
            for (p, s), x in zip([("A", 0), ("B", 0), ("A", 1), ("B", 1)], [1.0, 3.0, 5.0, 7.0])]
    (row,) = compare.summarize(rows, ["cfg"], ["x", "y"])
    assert row["x"] == 4.0 and row["x_std"] == pytest.approx(math.sqrt(8))  # std(2, 6), ddof 1; runs: 2.58
    assert row["y"] is None and row["y_std"] is None


def test_study_defaults_to_five_seeds():
    assert compare.parse([]).seeds == "0,1,2,3,4"  # the STAS protocol: 5 seeds per prompt


def test_unknown_method_fails_before_anything_is_read(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method 'foo'.*stg-official"):
        compare.main(["--ckpt", str(tmp_path / "nowhere"), "--methods", "cfg,foo", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="unknown method 'dg\\+cfg'"):
        compare.main(["--ckpt", str(tmp_path / "nowhere"), "--methods", "dg+cfg", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, match", [
    (["--methods", "cfg+stas", "--stas-alpha", "-1"], "alpha"),
    (["--methods", "dg", "--dg-block", "99"], "block indices"),
    (["--methods", "cfg,stg", "--stg-mode", "X"], "stg_mode"),
    (["--methods", "cfg,stg", "--dg-scale", "0.5"], "--dg-scale belongs to method 'dg', which no run"),
    (["--methods", "cfg+stas", "--stas-steps", "9"], "exceeds"),
])
def test_bad_parameters_fail_before_loading(ckpt, tmp_path, no_loading, args, match):
    with pytest.raises(ValueError, match=match):
        compare.main(["--ckpt", ckpt, "--out", str(tmp_path / "o"), *args, *SMALL])


def test_missing_backbone_folder_fails_before_loading(ckpt, tmp_path, no_loading):
    with pytest.raises(FileNotFoundError, match="--clip .*no such folder"):
        compare.main(["--ckpt", ckpt, "--methods", "cfg", "--out", str(tmp_path / "o"), "--clip",
                      str(tmp_path / "nope"), *SMALL])
    with pytest.raises(ValueError, match="holds a 'vit' model; expected CLIP"):
        compare.main(["--ckpt", ckpt, "--methods", "cfg", "--out", str(tmp_path / "o"), "--clip",
                      tiny_dino(tmp_path / "d"), *SMALL])


def test_rerun_resumes_and_refuses_changed_settings(ckpt, tmp_path, monkeypatch):
    """The same command again runs nothing and leaves every file as it was; other settings in the same --out are
    refused before any model is loaded; --overwrite redoes the jobs."""
    out = tmp_path / "cmp"
    cmd = ["--ckpt", ckpt, "--methods", "cfg", "--out", str(out), *SMALL, "--steps", "1", "--seeds", "0"]
    compare.main(cmd)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    compare.main(cmd)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    monkeypatch.setattr(compare.WanPipeline, "load", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(FileExistsError, match="other settings.*--overwrite"):
        compare.main([*cmd, "--steps", "2"])
    monkeypatch.undo()
    compare.main([*cmd, "--steps", "2", "--overwrite"])
    table = read_csv(out / "results.csv")
    assert [r["method"] for r in table] == ["cfg"] and float(table[0]["seconds_per_step"]) > 0
    assert json.loads((out / "p0_s0" / "cfg.json").read_text())["steps"] == 2
    assert "step 1 excluded (warm-up)" in (out / "results.md").read_text()


@pytest.mark.parametrize("preset", ["wan2.2-ti2v-tiny", "wan2.2-t2v-a14b-tiny"])
def test_compare_runs_wan22(tmp_path, preset):
    """TI2V (48-channel latents, stride 32) and A14B (one Guidance per expert) through the comparison runner."""
    ckpt = tiny_checkpoint(tmp_path / preset, preset=preset)
    rows = compare.main(["--ckpt", str(ckpt), "--methods", "cfg,stg", "--seeds", "0", "--steps", "2", "--frames", "5",
                         "--height", "64", "--width", "64", "--out", str(tmp_path / "o")])
    assert [r["method"] for r in rows] == ["cfg", "stg"] and rows[1]["passes_per_step"] == 3
    meta = json.loads((tmp_path / "o" / "p0_s0" / "stg.json").read_text())
    assert meta["preset"] == preset and (meta["height"], meta["width"]) == (64, 64)


def test_compare_runs_cogvideox(tmp_path):
    """The comparison runner on the tiny CogVideoX (v-prediction, DDIM, dynamic CFG, STAS on the video tokens)."""
    from minivdit.pipeline import tiny_cogvideox_checkpoint

    ckpt = tiny_cogvideox_checkpoint(tmp_path / "cog")
    rows = compare.main(["--ckpt", str(ckpt), "--methods", "cfg,stg,cfg+stas", "--stas-steps", "2", "--seeds", "0",
                         "--steps", "2", "--out", str(tmp_path / "o")])
    assert [r["method"] for r in rows] == ["cfg", "stg", "cfg+stas"]
    meta = json.loads((tmp_path / "o" / "p0_s0" / "cfg+stas.json").read_text())
    assert meta["preset"] == "cogvideox-tiny" and meta["solver"] == "ddim" and meta["negative_prompt"] == ""
    with pytest.raises(ValueError, match="v-prediction"):
        compare.main(["--ckpt", str(ckpt), "--methods", "cfg,apg", "--seeds", "0", "--steps", "2",
                      "--out", str(tmp_path / "o2")])
