"""Guidance: which model passes run at each step, and a pure function combining their predictions.

Every method sees the same two base passes, cond (row 0) and uncond (row 1), batched in one forward. STAS edits both
(it adds no pass); DG and STG add one branch pass that shares the blocks before its branch point (shared prefix).
Predictions are velocities v; a combine function maps named predictions to the v the solver integrates.

References: CFG (Ho & Salimans 2022); STAS (Sec. 5, Alg. 1); DG (Eq. 4-5); STG (appendix Alg. 1, 4, and the official
junhahyung/STGuidance form); CFG-Zero* (Fan et al. 2025); APG (Sadat et al. 2024).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .interventions import Perturb, Steer


def cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance v = v_uncond + g (v_cond - v_uncond)."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


METHODS = ("cfg",)


@dataclass(frozen=True)
class Guidance:
    """A guidance method and its parameters.

    method: one of METHODS. guidance_scale: the CFG scale g (1 = cond only).
    stas: STAS steering (interventions.Steer) applied to both CFG passes during the first `stas_steps` steps (K), or
    None.
    """
    method: str = "cfg"
    guidance_scale: float = 5.0
    stas: Steer | None = None
    stas_steps: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown guidance method {self.method!r}; choose one of {METHODS}")
        if self.stas_steps < 0:
            raise ValueError(f"stas_steps (K) = {self.stas_steps} must be >= 0")

    def check(self, steps: int, num_layers: int, dim: int) -> None:
        """Raise ValueError for settings that do not fit the run (K > steps, block / channel out of range)."""
        if self.stas_steps > steps:
            raise ValueError(f"STAS K = {self.stas_steps} steps exceeds the {steps} sampling steps")
        base, branches, _ = self.passes(0)
        for p in (base, *(p for _, p in branches)):
            p.validate(num_layers, dim)

    def passes(self, i: int) -> tuple[Perturb, tuple[tuple[int, Perturb], ...], tuple[str, ...]]:
        """Step i's passes: the Perturb of the [cond, uncond] batch, extra branch passes ((row, Perturb), ...), and
        the names of the branch predictions."""
        base = Perturb(steer=self.stas if self.stas is not None and i < self.stas_steps else None)
        return base, (), ()

    def combine(self, preds: dict[str, torch.Tensor], state: dict) -> torch.Tensor:
        """Named predictions {'cond', 'uncond', ...} (each (B, C, F, H, W)) -> the guided velocity."""
        return cfg(preds["cond"], preds["uncond"], self.guidance_scale)
