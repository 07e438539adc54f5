"""Guidance methods: formulas, neutral settings, shared-prefix branches, step schedules and errors."""
import pytest
import torch

from minivdit import guidance as G
from minivdit.guidance import Guidance, from_preset
from minivdit.interventions import Perturb, Steer, Zero
from minivdit.pipeline import SampleConfig, WanPipeline
from minivdit.solvers import wan_unipc_sigmas
from minivdit.wan import PRESETS


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return WanPipeline(tiny_model, None, None, None, "wan2.1-tiny", {})




def context():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 512, 32, generator=g)


def sample(pipe, guidance, steps=4):
    return pipe.sample(SampleConfig("unused", frames=9, height=32, width=48, steps=steps), guidance,
                       context=context(), progress=False)


STAS = Steer(block=1, dims=(3, 11), alpha=2.5, p=8)


def test_neutral_settings_equal_vanilla_cfg(pipe):
    vanilla = sample(pipe, Guidance())
    for neutral in (Guidance(stas=STAS, stas_steps=0), Guidance(stas=Steer(block=1, dims=()), stas_steps=4),
                    Guidance(method="dg", dg=Zero(1, (3,)), dg_scale=0.0),
                    Guidance(method="stg", stg_blocks=(2,), stg_scale=0.0),
                    Guidance(method="stg-official", stg_blocks=(2,), stg_scale=0.0)):
        assert torch.equal(sample(pipe, neutral), vanilla), neutral


def test_each_method_changes_the_result_and_strengths_differ(pipe):
    vanilla = sample(pipe, Guidance())
    cases = {"stas": [Guidance(stas=replace_alpha(a), stas_steps=2) for a in (1.0, 4.0)],
             "dg": [Guidance(method="dg", dg=Zero(1, (3, 11)), dg_scale=w) for w in (1.0, 3.0)],
             "stg-R": [Guidance(method="stg", stg_blocks=(2,), stg_scale=s) for s in (1.0, 2.0)],
             "stg-A": [Guidance(method="stg", stg_blocks=(2,), stg_mode="A", stg_scale=s) for s in (1.0, 2.0)],
             "stg-official": [Guidance(method="stg-official", stg_blocks=(2,), stg_scale=s) for s in (1.0, 2.0)],
             "cfg-zero*": [Guidance(method="cfg-zero*", guidance_scale=g) for g in (3.0, 5.0)],
             "apg": [Guidance(method="apg", guidance_scale=g) for g in (3.0, 5.0)]}
    for name, (a, b) in cases.items():
        xa, xb = sample(pipe, a), sample(pipe, b)
        assert (xa - vanilla).abs().max() > 1e-4, name
        assert (xa - xb).abs().max() > 1e-4, name


def replace_alpha(alpha):
    return Steer(block=STAS.block, dims=STAS.dims, alpha=alpha, p=STAS.p)


def test_stas_only_during_the_first_k_steps():
    g = Guidance(stas=STAS, stas_steps=2)
    assert [g.passes(i)[0].steer for i in range(4)] == [STAS, STAS, None, None]
    assert g.passes_per_step() == 2


@torch.no_grad()
def test_batched_cond_uncond_equals_sequential_under_stas(pipe):
    x = torch.randn(1, 16, 3, 4, 6)
    t, ctx, p = torch.tensor([800, 800]), context(), Perturb(steer=STAS)
    both = pipe.model(x.expand(2, -1, -1, -1, -1), t, ctx, p)
    one = torch.cat([pipe.model(x, t[:1], ctx[:1], p), pipe.model(x, t[:1], ctx[1:], p)])
    assert torch.allclose(both, one, atol=2e-6, rtol=0)  # the same up to float summation order of batched matmuls


@torch.no_grad()
@pytest.mark.parametrize("g,row", [(Guidance(method="dg", dg=Zero(1, (3, 11)), dg_scale=2.0), 0),
                                   (Guidance(method="stg", stg_blocks=(2,), stg_scale=1.5), 0),
                                   (Guidance(method="stg", stg_blocks=(1, 3), stg_mode="A", stg_scale=1.5), 0),
                                   (Guidance(method="stg-official", stg_blocks=(2,), stg_scale=1.5), 1)])
def test_branch_pass_equals_separate_pass_and_formula(pipe, g, row):
    """One denoise call (shared prefix) equals the method's formula on three separately computed passes."""
    sigmas = wan_unipc_sigmas(4, 5.0)
    x = torch.randn(1, 16, 3, 4, 6)
    ctx = context()
    v = pipe.denoiser(ctx, g, sigmas)(x, sigmas[0].item())
    t = torch.tensor([999])
    cond, uncond = pipe.model(x, t, ctx[:1]), pipe.model(x, t, ctx[1:])
    _, branches, _ = g.passes(0)
    extra = pipe.model(x, t, ctx[row:row + 1], branches[0][1])
    gs = g.guidance_scale
    want = {"dg": lambda: uncond + gs * (cond - uncond) + g.dg_scale * (cond - extra),
            "stg": lambda: uncond + gs * (cond - uncond) + g.stg_scale * (cond - extra),
            "stg-official": lambda: (uncond + gs * (cond - uncond)) * (1 + g.stg_scale) - g.stg_scale * extra}[g.method]()
    assert (v - want).abs().max() <= 1e-5 * want.abs().max()


def test_official_and_paper_stg_differ_as_their_formulas_say():
    c, u, p = torch.randn(3, 1, 4, 2, 3, 3)
    paper, official = G.stg(c, u, p, 5.0, 1.0), G.stg_official(c, u, p, 5.0, 1.0)
    assert torch.allclose(official - paper, 1.0 * ((u + 5 * (c - u)) - c), atol=1e-6)  # s (v_cfg - v_cond) when p matches


def test_combine_formulas():
    c, u, d = torch.randn(3, 2, 4, 2, 3, 3)
    assert torch.allclose(G.dg(c, u, d, 1.0, 2.0), c + 2.0 * (c - d))  # Eq. 4 when g = 1
    v = G.stg(c, u, d, 5.0, 1.0, rescale=1.0)
    assert torch.allclose(v.flatten(1).std(1), c.flatten(1).std(1), rtol=1e-5)  # Alg. 4 with rescale 1
    assert torch.allclose(G.cfg_zero_star(c, c, 7.0), c, atol=1e-6)  # s* = 1 when cond = uncond
    s = (c.flatten(1) * u.flatten(1)).sum(1) / (u.flatten(1) ** 2).sum(1)
    assert torch.allclose(G.cfg_zero_star(c, u, 4.0), s.view(-1, 1, 1, 1, 1) * u * (1 - 4.0) + 4.0 * c, atol=1e-5)
    x0, _ = G.apg(c, u, 5.0, eta=1.0, norm_threshold=0.0)  # no projection, no threshold, no momentum: CFG
    assert torch.allclose(x0, G.cfg(c, u, 5.0), atol=1e-5)
    x0, _ = G.apg(c, u, 5.0, eta=0.0, norm_threshold=0.0)
    par = (x0 - c).flatten(1)
    assert torch.allclose((par * c.flatten(1)).sum(1), torch.zeros(2), atol=1e-3)  # update orthogonal to x0_cond
    g = Guidance(method="cfg-zero*", zero_init_steps=1)
    assert torch.equal(g.combine({"cond": c, "uncond": u}, c, 0.9, 0, {}), torch.zeros_like(c))


@pytest.mark.parametrize("kw,match", [
    (dict(method="nope"), "unknown guidance method"), (dict(method="dg"), "needs `dg`"),
    (dict(method="stg"), "needs stg_blocks"), (dict(method="stg", stg_blocks=(1,), stg_mode="X"), "stg_mode"),
    (dict(stas_steps=-1), "K"), (dict(method="stg", stg_blocks=(1,), stg_rescale=2.0), "stg_rescale")])
def test_bad_guidance(kw, match):
    with pytest.raises(ValueError, match=match):
        Guidance(**kw)


def test_guidance_does_not_fit_the_run():
    with pytest.raises(ValueError, match="exceeds the 4 sampling steps"):
        Guidance(stas=STAS, stas_steps=5).check(4, 4, 64)
    with pytest.raises(ValueError, match="block indices"):
        Guidance(stas=Steer(block=4, dims=(1,)), stas_steps=1).check(4, 4, 64)
    with pytest.raises(ValueError, match="hidden size"):
        Guidance(method="dg", dg=Zero(1, (64,))).check(4, 4, 64)


def test_from_preset_uses_the_paper_tables():
    p = PRESETS["wan2.1-t2v-1.3b"]
    g = from_preset(p, "cfg", stas=True)
    assert g.stas == Steer(block=9, dims=(1188,), alpha=2.5, p=8.0) and g.stas_steps == 20 and g.guidance_scale == 5.0
    g = from_preset(p, "dg", stas=True, stas_alpha=3.0, dg_scale=2.0)
    assert g.stas.alpha == 3.0 and g.dg == Zero(9, (1188,)) and g.dg_scale == 2.0
    with pytest.raises(ValueError, match=r"--stas-alpha belongs to STAS \(add --stas\)"):
        from_preset(p, "cfg", stas_alpha=3.0)
    with pytest.raises(ValueError, match="no DG settings"):
        from_preset(PRESETS["wan2.1-t2v-14b"], "dg")
