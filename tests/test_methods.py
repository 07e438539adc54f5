"""Faithfulness of each method to its paper / official code (docs/methods.md): the reference form is written out in
the test beside minivdit's, across steps, on random tensors and on the tiny model."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from minivdit import guidance as G
from minivdit.guidance import OPTIONS, STG_RESCALE_ON, Guidance, from_preset
from minivdit.interventions import Perturb, Steer, TokenLayout, Zero
from minivdit.pipeline import SampleConfig, WanPipeline
from minivdit.cogvideox import PRESETS as COG_PRESETS
from minivdit.wan import PRESETS
from samplers import compare, sample

ROOT = Path(__file__).resolve().parent.parent
WAN = [name for name in PRESETS if name.startswith("wan")]
ALL_PRESETS = {**PRESETS, **COG_PRESETS}


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return WanPipeline(tiny_model, None, None, None, "wan2.1-tiny", {})


def context():
    return torch.randn(2, 512, 32, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------------------------------------
# 1. APG (Sadat et al. 2024, Alg. 1) with a norm threshold, on 5-D latents, over two consecutive steps


def apg_alg1(x0_c, x0_u, g, eta, r, beta, running):
    """APG Algorithm 1 written out: momentum, then norm limit, then the projection onto x0_cond, per sample."""
    diff = x0_c - x0_u
    running = diff + beta * running  # MomentumBuffer.update: new = diff + beta * old
    diff = running
    out = []
    for d, c in zip(diff, x0_c):  # one sample at a time, all of (C, F, H, W)
        norm = torch.sqrt((d.double() ** 2).sum())
        if r > 0:
            d = d * min(1.0, r / norm.item())
        unit = c.double() / torch.sqrt((c.double() ** 2).sum())
        par = (d.double() * unit).sum() * unit
        out.append(c + (g - 1) * ((d.double() - par) + eta * par).float())
    return torch.stack(out), running


def test_apg_norm_threshold_matches_alg1_over_two_steps():
    gen = torch.Generator().manual_seed(0)
    shape = (2, 16, 3, 4, 6)
    running, ours_running = torch.zeros(shape), None
    limited = 0
    for step in range(2):  # step 2 exercises the momentum average
        x0_c, x0_u = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        ref, running = apg_alg1(x0_c, x0_u, 5.0, 0.3, 10.0, -0.5, running)
        ours, ours_running = G.apg(x0_c, x0_u, 5.0, 0.3, 10.0, ours_running, -0.5)
        assert torch.allclose(ours, ref, atol=1e-5, rtol=0), step
        limited += int(torch.linalg.vector_norm(running, dim=(1, 2, 3, 4)).gt(10.0).sum())
    assert limited > 0  # the threshold acted: some update norm exceeded 10


def test_apg_threshold_runs_through_the_sample_script(tmp_path):
    out = sample.main(["--method", "apg", "--apg-norm-threshold", "1.0", "--steps", "2", "--frames", "5",
                    "--height", "32", "--width", "32", "--output", str(tmp_path / "apg.mp4")])
    assert out.exists() and '"apg_norm_threshold": 1.0' in out.with_suffix(".json").read_text()


# ----------------------------------------------------------------------------------------------------------
# 2. CFG-Zero*: the official Wan setting zeroes 2 of 50 steps; s* = <c, u> / (|u|^2 + 1e-8)


def official_cfg_zero_star(c, u, g, i, zero_steps=1):
    """WeichenFan/CFG-Zero-star Wan2.1: `optimized_scale` then `if i <= zero_steps: v = 0`."""
    b = c.shape[0]
    pos, neg = c.reshape(b, -1), u.reshape(b, -1)
    alpha = ((pos * neg).sum(1, keepdim=True) / ((neg ** 2).sum(1, keepdim=True) + 1e-8)).view(b, 1, 1, 1, 1)
    return c * 0.0 if i <= zero_steps else u * alpha + g * (c - u * alpha)


@pytest.mark.parametrize("preset", WAN)
def test_cfg_zero_star_follows_the_official_wan_setting(preset):
    g = from_preset(PRESETS[preset], "cfg-zero*")
    assert g.zero_init_steps == 2
    gen = torch.Generator().manual_seed(1)
    for i in range(4):  # steps 0 and 1 zeroed, 2 and 3 (the first after zero-init) guided
        c, u = torch.randn(2, 16, 2, 4, 4, generator=gen), torch.randn(2, 16, 2, 4, 4, generator=gen)
        ours = g.combine({"cond": c, "uncond": u}, torch.zeros_like(c), 0.5, i, {})
        ref = official_cfg_zero_star(c, u, g.guidance_scale, i)
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0), i
        assert bool((ours == 0).all()) == (i < 2)


# ----------------------------------------------------------------------------------------------------------
# 3 and 7. STG scale: per mode (STG appendix: R 1.0, A 2.0); block 2 is the official Wan default block


def test_stg_scale_by_mode_and_official_block():
    p = PRESETS["wan2.1-t2v-1.3b"]
    r, a = from_preset(p, "stg"), from_preset(p, "stg", stg_mode="A")
    assert (r.stg_blocks, r.stg_mode, r.stg_scale) == ((2,), "R", 1.0)
    assert (a.stg_blocks, a.stg_mode, a.stg_scale) == ((2,), "A", 2.0)
    assert from_preset(p, "stg", stg_mode="A", stg_scale=0.5).stg_scale == 0.5
    assert Guidance(method="stg", stg_blocks=(1,), stg_mode="A").stg_scale == 2.0


# ----------------------------------------------------------------------------------------------------------
# 4. STAS scaling rule: omega has a documented default (2.5x, Fig. 3) and omega <= 0 is refused


def test_stas_scaling_rule_default_and_refusals():
    layout = TokenLayout(frames=2, height=2, width=5)
    h = torch.randn(2, layout.num_tokens, 8, generator=torch.Generator().manual_seed(2))
    s = Steer(block=0, dims=(3,), rule="scaling", tokens="first+boundary", p=20)
    out = s(h, layout)
    idx = layout.tokens("first+boundary", 20)
    assert torch.allclose(out[:, idx, 3], 2.5 * h[:, idx, 3])  # (1 + 1.5) h
    rest = torch.ones_like(h, dtype=torch.bool)
    rest[:, idx, 3] = False
    assert torch.equal(out[rest], h[rest])
    for omega in (0.0, -0.5):
        with pytest.raises(ValueError, match="omega > 0"):
            Steer(block=0, dims=(3,), rule="scaling", omega=omega)
    with pytest.raises(ValueError, match="scaling rule only"):
        from_preset(PRESETS["wan2.1-t2v-1.3b"], "cfg", stas=True, stas_omega=1.0)
    g = from_preset(PRESETS["wan2.1-t2v-1.3b"], "cfg", stas=True, stas_rule="scaling", stas_omega=1.0)
    assert (g.stas.rule, g.stas.omega) == ("scaling", 1.0)


# ----------------------------------------------------------------------------------------------------------
# 5. With STAS on, the DG degraded / STG perturbed branch is the steered model plus the perturbation, and STAS
#    switches off on every pass after step K


@torch.no_grad()
def test_branches_are_steered_during_the_first_k_steps_only(pipe):
    steer = Steer(block=1, dims=(3, 11), alpha=2.5, p=8)
    g = Guidance(method="dg", dg=Zero(2, (5,)), dg_scale=1.0, stas=steer, stas_steps=1)
    x, t, ctx = torch.randn(1, 16, 2, 4, 6), torch.tensor([700, 700]), context()
    for i, steered in ((0, True), (1, False)):
        base, branches, _ = g.passes(i)
        out = pipe.model(x.expand(2, -1, -1, -1, -1), t, ctx, base, branches)
        alone = pipe.model(x, t[:1], ctx[:1], Perturb(steer=steer if steered else None, zero=Zero(2, (5,))))
        assert torch.allclose(out[2:], alone, atol=2e-6, rtol=0), i
        assert (base.steer is not None) == steered and (branches[0][1].steer is not None) == steered


def test_stas_switches_off_after_step_k_in_the_loop(pipe):
    seen = []
    model = pipe.model

    class Spy(torch.nn.Module):  # records which passes were steered, step by step
        config = model.config
        patch_embedding = model.patch_embedding

        def forward(self, x, t, ctx, perturb, branches=()):
            seen.append((perturb.steer is not None, [p.steer is not None for _, p in branches]))
            return model(x, t, ctx, perturb, branches)

    spy = WanPipeline(Spy(), None, None, None, "wan2.1-tiny", {})
    g = Guidance(method="stg", stg_blocks=(2,), stas=Steer(block=1, dims=(3,)), stas_steps=2)
    spy.sample(SampleConfig("x", frames=5, height=32, width=32, steps=4), g, context=context(), progress=False)
    assert seen == [(True, [True])] * 2 + [(False, [False])] * 2


# ----------------------------------------------------------------------------------------------------------
# 6. STG rescale: a bare flag means the official 0.7; Alg. 4 applies to 'stg' only


def test_stg_rescale_flag_and_domain():
    assert sample.parse(["--method", "stg", "--stg-rescale"]).stg_rescale == STG_RESCALE_ON == 0.7
    assert sample.parse(["--method", "stg", "--stg-rescale", "0.3"]).stg_rescale == 0.3
    assert sample.parse([]).stg_rescale is None
    with pytest.raises(ValueError, match="'stg' only"):
        Guidance(method="stg-official", stg_blocks=(2,), stg_rescale=0.7)
    c, u, p = (torch.randn(2, 4, 2, 3, 3, generator=torch.Generator().manual_seed(k)) for k in range(3))
    v = c + 1.0 * (c - p) + 4.0 * (c - u)  # v_u + g (v_c - v_u) + s (v_c - v_p) with g = 5, s = 1
    dims = (1, 2, 3, 4)
    factor = c.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True)  # Alg. 4: std(eps_t) / std(eps_tilde)
    ref = v * (0.7 * factor + 0.3)
    assert torch.allclose(G.stg(c, u, p, 5.0, 1.0, rescale=0.7), ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# options that do not apply are refused; both scripts accept every Guidance option


def test_options_of_another_method_are_refused():
    p = PRESETS["wan2.1-t2v-1.3b"]
    for method, opt in (("cfg", "dg_scale"), ("cfg", "stg_rescale"), ("dg", "apg_eta"), ("apg", "zero_init_steps"),
                        ("stg", "dg_block")):
        with pytest.raises(ValueError, match="--" + opt.replace("_", "-") + " belongs to"):
            from_preset(p, method, **{opt: 1})


def test_every_guidance_option_reachable_from_both_scripts():
    fields = {f.name for f in dataclasses.fields(Guidance)} - {"method", "guidance_scale", "stas", "dg", "capture"}
    fields |= {f"stas_{f.name}" for f in dataclasses.fields(Steer)} | {f"dg_{f.name}" for f in dataclasses.fields(Zero)}
    assert {name for name, *_ in OPTIONS} == fields
    values = {"stas_tokens": "first", "stas_rule": "scaling", "stg_mode": "A"}
    for name, *_ in OPTIONS:
        flag, value = "--" + name.replace("_", "-"), values.get(name, "1")
        assert getattr(sample.parse([flag, value]), name) is not None, name
        assert getattr(compare.parse([flag, value]), name) is not None, name


# ----------------------------------------------------------------------------------------------------------
# the method card: its defaults table is generated from the presets and the Guidance defaults


def test_method_card_defaults_match_the_code():
    card = (ROOT / "docs" / "methods.md").read_text()
    table = re.search(r"<!-- defaults:begin -->\n(.*?)\n<!-- defaults:end -->", card, re.S)
    assert table is not None, "docs/methods.md lost its generated defaults table"
    assert table.group(1) == G.defaults_table(ALL_PRESETS), \
        "docs/methods.md defaults are stale: paste guidance.defaults_table({**wan.PRESETS, **cogvideox.PRESETS})"
    for name in ("cfg", "cfg-zero", "apg", "dg", "stg", "stas", "ma-analysis"):
        assert f'<a id="{name}"></a>' in card, name
