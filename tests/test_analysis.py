"""Massive-activation statistics (streaming == stored, injected MA / weak-MA channels detected, positional split
sizes); the analysis script end to end on the tiny model. Frame consistency is tested in test_metrics.py."""
import json

import numpy as np
import pytest
import torch

from minivdit.analysis import MAStats, classify, write_plots
from minivdit.interventions import TokenLayout


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from minivdit.pipeline import WanPipeline, tiny_checkpoint

    return WanPipeline.load(tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt"))


def stats_from_stored(acts, layout, p, steps, blocks, dim):
    """The same statistics from full stored activations [(step, block, h (B, L, D))], computed directly."""
    first, boundary, interior = layout.partition(p)
    peak = torch.zeros(steps, len(blocks), dim, dtype=torch.float64)
    pos = torch.zeros(steps, len(blocks), 3, dim, dtype=torch.float64)
    rows = torch.zeros(steps, len(blocks))
    for s, b, h in acts:
        a = h.double().abs()  # (B, L, D)
        k = blocks.index(b)
        peak[s, k] += a.amax(dim=1).sum(0)
        pos[s, k] += torch.stack([a[:, idx].mean(dim=1) for idx in (first, boundary, interior)], 1).sum(0)
        rows[s, k] += h.shape[0]
    return peak / rows[..., None], pos / rows[..., None, None]


def test_streaming_equals_stored_on_the_tiny_pipeline(tiny_pipe, tmp_path):
    from minivdit.guidance import Guidance
    from minivdit.pipeline import SampleConfig

    model = tiny_pipe.model
    steps, blocks, p = 3, [1, 2, 3], 25.0
    runs = [SampleConfig(prompt=t, frames=9, height=32, width=48, steps=steps, seed=i)
            for i, t in enumerate(["a red fox", "a blue boat on a lake"])]
    layout = model.layout(runs[0].latent_shape(model.config.in_dim))
    stats = MAStats(layout, model.config.dim, blocks, steps, p=p)
    acts, step = [], [0]

    def capture(block, h):
        stats(block, h)
        if block in blocks:
            acts.append((step[0], block, h.clone()))

    def callback(info):
        stats.next_step(info)
        step[0] = (info["i"] + 1) % steps

    for run in runs:
        tiny_pipe.sample(run, Guidance(capture=capture, guidance_scale=5.0), callback=callback, progress=False)
    assert stats.prompts == 2 and stats.step == 0
    assert len(acts) == 2 * steps * len(blocks) and acts[0][2].shape == (2, layout.num_tokens, model.config.dim)
    assert (stats.rows == 4).all()  # 2 prompts x [cond, uncond]
    peak, pos = stats_from_stored(acts, layout, p, steps, blocks, model.config.dim)
    torch.testing.assert_close(stats.mean_peak(), peak, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats._mean(stats.pos), pos, rtol=1e-10, atol=1e-14)
    # the token profile of block 2 at step 1 is the mean over rows of |h[:, :, c]|
    c = stats.profile_dims[1]
    ref = torch.stack([h[:, :, c].double().abs().mean(0) for s, b, h in acts if s == 1 and b == 2]).mean(0)
    torch.testing.assert_close(stats.token_profile(1, 2), ref, rtol=1e-12, atol=0)

    report = stats.report()
    json.dumps(report)  # JSON-able
    assert isinstance(report["ma_channels"], list)
    assert len(report["slots"]) == steps * len(blocks)
    slot = report["slots"][0]
    ref_peak = peak[0, 0]
    assert slot["mean_peak"] == pytest.approx(ref_peak.mean().item(), rel=1e-12)
    assert slot["median_peak"] == pytest.approx(np.median(ref_peak.numpy()), rel=1e-12)
    assert [e["dim"] for e in slot["top"]] == torch.argsort(ref_peak, descending=True)[:5].tolist()
    pngs = write_plots(stats, report, tmp_path, step=1, block=2)
    assert all(f.exists() and f.read_bytes()[:4] == b"\x89PNG" for f in pngs)


def synthetic(layout, dim, seed, spikes):
    """h (2, L, D) with |h| in [0.5, 1] and every channel's peak exactly 1, except channels d scaled by `factor`."""
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(2, layout.num_tokens, dim, generator=g) * 0.5 + 0.5
    h[:, seed % layout.num_tokens] = 1.0  # the peak token
    h *= torch.where(torch.rand(2, layout.num_tokens, dim, generator=g) < 0.5, -1.0, 1.0)
    for d, factor in spikes.items():
        h[:, :, d] *= factor
    return h


def test_injected_massive_and_weak_channels():
    layout = TokenLayout(frames=3, height=4, width=5)  # n = 20 tokens per frame, L = 60
    dim, steps = 2048, 2  # wide enough that one 100x channel does not lift mu + 3 sigma above the 10x channel
    stats = MAStats(layout, dim, blocks=[0, 1], steps=steps, p=10.0)
    for prompt in range(2):
        for s in range(steps):
            for b in (0, 1, 5):  # block 5 is not recorded
                stats(b, synthetic(layout, dim, 100 * prompt + 10 * s + b, {7: 100.0, 42: 10.0} if b else {7: 100.0}))
            stats.next_step()
    r = stats.report()
    assert stats.prompts == 2 and (stats.rows == 4).all()
    for slot in r["slots"]:
        assert [e["dim"] for e in slot["ma"]] == [7]
        assert [e["dim"] for e in slot["weak_ma"]] == ([42] if slot["block"] == 1 else [])
        ma = slot["ma"][0]
        mean = (dim - 2 + 100 + 10) / dim if slot["block"] == 1 else (dim - 1 + 100) / dim
        assert slot["mean_peak"] == pytest.approx(mean, rel=1e-12) and slot["median_peak"] == 1.0
        assert ma["peak"] == pytest.approx(100.0, rel=1e-12) and ma["peak_to_mean"] == pytest.approx(100 / mean)
        assert ma["peak_to_mean"] > 50 and ma["peak_to_median"] == pytest.approx(ma["peak"] / slot["median_peak"])
    assert r["ma_channels"] == [7] and r["lead_dim"] == 7 and r["lead_is_ma"]
    assert r["ma_counts"] == {"7": 4} and r["weak_ma_counts"] == {"42": 2}
    assert r["stas"] == {"dims": [7], "block": 0} and r["stas_flags"] == "--stas-dims 7 --stas-block 0"
    # uniform |h| on channel 7: first / boundary / interior means agree, ratio ~ 1
    pos = r["positional"]["1"]
    assert pos["dim"] == 7 and pos["steps"] == [0, 1]
    assert all(0.9 < x < 1.1 for x in pos["boundary_to_interior"])


def test_positional_split_sizes_and_means():
    layout = TokenLayout(frames=4, height=5, width=10)  # n = 50, p = 8 -> k = 4 tokens at each end of a frame
    dim, p = 8, 8.0
    stats = MAStats(layout, dim, blocks=[0], steps=1, p=p, profile_dim=3)
    assert stats.report.__doc__ and [len(i) for i in stats.sets] == [50, 3 * 8, 3 * 42]
    # channel 3 carries a position code: 9 on the first frame, 3 on boundary tokens, 1 on interior tokens
    code = torch.ones(layout.num_tokens)
    code[layout.boundary(p)] = 3.0
    code[layout.first()] = 9.0
    h = torch.zeros(1, layout.num_tokens, dim)
    h[0, :, 3] = -code  # |h| is what counts
    h[0, 0, 0] = 1e-3
    stats(0, h)
    r = stats.report()
    pos = r["positional"]["0"]
    assert r["protocol"]["positional_sizes"] == [50, 24, 126]
    assert pos["first"] + pos["boundary"] + pos["interior"] == pytest.approx([9.0, 3.0, 1.0], rel=1e-12)
    assert pos["boundary_to_interior"] + pos["first_to_interior"] == pytest.approx([3.0, 9.0], rel=1e-12)
    prof = r["slots"][0]["profile"]
    assert prof["dim"] == 3 and prof["frame_boundary"] == pytest.approx([9.0, 3.0, 3.0, 3.0], rel=1e-12)
    assert prof["frame_interior"] == pytest.approx([9.0, 1.0, 1.0, 1.0], rel=1e-12)
    torch.testing.assert_close(stats.token_profile(0, 0), code.double())
    with pytest.raises(ValueError, match="does not match"):
        stats(0, torch.zeros(1, 7, dim))


def test_no_capture_and_no_ma_report_cleanly():
    layout = TokenLayout(frames=2, height=2, width=2)
    stats = MAStats(layout, 16, blocks=[0], steps=1)
    with pytest.raises(ValueError, match="no block output"):
        stats.report()
    stats(0, torch.ones(2, layout.num_tokens, 16))
    r = stats.report()
    assert r["ma_channels"] == [] and r["stas"] == {"dims": [], "block": None} and r["stas_flags"] == ""


def test_analyze_script_end_to_end(tmp_path, capsys):
    import sys
    from pathlib import Path

    from minivdit.pipeline import tiny_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "samplers"))
    import analyze

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    (tmp_path / "prompts.txt").write_text("a red fox\n\n")
    args = ["--ckpt", str(ckpt), "--prompts", str(tmp_path / "prompts.txt"), "--prompt", "a green tree",
            "--steps", "2", "--height", "32", "--width", "48", "--blocks", "1", "3", "--out", str(tmp_path / "ma")]
    report = analyze.main(args)
    saved = json.loads((tmp_path / "ma" / "report.json").read_text())
    assert saved["run"]["prompts"] == ["a green tree", "a red fox"]
    assert saved["protocol"]["prompts"] == 2 and saved["protocol"]["blocks"] == [1, 3]
    assert len(saved["slots"]) == 2 * 2 and all(s["rows"] == 4 for s in saved["slots"])  # [cond, uncond] x 2
    assert saved["ma_channels"] == report["ma_channels"]
    pngs = sorted(p.name for p in (tmp_path / "ma").glob("*.png"))
    assert pngs == ["channel_peaks_b3_s1.png", "positional_b3.png", "token_profile_b3_s1.png"]
    out = capsys.readouterr().out
    assert ("MA channels" in out and "--stas-dims" in out) if report["ma_channels"] else "no MA channel" in out
    with pytest.raises(FileExistsError, match="--overwrite"):
        analyze.main(args)
    analyze.main(args + ["--overwrite", "--plot-step", "0", "--plot-block", "1"])
    assert (tmp_path / "ma" / "token_profile_b1_s0.png").exists()
    with pytest.raises(ValueError, match="blocks 0..3"):
        analyze.main(args[:-5] + ["--blocks", "4", "--out", str(tmp_path / "bad")])


def test_ma_rule_uses_the_mean_not_the_median_of_the_peaks():
    # 100 channels: 90 peak at 1, 9 at 100, channel 0 at 3000. Median 1, mean (90 + 900 + 3000) / 100 = 39.9:
    # channel 0 is 3000x the median and 75x the mean (MA); the 100-peak channels are 100x the median but 2.5x the
    # mean (not MA under STAS A.1's peak-to-mean rule).
    peaks = torch.ones(100, dtype=torch.float64)
    peaks[1:10], peaks[0] = 100.0, 3000.0
    r = classify(peaks, ratio=50.0)
    assert r["median_peak"] == 1.0 and r["mean_peak"] == pytest.approx(39.9)
    assert [e["dim"] for e in r["ma"]] == [0]
    assert r["ma"][0]["peak_to_mean"] == pytest.approx(3000 / 39.9) and r["ma"][0]["peak_to_median"] == 3000.0


def test_a1_order_averages_over_prompts_before_the_token_max():
    # channel 1 peaks at 100 on token 0 for prompt A and on token 1 for prompt B; channel 2 is 70 on token 0 for
    # both. Per-prompt maxima averaged (streaming slots): ch1 100 > ch2 70. A.1 order (mean |h| over prompts, then
    # max over tokens): ch1 (100 + 0.5) / 2 < ch2 70.
    layout = TokenLayout(frames=1, height=2, width=2)
    stats = MAStats(layout, 4, blocks=[0, 1], steps=2, p=0.0, a1_slots=[(1, 0)])
    for token in (0, 1):
        for step in range(2):
            h = torch.full((2, layout.num_tokens, 4), 0.5)
            h[:, token, 1], h[:, 0, 2] = 100.0, -70.0
            h[1] = 0.0  # the uncond row is not part of the A.1 average
            stats(0, h)
            stats.next_step()
    r = stats.report(ratio=1.5)
    streaming = next(s for s in r["slots"] if (s["step"], s["block"]) == (1, 0))
    assert [e["dim"] for e in streaming["top"][:2]] == [1, 2]
    (a1,) = r["a1"]
    assert (a1["step"], a1["block"], a1["prompts"]) == (1, 0, 2)
    assert [e["dim"] for e in a1["top"][:2]] == [2, 1]
    assert a1["top"][0]["peak"] == pytest.approx(70.0) and a1["top"][1]["peak"] == pytest.approx(50.25)  # (100 + 0.5) / 2
    with pytest.raises(ValueError, match="A.1 slot"):
        MAStats(layout, 4, blocks=[0], steps=2, a1_slots=[(5, 15)])


@pytest.mark.parametrize("preset", ["wan2.2-ti2v-tiny", "wan2.2-t2v-a14b-tiny"])
def test_analyze_script_on_wan22(tmp_path, capsys, preset):
    """TI2V (48-channel latents, stride 32): one report; A14B: one report per expert, each expert's statistics only
    from the steps it ran (4 steps at shift 5: the switch falls inside the run)."""
    import sys
    from pathlib import Path

    from minivdit.pipeline import tiny_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "samplers"))
    import analyze

    ckpt = tiny_checkpoint(tmp_path / preset, preset=preset)
    report = analyze.main(["--ckpt", str(ckpt), "--steps", "4", "--shift", "5", "--frames", "5", "--height", "64",
                           "--width", "64", "--blocks", "1", "2", "--out", str(tmp_path / "ma")])
    if preset.startswith("wan2.2-ti2v"):
        assert report["protocol"]["dim"] == 64 and report["protocol"]["tokens"] == 2 * 2 * 2
        return
    assert sorted(report["experts"]) == ["high", "low"]
    steps = {name: sorted({s["step"] for s in r["slots"]}) for name, r in report["experts"].items()}
    assert steps["high"] and steps["low"] and max(steps["high"]) < min(steps["low"])  # high first, then low
    assert sorted(steps["high"] + steps["low"]) == [0, 1, 2, 3]
    assert all(report["experts"][n]["run"]["expert"] == n and (tmp_path / "ma" / n).is_dir() for n in steps)


def test_analyze_script_on_cogvideox(tmp_path, monkeypatch):
    """MA statistics over CogVideoX's joint stream: the token layout carries the 226-token text prefix. The prompts
    are encoded before the DiT loads, and the text encoder is not loaded with it (the real T5-xxl and 5B DiT together
    are ~21 GB)."""
    import sys
    from pathlib import Path

    from minivdit.pipeline import tiny_cogvideox_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "samplers"))
    import analyze

    loaded, load = [], analyze.WanPipeline.load
    monkeypatch.setattr(analyze.WanPipeline, "load", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    report = analyze.main(["--ckpt", str(tiny_cogvideox_checkpoint(tmp_path / "cog")), "--steps", "2",
                           "--blocks", "0", "1", "--out", str(tmp_path / "ma")])
    assert len(loaded) == 1 and loaded[0].text_encoder is None and loaded[0].tokenizer is None
    assert report["protocol"]["tokens"] == 226 + 3 * (64 // 16) * (96 // 16)  # text + 3 latent frames of 4 x 6
    assert report["run"]["preset"] == "cogvideox-tiny" and len(report["slots"]) == 2 * 2
