"""Guidance: which model passes run at each step, and pure functions combining their predictions.

Every method sees the same base passes, cond (row 0) and uncond (row 1), batched in one forward. STAS edits both
(it adds no pass); DG and STG add one branch pass that shares the blocks before its branch point (shared prefix).
Predictions are velocities v; the combine functions below map named predictions to the v the solver integrates.

References: CFG (Ho & Salimans 2022); STAS (Sec. 5, Alg. 1); DG (Eq. 4-5); STG (appendix Alg. 1 and 4; official
junhahyung/STGuidance `Wan2.1/pipeline.py`); CFG-Zero* (Fan et al. 2025, Eq. 9 and zero-init); APG (Sadat et al.
2024, Alg. 1).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

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
    unit = torch.nn.functional.normalize(x0_cond.double().flatten(1), dim=1).view_as(x0_cond)
    par = ((d.double() * unit).sum(dims, keepdim=True) * unit).to(d.dtype)
    return x0_cond + (guidance_scale - 1) * (d - par + eta * par), running


# ----------------------------------------------------------------------------------------------------------
# methods

METHODS = ("cfg", "cfg-zero*", "apg", "dg", "stg", "stg-official")
STG_SCALE = {"R": 1.0, "A": 2.0}  # STG appendix A1: "STG-A using a scale of 2.0 and STG-R using 1.0"
STG_RESCALE_ON = 0.7  # the rescale factor of the official STGuidance pipelines whenever rescaling is on


def ints(s) -> tuple[int, ...]:
    """'1,2' -> (1, 2): a comma-separated list of block or channel indices."""
    return tuple(int(v) for v in str(s).split(","))


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
                     "apg_momentum"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} = {getattr(self, name)} must be a finite number")
        for name in ("guidance_scale", "dg_scale", "stg_scale", "zero_init_steps", "apg_norm_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 0")

    def check(self, steps: int, num_layers: int, dim: int) -> None:
        """Raise ValueError for settings that do not fit the run (K > steps, block or channel out of range)."""
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
    return Guidance(**{**kw, **o})


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
                 f"(scaling rule omega {Steer.__dataclass_fields__['omega'].default})."]
    return "\n".join(rows)
