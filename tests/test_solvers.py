"""Solvers: grids against models.md §2.8 and diffusers, step-by-step parity with diffusers' schedulers on the same
grid, convergence on a closed-form Gaussian flow, and the callback contract."""
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from minivdit.solvers import (diffusers_unipc_sigmas, flow_sigmas, sample_dpmpp_2m, sample_euler, sample_unipc,
                              shift_sigmas, timestep, wan_unipc_sigmas)

STEPS = [3, 4, 10, 50]


def toy_v(x, sigma):
    """A deterministic nonlinear velocity field of (x, sigma); sigma taken in float32 like the schedulers' grids."""
    s = float(np.float32(sigma))
    return torch.tanh(1.5 * x + s) - 0.7 * s * x + torch.sin(x) * s**2 + 0.2 * x.roll(1, dims=-1)


def noise(shape=(1, 4, 3, 5, 6)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def run_reference(scheduler, x):
    """The diffusers pipeline loop: v at each scheduler sigma, scheduler.step with the scheduler's timestep."""
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(toy_v(x, scheduler.sigmas[i].item()), t, x, return_dict=False)[0]
    return x


# ----------------------------------------------------------------------------------------------------------
# grids


def test_wan_unipc_grid_matches_models_md():
    sigmas = wan_unipc_sigmas(50, 5.0)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (51,) and sigmas[-1].item() == 0.0
    np.testing.assert_allclose(sigmas[:4].numpy(), [0.99980, 0.99573, 0.99153, 0.98719], atol=5e-6)
    assert abs(sigmas[-2].item() - 0.09251) < 5e-6
    t = timestep(sigmas[:-1])
    assert t.dtype == torch.int64
    assert t[:6].tolist() == [999, 995, 991, 987, 982, 978]
    assert t[-4:].tolist() == [302, 241, 172, 92]


def test_wan_unipc_grid_construction():
    # sigma_max is 0.999 read back from float32 (official base grid), sigma_min 0, shift in float64
    sigma_max = float(torch.tensor(1 - np.linspace(1, 1 / 1000, 1000)[::-1].copy(), dtype=torch.float32)[0])
    ref = 5.0 * (x := np.linspace(sigma_max, 0.0, 11)[:-1]) / (1 + 4.0 * x)
    assert torch.equal(wan_unipc_sigmas(10, 5.0)[:-1], torch.from_numpy(ref))
    assert torch.equal(timestep(wan_unipc_sigmas(10, 5.0)[:-1]), torch.from_numpy(ref * 1000).to(torch.int64))


def test_flow_sigmas():
    for steps, shift in [(3, 1.0), (20, 5.0), (50, 12.0)]:
        sigmas = flow_sigmas(steps, shift)
        assert sigmas.dtype == torch.float64 and sigmas.shape == (steps + 1,)
        assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
        assert torch.all(sigmas[1:] < sigmas[:-1])
        assert torch.equal(sigmas[:-1], shift_sigmas(np.linspace(1, 0, steps + 1)[:steps], shift))


def test_shift_sigmas():
    sigmas = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_sigmas(sigmas, 1.0), sigmas)
    shifted = shift_sigmas(sigmas, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and torch.all(shifted[1:-1] > sigmas[1:-1])
    assert abs(shifted[5].item() - 0.75) < 1e-15  # 3 * 0.5 / (1 + 2 * 0.5)


@pytest.mark.parametrize("steps,shift", [(3, 1.0), (4, 3.0), (10, 5.0), (50, 5.0), (40, 12.0)])
def test_diffusers_unipc_grid(steps, shift):
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    sched.set_timesteps(steps)
    ours = diffusers_unipc_sigmas(steps, shift)
    assert ours.dtype == torch.float64 and ours.shape == (steps + 1,)
    assert torch.equal(ours.to(torch.float32), sched.sigmas)
    assert torch.equal(timestep(ours[:-1]), sched.timesteps)


# ----------------------------------------------------------------------------------------------------------
# parity with diffusers, step by step, on the same grid


def unipc_scheduler(order=2):
    # flow_shift=1: the grid passed in is used as is (the shift is then the identity, exactly)
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                   solver_order=order, solver_type="bh2", lower_order_final=True,
                                   final_sigmas_type="zero")


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("grid", ["wan", "diffusers"])
def test_unipc_parity(steps, grid):
    if grid == "wan":  # the official Wan grid, handed to diffusers as explicit sigmas
        sigmas = wan_unipc_sigmas(steps, 5.0)
        sched = unipc_scheduler()
        sched.set_timesteps(sigmas=sigmas[:-1].numpy())
    else:  # diffusers' own flow grid, shift 5
        sigmas = diffusers_unipc_sigmas(steps, 5.0)
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
                                        solver_order=2, solver_type="bh2", lower_order_final=True)
        sched.set_timesteps(steps)
    assert torch.equal(sched.sigmas, sigmas.to(torch.float32))
    assert torch.equal(sched.timesteps, timestep(sigmas[:-1]))
    ref = run_reference(sched, noise())
    ours = sample_unipc(toy_v, noise(), sigmas)
    assert rel_err(ours, ref) <= 1e-6


@pytest.mark.parametrize("order", [1, 3])
def test_unipc_other_orders_parity(order):
    sigmas = wan_unipc_sigmas(10, 3.0)
    sched = unipc_scheduler(order)
    sched.set_timesteps(sigmas=sigmas[:-1].numpy())
    ref = run_reference(sched, noise())
    ours = sample_unipc(toy_v, noise(), sigmas, order=order)
    assert rel_err(ours, ref) <= 1e-6
    assert rel_err(sample_unipc(toy_v, noise(), sigmas, order=2), ref) > 1e-4  # the order matters


def dpm_scheduler(steps, shift):
    sched = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                        lower_order_final=True, final_sigmas_type="zero")
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("steps", STEPS)
def test_dpmpp_2m_parity_official_grid(steps):
    # diffusers' DPMSolverMultistepScheduler takes no custom sigmas: put the official Wan DPM++ grid (first sigma
    # exactly 1.0, lambda = -inf) in its place, as the official FlowDPMSolverMultistepScheduler.set_timesteps does
    sigmas = flow_sigmas(steps, 5.0)
    sched = dpm_scheduler(steps, 5.0)
    sched.sigmas, sched.timesteps = sigmas.to(torch.float32), timestep(sigmas[:-1])
    ref = run_reference(sched, noise())
    ours = sample_dpmpp_2m(toy_v, noise(), sigmas)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, ref) <= 1e-6


@pytest.mark.parametrize("steps", STEPS)
def test_dpmpp_2m_parity_diffusers_grid(steps):
    sched = dpm_scheduler(steps, 5.0)
    ref = run_reference(sched, noise())
    ours = sample_dpmpp_2m(toy_v, noise(), sched.sigmas.to(torch.float64))
    assert rel_err(ours, ref) <= 1e-6


@pytest.mark.parametrize("steps", STEPS)
def test_euler_parity(steps):
    sigmas = wan_unipc_sigmas(steps, 5.0)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=sigmas[:-1].numpy())
    assert torch.equal(sched.sigmas, sigmas.to(torch.float32))
    ref = run_reference(sched, noise())
    ours = sample_euler(toy_v, noise(), sigmas)
    assert rel_err(ours, ref) <= 1e-6


# ----------------------------------------------------------------------------------------------------------
# closed form: Gaussian data x0 ~ N(mu, tau^2) per element


MU, TAU = 0.8, 0.4


def gaussian_v(x, sigma):
    """Exact v = E[eps - x0 | x_sigma] for x0 ~ N(MU, TAU^2), eps ~ N(0, 1)."""
    var = (1 - sigma) ** 2 * TAU**2 + sigma**2
    return (sigma - (1 - sigma) * TAU**2) / var * (x - (1 - sigma) * MU) - MU


def gaussian_exact(x, sigma):
    """The ODE's flow map from x at sigma to sigma = 0: x_sigma = (1 - sigma) MU + sqrt(var(sigma)) z."""
    z = (x - (1 - sigma) * MU) / math.sqrt((1 - sigma) ** 2 * TAU**2 + sigma**2)
    return MU + TAU * z


def closed_form_errors(solver, steps, shift):
    sigmas = wan_unipc_sigmas(steps, shift)
    x = noise()
    return (solver(gaussian_v, x, sigmas) - gaussian_exact(x.double(), sigmas[0].item())).abs().max().item()


def test_closed_form_convergence():
    # unshifted grid, so the asymptotic orders show: Euler 1st order; UniPC / DPM++ 2nd order (their last step is
    # 1st order: it lands on the posterior mean E[x0 | x], O(sigma_last^2) from the ODE's endpoint)
    steps = [10, 20, 50, 100, 200]
    errs = {name: [closed_form_errors(solver, n, 1.0) for n in steps]
            for name, solver in [("euler", sample_euler), ("unipc", sample_unipc), ("dpm++", sample_dpmpp_2m)]}
    for name, e in errs.items():
        assert all(b < a for a, b in zip(e, e[1:])), (name, e)
    assert 0.4 < errs["euler"][-1] / errs["euler"][-2] < 0.6, errs
    assert errs["unipc"][-1] / errs["unipc"][-2] < 0.35 and errs["dpm++"][-1] / errs["dpm++"][-2] < 0.35, errs
    for k in range(len(steps)):
        assert errs["unipc"][k] < errs["euler"][k] / 3 and errs["dpm++"][k] < errs["euler"][k] / 3, errs
    assert errs["unipc"][-1] < 5e-4 and errs["dpm++"][-1] < 2e-3, errs


def test_closed_form_wan_default():
    # Wan's default run: 50 steps, shift 5
    euler, unipc, dpm = (closed_form_errors(f, 50, 5.0) for f in (sample_euler, sample_unipc, sample_dpmpp_2m))
    assert unipc < euler / 5 and dpm < euler / 5 and unipc < 3e-2, (euler, unipc, dpm)


def test_closed_form_flow_grid_from_sigma_one():
    # DPM++ and Euler start from sigma = 1 exactly (x = pure noise); UniPC refuses sigma = 1 (lambda = -inf)
    sigmas = flow_sigmas(50, 1.0)
    x = noise()
    exact = gaussian_exact(x.double(), 1.0)
    dpm = (sample_dpmpp_2m(gaussian_v, x, sigmas) - exact).abs().max().item()
    euler = (sample_euler(gaussian_v, x, sigmas) - exact).abs().max().item()
    assert dpm < 1e-2 and euler < 6e-2 and dpm < euler / 5, (dpm, euler)
    with pytest.raises(ValueError, match="sigmas\\[0\\] < 1"):
        sample_unipc(gaussian_v, x, sigmas)


# ----------------------------------------------------------------------------------------------------------
# contract


@pytest.mark.parametrize("solver", [sample_euler, sample_unipc, sample_dpmpp_2m])
def test_callback_once_per_step(solver):
    sigmas = wan_unipc_sigmas(4, 5.0)
    seen, calls = [], []

    def denoise(x, sigma):
        calls.append(sigma)
        assert isinstance(sigma, float)
        return toy_v(x, sigma)

    out = solver(denoise, noise(), sigmas, callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2, 3]
    assert all(set(d) == {"i", "sigma", "x", "x0"} for d in seen)
    assert [d["sigma"] for d in seen] == sigmas[:-1].tolist() == calls
    for d in seen:  # x0 = x - sigma * v at the sample the model saw
        assert torch.allclose(d["x0"], d["x"] - np.float32(d["sigma"]) * toy_v(d["x"], d["sigma"]), atol=1e-6)
    assert out.dtype == torch.float32 and out.shape == noise().shape


def test_bad_inputs():
    with pytest.raises(ValueError):
        sample_euler(toy_v, noise(), torch.tensor([0.5], dtype=torch.float64))
    with pytest.raises(ValueError):
        sample_unipc(toy_v, noise(), wan_unipc_sigmas(4, 5.0), order=0)
