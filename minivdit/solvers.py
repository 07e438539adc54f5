"""Flow-matching sigma grids and ODE solvers (Euler, UniPC-bh2, DPM-Solver++ 2M), k-diffusion style.

Sources: Wan-Video/Wan2.1 `wan/utils/fm_solvers_unipc.py` (FlowUniPCMultistepScheduler, the default Wan sampler)
and `wan/utils/fm_solvers.py` (FlowDPMSolverMultistepScheduler, get_sampling_sigmas); diffusers
`scheduling_unipc_multistep.py`, `scheduling_dpmsolver_multistep.py`, `scheduling_flow_match_euler_discrete.py`.
Papers: UniPC (Zhao et al. 2023, arXiv:2302.04867), DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095).
Facts: reference/models.md §2.8.

The CogVideoX v-prediction samplers (DDIM, SDE-DPM-Solver++(2M)) on their discrete VP schedule are at the end of this
file, with their own convention (integer timesteps, alphas_cumprod); see the section header there.

Convention: sigma in [0, 1], x_sigma = (1 - sigma) x0 + sigma eps, the model predicts the velocity v = eps - x0, so
x0 = x - sigma v. A solver only sees `denoise(x, sigma) -> v` (x float32, sigma a Python float, v like x) and walks
an explicit grid `sigmas`: a float64 1-D tensor, decreasing, usually ending in 0.0. As in the references, the step
math uses the grid cast to float32 (they store `sigmas.astype(np.float32)`), while `denoise` gets the float64 value
so that `timestep(sigma)` truncates exactly like the official `(sigmas * 1000).astype(np.int64)`.

Conditioning that pins part of the latent (Wan2.2 TI2V's clean first frame) is a `project(x) -> x` passed to the
solver: applied to the initial x and to x after every step, so `denoise`, the callback and the solver's history all
see the pinned latent, as in the official `textimage2video.py` loop (re-impose after each scheduler step).

A method that moves the latent before the step (FlowMo) is an `update(x, sigma) -> x` passed to the solver: called
right after `denoise(x, sigma)`, so the step combines the prediction made at the old x with the updated x, as FlowMo's
official loop does (`scheduler.step(noise_pred, t, optimized_sample)`).
"""
from __future__ import annotations

from collections.abc import Callable

import math

import numpy as np
import torch

Denoise = Callable[[torch.Tensor, float], torch.Tensor]
Callback = Callable[[dict], None]
Project = Callable[[torch.Tensor], torch.Tensor]
Update = Callable[[torch.Tensor, float], torch.Tensor]


def _pin(x: torch.Tensor, project: Project | None) -> torch.Tensor:
    return x if project is None else project(x)


def _update(x: torch.Tensor, sigma, update: Update | None) -> torch.Tensor:
    return x if update is None else update(x, sigma)

# ----------------------------------------------------------------------------------------------------------
# grids (built with numpy in float64, like the references, so every value is bit-identical)


def timestep(sigma) -> torch.Tensor:
    """Model timestep for sigma: int64 tensor trunc(sigma * 1000), computed in float64 (official Wan, diffusers)."""
    return (torch.as_tensor(sigma, dtype=torch.float64) * 1000).to(torch.int64)


def shift_sigmas(sigmas, shift: float) -> torch.Tensor:
    """Flow shift s*sigma / (1 + (s - 1)*sigma) (SD3 / Wan "shift"); float64, same shape as sigmas."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    return torch.from_numpy(shift * sigmas / (1 + (shift - 1) * sigmas))


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def wan_unipc_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Official Wan UniPC grid: shift(linspace(sigma_max, 0, steps+1)[:-1]) then 0; (steps+1,) float64.

    sigma_max = 0.999 rounded to float32 (0.99900001287...): FlowUniPCMultistepScheduler reads it with `.item()`
    from its float32 1000-step base grid 1 - linspace(1, 1/1000, 1000)[::-1]; sigma_min = 0.0.
    """
    sigma_max = float(np.float32(1 - 1 / 1000))
    return _append_zero(shift_sigmas(np.linspace(sigma_max, 0.0, steps + 1)[:-1], shift))


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Official Wan DPM++ grid, `get_sampling_sigmas`: shift(linspace(1, 0, steps+1)[:steps]) then 0; first is 1.0."""
    return _append_zero(shift_sigmas(np.linspace(1, 0, steps + 1)[:steps], shift))


def diffusers_unipc_sigmas(steps: int, shift: float) -> torch.Tensor:
    """diffusers UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift) grid; (steps+1,) float64.

    shift(linspace(1, 1/1000, steps+1)[:-1]), a first sigma within 1e-6 of 1 lowered by 1e-6 (keeps log(1 - sigma)
    finite), then 0.
    """
    sigmas = shift_sigmas(np.linspace(1, 1 / 1000, steps + 1)[:-1], shift)
    if abs(sigmas[0].item() - 1) < 1e-6:
        sigmas[0] -= 1e-6
    return _append_zero(sigmas)


# ----------------------------------------------------------------------------------------------------------
# solvers


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR log(alpha / sigma) with alpha = 1 - sigma; -inf at sigma = 1, +inf at sigma = 0."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _check(sigmas: torch.Tensor) -> torch.Tensor:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 values, got shape {tuple(sigmas.shape)}")
    return sigmas.to(torch.float32)  # the references' step math runs on float32 sigmas


@torch.no_grad()
def sample_euler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                 project: Project | None = None, update: Update | None = None):
    """Flow Euler x += (sigma_next - sigma) v (diffusers FlowMatchEulerDiscreteScheduler). x: latent, float32.
    project, update: see the module docstring."""
    s = _check(sigmas)
    x = _pin(x.to(torch.float32), project)
    for i in range(len(sigmas) - 1):
        v = denoise(x, sigmas[i].item())
        x = _update(x, sigmas[i].item(), update)
        if callback is not None:
            callback({"i": i, "sigma": sigmas[i].item(), "x": x, "x0": x - s[i] * v})
        x = _pin(x + (s[i + 1] - s[i]) * v, project)
    return x


def _unipc_bh2(x, ms, lams, sigma, sigma_next, lam_next, m_next=None):
    """One UniP step (m_next None) or UniC correction of UniPC-bh2 in x0 form; diffusers multistep_uni_{p,c}_bh_update.

    x is the sample at `sigma`, ms / lams the x0 predictions and lambdas at the last p grid points (oldest first,
    the newest at `sigma`); returns the sample at `sigma_next`. The corrector also uses m_next, the fresh x0
    prediction at sigma_next, and solves the full p x p system; the predictor its leading (p-1) x (p-1) block.
    """
    p, m0, lam0 = len(ms), ms[-1], lams[-1]
    alpha_next = 1 - sigma_next
    hh = -(lam_next - lam0)  # -h
    h_phi_1 = torch.expm1(hh)  # e^{-h} - 1
    B_h = torch.expm1(hh)  # bh2: B(h) = e^{-h} - 1
    rks = [(lam_k - lam0) / -hh for lam_k in reversed(lams[:-1])]  # r_k = (lambda_{-k} - lambda_0) / h
    D1s = [(m_k - m0) / r_k for m_k, r_k in zip(reversed(ms[:-1]), rks)]
    R = torch.stack([torch.pow(torch.stack(rks + [torch.ones(())]), j) for j in range(p)])  # (p, p), rows r^j
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1  # b_j = j! h phi_{j+1}(h) / B(h)
    for j in range(1, p + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    b = torch.stack(b)

    x_next = sigma_next / sigma * x - alpha_next * h_phi_1 * m0
    if m_next is None:  # UniP predictor
        if p == 1:
            return x_next
        # order 2 uses rho = 0.5 as the references do (not the solved b_1 / 1, which is close to it)
        rhos = torch.tensor([0.5]) if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        return x_next - alpha_next * B_h * sum(r * d for r, d in zip(rhos, D1s))
    rhos = torch.tensor([0.5]) if p == 1 else torch.linalg.solve(R, b)  # UniC corrector
    res = sum(r * d for r, d in zip(rhos[:-1], D1s))
    return x_next - alpha_next * B_h * (res + rhos[-1] * (m_next - m0))


@torch.no_grad()
def sample_unipc(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                 order: int = 2, project: Project | None = None, update: Update | None = None):
    """UniPC-bh2 multistep (official Wan FlowUniPCMultistepScheduler = diffusers UniPCMultistepScheduler, flow).

    predict_x0, UniC corrector at every step i >= 1 (disable_corrector=[]), lower_order_final. Step i's predictor
    has order min(order, i + 1, N - i) for N = len(sigmas) - 1 steps (warm-up; last step 1st order: with order 2,
    3 steps are orders 1, 2, 1 and 4 steps 1, 2, 2, 1); the corrector at step i reuses step i-1's order.
    x: latent, float32; sigmas: (N + 1,) with sigmas[0] < 1 (lambda is -inf at sigma = 1). Returns x at sigmas[-1].
    project: see the module docstring (the corrector starts from the projected previous sample, as the official
    TI2V loop hands its re-imposed latent to the scheduler). update: see the module docstring (the updated x gives
    this step's x0 and the predictor's start; the corrector restarts from the previous sample, as the official
    scheduler's step does with FlowMo's optimized sample).
    """
    s = _check(sigmas)
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if sigmas[0] >= 1:
        raise ValueError(f"UniPC needs sigmas[0] < 1 (log(1 - sigma) = -inf), got {sigmas[0].item()}")
    n = len(sigmas) - 1
    lam = [_lambda(si) for si in s]  # one 0-d float32 at a time, as the references compute them
    x = _pin(x.to(torch.float32), project)
    ms, x_prev, p_prev = [], None, 0  # history: last `order` x0 predictions; sample and order of the last step
    for i in range(n):
        v = denoise(x, sigmas[i].item())
        x = _update(x, sigmas[i].item(), update)
        m = x - s[i] * v  # x0 prediction
        if callback is not None:
            callback({"i": i, "sigma": sigmas[i].item(), "x": x, "x0": m})
        if i > 0:  # UniC: redo the last step with the fresh m
            x = _unipc_bh2(x_prev, ms[-p_prev:], lam[i - p_prev:i], s[i - 1], s[i], lam[i], m_next=m)
        ms = (ms + [m])[-order:]
        p = min(order, i + 1, n - i)
        x_prev, p_prev = x, p
        x = _pin(_unipc_bh2(x, ms[-p:], lam[i + 1 - p:i + 1], s[i], s[i + 1], lam[i + 1]), project)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                    project: Project | None = None, update: Update | None = None):
    """DPM-Solver++(2M), midpoint, in x0 form (official Wan FlowDPMSolverMultistepScheduler, diffusers DPMSolver++).

    The first step (warm-up) and the last step (lower_order_final, final sigma zero) are 1st order (DDIM).
    x: latent, float32; sigmas: (N + 1,); sigmas[0] = 1.0 is allowed. Returns x at sigmas[-1]. project, update: see
    the module docstring.
    """
    s = _check(sigmas)
    n = len(sigmas) - 1
    x = _pin(x.to(torch.float32), project)
    m_prev = lam_prev = None
    for i in range(n):
        v = denoise(x, sigmas[i].item())
        x = _update(x, sigmas[i].item(), update)
        m = x - s[i] * v  # x0 prediction
        if callback is not None:
            callback({"i": i, "sigma": sigmas[i].item(), "x": x, "x0": m})
        lam, lam_next = _lambda(s[i]), _lambda(s[i + 1])
        h = lam_next - lam
        coef = (1 - s[i + 1]) * (torch.exp(-h) - 1.0)  # alpha_next (e^{-h} - 1)
        x_next = (s[i + 1] / s[i]) * x - coef * m
        if 0 < i < n - 1:  # 2nd order: D1 = (m - m_prev) / r with r = h_prev / h
            r = (lam - lam_prev) / h
            x_next = x_next - 0.5 * coef * ((1.0 / r) * (m - m_prev))
        x, m_prev, lam_prev = _pin(x_next, project), m, lam
    return x


# ----------------------------------------------------------------------------------------------------------
# CogVideoX: v-prediction on a discrete variance-preserving schedule (zero terminal SNR, SNR shift)
#
# Sources: diffusers `schedulers/scheduling_ddim_cogvideox.py` (CogVideoXDDIMScheduler),
# `schedulers/scheduling_dpm_cogvideox.py` (CogVideoXDPMScheduler = SAT VPSDEDPMPP2MSampler),
# `pipelines/cogvideo/pipeline_cogvideox.py` (how they are stepped, dynamic CFG). Papers: DDIM (Song et al. 2021,
# arXiv:2010.02502), zero terminal SNR (Lin et al. 2024, arXiv:2305.08891), DPM-Solver++ (arXiv:2211.01095).
# Facts: reference/models.md §3.7.
#
# Convention: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t = alphas_cumprod[t] (float64 table of 1000), the model
# predicts v = sqrt(a_t) eps - sqrt(1 - a_t) x0, so x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v (`x0_from_v`). A solver
# walks the int64 `timesteps` of `cogvideox_timesteps` and only sees `denoise(x, t) -> v`: x float32, t the integer
# timestep (a Python int, what the CogVideoX DiT embeds), v like x, already guided (CFG on v in float32, as the
# pipeline does). The step coefficients are float64 Python floats that multiply float32 tensors (so they are rounded
# to float32 there), exactly as diffusers' 0-d float64 tensors are. The callback gets {"i", "t", "sigma", "x", "x0"}
# with sigma = sqrt(1 - a_t), the VP noise level.

VDenoise = Callable[[torch.Tensor, int], torch.Tensor]
COGVIDEOX_TRAIN_STEPS = 1000


def cogvideox_alphas_cumprod(snr_shift_scale: float, beta_start: float = 0.00085, beta_end: float = 0.012,
                             num_train_timesteps: int = COGVIDEOX_TRAIN_STEPS,
                             rescale_zero_snr: bool = True) -> torch.Tensor:
    """alphas_cumprod (num_train_timesteps,) float64 of the CogVideoX schedulers: scaled-linear betas
    (linspace(sqrt(beta_start), sqrt(beta_end))^2), a = cumprod(1 - beta), SNR shift a / (s + (1 - s) a), then the
    zero-terminal-SNR rescale of sqrt(a) (a[-1] becomes exactly 0). snr_shift_scale: 3.0 for CogVideoX-2B, 1.0 for
    5B and 1.5. Computed in float64 tensors as diffusers does, so the table is bit-identical."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1.0 - betas, dim=0)
    alphas = alphas / (snr_shift_scale + (1 - snr_shift_scale) * alphas)  # SNR / s
    if rescale_zero_snr:  # Lin et al. 2024, Algorithm 1, on sqrt(alphas_cumprod)
        sqrt_a = alphas.sqrt()
        first, last = sqrt_a[0].clone(), sqrt_a[-1].clone()
        alphas = ((sqrt_a - last) * (first / (first - last))) ** 2
    return alphas


def cogvideox_timesteps(steps: int, num_train_timesteps: int = COGVIDEOX_TRAIN_STEPS) -> torch.Tensor:
    """"trailing" timesteps, int64, decreasing: round(arange(1000, 0, -1000/steps)) - 1 (50 steps: 999, 979, ...,
    19). The step from t goes to t - 1000 // steps (diffusers' prev_timestep), which is the next grid timestep when
    steps divides 1000 and may be off by one from it otherwise (3 steps: 999, 666, 332, but 666 -> 333)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    ratio = num_train_timesteps / steps
    return torch.from_numpy(np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1)


def dynamic_cfg_scale(guidance_scale: float, t: int, num_inference_steps: int) -> float:
    """CogVideoX dynamic CFG weight 1 + g (1 - cos(pi ((N - t) / N)^5)) / 2 (diffusers pipeline_cogvideox.py,
    SAT DynamicCFG), in Python float64 exactly as written.

    Quirk kept on purpose: t is the raw integer timestep (0..999), not the step index, so (N - t) / N is a large
    negative number, its 5th power is ~-1e12 early on, and w jumps pseudo-randomly within [1, 1 + g] from step to step
    (N = 50, g = 6: 2.291, 2.544, 6.974, 6.42, ...). Both references do this; the model was tuned with it.
    """
    return 1 + guidance_scale * ((1 - math.cos(math.pi * ((num_inference_steps - t) / num_inference_steps) ** 5.0)) / 2)


def x0_from_v(x: torch.Tensor, v: torch.Tensor, alpha_cumprod: float) -> torch.Tensor:
    """x0 = sqrt(a) x - sqrt(1 - a) v: CogVideoX's v-prediction turned into the x0 the solvers integrate."""
    return math.sqrt(alpha_cumprod) * x - math.sqrt(1 - alpha_cumprod) * v


def _vp_grid(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> list[tuple[int, float, float, int]]:
    """(t, a_t, a_prev, prev_t) per step; a_prev = 1.0 past the end (set_alpha_to_one), prev_t = t - 1000 // steps."""
    if timesteps.ndim != 1 or len(timesteps) < 1:
        raise ValueError(f"timesteps must be a 1-D grid of at least 1 value, got shape {tuple(timesteps.shape)}")
    stride = len(alphas_cumprod) // len(timesteps)
    a = alphas_cumprod.to(torch.float64)
    return [(t, a[t].item(), a[t - stride].item() if t - stride >= 0 else 1.0, t - stride) for t in timesteps.tolist()]


@torch.no_grad()
def sample_ddim_vpred(denoise: VDenoise, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                      callback: Callback | None = None, update: Update | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta 0) for v-prediction (CogVideoXDDIMScheduler.step):
    x_prev = A x + B x0 with A = sqrt((1 - a_prev) / (1 - a_t)), B = sqrt(a_prev) - sqrt(a_t) A.
    The first step (a_t = 0 under zero terminal SNR) gives x0 = -v and ignores x except through v; the last
    (a_prev = 1) returns x0. x: latent, float32. update: see the module docstring. Returns the sample after the last
    step."""
    x = x.to(torch.float32)
    for i, (t, a_t, a_prev, _) in enumerate(_vp_grid(timesteps, alphas_cumprod)):
        v = denoise(x, t)
        x = _update(x, t, update)
        x0 = x0_from_v(x, v, a_t)
        if callback is not None:
            callback({"i": i, "t": t, "sigma": math.sqrt(1 - a_t), "x": x, "x0": x0})
        coef_x = math.sqrt((1 - a_prev) / (1 - a_t))
        coef_x0 = math.sqrt(a_prev) - math.sqrt(a_t) * coef_x
        x = coef_x * x + coef_x0 * x0
    return x


def _half_log_snr(a: float) -> float:
    """lambda = log sqrt(a / (1 - a)), written as diffusers does; -inf at a = 0 (zero terminal SNR), +inf at a = 1
    (the final step's a_prev). The infinities are explicit here; the algebra below stays NaN-free with them."""
    if a <= 0.0:
        return -math.inf
    if a >= 1.0:
        return math.inf
    return math.log(math.sqrt(a / (1 - a)))


@torch.no_grad()
def sample_dpm_vpred(denoise: VDenoise, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                     generator: torch.Generator | None = None, callback: Callback | None = None,
                     frames_first: bool = False, update: Update | None = None) -> torch.Tensor:
    """Stochastic SDE-DPM-Solver++(2M) for v-prediction (CogVideoXDPMScheduler.step as pipeline_cogvideox steps it,
    = SAT VPSDEDPMPP2MSampler). With h = lambda_prev - lambda_t:
    x_prev = A x - B D + s eps, A = sqrt((1 - a_prev) / (1 - a_t)) e^-h, B = expm1(-2h) sqrt(a_prev),
    s = sqrt(1 - a_prev) sqrt(1 - e^-2h); D = x0 on the first and last step, else the 2nd-order
    D = (1 + 1/2r) x0 - (1/2r) x0_prev with r = (lambda_t - lambda_back) / h.

    Endpoints under zero terminal SNR: at step 0, lambda_t = -inf so h = inf, A = 0 (x is discarded), B = -sqrt(a_prev)
    and s = sqrt(1 - a_prev); at step 1, lambda_back = -inf so r = inf and D = x0 (first order in effect); the last
    step (a_prev = 1) returns x0 exactly (A = 0, B = -1, s = 0).

    Noise: `torch.randn(x.shape, generator=generator, dtype=float32)` on the generator's device (CPU when None: the
    global RNG), then moved to x's device. Draws per step, as diffusers: 1 at step 0; 2 at each middle step (the
    first is discarded); 1 at the last step (unused). Pass the generator that drew the initial latent, in the same
    state the pipeline leaves it, to reproduce a diffusers run. x: latent, float32. frames_first: x is
    (B, C, F, H, W) but each draw is made in diffusers' latent layout (B, F, C, H, W) and permuted, so the values
    match CogVideoXPipeline's (its latents are frames first). update: see the module docstring.
    """
    x = x.to(torch.float32)
    device = generator.device if generator is not None else torch.device("cpu")
    shape = (x.shape[0], x.shape[2], x.shape[1], *x.shape[3:]) if frames_first else x.shape
    draw = lambda: torch.randn(shape, generator=generator, dtype=x.dtype, device=device).to(x.device)  # noqa: E731
    if frames_first:
        draw_ff = draw
        draw = lambda: draw_ff().transpose(1, 2)  # noqa: E731
    x0_prev, lam_back = None, None
    for i, (t, a_t, a_prev, prev_t) in enumerate(_vp_grid(timesteps, alphas_cumprod)):
        v = denoise(x, t)
        x = _update(x, t, update)
        x0 = x0_from_v(x, v, a_t)
        if callback is not None:
            callback({"i": i, "t": t, "sigma": math.sqrt(1 - a_t), "x": x, "x0": x0})
        lam, lam_next = _half_log_snr(a_t), _half_log_snr(a_prev)
        h = lam_next - lam  # inf at the first step and at the last
        coef_x = math.sqrt((1 - a_prev) / (1 - a_t)) * math.exp(-h)
        coef_d = math.expm1(-2 * h) * math.sqrt(a_prev)
        sigma_noise = math.sqrt(1 - a_prev) * math.sqrt(1 - math.exp(-2 * h))
        noise = draw()
        if x0_prev is None or prev_t < 0:  # first order
            x_next = coef_x * x - coef_d * x0 + sigma_noise * noise
        else:
            r = (lam - lam_back) / h  # inf at step 1 (lam_back = -inf): 1/2r = 0
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x_next = coef_x * x - coef_d * d + sigma_noise * draw()  # the first draw is discarded, as in diffusers
        x, x0_prev, lam_back = x_next, x0, lam
    return x
