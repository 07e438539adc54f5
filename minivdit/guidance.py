"""Guidance: which model passes run at each step, and pure functions combining their predictions.

Every method sees the same base passes, cond (row 0) and uncond (row 1), batched in one forward. STAS edits both
(it adds no pass); DG and STG add one branch pass that shares the blocks before its branch point (shared prefix).
Predictions are velocities v; the combine functions below map named predictions to the v the solver integrates.

References: CFG (Ho & Salimans 2022); STAS (Sec. 5, Alg. 1); DG (Eq. 4-5); STG (appendix Alg. 1 and 4; official
junhahyung/STGuidance `Wan2.1/pipeline.py`); CFG-Zero* (Fan et al. 2025, Eq. 9 and zero-init); APG (Sadat et al.
2024, Alg. 1). Comparators (facts: shared/reference/methods.md; combines checked against diffusers 0.42.1's guiders in
tests/test_comparators.py): PAG (Ahn et al. 2024), SEG (Hong 2024, official SEG-SDXL), FDG (Sadat et al. 2025,
diffusers FrequencyDecoupledGuidance), TCFG (arXiv 2503.18137, diffusers normalized_guidance), MAMBO-G
magnitude-aware guidance (arXiv 2508.03442, diffusers mambo_guidance), AutoGuidance (Karras et al. 2024, as
diffusers' AutoGuidance builds its bad model), CFG++ (Chung et al. 2025, official CFGpp `BaseDDIMCFGpp`), FlowMo
(Shaulov et al. 2025, official arielshaulov/FlowMo `motion_optimizer.py`, `wan/text2video.py`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .interventions import Perturb, Steer, Zero

# ----------------------------------------------------------------------------------------------------------
# pure combine functions; every tensor is (B, C, F, H, W)


def cfg(v_cond, v_uncond, guidance_scale: float):
    """Classifier-free guidance (docs/methods.md#cfg): v = v_uncond + g (v_cond - v_uncond), tensors (B, C, F, H, W)."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def dg(v_cond, v_uncond, v_degraded, guidance_scale: float, w: float):
    """Detail guidance (DG Eq. 5; docs/methods.md#dg): v = v_uncond + g (v_cond - v_uncond) + w (v_cond - v_degraded).

    The paper writes Eq. 5 as D_c + lambda (D_c - D_u) + w (D_c - D_m); that is this formula with lambda = g - 1, so
    g = 1 (no CFG) gives Eq. 4: v = v_cond + w (v_cond - v_degraded).
    """
    return cfg(v_cond, v_uncond, guidance_scale) + w * (v_cond - v_degraded)


def rescale_std(v, v_ref, rescale: float):
    """STG Algorithm 4 (docs/methods.md#stg): scale v by r * std(v_ref)/std(v) + (1 - r), stds per sample over (C, F, H, W)."""
    dims = tuple(range(1, v.ndim))
    factor = v_ref.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True)
    return v * (rescale * factor + (1 - rescale))


def stg(v_cond, v_uncond, v_perturbed, guidance_scale: float, s: float, rescale: float = 0.0):
    """STG with CFG (STG appendix Alg. 1 + 4; docs/methods.md#stg): v = v_uncond + g (v_cond - v_uncond) + s (v_cond - v_perturbed),
    then, if rescale > 0, its std pulled towards std(v_cond)."""
    v = cfg(v_cond, v_uncond, guidance_scale) + s * (v_cond - v_perturbed)
    return rescale_std(v, v_cond, rescale) if rescale > 0 else v


def stg_official(v_cond, v_uncond, v_perturbed_uncond, guidance_scale: float, s: float):
    """The official STGuidance Wan form (docs/methods.md#stg): v_cfg + s (v_cfg - v_perturbed), the perturbed pass on the negative prompt."""
    v = cfg(v_cond, v_uncond, guidance_scale)
    return v + s * (v - v_perturbed_uncond)


def cfg_zero_star(v_cond, v_uncond, guidance_scale: float):
    """CFG-Zero* (Eq. 9; docs/methods.md#cfg-zero): s* = <v_cond, v_uncond> / (|v_uncond|^2 + 1e-8) per sample, over
    (C, F, H, W) as the official `optimized_scale`; v = s* v_uncond + g (v_cond - s* v_uncond)."""
    c, u = v_cond.flatten(1), v_uncond.flatten(1)
    s = ((c * u).sum(1) / ((u * u).sum(1) + 1e-8)).view(-1, *[1] * (v_cond.ndim - 1))
    return cfg(v_cond, s * v_uncond, guidance_scale)


def apg(x0_cond, x0_uncond, guidance_scale: float, eta: float, norm_threshold: float, running=None, momentum=0.0):
    """APG on denoised predictions (APG Alg. 1; docs/methods.md#apg): x0 = x0_cond + (g - 1) (d_orth + eta d_par),
    d = x0_cond - x0_uncond, all tensors (B, C, F, H, W).

    running: the momentum average from the previous step (None at the first); d <- d + momentum * running. The
    update is rescaled to vector 2-norm <= norm_threshold (0: off) and split into parts parallel / orthogonal to
    x0_cond. Norm and projection run over (C, F, H, W) per sample (diffusers' default; the paper's image code uses
    (C, H, W)). Returns (x0, new running average).
    """
    d = x0_cond - x0_uncond
    if running is not None:
        d = d + momentum * running
    running = d
    dims = tuple(range(1, d.ndim))
    if norm_threshold > 0:
        d = d * (norm_threshold / torch.linalg.vector_norm(d, dim=dims, keepdim=True)).clamp(max=1.0)
    par = parallel_part(d, x0_cond)
    return x0_cond + (guidance_scale - 1) * (d - par + eta * par), running


def parallel_part(d, ref):
    """The part of d parallel to ref, per sample over all non-batch dims, computed in float64 and returned in d's
    dtype (APG Alg. 1; diffusers FDG `project` with upcast_to_double); the orthogonal part is d minus it."""
    dims = tuple(range(1, d.ndim))
    unit = F.normalize(ref.double().flatten(1), dim=1).view_as(ref)
    return ((d.double() * unit).sum(dims, keepdim=True) * unit).to(d.dtype)


def tcfg(v_cond, v_uncond, guidance_scale: float):
    """TCFG (docs/methods.md#tcfg; diffusers `normalized_guidance`): per sample, the SVD of the 2 x N matrix
    [v_cond; v_uncond] (flattened over (C, F, H, W), float32); v_uncond projected on the first right-singular vector
    V1: u' = (v_uncond . V1) V1; v = u' + g (v_cond - u')."""
    m = torch.stack([v_cond, v_uncond], dim=1).float().flatten(2)  # (B, 2, N)
    vh = torch.linalg.svd(m, full_matrices=False)[2][:, :1]  # (B, 1, N): V1
    u = (m[:, 1:] @ vh.transpose(1, 2) @ vh).view_as(v_uncond).to(v_uncond.dtype)
    return cfg(v_cond, u, guidance_scale)


def mag(v_cond, v_uncond, guidance_scale: float, alpha: float):
    """Magnitude-aware guidance, MAMBO-G (docs/methods.md#mag; diffusers `mambo_guidance`): r = |v_c - v_u| / |v_u|
    (2-norms per sample over (C, F, H, W)); g_t = 1 + (g - 1) exp(-alpha r); v = v_u + g_t (v_c - v_u)."""
    d = v_cond - v_uncond
    dims = tuple(range(1, d.ndim))
    r = torch.linalg.vector_norm(d, dim=dims, keepdim=True) / torch.linalg.vector_norm(v_uncond, dim=dims, keepdim=True)
    return v_uncond + (1 + (guidance_scale - 1) * torch.exp(-alpha * r)) * d


PYRAMID_KERNEL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16  # the 5 x 5 binomial kernel of kornia's pyramids


def _pyr_blur(x):
    """kornia pyramid blur: 5 x 5 binomial, reflect border; x (N, C, H, W)."""
    k = PYRAMID_KERNEL.to(x)
    kernel = (k[:, None] * k[None, :]).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def _pyr_up(x, size):
    """kornia `pyrup` to `size` (bilinear, align_corners False, then the blur); size = 2x for even sizes."""
    return _pyr_blur(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


def laplacian_pyramid(x, levels: int) -> list[torch.Tensor]:
    """Laplacian pyramid of x (N, C, H, W), finest first (kornia `build_laplacian_pyramid` without its power-of-two
    padding): G0 = x, G_k+1 = bilinear resize of blur(G_k) to floor(H/2) x floor(W/2), L_k = G_k - pyrup(G_k+1) at
    G_k's size, the last level G_(levels-1). `pyramid_image` inverts it exactly."""
    gs = [x]
    for _ in range(levels - 1):
        g = gs[-1]
        gs.append(F.interpolate(_pyr_blur(g), size=(g.shape[2] // 2, g.shape[3] // 2), mode="bilinear",
                                align_corners=False))
    return [g - _pyr_up(gn, g.shape[2:]) for g, gn in zip(gs, gs[1:])] + [gs[-1]]


def pyramid_image(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of laplacian_pyramid (diffusers `build_image_from_pyramid`, pyrup sized to each level)."""
    x = pyramid[-1]
    for level in reversed(pyramid[:-1]):
        x = _pyr_up(x, level.shape[2:]) + level
    return x


def fdg(v_cond, v_uncond, scales: tuple[float, ...], parallel_weights: tuple[float, ...] = (1.0,)):
    """FDG (docs/methods.md#fdg; diffusers FrequencyDecoupledGuidance): a Laplacian pyramid of len(scales) levels over
    (H, W) of every frame (tensors (B, C, F, H, W) folded to (B F, C, H, W)), per level k (k = 0 finest) the shift
    d_k = c_k - u_k, v_k = u_k + scales[k] d_k, then the reconstruction. parallel_weights (diffusers'; one value for
    every level or one per level): where rho_k != 1, d_k <- rho_k d_par + (d_k - d_par), d_par = d_k's part parallel
    to c_k per frame over (C, H, W) (`parallel_part`); 1 = the plain CFG shift."""
    b, c, f, h, w = v_cond.shape
    fold = lambda t: t.transpose(1, 2).reshape(b * f, c, h, w)  # noqa: E731  (B F, C, H, W)
    pc, pu = laplacian_pyramid(fold(v_cond), len(scales)), laplacian_pyramid(fold(v_uncond), len(scales))
    rhos = parallel_weights * len(scales) if len(parallel_weights) == 1 else parallel_weights
    levels = []
    for ck, uk, s, rho in zip(pc, pu, scales, rhos):
        d = ck - uk
        if not math.isclose(rho, 1.0):  # diffusers' test: projection off near 1
            par = parallel_part(d, ck)
            d = rho * par + (d - par)
        levels.append(uk + s * d)
    return pyramid_image(levels).reshape(b, f, c, h, w).transpose(1, 2)


def cfgpp(v_cond, v_uncond, scale: float, levels: tuple[float, float, float, float]):
    """CFG++ (docs/methods.md#cfgpp; official CFGpp `BaseDDIMCFGpp`): the velocity whose one-step (Euler / DDIM) update
    is x' = a' x0(v_lam) + s' eps(v_u), v_lam = v_u + lam (v_c - v_u): x0 from the guided prediction, renoised with
    the unconditional one. levels = (a, s, a', s'): x = a x0 + s eps now and at the step's target (flow: a = 1 - sigma,
    s = sigma; CogVideoX: sqrt(abar), sqrt(1 - abar)). For both x0(v) = . - s v and eps(v) = . + a v, so the update
    is the plain step with v_u + lam_eff (v_c - v_u), lam_eff = lam a' s / (a' s - s' a) (flow: lam sigma (1 - sigma')
    / (sigma - sigma'))."""
    a, s, a2, s2 = levels
    return cfg(v_cond, v_uncond, scale * a2 * s / (a2 * s - s2 * a))


def flowmo_loss(v):
    """FlowMo's patch-wise temporal variance (docs/methods.md#flowmo; official `calculate_motion_variance`): v (B, C,
    F, H, W), the CFG prediction; D_f = |v[:, :, f] - v[:, :, f - 1]| (latent frames), their population variance over
    the F - 1 differences per (c, h, w), the mean over channels, then the max over (h, w). Returns (B,): a patch is
    one latent pixel (all C channels)."""
    d = (v[:, :, 1:] - v[:, :, :-1]).abs()  # (B, C, F - 1, H, W)
    return d.var(dim=2, unbiased=False).mean(1).flatten(1).amax(1)  # (B,)


# ----------------------------------------------------------------------------------------------------------
# methods

METHODS = ("cfg", "cfg-zero*", "apg", "dg", "stg", "stg-official", "pag", "seg", "fdg", "tcfg", "mag", "autoguidance",
           "cfgpp", "flowmo")
# FlowMo's optimised model timesteps (official wan/text2video.py; steps 0-11 of Wan2.1's 50-step UniPC grid, shift 5)
FLOWMO_TIMESTEPS = (999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946)
STEP_SOLVERS = ("euler", "ddim")  # one-step solvers CFG++ is defined for (its update replaces their step)
STG_SCALE = {"R": 1.0, "A": 2.0}  # STG appendix A1: "STG-A using a scale of 2.0 and STG-R using 1.0"
STG_RESCALE_ON = 0.7  # the rescale factor of the official STGuidance pipelines whenever rescaling is on


def ints(s) -> tuple[int, ...]:
    """'1,2' -> (1, 2): a comma-separated list of block or channel indices ('' -> ())."""
    return tuple(int(v) for v in str(s).split(",") if v.strip())


def yes(s) -> bool:
    """'1' / 'true' / 'yes' -> True, '0' / 'false' / 'no' -> False."""
    if str(s).lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"expected 1/true/yes or 0/false/no, got {s!r}")
    return str(s).lower() in ("1", "true", "yes")


def floats(s) -> tuple[float, ...]:
    """'10,5' -> (10.0, 5.0): a comma-separated list of numbers."""
    return tuple(float(v) for v in str(s).split(","))


# Every method parameter a sampling script exposes: (name, type, the method it belongs to, help). One table for
# sample.py and compare.py; `from_preset` refuses a parameter whose method is not in the run.
OPTIONS = (
    ("stas_alpha", float, "stas", "STAS max rule (Eq. 5): h <- alpha * max_j |h[j, d]| * sign(h), alpha >= 0"),
    ("stas_p", float, "stas", "STAS boundary width p, percent of a latent frame's tokens per side, in [0, 50]"),
    ("stas_steps", int, "stas", "STAS K: steer during the first K sampling steps, 0 <= K <= steps"),
    ("stas_block", int, "stas", "STAS block m (0-based): its output is steered"),
    ("stas_dims", ints, "stas", "STAS MA channels M, comma separated"),
    ("stas_tokens", str, "stas", "STAS token set S: first | boundary | first+boundary (default)"),
    ("stas_rule", str, "stas", "STAS amplification rule g: max (default) | scaling"),
    ("stas_omega", float, "stas", "STAS scaling rule (Table 5): h <- (1 + omega) h, omega > 0; default 1.5 "
                                  "(2.5x, Fig. 3)"),
    ("dg_block", int, "dg", "DG block m (0-based): MA channels zeroed in its output"),
    ("dg_dims", ints, "dg", "DG MA channels, comma separated"),
    ("dg_scale", float, "dg", "DG weight w (Eq. 5), >= 0"),
    ("stg_blocks", ints, "stg", "STG perturbed blocks (0-based), comma separated"),
    ("stg_mode", str, "stg", "STG perturbation: R (skip the blocks) | A (identity self-attention map)"),
    ("stg_scale", float, "stg", "STG scale s >= 0; default per mode: R 1.0, A 2.0 (STG appendix)"),
    ("stg_rescale", float, "stg", f"STG Alg. 4 rescale factor r in [0, 1], 'stg' only; a bare flag means "
                                  f"{STG_RESCALE_ON} (the official pipelines' value); default 0 = off"),
    ("zero_init_steps", int, "cfg-zero*", "CFG-Zero*: the first N steps get v = 0 (default 2, the official Wan "
                                          "setting)"),
    ("apg_eta", float, "apg", "APG eta: weight of the update's part parallel to x0_cond (default 0)"),
    ("apg_norm_threshold", float, "apg", "APG norm limit r on the update's 2-norm over (C, F, H, W); 0 = off "
                                         "(default)"),
    ("apg_momentum", float, "apg", "APG momentum beta (default -0.5)"),
    ("pag_blocks", ints, "pag", "PAG blocks (0-based) whose self-attention map is the identity; default 1 (diffusers' "
                                "PAG pipelines for DiTs: blocks.1)"),
    ("pag_scale", float, "pag", "PAG scale s >= 0 (default 3.0, the PAG pipelines' pag_scale)"),
    ("seg_blocks", ints, "seg", "SEG blocks (0-based) whose self-attention queries are blurred; default 1"),
    ("seg_scale", float, "seg", "SEG scale s >= 0 (default 3.0, official SEG-SDXL)"),
    ("seg_sigma", float, "seg", f"SEG blur sigma > 0 in tokens, per frame over (H, W); >= {9999.0:g} is infinite: "
                                "the frame's mean query (default 9999999, official)"),
    ("fdg_scales", floats, "fdg", "FDG guidance scale per Laplacian-pyramid level, finest first (default 10,5: "
                                  "diffusers / the FDG paper's SDXL setting)"),
    ("fdg_parallel_weights", floats, "fdg", "FDG weight of the part of each level's shift parallel to the cond "
                                            "level: one value or one per level (default 1 = off, the plain CFG "
                                            "shift; diffusers recommends [0, 1])"),
    ("mag_alpha", float, "mag", "magnitude-aware guidance (MAMBO-G) alpha >= 0 (default 8.0, diffusers)"),
    ("ag_blocks", ints, "autoguidance", "AutoGuidance: blocks the bad model skips on the uncond pass (default 1)"),
    ("ag_model", str, "autoguidance", "AutoGuidance with a guide model: a DiT checkpoint of the same family and "
                                      "latent space (e.g. Wan2.1-1.3B guiding Wan2.1-14B) whose uncond prediction is "
                                      "the bad one, instead of skipping --ag-blocks (default: none)"),
    ("cfgpp_scale", float, "cfgpp", "CFG++ scale lambda in [0, 1] (default 0.6, the official README's DDIM value)"),
    ("flowmo_lr", float, "flowmo", "FlowMo learning rate of its Adam step on the latent, >= 0 (default 0.001, "
                                   "official)"),
    ("flowmo_iterations", int, "flowmo", "FlowMo: Adam iterations on the latent per optimised step, >= 1 (default 1, "
                                         "the official generate.py; the sample after the iteration of lowest loss "
                                         "is kept)"),
    ("flowmo_timesteps", ints, "flowmo", "FlowMo: the model timesteps (0..999) whose step optimises the latent "
                                         "(default: the official 999,...,946 = Wan's first 12 of 50 UniPC steps)"),
    ("flowmo_checkpoint", yes, "flowmo", "FlowMo: activation checkpointing over blocks in its gradient passes "
                                         "(1 / 0; default 0)"),
)


def uses(method: str, stas: bool, group: str) -> bool:
    """Whether a run of `method` (with or without STAS) uses the OPTIONS of `group`."""
    return stas if group == "stas" else method.startswith("stg") if group == "stg" else method == group


@dataclass(frozen=True)
class Guidance:
    """A guidance method and its parameters; any method can add STAS. Sections of docs/methods.md give each
    method's equations, sources, ambiguities and defaults.

    method: one of METHODS. guidance_scale: the CFG scale g >= 0 (lambda in the papers' CFG form; 1 = cond only).
    Every float setting must be finite; scales, weights and step counts >= 0 (ValueError otherwise).
    stas / stas_steps: STAS steering (interventions.Steer) on both CFG passes during the first K steps (Alg. 1).
    With STAS on, the DG degraded pass and the STG perturbed pass are steered too: the weak model is the steered
    model with the DG / STG perturbation on top, so the guidance term isolates that perturbation.
    dg / dg_scale: DG's degraded model (interventions.Zero: MA channels zeroed at block m) and its weight w.
    stg_blocks / stg_mode / stg_scale / stg_rescale: STG's perturbed blocks, 'R' (skip the block) or 'A' (identity
    self-attention map), its scale s (None: STG_SCALE[mode], the STG appendix's 1.0 for R and 2.0 for A), and the
    Algorithm 4 rescaling factor (0 = off; STG_RESCALE_ON = 0.7 is the official value; 'stg' only).
    zero_init_steps: CFG-Zero*'s number of first steps whose velocity is 0. Default 2: the official Wan2.1 T2V
    setting `zero_steps = 1` is an inclusive last index (`i <= zero_steps`), i.e. 2 of 50 steps (its README: "the
    first 2 steps, 4 %"); diffusers' CFGZeroStarGuider zeroes 1.
    apg_eta / apg_norm_threshold / apg_momentum: APG (Alg. 1) eta, norm limit (0 = off) and momentum beta.
    pag_blocks / pag_scale: PAG's identity-attention blocks and scale s; seg_blocks / seg_scale / seg_sigma: SEG's
    blurred-query blocks, scale s and blur sigma (tokens; >= attention.SEG_INF: the mean); a perturbed cond pass
    each, combined as STG: v_u + g (v_c - v_u) + s (v_c - v_perturbed). fdg_scales: FDG's per-level scales (finest
    first; replaces g); fdg_parallel_weights: its parallel-part weights (1 = off). mag_alpha: MAMBO-G's alpha.
    ag_blocks: AutoGuidance's bad model skips these blocks on the uncond pass: v = v_bad + g (v_c - v_bad) (() =
    plain CFG). ag_model: instead, the bad model is this guide DiT (a checkpoint path, or a name under which the
    pipeline holds a loaded DiT: `Pipeline.guides`) of the same latent space, on the uncond row, unsteered
    (pipeline.check_guide). cfgpp_scale: CFG++'s lambda in [0, 1] (replaces g); Euler / DDIM only. TCFG uses g.
    flowmo_lr / flowmo_iterations / flowmo_timesteps / flowmo_checkpoint: FlowMo's latent update (CFG combine; the
    pipeline's `flowmo_update` hook). docs/methods.md gives each method's sources and choices.
    capture: called as capture(block, h) with every block output of the base batch (massive-activation analysis).
    """
    method: str = "cfg"
    guidance_scale: float = 5.0
    stas: Steer | None = None
    stas_steps: int = 0
    dg: Zero | None = None
    dg_scale: float = 1.0
    stg_blocks: tuple[int, ...] = ()
    stg_mode: str = "R"
    stg_scale: float | None = None
    stg_rescale: float = 0.0
    zero_init_steps: int = 2
    apg_eta: float = 0.0
    apg_norm_threshold: float = 0.0
    apg_momentum: float = -0.5
    pag_blocks: tuple[int, ...] = (1,)
    pag_scale: float = 3.0
    seg_blocks: tuple[int, ...] = (1,)
    seg_scale: float = 3.0
    seg_sigma: float = 9999999.0
    fdg_scales: tuple[float, ...] = (10.0, 5.0)
    fdg_parallel_weights: tuple[float, ...] = (1.0,)
    mag_alpha: float = 8.0
    ag_blocks: tuple[int, ...] = (1,)
    ag_model: str | None = None
    cfgpp_scale: float = 0.6
    flowmo_lr: float = 1e-3
    flowmo_iterations: int = 1
    flowmo_timesteps: tuple[int, ...] = FLOWMO_TIMESTEPS
    flowmo_checkpoint: bool = False
    capture: Callable[[int, torch.Tensor], None] | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown guidance method {self.method!r}; choose one of {METHODS}")
        if self.stas_steps < 0:
            raise ValueError(f"STAS K = {self.stas_steps} must be >= 0")
        if self.method == "dg" and self.dg is None:
            raise ValueError("method 'dg' needs `dg` (the MA channels and the block m to zero them at)")
        if self.method.startswith("stg") and not self.stg_blocks:
            raise ValueError(f"method {self.method!r} needs stg_blocks (the blocks to perturb)")
        if self.stg_mode not in STG_SCALE:
            raise ValueError(f"stg_mode must be 'R' (skip blocks) or 'A' (identity attention), got {self.stg_mode!r}")
        if self.stg_scale is None:
            object.__setattr__(self, "stg_scale", STG_SCALE[self.stg_mode])
        if not 0 <= self.stg_rescale <= 1:
            raise ValueError(f"stg_rescale = {self.stg_rescale} must be in [0, 1] (0 = off, {STG_RESCALE_ON} = the "
                             "official value)")
        if self.method == "stg-official" and self.stg_rescale:
            raise ValueError("stg_rescale (Alg. 4) applies to method 'stg' only, not to 'stg-official'")
        for name in ("guidance_scale", "dg_scale", "stg_scale", "stg_rescale", "apg_eta", "apg_norm_threshold",
                     "apg_momentum", "pag_scale", "seg_scale", "mag_alpha", "cfgpp_scale", "flowmo_lr"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} = {getattr(self, name)} must be a finite number")
        if not all(math.isfinite(w) for w in self.fdg_scales + self.fdg_parallel_weights):
            raise ValueError(f"fdg_scales = {self.fdg_scales}, fdg_parallel_weights = {self.fdg_parallel_weights} "
                             "must be finite numbers")
        if len(self.fdg_parallel_weights) not in (1, len(self.fdg_scales)):
            raise ValueError(f"fdg_parallel_weights = {self.fdg_parallel_weights}: give one value or one per level "
                             f"({len(self.fdg_scales)} fdg_scales)")
        if not 0 <= self.cfgpp_scale <= 1:
            raise ValueError(f"cfgpp_scale = {self.cfgpp_scale}: CFG++'s lambda must be in [0, 1] (about CFG 1..12.5 "
                             "per the CFG++ README)")
        if not self.seg_sigma > 0:
            raise ValueError(f"seg_sigma = {self.seg_sigma} must be > 0 (tokens; >= 9999 means infinite: the mean)")
        if not self.fdg_scales:
            raise ValueError("fdg_scales needs one scale per pyramid level (e.g. 10,5)")
        if self.flowmo_iterations < 1:
            raise ValueError(f"flowmo_iterations = {self.flowmo_iterations} must be >= 1 (the official default is 1)")
        for name in ("pag_blocks", "seg_blocks"):
            if self.method == name[:3] and not getattr(self, name):
                raise ValueError(f"method {self.method!r} needs {name} (the blocks to perturb)")
        for name in ("guidance_scale", "dg_scale", "stg_scale", "zero_init_steps", "apg_norm_threshold", "pag_scale",
                     "seg_scale", "mag_alpha", "flowmo_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 0")

    def check(self, steps: int, num_layers: int, dim: int, solver: str | None = None) -> None:
        """Raise ValueError for settings that do not fit the run (K > steps, block or channel out of range, CFG++ with
        a multistep solver)."""
        if self.method == "cfgpp" and solver is not None and solver not in STEP_SOLVERS:
            raise ValueError(f"CFG++ replaces a one-step update and is defined for the {' / '.join(STEP_SOLVERS)} "
                             f"solvers only (no source defines it for the multistep {solver!r}): pass --solver euler "
                             "(Wan) or --solver ddim (CogVideoX)")
        if self.stas_steps > steps:
            raise ValueError(f"STAS K = {self.stas_steps} exceeds the {steps} sampling steps; use K <= {steps}")
        if self.method == "cfg-zero*" and self.zero_init_steps > steps:
            raise ValueError(f"CFG-Zero* zero_init_steps = {self.zero_init_steps} exceeds the {steps} sampling steps; "
                             f"use at most {steps}")
        base, branches, _ = self.passes(0)
        for p in (base, *(p for _, p in branches)):
            p.validate(num_layers, dim)

    def passes(self, i: int) -> tuple[Perturb, tuple[tuple[int, Perturb], ...], tuple[str, ...]]:
        """Step i's passes: the Perturb of the [cond, uncond] batch, the branch passes ((row, Perturb), ...) and
        the names of the branch predictions. A branch with zero weight is not run."""
        steer = self.stas if self.stas is not None and i < self.stas_steps else None
        base = Perturb(steer=steer, capture=self.capture)
        clean = replace(base, capture=None)
        if self.method == "dg" and self.dg_scale != 0:
            return base, ((0, replace(clean, zero=self.dg)),), ("degraded",)
        if self.method.startswith("stg") and self.stg_scale != 0:
            blocks = frozenset(self.stg_blocks)
            p = replace(clean, skip=blocks) if self.stg_mode == "R" else replace(clean, identity_attn=blocks)
            return base, ((1 if self.method == "stg-official" else 0, p),), ("perturbed",)
        if self.method == "pag" and self.pag_scale != 0 and self.pag_blocks:
            return base, ((0, replace(clean, identity_attn=frozenset(self.pag_blocks))),), ("perturbed",)
        if self.method == "seg" and self.seg_scale != 0 and self.seg_blocks:
            p = replace(clean, blur_attn=frozenset(self.seg_blocks), blur_sigma=self.seg_sigma)
            return base, ((0, p),), ("perturbed",)
        if self.method == "autoguidance" and self.ag_blocks and self.ag_model is None:  # uncond row, as diffusers
            return base, ((1, replace(clean, skip=frozenset(self.ag_blocks))),), ("bad",)
        return base, (), ()

    def combine(self, preds: dict[str, torch.Tensor], x: torch.Tensor, sigma: float, i: int, state: dict,
                levels: tuple[float, float, float, float] | None = None):
        """Named predictions {'cond', 'uncond', 'degraded' | 'perturbed' | 'bad'} at step i, sigma -> the guided
        velocity.

        x: the current latent (APG works on x0 = x - sigma v); state: per-run memory (APG's momentum average).
        levels: (a, s, a', s') of the step, x = a x0 + s eps now and at its target (CFG++ needs them).
        """
        c, u, g = preds["cond"], preds["uncond"], self.guidance_scale
        if self.method in ("pag", "seg") and "perturbed" in preds:
            return stg(c, u, preds["perturbed"], g, self.pag_scale if self.method == "pag" else self.seg_scale)
        if self.method == "autoguidance" and "bad" in preds:
            return cfg(c, preds["bad"], g)
        if self.method == "fdg":
            return fdg(c, u, self.fdg_scales, self.fdg_parallel_weights)
        if self.method == "tcfg":
            return tcfg(c, u, g)
        if self.method == "mag":
            return mag(c, u, g, self.mag_alpha)
        if self.method == "cfgpp":
            if levels is None:
                raise ValueError("CFG++ needs the step's noise levels (Pipeline.denoiser passes them)")
            return cfgpp(c, u, self.cfgpp_scale, levels)
        if self.method == "dg" and "degraded" in preds:
            return dg(c, u, preds["degraded"], g, self.dg_scale)
        if self.method == "stg" and "perturbed" in preds:
            return stg(c, u, preds["perturbed"], g, self.stg_scale, self.stg_rescale)
        if self.method == "stg-official" and "perturbed" in preds:
            return stg_official(c, u, preds["perturbed"], g, self.stg_scale)
        if self.method == "cfg-zero*":
            return torch.zeros_like(c) if i < self.zero_init_steps else cfg_zero_star(c, u, g)
        if self.method == "apg":
            x0, state["apg"] = apg(x - sigma * c, x - sigma * u, g, self.apg_eta, self.apg_norm_threshold,
                                   state.get("apg"), self.apg_momentum)
            return (x - x0) / sigma
        return cfg(c, u, g)

    def passes_per_step(self) -> int:
        """Model passes per step: a shared-prefix branch counts as one, so does an AutoGuidance guide-model pass (of
        the smaller DiT). FlowMo: on its optimised steps, 2 more forwards with gradients per iteration (+ their
        backward, and with checkpointing their recomputation)."""
        flowmo = 2 * self.flowmo_iterations if self.method == "flowmo" else 0
        return 2 + len(self.passes(0)[1]) + (self.guide is not None) + flowmo

    @property
    def guide(self) -> str | None:
        """The guide DiT this run's AutoGuidance needs (ag_model; one pass of it per step), or None."""
        return self.ag_model if self.method == "autoguidance" else None

    def flowmo_active(self, t: int) -> bool:
        """Whether FlowMo updates the latent at model timestep t."""
        return self.method == "flowmo" and self.flowmo_lr != 0 and int(t) in self.flowmo_timesteps


def from_preset(preset, method: str = "cfg", stas: bool = False, **overrides) -> Guidance:
    """A Guidance from a model preset's settings (wan.Preset: guidance_scale, stas, dg, stg), with overrides.

    stas: add STAS with the preset's STAS Table A2-A3 settings. overrides (None values are ignored, so a command line
    can pass every option): the OPTIONS names and `guidance_scale`. Raises ValueError for an option whose method is
    not in the run (e.g. `dg_scale` under 'cfg', a `stas_*` option without stas) and for settings the preset lacks.
    """
    o = {k: v for k, v in overrides.items() if v is not None}
    group = {name: g for name, _, g, _ in OPTIONS}
    unknown = sorted(set(o) - set(group) - {"guidance_scale", "capture"})
    if unknown:
        raise ValueError(f"unknown guidance options {unknown}; known: {sorted(group)}")
    wrong = [k for k in o if k in group and not uses(method, stas, group[k])]
    if wrong:
        flag = lambda k: "--" + k.replace("_", "-")
        raise ValueError("; ".join(f"{flag(k)} belongs to " + ("STAS (add --stas)" if group[k] == "stas" else
                                                               f"method {group[k]!r}") for k in wrong) +
                         f"; this run's method is {method!r}" + (" with STAS" if stas else ""))
    if "ag_blocks" in o and o.get("ag_model"):
        raise ValueError("--ag-blocks and --ag-model each define AutoGuidance's bad model: give one of them")
    kw = dict(method=method, guidance_scale=o.pop("guidance_scale", preset.guidance_scale))

    def settings(name, required):  # the preset's dict for a method, overridden by `<name>_<field>` arguments
        d = {**getattr(preset, name), **{k[len(name) + 1:]: o.pop(k) for k in list(o) if group.get(k) == name}}
        missing = [f for f in required if f not in d]
        if missing:
            raise ValueError(f"this model has no {name.upper()} settings (no MA channels known): run "
                             "samplers/analyze.py first to find them, then give " +
                             ", ".join(f"--{name}-{f}" for f in missing))
        return d
    if method == "dg":
        d = settings("dg", ("block", "dims"))
        kw.update(dg=Zero(block=d["block"], dims=tuple(d["dims"])), dg_scale=d.get("scale", 1.0))
    if method.startswith("stg"):
        d = settings("stg", ("blocks", "mode"))
        kw.update(stg_blocks=tuple(d["blocks"]), stg_mode=d["mode"], stg_scale=d.get("scale"),
                  stg_rescale=d.get("rescale", 0.0))
    if stas:
        if "stas_omega" in o and o.get("stas_rule", preset.stas.get("rule", "max")) != "scaling":
            raise ValueError("--stas-omega applies to the scaling rule only: add --stas-rule scaling")
        d = settings("stas", ("steps", "dims", "block"))
        kw["stas_steps"] = d.pop("steps")
        kw["stas"] = Steer(**{**d, "dims": tuple(d["dims"])})
    g = Guidance(**{**kw, **o})
    config = getattr(preset, "config", None)
    if config is not None:  # blocks and channels checked against the preset's architecture, before any loading
        base, branches, _ = g.passes(0)
        for p in (base, *(p for _, p in branches)):
            p.validate(config.num_layers, config.dim)
    return g


def defaults_table(presets: dict) -> str:
    """The per-preset method defaults as a Markdown table, read from the presets and the Guidance defaults (the
    method card docs/methods.md embeds it; a test keeps the two equal)."""
    g = Guidance()
    rows = ["| preset | CFG g | STAS (dims, block m, alpha, p %, K) | DG (dims, block m, w) | STG (blocks, mode) |",
            "|---|---|---|---|---|"]
    for name, p in presets.items():
        stas = ", ".join(str(p.stas.get(k, "-")) for k in ("dims", "block", "alpha", "p", "steps")) if p.stas else "-"
        dgs = ", ".join(str(p.dg.get(k, "-")) for k in ("dims", "block", "scale")) if p.dg else "-"
        stg_ = ", ".join(str(p.stg.get(k, "-")) for k in ("blocks", "mode")) if p.stg else "-"
        g_ = ", ".join(f"{e.name} {e.guidance_scale}" for e in getattr(p, "experts", ())) or p.guidance_scale
        rows.append(f"| {name} | {g_} | {stas} | {dgs} | {stg_} |")
    rows += ["", f"For every preset: STG scale s by mode {STG_SCALE}, STG rescale {g.stg_rescale} (off; "
                 f"{STG_RESCALE_ON} when on), CFG-Zero* zero_init_steps {g.zero_init_steps}, APG eta {g.apg_eta}, "
                 f"norm threshold {g.apg_norm_threshold} (off), momentum {g.apg_momentum}; STAS token set "
                 f"{Steer.__dataclass_fields__['tokens'].default}, rule {Steer.__dataclass_fields__['rule'].default} "
                 f"(scaling rule omega {Steer.__dataclass_fields__['omega'].default}). Comparators: PAG blocks "
                 f"{g.pag_blocks}, scale {g.pag_scale}; SEG blocks {g.seg_blocks}, scale {g.seg_scale}, sigma "
                 f"{g.seg_sigma:g} (infinite); FDG scales {g.fdg_scales} (finest first), parallel weights "
                 f"{g.fdg_parallel_weights} (off); MAG alpha {g.mag_alpha}; AutoGuidance skipped blocks {g.ag_blocks}, "
                 f"guide model {g.ag_model}; CFG++ lambda {g.cfgpp_scale}; FlowMo lr {g.flowmo_lr}, "
                 f"{g.flowmo_iterations} iteration(s) at timesteps {g.flowmo_timesteps}; TCFG and MAG use CFG g."]
    return "\n".join(rows)
