"""CogVideoX v-prediction samplers: grids against diffusers' CogVideoX schedulers and models.md §3.7, whole runs of
DDIM and SDE-DPM-Solver++(2M) against the schedulers stepped as pipeline_cogvideox.py steps them (same generator
draws), dynamic CFG against the pipeline's own formula line, endpoints and the callback contract."""
import inspect
import math

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline

from minivdit.solvers import (cogvideox_alphas_cumprod, cogvideox_timesteps, dynamic_cfg_scale, sample_ddim_vpred,
                              sample_dpm_vpred, x0_from_v)

BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, clip_sample=False,
            timestep_spacing="trailing", steps_offset=0)
CONFIGS = {"2b": dict(BASE, snr_shift_scale=3.0), "5b": dict(BASE, snr_shift_scale=1.0)}  # 1.5 = 5B schedule
STEPS = [1, 2, 3, 4, 5, 7]
TOL = 1e-6


def toy_v(x, t):
    """A deterministic nonlinear v field of (x, integer t)."""
    s = t / 1000
    return torch.tanh(1.3 * x) * s + 0.4 * x - 0.2 * (1 - s) * x.roll(1, dims=-1) + 0.1 * torch.sin(3 * x)


def start(shape=(2, 3, 4, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32), g


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def ddim_reference(config, steps, x):
    """pipeline_cogvideox.py's loop with CogVideoXDDIMScheduler (eta passed as the pipeline passes it)."""
    sched = CogVideoXDDIMScheduler(**config)
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(toy_v(x, int(t)), t, x, eta=0.0, return_dict=False)[0]
    return x


def dpm_reference(config, steps, x, generator):
    """pipeline_cogvideox.py's loop with CogVideoXDPMScheduler: old_pred_original_sample and timesteps[i - 1]."""
    sched = CogVideoXDPMScheduler(**config)
    sched.set_timesteps(steps)
    ts, old = sched.timesteps, None
    for i, t in enumerate(ts):
        x, old = sched.step(toy_v(x, int(t)), old, t, ts[i - 1] if i > 0 else None, x, eta=0.0,
                            generator=generator, return_dict=False)
    return x


# ----------------------------------------------------------------------------------------------------------
# grids


@pytest.mark.parametrize("model", ["2b", "5b"])
def test_alphas_cumprod_bit_identical(model):
    ours = cogvideox_alphas_cumprod(CONFIGS[model]["snr_shift_scale"])
    for cls in (CogVideoXDDIMScheduler, CogVideoXDPMScheduler):
        ref = cls(**CONFIGS[model]).alphas_cumprod
        assert ours.dtype == ref.dtype == torch.float64 and torch.equal(ours, ref)
    assert ours[-1].item() == 0.0  # zero terminal SNR, exactly


def test_alphas_cumprod_models_md_values():
    a3, a1 = cogvideox_alphas_cumprod(3.0), cogvideox_alphas_cumprod(1.0)
    assert abs(a3[0].item() - 0.997454) < 5e-7 and abs(a3[499].item() - 0.095970) < 5e-7
    assert abs(a3[998].item() - 6.23e-8) < 5e-10
    assert abs(a1[0].item() - 0.999150) < 5e-7 and abs(a1[499].item() - 0.242359) < 5e-7
    # without the rescale the last alpha is not zero; without the shift (s = 1) the 2B table is not reproduced
    assert cogvideox_alphas_cumprod(3.0, rescale_zero_snr=False)[-1].item() > 0
    assert not torch.equal(a1, a3)


@pytest.mark.parametrize("steps", list(range(1, 101)) + [250, 999, 1000])
def test_timesteps_match_diffusers(steps):
    sched = CogVideoXDDIMScheduler(**CONFIGS["2b"])
    sched.set_timesteps(steps)
    ours = cogvideox_timesteps(steps)
    assert ours.dtype == torch.int64 and torch.equal(ours, sched.timesteps)


def test_timesteps_models_md():
    t = cogvideox_timesteps(50)
    assert t[:3].tolist() == [999, 979, 959] and t[-2:].tolist() == [39, 19] and len(t) == 50
    assert cogvideox_timesteps(3).tolist() == [999, 666, 332]
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        cogvideox_timesteps(0)


# ----------------------------------------------------------------------------------------------------------
# whole runs against the schedulers


@pytest.mark.parametrize("model", ["2b", "5b"])
@pytest.mark.parametrize("steps", STEPS)
def test_ddim_matches_diffusers(model, steps):
    x, _ = start()
    ref = ddim_reference(CONFIGS[model], steps, x.clone())
    ours = sample_ddim_vpred(toy_v, x.clone(), cogvideox_timesteps(steps),
                             cogvideox_alphas_cumprod(CONFIGS[model]["snr_shift_scale"]))
    assert torch.isfinite(ours).all()
    assert rel_err(ours, ref) <= TOL, rel_err(ours, ref)


@pytest.mark.parametrize("model", ["2b", "5b"])
@pytest.mark.parametrize("steps", STEPS)
def test_dpm_matches_diffusers_with_same_draws(model, steps):
    """Same seeded CPU generator, after it drew the initial latent (as the pipeline does): the results agree and both
    generators end in the same state (1 + 2(N - 2) + 1 draws for N >= 2)."""
    x, g_ref = start(seed=steps)
    _, g_ours = start(seed=steps)
    ref = dpm_reference(CONFIGS[model], steps, x.clone(), g_ref)
    ours = sample_dpm_vpred(toy_v, x.clone(), cogvideox_timesteps(steps),
                            cogvideox_alphas_cumprod(CONFIGS[model]["snr_shift_scale"]), generator=g_ours)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, ref) <= TOL, rel_err(ours, ref)
    assert torch.equal(torch.randn(3, generator=g_ours), torch.randn(3, generator=g_ref))


def test_dpm_draw_count_and_noise_matters():
    """Draws per run: 1 (N = 1), 2 (N = 2), 1 + 2(N - 2) + 1 otherwise; another seed changes the result."""
    x, _ = start()
    a = cogvideox_alphas_cumprod(1.0)
    for steps, draws in [(1, 1), (2, 2), (3, 4), (5, 8)]:
        g, counted = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        sample_dpm_vpred(toy_v, x, cogvideox_timesteps(steps), a, generator=g)
        for _ in range(draws):
            torch.randn(x.shape, generator=counted)
        assert torch.equal(torch.randn(2, generator=g), torch.randn(2, generator=counted)), steps
    run = lambda seed: sample_dpm_vpred(toy_v, x, cogvideox_timesteps(4), a,  # noqa: E731
                                        generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.allclose(run(1), run(2))


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_endpoints_first_step_ignores_x_last_step_returns_x0(sampler):
    """Zero terminal SNR: a_999 = 0, so step 0 sees x only through v (x0 = -v); the last step returns its x0."""
    a = cogvideox_alphas_cumprod(3.0)
    seen = []
    v_const = lambda x, t: torch.full_like(x, 0.5)  # noqa: E731
    x, _ = start()
    kw = {} if sampler == "ddim" else {"generator": torch.Generator().manual_seed(0)}
    run = sample_ddim_vpred if sampler == "ddim" else sample_dpm_vpred
    one = run(v_const, x, cogvideox_timesteps(1), a, callback=seen.append, **kw)
    assert torch.equal(one, torch.full_like(x, -0.5))  # 1 step: x0 = sqrt(0) x - 1 * v
    kw = {} if sampler == "ddim" else {"generator": torch.Generator().manual_seed(0)}
    seen.clear()
    out = run(toy_v, x, cogvideox_timesteps(4), a, callback=seen.append, **kw)
    assert torch.isfinite(out).all() and torch.equal(out, seen[-1]["x0"])
    assert [c["i"] for c in seen] == [0, 1, 2, 3] and [c["t"] for c in seen] == [999, 749, 499, 249]
    assert seen[0]["sigma"] == 1.0 and all(set(c) == {"i", "t", "sigma", "x", "x0"} for c in seen)
    assert torch.equal(seen[0]["x0"], -toy_v(x, 999))


def test_x0_from_v():
    x, v = torch.randn(4), torch.randn(4)
    assert torch.allclose(x0_from_v(x, v, 0.36), 0.6 * x - 0.8 * v)


# ----------------------------------------------------------------------------------------------------------
# dynamic CFG


def pipeline_dynamic_cfg():
    """The pipeline's own dynamic-CFG expression, read from CogVideoXPipeline.__call__, as a function of
    (guidance_scale, t tensor, num_inference_steps)."""
    src = inspect.getsource(CogVideoXPipeline.__call__)
    i = src.index("self._guidance_scale = 1 + guidance_scale * (")
    j = i + len("self._guidance_scale = ")
    depth, k = 0, j
    while True:  # the expression spans lines: read to its closing parenthesis
        depth += {"(": 1, ")": -1}.get(src[k], 0)
        k += 1
        if depth == 0 and src[k - 1] == ")":
            break
    expr = " ".join(src[j:k].split())
    return lambda guidance_scale, t, num_inference_steps: eval(expr, {"math": math}, dict(  # noqa: S307
        guidance_scale=guidance_scale, t=t, num_inference_steps=num_inference_steps))


@pytest.mark.parametrize("steps,g", [(50, 6.0), (5, 6.0), (20, 3.5)])
def test_dynamic_cfg_matches_pipeline_formula(steps, g):
    ref = pipeline_dynamic_cfg()
    for t in cogvideox_timesteps(steps):
        assert dynamic_cfg_scale(g, int(t), steps) == ref(g, t, steps)


def test_dynamic_cfg_models_md_values():
    """The raw-timestep quirk: w jumps around [1, 1 + g] instead of rising smoothly (models.md §3.7)."""
    w = [dynamic_cfg_scale(6.0, int(t), 50) for t in cogvideox_timesteps(50)[:8]]
    expected = [2.291, 2.544, 6.974, 6.42, 2.788, 4.272, 1.038, 4.17]
    assert all(abs(a - b) < 5e-3 for a, b in zip(w, expected)), w
    assert all(1.0 <= dynamic_cfg_scale(6.0, int(t), 50) <= 7.0 for t in cogvideox_timesteps(50))
