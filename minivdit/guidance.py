"""Guidance: which model passes run at each step, and pure functions combining their predictions.

Every method sees the same base passes, cond (row 0) and uncond (row 1), batched in one forward. STAS edits both
(it adds no pass); DG and STG add one branch pass that shares the blocks before its branch point (shared prefix).
Predictions are velocities v; the combine functions below map named predictions to the v the solver integrates.

References: CFG (Ho & Salimans 2022); STAS (Sec. 5, Alg. 1); DG (Eq. 4-5); STG (appendix Alg. 1 and 4; official
junhahyung/STGuidance `Wan2.1/pipeline.py`); CFG-Zero* (Fan et al. 2025, Eq. 9 and zero-init); APG (Sadat et al.
2024, Alg. 1).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .interventions import Perturb, Steer, Zero

# ----------------------------------------------------------------------------------------------------------
# pure combine functions; every tensor is (B, C, F, H, W)


def cfg(v_cond, v_uncond, guidance_scale: float):
    """Classifier-free guidance: v = v_uncond + g (v_cond - v_uncond)."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def dg(v_cond, v_uncond, v_degraded, guidance_scale: float, w: float):
    """Detail guidance (DG Eq. 5): v = v_uncond + g (v_cond - v_uncond) + w (v_cond - v_degraded).

    The paper writes Eq. 5 as D_c + lambda (D_c - D_u) + w (D_c - D_m); that is this formula with lambda = g - 1, so
    g = 1 (no CFG) gives Eq. 4: v = v_cond + w (v_cond - v_degraded).
    """
    return cfg(v_cond, v_uncond, guidance_scale) + w * (v_cond - v_degraded)


def rescale_std(v, v_ref, rescale: float):
    """STG Algorithm 4: scale v by r * std(v_ref)/std(v) + (1 - r), stds per sample over (C, F, H, W)."""
    dims = tuple(range(1, v.ndim))
    factor = v_ref.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True)
    return v * (rescale * factor + (1 - rescale))


def stg(v_cond, v_uncond, v_perturbed, guidance_scale: float, s: float, rescale: float = 0.0):
    """STG with CFG (STG appendix Alg. 1 + 4): v = v_uncond + g (v_cond - v_uncond) + s (v_cond - v_perturbed),
    then, if rescale > 0, its std pulled towards std(v_cond)."""
    v = cfg(v_cond, v_uncond, guidance_scale) + s * (v_cond - v_perturbed)
    return rescale_std(v, v_cond, rescale) if rescale > 0 else v


def stg_official(v_cond, v_uncond, v_perturbed_uncond, guidance_scale: float, s: float):
    """The official STGuidance Wan form: v_cfg + s (v_cfg - v_perturbed), the perturbed pass on the negative prompt."""
    v = cfg(v_cond, v_uncond, guidance_scale)
    return v + s * (v - v_perturbed_uncond)


def cfg_zero_star(v_cond, v_uncond, guidance_scale: float):
    """CFG-Zero* (Eq. 9): s* = <v_cond, v_uncond> / |v_uncond|^2 per sample; v = s* v_uncond + g (v_cond - s* v_uncond)."""
    c, u = v_cond.flatten(1), v_uncond.flatten(1)
    s = ((c * u).sum(1) / (u * u).sum(1).clamp_min(1e-8)).view(-1, *[1] * (v_cond.ndim - 1))
    return cfg(v_cond, s * v_uncond, guidance_scale)


def apg(x0_cond, x0_uncond, guidance_scale: float, eta: float, norm_threshold: float, running=None, momentum=0.0):
    """APG on denoised predictions (APG Alg. 1): x0 = x0_cond + (g - 1) (d_orth + eta d_par), d = x0_cond - x0_uncond.

    running: the momentum average from the previous step (None at the first); d <- d + momentum * running. The
    update is rescaled to norm <= norm_threshold (0: off) and split into parts parallel / orthogonal to x0_cond.
    Returns (x0, new running average).
    """
    d = x0_cond - x0_uncond
    if running is not None:
        d = d + momentum * running
    running = d
    dims = tuple(range(1, d.ndim))
    if norm_threshold > 0:
        d = d * (norm_threshold / d.norm(dim=dims, keepdim=True)).clamp(max=1.0)
    unit = torch.nn.functional.normalize(x0_cond.double().flatten(1), dim=1).view_as(x0_cond)
    par = ((d.double() * unit).sum(dims, keepdim=True) * unit).to(d.dtype)
    return x0_cond + (guidance_scale - 1) * (d - par + eta * par), running


# ----------------------------------------------------------------------------------------------------------
# methods

METHODS = ("cfg", "cfg-zero*", "apg", "dg", "stg", "stg-official")


@dataclass(frozen=True)
class Guidance:
    """A guidance method and its parameters; any method can add STAS.

    method: one of METHODS. guidance_scale: the CFG scale g (lambda in the papers' CFG form).
    stas / stas_steps: STAS steering (interventions.Steer) on both CFG passes during the first K steps (Alg. 1).
    dg / dg_scale: DG's degraded model (interventions.Zero: MA channels zeroed at block m) and its weight w.
    stg_blocks / stg_mode / stg_scale / stg_rescale: STG's perturbed blocks, 'R' (skip the block) or 'A' (identity
    self-attention map), its scale s, and the Algorithm 4 rescaling factor (0 = off; 'stg' only).
    zero_init_steps: CFG-Zero*'s first steps whose velocity is 0. apg_eta / apg_norm_threshold / apg_momentum: APG.
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
    stg_scale: float = 1.0
    stg_rescale: float = 0.0
    zero_init_steps: int = 1
    apg_eta: float = 0.0
    apg_norm_threshold: float = 0.0
    apg_momentum: float = -0.5
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
        if self.stg_mode not in ("R", "A"):
            raise ValueError(f"stg_mode must be 'R' (skip blocks) or 'A' (identity attention), got {self.stg_mode!r}")
        if not 0 <= self.stg_rescale <= 1:
            raise ValueError(f"stg_rescale = {self.stg_rescale} must be in [0, 1]")

    def check(self, steps: int, num_layers: int, dim: int) -> None:
        """Raise ValueError for settings that do not fit the run (K > steps, block or channel out of range)."""
        if self.stas_steps > steps:
            raise ValueError(f"STAS K = {self.stas_steps} exceeds the {steps} sampling steps; use K <= {steps}")
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
        return base, (), ()

    def combine(self, preds: dict[str, torch.Tensor], x: torch.Tensor, sigma: float, i: int, state: dict):
        """Named predictions {'cond', 'uncond', 'degraded' | 'perturbed'} at step i, sigma -> the guided velocity.

        x: the current latent (APG works on x0 = x - sigma v); state: per-run memory (APG's momentum average).
        """
        c, u, g = preds["cond"], preds["uncond"], self.guidance_scale
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
        """Model passes per step (a shared-prefix branch counts as one)."""
        return 2 + len(self.passes(0)[1])


def from_preset(preset, method: str = "cfg", stas: bool = False, **overrides) -> Guidance:
    """A Guidance from a model preset's settings (wan.Preset: guidance_scale, stas, dg, stg), with overrides.

    stas: add STAS with the preset's STAS Table A2-A3 settings. overrides (None values are ignored, so a command line
    can pass every option): `stas_<field>` sets a Steer field (alpha, p, tokens, rule, omega, block, dims) and
    `stas_steps` sets K; `dg_block` / `dg_dims` set the degraded model; any other key is a Guidance field.
    """
    o = {k: v for k, v in overrides.items() if v is not None}
    kw = dict(method=method, guidance_scale=o.pop("guidance_scale", preset.guidance_scale))

    def settings(name, fields):  # the preset's dict for a method, overridden by `<name>_<field>` arguments
        d = {**getattr(preset, name), **{f: o.pop(f"{name}_{f}") for f in fields if f"{name}_{f}" in o}}
        missing = [f for f in fields if f not in d]
        if missing:
            raise ValueError(f"this preset has no {name.upper()} settings: give " +
                             ", ".join(f"--{name}-{f}" for f in missing))
        return d
    if method == "dg":
        d = settings("dg", ("block", "dims", "scale"))
        kw.update(dg=Zero(block=d["block"], dims=tuple(d["dims"])), dg_scale=d["scale"])
    if method.startswith("stg"):
        d = settings("stg", ("blocks", "mode", "scale"))
        kw.update(stg_blocks=tuple(d["blocks"]), stg_mode=d["mode"], stg_scale=d["scale"])
    steer = {k[5:]: o.pop(k) for k in list(o) if k.startswith("stas_") and k != "stas_steps"}
    if stas:
        d = settings("stas", ("steps",))
        kw["stas_steps"] = d.pop("steps")
        d.update(steer)
        if "dims" not in d or "block" not in d:
            raise ValueError("this preset has no STAS channels / block: give --stas-dims and --stas-block "
                             "(samplers/analyze.py finds MA channels)")
        kw["stas"] = Steer(**{**d, "dims": tuple(d["dims"])})
    unused = ([] if stas else [f"stas_{k}" for k in steer]) + [k for k in ("dg_block", "dg_dims") if k in o]
    if unused:
        raise ValueError(f"options {unused} do not apply to method {method!r}" + ("" if stas else " without --stas"))
    return Guidance(**{**kw, **o})
