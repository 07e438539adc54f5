"""The comparator methods (issue 15; docs/methods.md#comparators): PAG, SEG, FDG, TCFG, magnitude-aware guidance,
AutoGuidance and CFG++.

Combines against diffusers 0.42.1's guiders fed the same predictions (all with use_original_formulation=False, the
diffusers default, which is the u + g (c - u) form minivdit uses; every guider's start/stop window opened and its
state set to a step inside it). Where diffusers is broken (SEG never installs its blur and inverts sigma, FDG needs
kornia, rejects 5-D latents and pads without cropping, MAMBO-G's torch.norm rejects 5-D tensors) the test writes the
official form out. Then, on the tiny Wan2.1, Wan2.2 TI2V and CogVideoX models: neutral setting = CFG, the method
intervenes and its strength matters, batched = sequential, and bad input is refused.
"""
import dataclasses
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from minivdit import guidance as G
from minivdit import solvers
from minivdit.attention import SEG_INF, blur_queries
from minivdit.cogvideox import PRESETS as COG_PRESETS, CogVideoXModel
from minivdit.guidance import Guidance, from_preset
from minivdit.interventions import Perturb
from minivdit.pipeline import Pipeline, SampleConfig, guidance_for, weight_files
from minivdit.wan import PRESETS, WanModel

STATE = dict(step=1, num_inference_steps=10, timestep=torch.tensor(900))  # inside every guider's window


def preds(shape=(2, 4, 3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def guider(cls, **kw):
    g = cls(**kw)
    g.set_state(**STATE)
    return g


def combine(method, named, **kw):
    return Guidance(method=method, **kw).combine(named, None, 0.5, 0, {})


# ----------------------------------------------------------------------------------------------------------
# combines vs diffusers


def test_pag_and_seg_combines_match_diffusers():
    from diffusers.guiders import PerturbedAttentionGuidance, SmoothedEnergyGuidance

    c, u, p = preds()
    pag = guider(PerturbedAttentionGuidance, guidance_scale=5.0, perturbed_guidance_scale=3.0,
                 perturbed_guidance_layers=[1], perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)
    seg = guider(SmoothedEnergyGuidance, guidance_scale=5.0, seg_guidance_scale=2.0, seg_guidance_layers=[1])
    named = {"cond": c, "uncond": u, "perturbed": p}
    assert (combine("pag", named, guidance_scale=5.0, pag_scale=3.0) - pag.forward(c, u, p).pred).abs().max() <= 1e-6
    assert (combine("seg", named, guidance_scale=5.0, seg_scale=2.0) - seg.forward(c, u, p).pred).abs().max() <= 1e-6


def test_autoguidance_combine_matches_diffusers():
    from diffusers.guiders import AutoGuidance
    from diffusers.hooks import LayerSkipConfig

    c, _, bad = preds()
    # diffusers' auto_guidance_layers=[1] raises TypeError (methods.md §7): the config form is the one that works
    ag = guider(AutoGuidance, guidance_scale=5.0, auto_guidance_config=LayerSkipConfig(indices=[1], dropout=1.0))
    ours = combine("autoguidance", {"cond": c, "uncond": torch.zeros_like(c), "bad": bad}, guidance_scale=5.0)
    assert (ours - ag.forward(c, bad).pred).abs().max() <= 1e-6


def test_tcfg_combine_matches_diffusers():
    from diffusers.guiders import TangentialClassifierFreeGuidance

    c, u, _ = preds()
    ref = guider(TangentialClassifierFreeGuidance, guidance_scale=5.0).forward(c, u).pred
    ours = combine("tcfg", {"cond": c, "uncond": u}, guidance_scale=5.0)
    assert (ours - ref).abs().max() <= 1e-6
    assert (ours - G.cfg(c, u, 5.0)).abs().max() > 1e-2  # the projection changes it


def test_mag_combine_matches_diffusers():
    from diffusers.guiders import MagnitudeAwareGuidance

    c, u, _ = preds()
    u = 3 * u  # |c - u| / |u| ~ 0.5: exp(-alpha r) is neither 0 nor 1
    m = guider(MagnitudeAwareGuidance, guidance_scale=5.0, alpha=2.0)
    with pytest.raises(RuntimeError):  # diffusers' torch.norm over 4 dims rejects 5-D video tensors
        m.forward(c, u)
    ref = m.forward(c.flatten(2), u.flatten(2)).pred.view_as(c)  # (B, C, F H W): the same 2-norms
    ours = combine("mag", {"cond": c, "uncond": u}, guidance_scale=5.0, mag_alpha=2.0)
    assert (ours - ref).abs().max() <= 1e-6
    assert (ours - G.cfg(c, u, 5.0)).abs().max() > 1e-2


def kornia_blur(x):
    """kornia pyramid blur written out: [1, 4, 6, 4, 1] x [1, 4, 6, 4, 1] / 256, reflect border."""
    k = torch.tensor([[1.0, 4, 6, 4, 1]])
    k2 = (k.T @ k / 256).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k2, groups=x.shape[1])


def kornia_pyrup(x):
    return kornia_blur(F.interpolate(x, size=(2 * x.shape[2], 2 * x.shape[3]), mode="bilinear", align_corners=False))


def kornia_laplacian_pyramid(x, levels):
    """kornia build_laplacian_pyramid for power-of-two sizes (no padding): Gaussian levels by blur + bilinear
    halving, L_k = G_k - pyrup(G_k+1), last = G."""
    gs = [x]
    for _ in range(levels - 1):
        b = kornia_blur(gs[-1])
        gs.append(F.interpolate(b, size=(b.shape[2] // 2, b.shape[3] // 2), mode="bilinear", align_corners=False))
    return [gs[i] - kornia_pyrup(gs[i + 1]) for i in range(levels - 1)] + [gs[-1]]


def test_fdg_combine_matches_diffusers_per_frame(monkeypatch):
    import diffusers.guiders.frequency_decoupled_guidance as fd

    # kornia is not installed: diffusers' FDG gets the kornia functions written out above; it takes 4-D input only,
    # so frames are folded into the batch, as minivdit's fdg does
    monkeypatch.setattr(fd, "_CAN_USE_KORNIA", True)
    monkeypatch.setattr(fd, "build_laplacian_pyramid_func", kornia_laplacian_pyramid)
    monkeypatch.setattr(fd, "upsample_and_blur_func", kornia_pyrup)
    c, u, _ = preds((2, 4, 3, 16, 8))
    fold = lambda t: t.transpose(1, 2).reshape(6, 4, 16, 8)  # noqa: E731
    named = {"cond": c, "uncond": u}
    for scales in ((10.0, 5.0), (7.0, 2.0, 4.0)):
        ref = guider(fd.FrequencyDecoupledGuidance, guidance_scales=list(scales)).forward(fold(c), fold(u)).pred
        ours = combine("fdg", named, fdg_scales=scales)
        assert (fold(ours) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (ours - G.cfg(c, u, 5.0)).abs().max() > 1e-2
    # the parallel projection (diffusers' parallel_weights, upcast_to_double True): one weight, and one per level
    for scales, rho in (((10.0, 5.0), (0.5,)), ((7.0, 2.0, 4.0), (0.0, 0.3, 1.0))):
        ref = guider(fd.FrequencyDecoupledGuidance, guidance_scales=list(scales),
                     parallel_weights=rho[0] if len(rho) == 1 else list(rho)).forward(fold(c), fold(u)).pred
        ours = combine("fdg", named, fdg_scales=scales, fdg_parallel_weights=rho)
        assert (fold(ours) - ref).abs().max() <= 1e-6 * ref.abs().max()  # float32 rounding of values up to ~35
        assert (ours - combine("fdg", named, fdg_scales=scales)).abs().max() > 1e-2  # the projection acts
    d, level = fold(c - u), fold(c)  # the projection alone, on a 4-D level: diffusers' `project`
    par, orth = fd.project(d, level)
    ours = G.parallel_part(d, level)
    assert (ours - par).abs().max() <= 1e-6 and (d - ours - orth).abs().max() <= 1e-6


def test_fdg_pyramid_keeps_any_size():
    """Wan 480p latents are 60 x 104: kornia pads to 64 x 128 and diffusers returns that shape; ours inverts exactly."""
    c, u, _ = preds((1, 4, 2, 6, 10))
    x = c[:, :, 0]
    pyr = G.laplacian_pyramid(x, 3)
    assert [tuple(p.shape[2:]) for p in pyr] == [(6, 10), (3, 5), (1, 2)]
    assert (G.pyramid_image(pyr) - x).abs().max() <= 1e-5
    # equal scales: CFG (the pyramid is linear and inverted exactly)
    assert (G.fdg(c, u, (5.0, 5.0, 5.0)) - G.cfg(c, u, 5.0)).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------------------------
# SEG's blur: the official 2-D Gaussian, per frame


def seg_official_blur(img, sigma):
    """SEG-SDXL gaussian_blur_2d written out: img (B, C, H, W), square."""
    k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    k = min(k, img.shape[-1] - (img.shape[-1] % 2 - 1))
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, steps=k)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    k1 = pdf / pdf.sum()
    k2 = torch.mm(k1[:, None], k1[None, :]).expand(img.shape[-3], 1, k, k)
    img = F.pad(img, [k // 2] * 4, mode="reflect")
    return F.conv2d(img, k2, groups=img.shape[-3])


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0, 100.0])
def test_seg_blur_is_the_official_gaussian_per_frame(sigma):
    g = torch.Generator().manual_seed(1)
    f, h, w, heads, d = 3, 6, 6, 2, 4
    q = torch.randn(2, 5 + f * h * w, heads, d, generator=g)  # 5 prefix rows (a text prefix)
    out = blur_queries(q, sigma, (f, h, w), start=5)
    assert torch.equal(out[:, :5], q[:, :5])
    for j in range(f):
        frame = q[:, 5 + j * h * w: 5 + (j + 1) * h * w]  # (B, H W, heads, d)
        img = frame.reshape(2, h, w, heads * d).permute(0, 3, 1, 2)
        ref = seg_official_blur(img, sigma).permute(0, 2, 3, 1).reshape_as(frame)
        assert (out[:, 5 + j * h * w: 5 + (j + 1) * h * w] - ref).abs().max() <= 1e-6


def test_seg_infinite_sigma_is_the_frame_mean_and_frames_never_mix():
    g = torch.Generator().manual_seed(2)
    f, h, w = 3, 4, 6
    q = torch.randn(1, f * h * w, 2, 4, generator=g)
    out = blur_queries(q, SEG_INF, (f, h, w))
    frames = q.unflatten(1, (f, h * w))
    assert torch.allclose(out.unflatten(1, (f, h * w)), frames.mean(2, keepdim=True).expand_as(frames), atol=1e-6)
    for sigma in (1.5, SEG_INF):  # changing frame 0 leaves the blurred queries of frames 1, 2 as they were
        q2 = q.clone()
        q2[:, : h * w] += 5
        a, b = blur_queries(q, sigma, (f, h, w)), blur_queries(q2, sigma, (f, h, w))
        assert torch.equal(a[:, h * w:], b[:, h * w:]) and not torch.equal(a[:, : h * w], b[:, : h * w])


# ----------------------------------------------------------------------------------------------------------
# on every family: neutral = CFG, intervenes, batched = sequential


def randomized(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


FAMILIES = ("wan2.1-tiny", "wan2.2-ti2v-tiny", "cogvideox-tiny")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(preset, Pipeline, context (2, L, D), latent x (3 latent frames: FlowMo's variance needs >= 2 differences),
    grid) on a tiny model of the family."""
    name = request.param
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(0)  # the initial weights too: the same model whatever ran before
    if name in COG_PRESETS:
        c = COG_PRESETS[name].config
        model = randomized(CogVideoXModel(c))
        context = torch.randn(2, c.max_text_seq_length, c.text_embed_dim, generator=g)
        x = torch.randn(1, c.in_channels, 3, 8, 8, generator=g)
        grid = solvers.cogvideox_timesteps(4)
    else:
        c = PRESETS[name].config
        model = randomized(WanModel(c))
        context = torch.randn(2, c.text_len, c.text_dim, generator=g)
        x = torch.randn(1, c.in_dim, 3, 8, 8, generator=g)
        grid = solvers.flow_sigmas(4, 5.0)
    return name, Pipeline(model, None, None, None, name, {}), context, x, grid


def step_v(family, guidance, i=1):
    _, pipe, context, x, grid = family
    with torch.no_grad():
        return pipe.denoiser(context, guidance, grid)(x, grid[i].item())


NEUTRAL = {  # method -> (neutral settings = plain CFG at g, a setting that intervenes, a stronger one)
    "pag": ({"pag_scale": 0.0}, {"pag_scale": 1.0}, {"pag_scale": 3.0}),
    "seg": ({"seg_scale": 0.0}, {"seg_scale": 1.0}, {"seg_scale": 3.0}),
    "autoguidance": ({"ag_blocks": ()}, {"ag_blocks": (1,)}, {"ag_blocks": (0, 1)}),
    "mag": ({"mag_alpha": 0.0}, {"mag_alpha": 0.5}, {"mag_alpha": 8.0}),
    "fdg": ({"fdg_scales": (5.0, 5.0)}, {"fdg_scales": (10.0, 5.0)}, {"fdg_scales": (20.0, 5.0)}),
}


@pytest.mark.parametrize("method", list(NEUTRAL))
def test_neutral_is_cfg_and_strength_matters(family, method):
    neutral, some, more = NEUTRAL[method]
    v_cfg = step_v(family, Guidance(guidance_scale=5.0))
    v0 = step_v(family, Guidance(method=method, guidance_scale=5.0, **neutral))
    tol = 1e-5 * v_cfg.abs().max() if method == "fdg" else 0  # the pyramid round trip rounds
    assert (v0 - v_cfg).abs().max() <= tol
    v1 = step_v(family, Guidance(method=method, guidance_scale=5.0, **some))
    v2 = step_v(family, Guidance(method=method, guidance_scale=5.0, **more))
    assert (v1 - v_cfg).abs().max() > 1e-4 and (v2 - v1).abs().max() > 1e-4


def test_tcfg_at_scale_one_is_cfg_and_intervenes(family):
    assert torch.allclose(step_v(family, Guidance(method="tcfg", guidance_scale=1.0)),
                          step_v(family, Guidance(guidance_scale=1.0)), atol=1e-5)
    assert (step_v(family, Guidance(method="tcfg")) - step_v(family, Guidance())).abs().max() > 1e-4


def test_seg_sigma_matters_and_pag_is_stg_a(family):
    a = step_v(family, Guidance(method="seg", seg_sigma=0.5))
    b = step_v(family, Guidance(method="seg"))  # infinite sigma
    assert (a - b).abs().max() > 1e-5
    # PAG = STG-A's perturbation and combine: same blocks, same scale -> the same velocity
    pag = step_v(family, Guidance(method="pag", pag_blocks=(1,), pag_scale=2.0))
    stg = step_v(family, Guidance(method="stg", stg_blocks=(1,), stg_mode="A", stg_scale=2.0))
    assert torch.equal(pag, stg)


@pytest.mark.parametrize("method", ["pag", "seg", "autoguidance"])
def test_batched_equals_sequential(family, method):
    name, pipe, context, x, grid = family
    g = Guidance(method=method, seg_sigma=1.0)
    base, branches, _ = g.passes(0)
    t = pipe.family.timestep(grid[1].item())
    tt = pipe.timesteps(t, x.shape, False)
    with torch.no_grad():
        batched = pipe.model(x.expand(2, *x.shape[1:]), tt, context, base, branches)
        (row, p), = branches
        alone = pipe.model(x, tt[row:row + 1], context[row:row + 1], p)
        rows = pipe.model(x.expand(2, *x.shape[1:]), tt, context, base)
    assert batched.shape[0] == 3
    assert (batched[2:] - alone).abs().max() <= 1e-5 and (batched[:2] - rows).abs().max() <= 1e-5
    assert (batched[2] - batched[row]).abs().max() > 1e-5  # the branch is perturbed


# ----------------------------------------------------------------------------------------------------------
# AutoGuidance with a guide model: a smaller DiT of the same latent space predicts the bad (uncond) prediction


def smaller(name, seed=1):
    """A Wan DiT of the preset's latent space at half the width and depth (dim 32, 2 blocks), randomized."""
    c = PRESETS[name].config
    torch.manual_seed(seed)
    return randomized(WanModel(dataclasses.replace(c, dim=32, ffn_dim=64, num_heads=2, num_layers=2)), seed)


@pytest.mark.parametrize("name", ["wan2.1-tiny", "wan2.2-ti2v-tiny"])
def test_autoguidance_guide_model_prediction_is_used(name):
    c = PRESETS[name].config
    g = torch.Generator().manual_seed(10)
    big, small = randomized(WanModel(c)), smaller(name)
    context = torch.randn(2, c.text_len, c.text_dim, generator=g)
    x = torch.randn(1, c.in_dim, 3, 8, 8, generator=g)
    grid = solvers.flow_sigmas(4, 5.0)
    pipe = Pipeline(big, None, None, None, name, {})
    pipe.guides["small"] = small
    guided = Guidance(method="autoguidance", guidance_scale=5.0, ag_model="small")
    assert guided.passes(0)[1] == () and guided.passes_per_step() == 3  # no skipped-block branch: the guide instead
    t = pipe.family.timestep(grid[1].item())
    tt = pipe.timesteps(t, x.shape, False)
    with torch.no_grad():
        ours = pipe.denoiser(context, guided, grid)(x, grid[1].item())
        skipped = pipe.denoiser(context, Guidance(method="autoguidance"), grid)(x, grid[1].item())
        v_c = big(x.expand(2, *x.shape[1:]), tt, context)[:1]  # the big model's cond prediction
        v_bad = small(x, tt[1:], context[1:])  # the guide's prediction on the negative prompt
    ref = v_bad + 5.0 * (v_c - v_bad)  # AutoGuidance's combine, written out
    assert (ours - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert (ours - skipped).abs().max() > 1e-2


def test_autoguidance_guide_model_loads_from_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    name = "wan2.1-tiny"
    guide = randomized(WanModel(PRESETS[name].config), seed=2)  # a loadable guide must match a preset's shapes
    path = tmp_path / "guide.safetensors"
    save_file({k: v.contiguous() for k, v in guide.state_dict().items()}, path)
    c, g = PRESETS[name].config, torch.Generator().manual_seed(11)
    context, x = torch.randn(2, c.text_len, c.text_dim, generator=g), torch.randn(1, c.in_dim, 3, 8, 8, generator=g)
    grid = solvers.flow_sigmas(4, 5.0)
    pipe = Pipeline(randomized(WanModel(c)), None, None, None, name, {})
    pipe.guides["memory"] = guide
    with torch.no_grad():
        loaded = pipe.denoiser(context, Guidance(method="autoguidance", ag_model=str(path)), grid)(x, grid[1].item())
        given = pipe.denoiser(context, Guidance(method="autoguidance", ag_model="memory"), grid)(x, grid[1].item())
    assert torch.equal(loaded, given) and str(path) in pipe.guides
    assert str(path.resolve()) in weight_files(pipe.info)  # the sidecar fingerprints the guide's file
    from minivdit.specs import filename, parse_specs
    label = parse_specs(f"autoguidance:ag_model={path}")[0].label  # a compare.py spec: its file name stays in the folder
    assert str(path) in label and "/" not in filename(label)


def test_autoguidance_guide_of_another_latent_space_refused(tmp_path):
    from safetensors.torch import save_file

    from samplers import sample

    save = lambda m, f: save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / f)  # noqa
    save(CogVideoXModel(COG_PRESETS["cogvideox-tiny"].config), "cog.safetensors")
    save(smaller("wan2.2-ti2v-tiny"), "ti2v.safetensors")  # Wan2.2 VAE latents: 48 channels
    wan21 = PRESETS["wan2.1-tiny"]
    for f, what in (("cog", "a CogVideoX DiT"), ("ti2v", "a Wan DiT with .* = \\(48, 48")):
        with pytest.raises(ValueError, match=f"is {what}.*its own latent space"):
            guidance_for(wan21, "autoguidance", ag_model=str(tmp_path / f"{f}.safetensors"))
        with pytest.raises(ValueError, match="its own latent space"):  # the script: before any model is loaded
            sample.guidance_from_args(sample.parse(["--method", "autoguidance", "--ag-model",
                                                    str(tmp_path / f"{f}.safetensors")]), wan21)
    pipe = Pipeline(randomized(WanModel(wan21.config)), None, None, None, "wan2.1-tiny", {})
    pipe.guides["ti2v"] = smaller("wan2.2-ti2v-tiny")  # a loaded guide is checked too
    with pytest.raises(ValueError, match="its own latent space"):
        pipe.sample(run_of("wan2.1-tiny"), Guidance(method="autoguidance", ag_model="ti2v"),
                    context=torch.zeros(2, 512, 32), progress=False)
    with pytest.raises(ValueError, match="defined for Wan models only"):
        guidance_for(COG_PRESETS["cogvideox-tiny"], "autoguidance", ag_model=str(tmp_path / "cog.safetensors"))
    with pytest.raises(ValueError, match="--ag-model .*none: no such checkpoint"):
        guidance_for(wan21, "autoguidance", ag_model=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="give one of them"):
        guidance_for(wan21, "autoguidance", ag_blocks=(1,), ag_model=str(tmp_path / "ti2v.safetensors"))


# ----------------------------------------------------------------------------------------------------------
# CFG++: one solver update against the official formula


def test_cfgpp_one_update_is_the_official_formula(family):
    name, pipe, context, x, grid = family
    lam, i = 0.6, 1
    g = Guidance(method="cfgpp", cfgpp_scale=lam)
    t = pipe.family.timestep(grid[i].item())
    with torch.no_grad():
        vc, vu = pipe.model(x.expand(2, *x.shape[1:]), pipe.timesteps(t, x.shape, False), context)[:, None]
        v = pipe.denoiser(context, g, grid)(x, grid[i].item())
    v_lam = vu + lam * (vc - vu)
    if name in COG_PRESETS:  # DDIM, v-prediction: x' = sqrt(a') x0(v_lam) + sqrt(1 - a') eps(v_u)
        alphas = solvers.cogvideox_alphas_cumprod(COG_PRESETS[name].snr_shift_scale)
        a, a2 = alphas[int(grid[i])].item(), alphas[int(grid[i]) - 1000 // len(grid)].item()
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * v_lam
        eps_u = math.sqrt(1 - a) * x + math.sqrt(a) * vu
        ref = math.sqrt(a2) * x0 + math.sqrt(1 - a2) * eps_u
        coef_x = math.sqrt((1 - a2) / (1 - a))  # the solver's DDIM step (solvers.sample_ddim_vpred)
        ours = coef_x * x + (math.sqrt(a2) - math.sqrt(a) * coef_x) * solvers.x0_from_v(x, v, a)
    else:  # flow Euler: x' = (1 - sigma') x0(v_lam) + sigma' eps(v_u), x0 = x - sigma v, eps = x + (1 - sigma) v
        s, s2 = (float(torch.tensor(grid[k].item(), dtype=torch.float32)) for k in (i, i + 1))
        ref = (1 - s2) * (x - s * v_lam) + s2 * (x + (1 - s) * vu)
        ours = solvers.sample_euler(pipe.denoiser(context, g, grid), x, grid[i:i + 2])
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (v - v_lam).abs().max() > 1e-3  # the renoising with v_u matters: not plain CFG at scale lambda


# ----------------------------------------------------------------------------------------------------------
# bad input: one clear error each, before any model is loaded


@pytest.mark.parametrize("kw,match", [
    (dict(method="cfgpp", cfgpp_scale=1.5), "in \\[0, 1\\]"),
    (dict(method="cfgpp", cfgpp_scale=-0.1), "in \\[0, 1\\]"),
    (dict(method="seg", seg_sigma=0.0), "seg_sigma"),
    (dict(method="seg", seg_sigma=-1.0), "seg_sigma"),
    (dict(method="pag", pag_scale=-1.0), "pag_scale"),
    (dict(method="pag", pag_blocks=()), "needs pag_blocks"),
    (dict(method="mag", mag_alpha=-1.0), "mag_alpha"),
    (dict(method="fdg", fdg_parallel_weights=(0.5, 0.5, 0.5)), "one value or one per level"),
    (dict(method="flowmo", flowmo_iterations=0), "flowmo_iterations = 0 must be >= 1"),
])
def test_out_of_range_parameters_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Guidance(**kw)


@pytest.mark.parametrize("preset,method,kw", [
    ("wan2.1-tiny", "pag", dict(pag_blocks=(4,))),
    ("wan2.1-tiny", "seg", dict(seg_blocks=(0, 9))),
    ("cogvideox-tiny", "autoguidance", dict(ag_blocks=(3,))),
    ("wan2.1-t2v-1.3b", "pag", dict(pag_blocks=(30,))),
])
def test_blocks_outside_the_model_refused_from_the_preset(preset, method, kw):
    with pytest.raises(ValueError, match="out of range"):
        from_preset({**PRESETS, **COG_PRESETS}[preset], method, **kw)


def test_options_of_another_method_refused():
    with pytest.raises(ValueError, match="--seg-sigma belongs to method 'seg'"):
        from_preset(PRESETS["wan2.1-tiny"], "pag", seg_sigma=1.0)


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_cfgpp_refused_with_multistep_solvers(tiny_model, solver):
    pipe = Pipeline(tiny_model, None, None, None, "wan2.1-tiny", {})
    with pytest.raises(ValueError, match="CFG\\+\\+ replaces a one-step update"):
        pipe.sample(SampleConfig("x", frames=5, height=32, width=32, steps=2, solver=solver),
                    Guidance(method="cfgpp"), context=torch.zeros(2, 512, 32), progress=False)


# ----------------------------------------------------------------------------------------------------------
# FlowMo: loss, gradient, one update against the official formulas; gradients through the DiT


def flowmo_loss_written(v):
    """Official `calculate_motion_variance` (4-D branch) per sample, written out: L1 distance of consecutive latent
    frames, population variance over the differences per (c, h, w), mean over channels, max over (h, w)."""
    out = []
    for s in v:  # (C, F, H, W)
        diffs = torch.stack([(s[:, f] - s[:, f - 1]).abs() for f in range(1, s.shape[1])], dim=1)  # (C, F-1, H, W)
        var = ((diffs - diffs.mean(1, keepdim=True)) ** 2).mean(1)  # (C, H, W)
        out.append(var.mean(0).max())
    return torch.stack(out)


def test_flowmo_loss_and_its_gradient_are_the_official_formula():
    g = torch.Generator().manual_seed(5)
    v = torch.randn(2, 4, 5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ours, ref = G.flowmo_loss(v), flowmo_loss_written(v)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    (grad,), (grad_ref,) = torch.autograd.grad(ours.sum(), v), torch.autograd.grad(ref.sum(), v)
    assert torch.allclose(grad, grad_ref, rtol=1e-12, atol=1e-15)
    d = torch.randn(v.shape, generator=g, dtype=torch.float64)  # finite differences along a random direction
    with torch.no_grad():
        fd = (flowmo_loss_written(v + 1e-6 * d).sum() - flowmo_loss_written(v - 1e-6 * d).sum()) / 2e-6
    assert abs(fd - (grad * d).sum()) <= 1e-6 * abs(fd)


def flowmo_official(passes, x, lr, iterations, g=5.0, written=True):
    """Official `optimize_noise_prediction` written out: a fresh Adam (torch defaults: betas 0.9, 0.999, eps 1e-8)
    on a copy of x; each iteration: the loss of the CFG velocity through both passes at the current sample, its
    gradient, the Adam step; returned: the sample after the step of the iteration whose loss was lowest (strictly
    lower than every earlier one: `best_sample`), the losses, the smallest relative gap between the largest and
    the second largest patch variance (the max is not differentiable at a tie: there float32 rounding picks the
    patch, and so the gradient) and per entry the smallest |gradient| (near Adam's eps, 1e-8, the step
    g / (|g| + eps) follows the rounding of g). written=False: the same loop with minivdit's CFG combine and loss (each
    checked against its formula elsewhere) and torch's Adam (the official optimizer), so that both sides do the same
    float32 arithmetic: several large steps amplify any rounding difference (a chaotic map), and only the iteration,
    fresh-Adam and selection logic is then under test."""
    xk = x.clone().requires_grad_(True)
    m, s, adam = torch.zeros_like(x), torch.zeros_like(x), torch.optim.Adam([xk], lr=lr)
    best, lowest, losses, gap, small = x.clone(), math.inf, [], math.inf, torch.full_like(x, math.inf)
    for k in range(1, iterations + 1):
        vc, vu = passes(xk)
        loss = (flowmo_loss_written(vu + g * (vc - vu)) if written else G.flowmo_loss(G.cfg(vc, vu, g))).sum()
        v = (vu + g * (vc - vu)).detach()
        top = (v[:, :, 1:] - v[:, :, :-1]).abs().var(2, unbiased=False).mean(1).flatten().topk(2).values
        gap = min(gap, ((top[0] - top[1]) / top[0]).item())
        grad, = torch.autograd.grad(loss, xk)
        small = torch.minimum(small, grad.abs())
        with torch.no_grad():
            if written:  # Adam with bias corrections
                m, s = 0.9 * m + 0.1 * grad, 0.999 * s + 0.001 * grad**2
                xk -= lr / (1 - 0.9**k) * m / ((s / (1 - 0.999**k)).sqrt() + 1e-8)
            else:
                xk.grad = grad
                adam.step()
        losses.append(loss.item())
        if loss.item() < lowest:
            best, lowest = xk.detach().clone(), loss.item()
    return best, losses, gap, small


@pytest.mark.parametrize("lr,iterations", [(1e-3, 1), (1e-3, 2), (0.3, 4)])
def test_flowmo_update_through_the_dit_is_the_official_update(family, lr, iterations):
    name, pipe, context, x, grid = family
    i = 1
    t = pipe.family.timestep(grid[i].item())
    tt = pipe.timesteps(t, x.shape, False)
    written = lr < 0.1  # lr 0.3 over 4 iterations: both sides with the same arithmetic (flowmo_official's docstring)
    ref, losses, gap, small = flowmo_official(lambda xg: pipe.model(xg.expand(2, *x.shape[1:]), tt, context)[:, None],
                                              x, lr, iterations, written=written)
    assert gap > 1e-4, "a near tie of the max patch: rounding picks the gradient; change the fixture's seed"
    clear = small > 1e-7  # 10 eps: where the step does not hang on the rounding of g (most entries)
    assert clear.float().mean() > 0.9
    for checkpoint in (False, True):
        g = Guidance(method="flowmo", flowmo_lr=lr, flowmo_iterations=iterations, flowmo_timesteps=(int(t),),
                     flowmo_checkpoint=checkpoint)
        with torch.no_grad():  # as the sampling loop runs it
            ours = pipe.flowmo_update(context, g, grid)(x, grid[i].item())
        # written out: 1 % of lr per iteration (an entry near eps steps by the rounding of g, which later gradients
        # see); the same arithmetic: float32 round-off of the passes only
        assert ((ours - ref).abs() * clear).max() <= (1e-2 * lr * iterations if written else 1e-5)
    if iterations == 2:  # the second iteration moved the sample again, by about lr
        one = pipe.flowmo_update(context, replace(g, flowmo_iterations=1), grid)(x, grid[i].item())
        assert (ours - one).abs().max() > 0.5 * lr
    if iterations == 4 and name == "cogvideox-tiny":  # lr 0.3 overshoots here: the kept sample is not the last one
        assert losses.index(min(losses)) < 3
    other = Guidance(method="flowmo", flowmo_timesteps=(int(t) + 1,))  # not an optimised timestep: x as it was
    assert torch.equal(pipe.flowmo_update(context, other, grid)(x, grid[i].item()), x)


def test_flowmo_gradient_through_the_dit_matches_finite_differences():
    c = COG_PRESETS["cogvideox-tiny"].config  # runs in its parameter dtype, float64; only its output is float32
    model = randomized(CogVideoXModel(c)).double()
    g = torch.Generator().manual_seed(7)
    context = torch.randn(2, c.max_text_seq_length, c.text_embed_dim, generator=g, dtype=torch.float64)
    x = torch.randn(1, c.in_channels, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([500, 500])

    def loss(x, checkpoint=False):
        vc, vu = model(x.expand(2, *x.shape[1:]), t, context, Perturb(checkpoint=checkpoint))[:, None]
        return G.flowmo_loss(G.cfg(vc, vu, 6.0)).sum()

    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(loss(xg), xg)
    xc = x.clone().requires_grad_(True)
    grad_ckpt, = torch.autograd.grad(loss(xc, checkpoint=True), xc)
    assert torch.allclose(grad, grad_ckpt, rtol=1e-10, atol=1e-14)
    assert grad.abs().gt(0).float().mean() > 0.5  # attention spreads the max's gradient over the latent
    d = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():  # eps 1e-3: the float32 output rounds the loss to ~1e-7 relative
        fd = (loss(x + 1e-3 * d).double() - loss(x - 1e-3 * d).double()) / 2e-3
    assert abs(fd - (grad * d).sum()) <= 1e-3 * abs(fd)


def run_of(name):
    if name in COG_PRESETS:
        return SampleConfig("x", frames=9, height=64, width=64, steps=4, shift=None, solver="ddim")
    return SampleConfig("x", frames=9, height=128 if "ti2v" in name else 64, width=128 if "ti2v" in name else 64,
                        steps=4, solver="unipc")


def test_flowmo_through_the_loop_neutral_and_strength(family):
    name, pipe, context, x, _ = family
    run = run_of(name)
    sample = lambda g: pipe.sample(run, g, context=context, x=x, progress=False)  # noqa: E731
    v_cfg = sample(Guidance())
    assert torch.equal(sample(Guidance(method="flowmo", flowmo_lr=0.0)), v_cfg)
    a, b = sample(Guidance(method="flowmo")), sample(Guidance(method="flowmo", flowmo_lr=1e-2))
    assert (a - v_cfg).abs().max() > 1e-5 and (b - a).abs().max() > 1e-5


def test_flowmo_composes_with_stas(tiny_model):
    pipe = Pipeline(tiny_model, None, None, None, "wan2.1-tiny", {})
    context = torch.randn(2, 512, 32, generator=torch.Generator().manual_seed(8))
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    grid = solvers.wan_unipc_sigmas(4, 5.0)
    both = from_preset(PRESETS["wan2.1-tiny"], "flowmo", stas=True)
    alone = from_preset(PRESETS["wan2.1-tiny"], "flowmo")
    with torch.no_grad():  # the gradient passes are steered too: the updates differ
        ub = pipe.flowmo_update(context, both, grid)(x, grid[0].item())
        ua = pipe.flowmo_update(context, alone, grid)(x, grid[0].item())
    assert (ub - x).abs().max() > 0 and (ub - ua).abs().max() > 0
    run = run_of("wan2.1-tiny")
    outs = [pipe.sample(run, g, context=context, x=x, progress=False)
            for g in (both, alone, from_preset(PRESETS["wan2.1-tiny"], "cfg", stas=True))]
    assert all((p - q).abs().max() > 1e-5 for p, q in ((outs[0], outs[1]), (outs[0], outs[2])))


def test_solver_update_hook_keeps_the_prediction_of_the_old_latent():
    sigmas = torch.tensor([1.0, 0.5], dtype=torch.float64)
    seen = []
    denoise = lambda x, s: seen.append(x.clone()) or 2 * x  # noqa: E731
    x = torch.ones(1, 1, 1, 1, 1)
    out = solvers.sample_euler(denoise, x, sigmas, update=lambda x, s: x + 3)
    assert torch.equal(seen[0], x) and torch.allclose(out, x + 3 + (0.5 - 1.0) * 2 * x)


def test_every_comparator_in_the_card_and_both_scripts():
    from pathlib import Path

    from samplers import compare, sample

    card = (Path(__file__).resolve().parent.parent / "docs" / "methods.md").read_text()
    for method in ("pag", "seg", "fdg", "tcfg", "mag", "autoguidance", "cfgpp", "flowmo"):
        assert f'<a id="{method}"></a>' in card and f"`{method}`" in card, method
        assert sample.parse(["--method", method]).method == method
        assert [r.label for r in compare.parse_methods(f"{method},{method}+stas")] == ["cfg", method, f"{method}+stas"]
    args = sample.parse(["--method", "flowmo", "--flowmo-checkpoint", "1", "--flowmo-timesteps", "999,995"])
    assert (args.flowmo_checkpoint, args.flowmo_timesteps) == (True, (999, 995))
