"""Text-to-video: encode prompts -> seeded noise -> solve with guidance -> decode -> write. The one sampling loop.

Wan2.2 variants are arguments of that loop, not copies of it: per-token timesteps (a preset property), TI2V's clean
first frame (`sample(first_frame=z0)`: pinned by the solver's `project` hook, its tokens at t = 0), I2V-A14B's
channel-concat condition (`sample(concat=y)`) and A14B's two experts (the step's timestep picks the DiT and its
Guidance; one expert resident at a time).

Sources: Wan-Video/Wan2.1 `wan/text2video.py` (WanT2V.generate), `generate.py`; Wan-Video/Wan2.2
`wan/textimage2video.py`, `wan/text2video.py` (experts); diffusers `pipeline_wan.py`, `pipeline_wan_i2v.py`.
Facts: reference/models.md §2.8-2.12.
"""
from __future__ import annotations

import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import solvers
from .checkpoints import CheckpointError, LazySafetensors, fingerprint, read_state_dict, shape_of, strip_prefix
from .guidance import OPTIONS, Guidance, cfg, flowmo_loss, from_preset, uses
from .text import (NEGATIVE_PROMPT, encode_text, load_text_encoder, load_tokenizer, prompt_tokens as count_tokens,
                   tiny_umt5_config, umt5_xxl_config)
from .cogvideox import PRESETS as COG_PRESETS, latent_frames as cog_latent_frames, load_cogvideox, open_cogvideox
from .cogvideox_vae import load_cogvideox_vae
from .text import encode_t5, load_t5_encoder, tiny_t5_config
from .wan import PRESETS, WanConfig, WanModel, find_experts, find_transformer, load_wan, native_config, open_wan
from .video import umask
from .wan_vae import WanVAE, WanVAE22, load_wan_vae, open_wan_vae

SOLVERS = {  # Wan's flow solvers: name -> (solver, official grid)
    "unipc": (solvers.sample_unipc, solvers.wan_unipc_sigmas),
    "dpm++": (solvers.sample_dpmpp_2m, solvers.flow_sigmas),
    "euler": (solvers.sample_euler, solvers.flow_sigmas),
}
COG_SOLVERS = {"ddim": solvers.sample_ddim_vpred, "dpm": solvers.sample_dpm_vpred}  # CogVideoX v-prediction
VAE_STRIDE = (4, 8, 8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype names


class NonFiniteError(RuntimeError):
    """A NaN or inf appeared in a run (text embedding, latent after a solver step, decoded video): the message names
    where. Weights are checked as they are loaded (checkpoints.load_strict raises a CheckpointError)."""


def check_finite(x: torch.Tensor, where: str) -> None:
    """Raise NonFiniteError(where) unless every value of x is finite: one reduction, well under 1 % of a step."""
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"non-finite values (NaN / inf) in {where}; nothing was written")


@dataclass(frozen=True)
class SampleConfig:
    """One sampling run. frames = 4k + 1; height and width in pixels, multiples of 16 (VAE 8 x patch 2);
    negative_prompt None = the official Wan default; seed: noise drawn on the CPU, so a seed gives the same video on
    any device."""
    prompt: str
    negative_prompt: str | None = None
    frames: int = 81
    height: int = 480
    width: int = 832
    steps: int = 50
    shift: float | None = 5.0
    solver: str = "unipc"
    seed: int = 0
    fps: int = 16
    dynamic_cfg: bool = False

    def check(self, stride: int = 16, family: "Family | None" = None) -> None:
        """Raise ValueError for a frame count, size, step count, fps (>= 1), seed ([0, 2^63 - 1]), solver or shift
        the model cannot take. stride: the
        size multiple, VAE stride x patch 2 (16 for the Wan2.1 and CogVideoX VAEs, 32 for Wan2.2 TI2V-5B); family:
        whose rules (solvers, shift, dynamic CFG) and name the messages use (None: Wan)."""
        family = family or WAN
        if self.frames < 1 or (self.frames - 1) % 4:
            k = max(0, round((self.frames - 1) / 4))
            raise ValueError(f"frames={self.frames}: {family.name} needs 4k+1 frames (the VAE packs 4 frames per "
                             f"latent after the first); try {4 * k + 1}")
        for name, v in (("height", self.height), ("width", self.width)):
            if v < stride or v % stride:
                raise ValueError(f"{name}={v}: must be a positive multiple of {stride} (VAE stride {stride // 2} x "
                                 f"patch 2); "
                                 f"try {max(stride, v // stride * stride)}")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.fps < 1:
            raise ValueError(f"fps={self.fps} must be >= 1 (frames per second of the mp4)")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed} must be in [0, 2^63 - 1]")
        family.check(self)

    @classmethod
    def from_preset(cls, preset, prompt: str, **overrides) -> "SampleConfig":
        """A run with the preset's frames / size / steps / fps and its family's sampler defaults: Wan: shift 5 (the
        preset's), solver unipc, no dynamic CFG; CogVideoX: no shift (None: its SNR shift is the preset's schedule),
        the preset's solver ('ddim' 2B, 'dpm' 5B / 1.5) and dynamic CFG. Overrides that are None are ignored."""
        defaults = {k: getattr(preset, k) for k in ("frames", "height", "width", "steps", "fps")}
        defaults.update(shift=getattr(preset, "shift", None), solver=getattr(preset, "solver", "unipc"),
                        dynamic_cfg=getattr(preset, "dynamic_cfg", False))
        return cls(prompt=prompt, **{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    def latent_shape(self, channels: int = 16, stride: tuple[int, int, int] = VAE_STRIDE) -> tuple[int, ...]:
        """(1, C, F, H, W) latent of this run for a VAE of this (t, h, w) stride."""
        t, h, w = stride
        return (1, channels, (self.frames - 1) // t + 1, self.height // h, self.width // w)


def noise(shape, seed: int) -> torch.Tensor:
    """Standard normal float32 noise drawn on the CPU from `seed` (official Wan draws (C, F, H, W) the same way)."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# families: what the one loop asks of a model family (it never branches on the family's name)


class Family:
    """A model family as the sampling loop sees it: its presets, size / solver rules, the latent and its seeded
    noise, the solver's step grid and how a grid value becomes the DiT's timestep, the solver call, and which
    guidance methods are defined for its prediction type. Both families' DiTs predict a velocity-like v and are
    called as model(x, t, context, perturb, branches); guidance combines those v predictions (CFG, DG, STG are
    linear in them; STAS acts inside the DiT)."""
    name = "?"
    presets: dict = {}
    solvers: Mapping = {}
    negative_prompt = ""

    def check(self, run: SampleConfig) -> None:
        """Raise ValueError for sampler settings this family cannot take (sizes are checked by SampleConfig)."""
        if run.solver not in self.solvers:
            raise ValueError(f"unknown solver {run.solver!r} for {self.name}; choose one of {list(self.solvers)}")

    def check_guidance(self, g: Guidance) -> None:
        """Raise ValueError for a guidance method not defined for this family's prediction."""

    def negative(self, run: SampleConfig) -> str:
        """The run's negative prompt: its own, or the family's default when it has none."""
        return self.negative_prompt if run.negative_prompt is None else run.negative_prompt

    def stride(self, preset) -> int:
        """Height / width multiple: VAE stride x patch."""
        raise NotImplementedError

    def latent(self, run: SampleConfig, preset) -> tuple[tuple[int, ...], int]:
        """(latent shape (1, C, F, H, W) the DiT runs on, latent frames padded in front and dropped after solving)."""
        raise NotImplementedError

    def noise(self, shape, generator: torch.Generator) -> torch.Tensor:
        """The initial latent (shape, float32) drawn from generator (CPU: the same on every device)."""
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def grid(self, run: SampleConfig, preset) -> torch.Tensor:
        """The official step grid of run.solver: the values the solver hands to `denoise`, in order."""
        raise NotImplementedError

    def timestep(self, value) -> torch.Tensor:
        """A grid value -> the DiT's int64 timestep (0-d)."""
        raise NotImplementedError

    def levels(self, preset, grid: torch.Tensor) -> list[tuple[float, float, float, float]]:
        """Per step i: (a, s, a', s') with x = a x0 + s eps at the step's grid value and at the one-step solver's
        target (CFG++'s renoising needs them)."""
        raise NotImplementedError

    def solve(self, run: SampleConfig, preset, denoise, x, grid, callback, project, generator,
              update=None) -> torch.Tensor:
        """Run run.solver over grid; project / update: the solvers' hooks (solvers module docstring)."""
        raise NotImplementedError


class WanFamily(Family):
    """Wan2.1 / Wan2.2: flow matching, the DiT predicts the velocity v = eps - x0; sigma grids with a shift."""
    name = "Wan"
    presets = PRESETS
    solvers = SOLVERS
    negative_prompt = NEGATIVE_PROMPT

    def check(self, run):
        super().check(run)
        if run.shift is None or not 0 < run.shift < float("inf"):
            raise ValueError(f"shift={run.shift} must be a finite number > 0")
        if run.dynamic_cfg:
            raise ValueError("dynamic CFG is CogVideoX's (its w(t) formula is tied to its timesteps); Wan runs a "
                             "constant scale: drop --dynamic-cfg")

    def stride(self, preset):
        return preset.vae_stride[1] * preset.config.patch_size[1]

    def latent(self, run, preset):
        return run.latent_shape(preset.config.out_dim, preset.vae_stride), 0

    def grid(self, run, preset):
        return SOLVERS[run.solver][1](run.steps, run.shift)

    def timestep(self, value):
        return solvers.timestep(value)

    def levels(self, preset, grid):
        s = grid.to(torch.float32).tolist()  # the solvers' step math uses the float32 grid
        return [(1 - a, a, 1 - b, b) for a, b in zip(s, s[1:])]

    def solve(self, run, preset, denoise, x, grid, callback, project, generator, update=None):
        return SOLVERS[run.solver][0](denoise, x, grid, callback, project=project, update=update)


class CogVideoXFamily(Family):
    """CogVideoX (2B, 5B, 1.5): v-prediction v = sqrt(a) eps - sqrt(1 - a) x0 on the discrete VP schedule of the
    preset (SNR shift, zero terminal SNR); the solvers (DDIM, SDE-DPM-Solver++(2M)) walk integer timesteps.

    Guidance: as diffusers' CogVideoXPipeline, CFG combines the v-predictions (`noise_pred`); DG and STG, linear in
    the predictions like CFG, do the same, and STAS acts inside the DiT. Dynamic CFG (SampleConfig.dynamic_cfg)
    replaces the CFG scale g at each step by solvers.dynamic_cfg_scale(g, t, steps) (for DG / STG: their CFG term's
    scale; their own weights stay). APG and CFG-Zero* are written for flow velocities (APG's x0 = x - sigma v,
    CFG-Zero*'s zeroed first velocities) and are refused here rather than run on the wrong quantity.

    Noise: diffusers draws the latent (B, F, C, H, W) from the caller's generator; this family draws the same
    shape from a CPU generator seeded with run.seed and permutes it to (B, C, F, H, W), and the DPM solver keeps
    drawing from that generator in the same frames-first layout, so a seed reproduces diffusers'
    CogVideoXPipeline(generator=torch.Generator().manual_seed(seed)) (tests/test_cogvideox_pipeline.py).
    1.5 (patch_size_t = 2): an odd latent frame count gets one latent frame drawn in front (as diffusers), dropped
    after solving (cogvideox.latent_frames)."""
    name = "CogVideoX"
    presets = COG_PRESETS
    solvers = COG_SOLVERS
    negative_prompt = ""  # diffusers' `negative_prompt or ""`

    def check(self, run):
        super().check(run)
        if run.shift is not None:
            raise ValueError(f"shift={run.shift}: CogVideoX has no flow shift (its SNR shift is part of the preset's "
                             "noise schedule); drop --shift")

    def check_guidance(self, g):
        if g.method in ("apg", "cfg-zero*"):
            raise ValueError(f"guidance method {g.method!r} is defined on flow velocities (x0 = x - sigma v) and is "
                             "not implemented for CogVideoX's v-prediction; use cfg, dg, stg or stg-official "
                             "(any of them with --stas)")

    def stride(self, preset):
        return preset.vae_stride[1] * preset.config.patch_size

    def latent(self, run, preset):
        t, pad = cog_latent_frames(run.frames, preset.config, preset.vae_stride[0])
        _, h, w = preset.vae_stride
        return (1, preset.config.out_channels, t, run.height // h, run.width // w), pad

    def noise(self, shape, generator):
        b, c, f, h, w = shape
        return torch.randn((b, f, c, h, w), generator=generator, dtype=torch.float32).permute(0, 2, 1, 3, 4)

    def grid(self, run, preset):
        return solvers.cogvideox_timesteps(run.steps)

    def timestep(self, value):
        return torch.tensor(int(value), dtype=torch.int64)

    def levels(self, preset, grid):
        vp = solvers._vp_grid(grid, solvers.cogvideox_alphas_cumprod(preset.snr_shift_scale))
        return [(math.sqrt(a), math.sqrt(1 - a), math.sqrt(b), math.sqrt(1 - b)) for _, a, b, _ in vp]

    def solve(self, run, preset, denoise, x, grid, callback, project, generator, update=None):
        if project is not None:
            raise ValueError("CogVideoX takes no clean first frame")
        alphas = solvers.cogvideox_alphas_cumprod(preset.snr_shift_scale)
        if run.solver == "dpm":
            return solvers.sample_dpm_vpred(denoise, x, grid, alphas, generator, callback, frames_first=True,
                                            update=update)
        return solvers.sample_ddim_vpred(denoise, x, grid, alphas, callback, update=update)


WAN, COGVIDEOX = WanFamily(), CogVideoXFamily()
FAMILIES = {"wan": WAN, "cogvideox": COGVIDEOX}


def family_of(preset: str) -> Family:
    """The family of a preset name; raises ValueError for an unknown one."""
    for f in FAMILIES.values():
        if preset in f.presets:
            return f
    raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS) + list(COG_PRESETS)}")


def preset_of(preset: str):
    return family_of(preset).presets[preset]


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def find_checkpoint(path, vae=None, text_encoder=None, tokenizer=None, ckpt_high=None, ckpt_low=None) -> dict:
    """Locate the four components of a Wan checkpoint, checking they exist before anything heavy is read.

    path: the native folder (Wan-AI/Wan2.1-T2V-1.3B: diffusion_pytorch_model*.safetensors, Wan2.1_VAE.pth or
    Wan2.2_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/; Wan2.2 A14B: high_noise_model/ and
    low_noise_model/ instead of the DiT files), a diffusers folder (transformer/ [+ transformer_2/ for A14B], vae/,
    text_encoder/, tokenizer/), or a single DiT .safetensors (ComfyUI), in which case vae, text_encoder and tokenizer
    must be given. ckpt_high / ckpt_low: the two A14B expert files (ComfyUI), path may then be None.
    Returns {"transformer", "experts" (None or {'high', 'low'}), "vae", "text_encoder", "tokenizer", "layout"};
    raises CheckpointError naming what is missing.
    """
    if path is None and (ckpt_high is not None or ckpt_low is not None):
        experts = find_experts(None, ckpt_high, ckpt_low)
        found = dict(layout="single files", transformer=experts["high"], experts=experts, vae=None,
                     text_encoder=None, tokenizer=None)
        return _complete(found, "the expert files", vae, text_encoder, tokenizer)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder or file. See weights/README.md for downloads.")
    if path.is_dir() and not any(path.iterdir()):
        raise CheckpointError(f"{path}: the checkpoint folder is empty. See weights/README.md for downloads.")
    experts = find_experts(path, ckpt_high, ckpt_low)
    if path.is_dir() and (path / "transformer").is_dir():
        found = dict(layout="diffusers", transformer=path, vae=path / "vae", text_encoder=path / "text_encoder",
                     tokenizer=path / "tokenizer")
    elif path.is_dir():
        vae_file = next((path / f for f in ("Wan2.2_VAE.pth", "Wan2.1_VAE.pth") if (path / f).exists()),
                        path / "Wan2.1_VAE.pth")
        found = dict(layout="native", transformer=path, vae=vae_file,
                     text_encoder=path / "models_t5_umt5-xxl-enc-bf16.pth", tokenizer=path / "google" / "umt5-xxl")
    else:
        found = dict(layout="single file", transformer=path, vae=None, text_encoder=None, tokenizer=None)
    if experts is not None:
        found.update(transformer=experts["high"], experts=experts)
    return _complete(found, path, vae, text_encoder, tokenizer)


def _complete(found: dict, path, vae, text_encoder, tokenizer) -> dict:
    """find_checkpoint: apply the explicit component paths and check that every component and DiT exists."""
    found.setdefault("experts", None)
    for k, v in (("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer)):
        found[k] = Path(v) if v is not None else found[k]
        if found[k] is None:
            raise CheckpointError(f"{path} is a single DiT file: also pass --{k.replace('_', '-')} (see README).")
        if not found[k].exists():
            raise CheckpointError(f"{found[k]}: missing {k} of the {found['layout']} checkpoint {path}; pass "
                                  f"--{k.replace('_', '-')} or complete the download (weights/README.md).")
    for f in (found["experts"] or {"dit": found["transformer"]}).values():
        find_transformer(f)  # raises if no DiT weights are there
    return found


def detect_family(found: dict, preset: str | None = None) -> Family:
    """The family of a checkpoint (`find_checkpoint`): the preset's if one is given, else from the DiT's key names
    (headers only): CogVideoX's `patch_embed.proj.weight` or Wan's `patch_embedding`."""
    for f in (found["experts"] or {"dit": found["transformer"]}).values():
        check_kind(LazySafetensors(find_transformer(f)).keys(), f, "DiT", "--ckpt")
    if preset is not None:
        return family_of(preset)
    if found["experts"] is None:
        if "patch_embed.proj.weight" in LazySafetensors(find_transformer(found["transformer"])).keys():
            return COGVIDEOX
    return WAN


def component_of(keys) -> str:
    """What a state dict's key names say it is: 'DiT' (Wan patch_embedding / CogVideoX patch_embed), 'VAE'
    (encoder. / decoder. keys), 'text encoder' (T5 / umt5 names) or 'unknown'. A ComfyUI / single-file prefix
    is ignored."""
    keys = [k.removeprefix("model.diffusion_model.").removeprefix("first_stage_model.").removeprefix("vae.")
            for k in keys]
    if any(k.startswith(("patch_embedding.", "patch_embed.")) for k in keys):
        return "DiT"
    if any(k in ("shared.weight", "token_embedding.weight") or k.startswith("encoder.block.") for k in keys):
        return "text encoder"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "VAE"
    return "unknown"


def check_kind(keys, path, want: str, flag: str) -> None:
    """Raise CheckpointError if the keys of `path` are those of another component than `want` (e.g. a VAE file
    given as the DiT), naming the file and the option it belongs to."""
    kind = component_of(keys)
    if kind not in (want, "unknown"):
        where = {"DiT": "--ckpt", "VAE": "--vae", "text encoder": "--text-encoder"}[kind]
        raise CheckpointError(f"{path}: this is a {kind} checkpoint, not a {want}: give it with {where}, and the "
                              f"{want} with {flag}.")


def detect_preset(found: dict, preset: str | None = None) -> str:
    """The preset of a checkpoint (`find_checkpoint`) from its DiT shapes, reading headers only. For two experts
    both are read: they must have the same shapes and fit a two-expert preset. Raises CheckpointError."""
    if detect_family(found, preset) is COGVIDEOX:
        return open_cogvideox(found["transformer"], preset)[2]
    if found["experts"] is None:
        return open_wan(found["transformer"], preset)[2]
    seen = {}
    for name, path in found["experts"].items():
        sd, _, p, where = open_wan(path, preset, experts=True, required=False)
        blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        seen[name] = (where, tuple(shape_of(sd, "patch_embedding.weight")), blocks, p)
    (wh, sh, lh, ph), (wl, sl, ll, _) = seen["high"], seen["low"]
    if (sh, lh) != (sl, ll):
        raise CheckpointError(f"experts of different sizes: high {wh} has patch_embedding {sh} and {lh} blocks, "
                              f"low {wl} has {sl} and {ll} blocks; both experts must come from one A14B model")
    if ph is None or not PRESETS[ph].experts:
        raise CheckpointError(f"{wh}: no two-expert preset matches these weights (patch_embedding {sh}, {lh} blocks); "
                              f"pass --preset. Known: {[k for k, v in PRESETS.items() if v.experts]}")
    return ph


def load_text(found: dict, preset: str, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """The tokenizer and text encoder of a checkpoint (`find_checkpoint`): Wan's umt5 (umt5-xxl unless the preset
    is tiny), CogVideoX's T5 (its text_encoder/ folder brings config.json; T5-v1.1-xxl otherwise)."""
    tok = load_tokenizer(found["tokenizer"])
    path = Path(found["text_encoder"])
    tiny = preset_of(preset).text_encoder == "tiny"
    if family_of(preset) is COGVIDEOX:
        config = tiny_t5_config(len(tok)) if tiny and not path.is_dir() else None
        return tok, load_t5_encoder(path, config=config, dtype=dtype, device=device)
    config = tiny_umt5_config(len(tok)) if tiny else \
        None if path.is_dir() else umt5_xxl_config()  # a transformers folder brings its config.json
    return tok, load_text_encoder(path, config=config, dtype=dtype, device=device)


def prompt_tokens(preset: str, prompts: list[str], tok) -> list[int]:
    """The tokens of each prompt the preset's text encoder reads (umt5: 512, EOS included; CogVideoX's T5: 226);
    a longer prompt is truncated, with a UserWarning saying how many tokens are dropped (text.prompt_tokens)."""
    if family_of(preset) is COGVIDEOX:
        return count_tokens(prompts, tok, preset_of(preset).config.max_text_seq_length, clean=False, encoder="T5")
    return count_tokens(prompts, tok, PRESETS[preset].config.text_len, encoder="umt5")


def encode_with(preset: str, prompts: list[str], tok, enc, device=None) -> torch.Tensor:
    """Prompts -> context float32 as the family's reference pipeline encodes them: Wan (B, 512, D) trimmed and
    zero-padded (text.encode_text); CogVideoX (B, 226, D), every row kept (text.encode_t5)."""
    if family_of(preset) is COGVIDEOX:
        return encode_t5(prompts, tok, enc, preset_of(preset).config.max_text_seq_length, device=device)
    return encode_text(prompts, tok, enc, PRESETS[preset].config.text_len, device=device)


def encode_prompts(found: dict, preset: str, pairs: list[tuple[str, str]], dtype: torch.dtype = torch.bfloat16,
                   device="cpu") -> list[torch.Tensor]:
    """Encode each (prompt, negative prompt) pair on its own (so a context never depends on which prompts share a
    call) with a text encoder that is loaded for this call only and freed before it returns, so that its memory
    (11 GB for umt5-xxl in bf16, 9.5 GB for CogVideoX's T5-xxl) is never held together with the DiT's. Returns one
    (2, text_len, text_dim) float32 [cond, uncond] context per pair."""
    tok, enc = load_text(found, preset, dtype, device)
    contexts = [encode_with(preset, list(pair), tok, enc, device=device) for pair in pairs]
    del tok, enc
    gc.collect()
    return contexts


class Pipeline:
    """A loaded model of any family (Wan2.1 / Wan2.2, CogVideoX): its DiT (or A14B experts), VAE, optionally the text
    encoder and tokenizer, and their sources. `family` (WAN or COGVIDEOX, from the preset) supplies what differs;
    the sampling loop (`sample`, `denoiser`) is one copy for all.

    model: the DiT; for a two-expert preset (Wan2.2 A14B) pass `experts` = {name: loader() -> WanModel} instead
    (model may be one already-loaded expert, under the name of the preset's first expert). Only one expert is
    resident at a time: when the step's timestep crosses the boundary, the pipeline drops the resident expert and
    then calls the next loader, unless keep_experts=True (both stay loaded after their first use). `loads` lists
    the experts loaded so far in order; `expert_steps` names the expert that ran each step of the last `sample`.
    compile: the DiT blocks of every model that becomes resident run through torch.compile (`compile_blocks`).
    """

    def __init__(self, model: WanModel | None, vae: WanVAE | None, text_encoder, tokenizer, preset: str, info: dict,
                 experts: Mapping[str, Callable[[], WanModel]] | None = None, keep_experts: bool = False,
                 compile: bool = False):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.family = family_of(preset)
        self.preset, self.info = self.family.presets[preset], dict(info, preset=preset, family=self.family.name)
        self.names = [e.name for e in self.preset.experts] or ["dit"]  # in timestep order, high noise first
        self.loaders, self.keep_experts = dict(experts or {}), keep_experts
        self.compile = compile
        self.resident = {} if model is None else {self.names[0]: compile_blocks(model) if compile else model}
        missing = [n for n in self.names if n not in self.loaders and n not in self.resident]
        if missing:
            raise ValueError(f"preset {preset!r} needs the DiTs {self.names}; no model or loader for {missing}")
        self.current = None if model is None else self.names[0]
        self.loads, self.expert_steps = [], []
        self.guides = {}  # AutoGuidance guide DiTs by Guidance.ag_model (`guide_model`)

    @property
    def model(self) -> WanModel:
        """The resident DiT (the expert that ran last); loads the first expert if none is resident."""
        return self.resident[self.current] if self.current is not None else self.use_expert(self.names[0])

    def expert_for(self, t: int) -> str:
        """The expert that runs integer timestep t: the first of the preset's experts whose boundary t reaches
        (official: t >= boundary -> high-noise expert); 'dit' for a one-DiT model."""
        return next((e.name for e in self.preset.experts if t >= e.boundary), "dit")

    def use_expert(self, name: str) -> WanModel:
        """Make `name` the running DiT, loading it if needed; without keep_experts the previous one is released
        (every reference dropped, memory returned) before the next is loaded, so peak memory is one expert."""
        if name not in self.resident:
            if not self.keep_experts:
                self.resident.clear()
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            model = self.loaders[name]()
            self.resident[name] = compile_blocks(model) if self.compile else model
            self.loads.append(name)
        self.current = name
        return self.resident[name]

    def guide_model(self, name: str) -> WanModel:
        """The AutoGuidance guide DiT called `name` (Guidance.ag_model): one put in `guides` under that name, or the
        checkpoint at that path, loaded once in the DiT's dtype and device (kept for later runs). Either is refused
        unless it shares the model's latent space (`check_guide`)."""
        if name not in self.guides:
            check_guide(name, self.preset)
            self.guides[name] = load_wan(name, dtype=patch_weight(self.model).dtype, device=self.device)[0]
            self.info.setdefault("guide_files", []).extend(str(f.resolve()) for f in find_transformer(name))
        check_guide(self.guides[name], self.preset)
        return self.guides[name]

    @classmethod
    def load(cls, path, preset: str | None = None, vae=None, text_encoder=None, tokenizer=None,
             dtype: torch.dtype | None = None, text_dtype: torch.dtype = torch.bfloat16, device="cpu",
             with_text_encoder: bool = True, ckpt_high=None, ckpt_low=None, keep_experts: bool = False,
             compile: bool = False):
        """Load the components of a checkpoint (see `find_checkpoint`); dtype: DiT parameter dtype (None: as stored).

        with_text_encoder=False leaves the text encoder out: pass `context` from `encode_prompts` to `sample`.
        A14B (two experts: native high_noise_model/ + low_noise_model/, diffusers transformer/ + transformer_2/, or
        ckpt_high + ckpt_low files): the first expert is loaded now, the other when sampling reaches it.
        """
        found = find_checkpoint(path, vae, text_encoder, tokenizer, ckpt_high, ckpt_low)
        preset = detect_preset(found, preset)
        experts = None
        if family_of(preset) is COGVIDEOX:
            model, preset, dit_layout = load_cogvideox(found["transformer"], preset=preset, dtype=dtype, device=device)
        elif found["experts"] is not None:
            experts = {name: (lambda f=f: load_wan(f, preset=preset, dtype=dtype, device=device)[0])
                       for name, f in found["experts"].items()}
            model, dit_layout = None, open_wan(found["transformer"], preset)[1]
        else:
            model, preset, dit_layout = load_wan(found["transformer"], preset=preset, dtype=dtype, device=device)
        tok, enc = load_text(found, preset, text_dtype, device) if with_text_encoder else (None, None)
        vae_model = load_vae(found["vae"], preset, device)
        dits = (found["experts"] or {"dit": found["transformer"]}).values()
        info = {"family": family_of(preset).name,
                "checkpoint": str(Path(path or found["transformer"]).resolve()), "layout": found["layout"],
                "dit_layout": dit_layout, "dit_files": [str(f.resolve()) for d in dits for f in find_transformer(d)],
                **{k: str(Path(found[k]).resolve()) for k in ("vae", "text_encoder", "tokenizer")}}
        if experts:
            info["experts"] = {k: str(Path(v).resolve()) for k, v in found["experts"].items()}
        pipe = cls(model, vae_model, enc, tok, preset, info, experts=experts, keep_experts=keep_experts,
                   compile=compile)
        pipe.model  # noqa: B018 -- the first expert is loaded now: errors surface before sampling
        return pipe

    @property
    def device(self):
        return patch_weight(self.model).device

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> context float32 as the family encodes them (`encode_with`); the prompts' token counts go to
        `prompt_tokens` (the sidecar records them), a prompt longer than the encoder's window is truncated with a
        warning."""
        self.prompt_tokens = prompt_tokens(self.info["preset"], prompts, self.tokenizer)
        return encode_with(self.info["preset"], prompts, self.tokenizer, self.text_encoder, device=self.device)

    def timesteps(self, t: torch.Tensor, latent_shape, first_frame: bool) -> torch.Tensor:
        """The model's timesteps for both CFG rows: (2,) int64, or for per-token presets (Wan2.2 TI2V) (2, L) with
        every token at t and, with a clean first frame, its tokens at 0 (official `mask2[0][:, ::2, ::2] * t`)."""
        if not self.preset.per_token_t:
            return t.expand(2)
        pt, ph, pw = self.preset.config.patch_size
        _, _, f, h, w = latent_shape
        tt = t.expand(f // pt, (h // ph) * (w // pw)).clone()  # (frames, tokens per frame)
        if first_frame:
            tt[0] = 0
        return tt.flatten()[None].expand(2, -1)  # (2, L)

    def denoiser(self, context: torch.Tensor, guidance: Guidance | Mapping[str, Guidance], sigmas: torch.Tensor,
                 first_frame: bool = False, concat: torch.Tensor | None = None, dynamic_steps: int | None = None):
        """The solver's `denoise(x, sigma) -> v`: one batched model call per step, combined by `guidance`.

        sigmas: the solver's grid (`Family.grid`: flow sigmas for Wan, integer timesteps for CogVideoX); the solver
        calls denoise with one grid value, which `Family.timestep` turns into the DiT's timestep.
        dynamic_steps: CogVideoX dynamic CFG over that many inference steps (None: off): the step's CFG scale is
        solvers.dynamic_cfg_scale(g, t, dynamic_steps), as diffusers' CogVideoXPipeline computes it.
        context: (2, L, D) = [cond, uncond]. Step i is found from sigma on the grid, so STAS knows its first K steps.
        The step's integer timestep picks the expert (A14B) and its Guidance (a mapping: one per expert name; an
        expert not in it runs plain CFG at its preset scale). first_frame: frame 0 of x is the clean image latent
        (the loop pins it), so its tokens get t = 0. concat: (1, C', F, H, W) channels appended to x for the model
        input (I2V-A14B's mask + image latent); v has x's channels. The combine sees x as the solver holds it.
        """
        step = {s: i for i, s in enumerate(sigmas.tolist())}
        state: dict = {}
        levels = self.family.levels(self.preset, sigmas)  # CFG++'s (a, s, a', s') per step

        def denoise(x, sigma):
            i = step[sigma]
            t = self.family.timestep(sigma).to(x.device)  # int64 model timestep
            name = self.expert_for(int(t))
            model = self.use_expert(name)
            self.expert_steps.append(name)
            g = guidance if isinstance(guidance, Guidance) else \
                guidance.get(name, Guidance(guidance_scale=self.expert_scale(name)))
            if dynamic_steps is not None:
                g = replace(g, guidance_scale=solvers.dynamic_cfg_scale(g.guidance_scale, int(t), dynamic_steps))
            perturb, branches, names = g.passes(i)
            xin = x if concat is None else torch.cat([x, concat.to(x)], dim=1)  # (1, C + C', F, H, W)
            tt = self.timesteps(t, x.shape, first_frame)
            v = model(xin.expand(2, *xin.shape[1:]), tt, context, perturb, branches)  # (2 + branches, C, F, H, W)
            preds = dict(zip(("cond", "uncond", *names), v[:, None].unbind(0)))
            if g.guide is not None:  # AutoGuidance's bad model is the guide DiT, on the uncond row, unsteered
                preds["bad"] = self.guide_model(g.guide)(xin, tt[1:], context[1:])  # (1, C, F, H, W)
            return g.combine(preds, x, sigma, i, state, levels=levels[i] if i < len(levels) else None)

        return denoise

    def flowmo_update(self, context: torch.Tensor, guidance: Guidance | Mapping[str, Guidance], sigmas: torch.Tensor,
                      first_frame: bool = False, concat: torch.Tensor | None = None,
                      dynamic_steps: int | None = None):
        """FlowMo's latent update, the solver's `update(x, sigma) -> x` hook (solvers module docstring), or None when
        no Guidance of the run is FlowMo. At a step whose model timestep is in flowmo_timesteps, a fresh Adam (torch
        defaults, lr flowmo_lr) runs flowmo_iterations iterations on a copy of x: each runs the [cond, uncond] passes
        with gradients (the step's Perturb, so STAS composes; blocks checkpointed with flowmo_checkpoint),
        differentiates the FlowMo loss of their CFG combine w.r.t. x and steps (an iteration without a gradient does
        not). Returned: the sample after the step of the iteration whose loss (measured before its step) was lowest,
        x if no step was taken — the official `optimize_noise_prediction` and its `best_sample`; with the default 1
        iteration, the updated sample. The solver then steps with the prediction `denoise` made at the old x
        (official order). Arguments as `denoiser`."""
        if not any(g.method == "flowmo" for g in ([guidance] if isinstance(guidance, Guidance) else guidance.values())):
            return None
        step = {s: i for i, s in enumerate(sigmas.tolist())}

        def update(x, sigma):
            t = self.family.timestep(sigma).to(x.device)
            name = self.expert_for(int(t))
            g = guidance if isinstance(guidance, Guidance) else guidance.get(name)
            if g is None or not g.flowmo_active(int(t)):
                return x
            scale = g.guidance_scale if dynamic_steps is None else \
                solvers.dynamic_cfg_scale(g.guidance_scale, int(t), dynamic_steps)
            perturb = replace(g.passes(step[sigma])[0], capture=None, checkpoint=g.flowmo_checkpoint)
            model, tt = self.use_expert(name), self.timesteps(t, x.shape, first_frame)
            best, lowest = x, math.inf
            with torch.enable_grad():
                xg = x.detach().clone().requires_grad_(True)
                adam = torch.optim.Adam([xg], lr=g.flowmo_lr)
                for _ in range(g.flowmo_iterations):
                    xin = xg if concat is None else torch.cat([xg, concat.to(x)], dim=1)
                    v = model(xin.expand(2, *xin.shape[1:]), tt, context, perturb)  # (2, C, F, H, W), with gradients
                    loss = flowmo_loss(cfg(v[:1], v[1:], scale)).sum()
                    xg.grad, = torch.autograd.grad(loss, xg)
                    if not xg.grad.any():
                        continue
                    adam.step()
                    if loss.item() < lowest:
                        best, lowest = xg.detach().clone(), loss.item()
            return best

        return update

    def expert_scale(self, name: str) -> float:
        """The preset's CFG scale of an expert (A14B: high 4.0 / low 3.0 for T2V); the preset's scale otherwise."""
        return next((e.guidance_scale for e in self.preset.experts if e.name == name), self.preset.guidance_scale)

    @torch.no_grad()
    def sample(self, run: SampleConfig, guidance: Guidance | Mapping[str, Guidance],
               context: torch.Tensor | None = None, sigmas: torch.Tensor | None = None, x: torch.Tensor | None = None,
               callback=None, progress: bool = True, first_frame: torch.Tensor | None = None,
               concat: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Solve from seeded noise to a latent (1, C, F, H/s, W/s) float32 (C = the DiT's out_dim, s its VAE stride).

        context: (2, text_len, text_dim) [cond, uncond] (None: encode run.prompt / run.negative_prompt with the
        family's default negative prompt); sigmas: the grid (None: the family's official grid of run.solver:
        sigmas for Wan, integer timesteps for CogVideoX); x: the initial latent on the DiT's grid (None: drawn by
        `Family.noise` from the generator); generator: the CPU generator the initial noise and a stochastic solver
        (CogVideoX 'dpm') draw from (None: torch.Generator().manual_seed(run.seed)). callback(dict) per step.
        CogVideoX1.5: the DiT's latent has the padded frame in front; it is dropped from the result.
        run.dynamic_cfg: CogVideoX's dynamic CFG (see `denoiser`).
        guidance: one Guidance, or {expert name: Guidance} for A14B (see `guidance_per_expert`).
        first_frame: TI2V image-to-video, the normalized image latent z0 (1, C, 1, H/s, W/s): latent frame 0 is z0
        from the start and after every solver step (official textimage2video.py; the guidance combine sees that
        pinned x), its tokens get t = 0; the result's frame 0 is z0. concat: I2V-A14B, y = [mask, image latent]
        (1, 20, F, H/8, W/8) from `conditioning.i2v_condition`, appended to the model input's channels.
        STAS with first_frame: the token set S keeps F0 (the image frame, t = 0). Its own prediction is discarded
        (the frame is re-pinned), so steering it can never alter the image; its tokens remain keys of every other
        token's attention, which is the path STAS acts through; and S stays the same positional set as in T2V, so
        T2V and I2V runs are comparable. Steer(tokens='boundary') leaves F0 out.
        Raises ValueError for a run, guidance or conditioning the model cannot take; NonFiniteError when the
        context, a step's x0 prediction x - sigma v (the latent the step saw and its guided prediction: one reduction
        per step) or the final latent holds a NaN / inf, naming the step, its sigma, the expert and the method.
        """
        p, c, fam = self.preset, self.preset.config, self.family
        run.check(fam.stride(p), fam)
        for g in ([guidance] if isinstance(guidance, Guidance) else guidance.values()):
            g.check(run.steps, c.num_layers, c.dim, run.solver)
            fam.check_guidance(g)
            if g.guide is not None:
                self.guide_model(g.guide)  # loaded and checked before the first step
            if g.method == "flowmo" and not patch_weight(self.model).is_floating_point():
                raise ValueError(f"FlowMo needs gradients through the DiT; its {patch_weight(self.model).dtype} weights "
                                 "have none: load the DiT in float32 or bfloat16")
        shape, pad = fam.latent(run, p)
        self.check_conditioning(shape, first_frame, concat)
        flowmo = any(g.method == "flowmo" for g in ([guidance] if isinstance(guidance, Guidance) else guidance.values()))
        if flowmo and shape[2] < 3:
            raise ValueError(f"FlowMo's loss is the variance of latent-frame differences: it needs >= 3 latent frames, "
                             f"this run has {shape[2]}; use frames >= 9")
        sigmas = fam.grid(run, p) if sigmas is None else sigmas
        if context is None:
            context = self.encode([run.prompt, fam.negative(run)])
        check_finite(context, "the text embedding (text encoder output, before sampling)")
        generator = torch.Generator("cpu").manual_seed(run.seed) if generator is None else generator
        x = fam.noise(shape, generator) if x is None else x
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"x has shape {tuple(x.shape)}; this run needs {tuple(shape)}")
        project = None
        if first_frame is not None:
            z0 = first_frame.to(self.device, torch.float32)
            project = lambda x: torch.cat([z0, x[:, :, 1:]], dim=2)  # noqa: E731 -- pin latent frame 0 to z0
        bar = tqdm(total=run.steps, disable=not progress, desc="sampling", unit="step")

        def step_done(info):  # every solver step: one finiteness check of its x0 = x - sigma v, then the callback
            bar.update(1)
            i, where = info["i"], self.expert_steps[-1] if self.expert_steps else "dit"
            check_finite(info["x0"], f"solver step {i + 1} of {run.steps} (step index {i}, sigma {info['sigma']:.4g}, "
                                     f"{'DiT' if where == 'dit' else where + '-noise expert'}, guidance "
                                     f"{self.guidance_name(guidance, where)}): the latent or the guided prediction "
                                     "overflowed (with --dtype float16 / bfloat16, try float32)")
            if callback is not None:
                callback(info)

        self.expert_steps = []
        hooks = (context.to(self.device), guidance, sigmas, first_frame is not None,
                 None if concat is None else concat.to(self.device, torch.float32), run.steps if run.dynamic_cfg else None)
        denoise, update = self.denoiser(*hooks), self.flowmo_update(*hooks)
        try:
            x = fam.solve(run, p, denoise, x.to(self.device), sigmas, step_done, project, generator, update)
        finally:
            bar.close()
        check_finite(x, f"the latent after the last solver step ({run.steps} of {run.steps})")
        return x[:, :, pad:]

    @staticmethod
    def guidance_name(guidance, expert: str) -> str:
        g = guidance if isinstance(guidance, Guidance) else guidance.get(expert)
        return "cfg" if g is None else g.method + (" + STAS" if g.stas is not None else "")

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, progress: bool = True) -> torch.Tensor:
        """Latent (1, C, F, h, w) -> video (1, 3, T, H, W) through the VAE's `decode_frames` (one latent frame or
        frame batch at a time, with a tqdm bar over the pixel frames); raises NonFiniteError naming the VAE decoder
        if the video holds a NaN or inf."""
        t = latent.shape[2]
        total = self.vae.num_frames(t) if hasattr(self.vae, "num_frames") else 1 + self.vae.time_factor * (t - 1)
        chunks = []
        with tqdm(total=total, disable=not progress, desc="decoding", unit="frame") as bar:
            for chunk in self.vae.decode_frames(latent):
                chunks.append(chunk)
                bar.update(chunk.shape[2])
        video = torch.cat(chunks, dim=2)
        check_finite(video, "the decoded video (VAE decoder output)")
        return video

    def check_conditioning(self, shape, first_frame, concat) -> None:
        """Raise ValueError if an image condition does not fit the model (kind, channels, frames, size)."""
        kind, c = self.preset.image, self.preset.config
        name = self.info.get("preset")
        if first_frame is not None:
            if kind != "first_frame":
                raise ValueError(f"preset {name!r} takes no clean first frame (TI2V models only)")
            want = (1, shape[1], 1, *shape[3:])
            if tuple(first_frame.shape) != want:
                raise ValueError(f"first_frame has shape {tuple(first_frame.shape)}; this run needs {want}")
        if kind == "concat" and concat is None:
            raise ValueError(f"preset {name!r} is image-to-video: pass concat (conditioning.i2v_condition)")
        if concat is not None:
            if kind != "concat":
                raise ValueError(f"preset {name!r} takes no concatenated image condition (I2V-A14B only)")
            want = (1, c.in_dim - shape[1], *shape[2:])
            if tuple(concat.shape) != want:
                raise ValueError(f"concat has shape {tuple(concat.shape)}; this run needs {want}")

    def __call__(self, run: SampleConfig, guidance: Guidance, **kw) -> torch.Tensor:
        """Generate a video (3, T, H, W) in [-1, 1]; raises NonFiniteError if a NaN / inf appears (see `sample`,
        `decode`)."""
        return self.decode(self.sample(run, guidance, **kw), kw.get("progress", True))[0]


WanPipeline = Pipeline  # the name before CogVideoX joined the loop


def compile_blocks(model, backend: str | Callable = "inductor"):
    """Compile every DiT block in place with torch.compile (`nn.Module.compile`); returns the model.

    The block loop, the interventions between blocks (STAS steering, DG zeroing, captures) and the branch bookkeeping
    stay eager (interventions.run_blocks), so only what runs inside a block is traced: the step index, timestep and
    steering values are tensors and never recompile. A block is traced once per distinct structure of its arguments:
    identity attention (STG-A, PAG) or SEG's blur sigma change the traced code; a branch pass's one-row batch makes
    the batch size dynamic (one recompile). All blocks share the traced graphs (parameters are graph inputs).
    The first call of each structure compiles (inductor on CPU: tens of seconds at 1.3B width, README: Speed).
    backend: torch.compile's backend ('inductor'; tests count compiles with a counting backend).
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # many methods, one process
    for block in model.blocks if isinstance(model, WanModel) else model.transformer_blocks:  # CogVideoX: diffusers name
        block.compile(backend=backend)
    return model


def patch_weight(model) -> torch.Tensor:
    """The DiT's patch-embedding weight (its device and parameter dtype): Wan `patch_embedding`, CogVideoX
    `patch_embed.proj`."""
    embed = getattr(model, "patch_embedding", None)
    return embed.weight if embed is not None else model.patch_embed.proj.weight


def guidance_per_expert(preset, guidance: Guidance, guidance_scale: float | None = None,
                        steer: tuple[str, ...] | None = None) -> dict[str, Guidance] | Guidance:
    """A14B: the Guidance of each expert: `guidance` at the expert's preset CFG scale (or guidance_scale if given).
    steer: the experts that STAS / DG steer (None: all); the others run without STAS and, for method 'dg', plain
    CFG, since MA channels are a property of one network. A one-DiT preset gets `guidance` back."""
    if not preset.experts:
        return guidance
    names = [e.name for e in preset.experts]
    unknown = sorted(set(steer or ()) - set(names))
    if unknown:
        raise ValueError(f"unknown experts {unknown}; this model has {names}")
    out = {}
    for e in preset.experts:
        g = replace(guidance, guidance_scale=e.guidance_scale if guidance_scale is None else guidance_scale)
        if steer is not None and e.name not in steer:
            g = replace(g, stas=None, stas_steps=0)
            if g.method == "dg":
                g = replace(g, method="cfg", dg=None)
        out[e.name] = g
    return out


def guidance_for(preset, method: str = "cfg", stas: bool = False, steer: tuple[str, ...] | None = None,
                 **overrides) -> Guidance | dict[str, Guidance]:
    """The run's guidance from a preset (guidance.from_preset) and, for A14B, one Guidance per expert
    (`guidance_per_expert`). A preset without STAS / DG settings (A14B: the STAS paper has no row for it) needs the
    MA channels and block given; from_preset's ValueError then points to samplers/analyze.py."""
    scale = overrides.get("guidance_scale")
    g = from_preset(preset, method, stas=stas, **overrides)
    if g.guide is not None:  # headers only: a guide of another latent space is refused before anything is loaded
        check_guide(g.guide, preset)
    return guidance_per_expert(preset, g, scale, steer)


def check_guide(guide, preset) -> None:
    """Refuse an AutoGuidance guide model (Guidance.ag_model) that does not predict in the latent space of `preset`
    (a wan.Preset or cogvideox preset): it must be a Wan DiT with the same latent channels in and out, patch size and
    text width, e.g. Wan2.1-1.3B guiding Wan2.1-14B or a Wan2.2 A14B expert. guide: a checkpoint path (keys and
    shapes only, so it is cheap enough to call before any loading) or a loaded DiT. Raises CheckpointError (no DiT
    there) or ValueError naming both latent spaces."""
    c = preset.config
    if not isinstance(c, WanConfig):
        raise ValueError("AutoGuidance with a guide model (--ag-model) is defined for Wan models only: CogVideoX-2B, "
                         "-5B and 1.5 differ in noise schedule and latent scaling (2B vs 5B) or temporal patch "
                         "(5B vs 1.5), so none can guide another; use --ag-blocks")
    if isinstance(guide, torch.nn.Module):
        g = guide.config
        have = (g.in_dim, g.out_dim, tuple(g.patch_size), g.text_dim) if isinstance(g, WanConfig) else None
    else:
        if not Path(guide).exists():
            raise CheckpointError(f"--ag-model {guide}: no such checkpoint file or folder (a guide DiT of the same "
                                  "latent space, e.g. Wan2.1-1.3B's folder for Wan2.1-14B)")
        keys = LazySafetensors(find_transformer(guide)).keys()
        check_kind(keys, guide, "DiT", "--ag-model")
        have = None
        if not any(k.endswith("patch_embed.proj.weight") for k in keys):  # else a CogVideoX DiT
            sd = open_wan(guide, required=False)[0]
            _, in_dim, *patch = shape_of(sd, "patch_embedding.weight")  # (dim, in_dim, pt, ph, pw)
            out_dim = shape_of(sd, "head.head.weight")[0] // math.prod(patch)  # (prod(patch) out_dim, dim)
            have = (in_dim, out_dim, tuple(patch), shape_of(sd, "text_embedding.0.weight")[1])
    want = (c.in_dim, c.out_dim, tuple(c.patch_size), c.text_dim)
    if have != want:
        what = "a CogVideoX DiT" if have is None else \
            "a Wan DiT with (in channels, out channels, patch, text width) = " + str(have)
        raise ValueError(f"AutoGuidance guide model {guide if isinstance(guide, (str, Path)) else 'given'} is {what}; "
                         f"this model needs a guide of its own latent space, {want}: a Wan DiT of the same VAE, e.g. "
                         "Wan2.1-1.3B for Wan2.1-14B (Wan2.2-TI2V-5B's 48-channel latents and CogVideoX's are other "
                         "spaces)")


def check_vae(found: dict, preset: str) -> None:
    """Cheap check, before heavy work (keys and shapes only), that the checkpoint's VAE fits the DiT: a Wan2.1 VAE
    (z 16, stride 8) given to TI2V-5B, or the Wan2.2 VAE (z 48, stride 16) given to a Wan2.1 / A14B model, raises a
    CheckpointError naming the file and the VAE the model needs. A VAE of the other family (a CogVideoX vae/ given
    to Wan, a Wan VAE given to CogVideoX) and a file of another component (a DiT or text encoder given as the VAE)
    are named as such."""
    path = Path(found["vae"])
    cog = family_of(preset) is COGVIDEOX
    pth = sorted(f.name for f in path.glob("*.pth")) if path.is_dir() else []
    if cog and pth and not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path}: holds {pth}, a Wan VAE, but {preset} is a CogVideoX model: give its "
                              "diffusers vae/ folder (AutoencoderKLCogVideoX, config.json + safetensors) with --vae")
    keys = list(strip_prefix(read_state_dict(path)))
    check_kind(keys, path, "VAE", "--vae")
    is_cog = "decoder.conv_in.conv.weight" in keys
    if cog and not is_cog:
        raise CheckpointError(f"{path}: a Wan VAE, but {preset} is a CogVideoX model: give the CogVideoX vae/ folder "
                              "(AutoencoderKLCogVideoX) with --vae")
    if cog:
        return
    p = PRESETS[preset]
    need = "the Wan2.2 VAE (Wan2.2_VAE.pth)" if p.vae == "wan2.2" else "the Wan2.1 VAE (Wan2.1_VAE.pth)"
    if is_cog:
        raise CheckpointError(f"{path}: a CogVideoX VAE (AutoencoderKLCogVideoX), but {preset} is a Wan model: pass "
                              f"{need} with --vae")
    _, layout, version, _, z_dim = open_wan_vae(path)
    if z_dim != p.config.out_dim:
        raise CheckpointError(f"{found['vae']}: a {version} VAE ({layout} layout, {z_dim} latent channels), but "
                              f"{preset} works on {p.config.out_dim}-channel latents: pass {need} with --vae")


def load_vae(path, preset: str, device="cpu"):
    """The VAE of a preset (Wan2.1 or Wan2.2, detected from the file; CogVideoX's from its vae/ folder), float32 as
    the official pipelines run it; raises CheckpointError when it does not fit the DiT (`check_vae`)."""
    if family_of(preset) is COGVIDEOX:
        return load_cogvideox_vae(path, dtype=torch.float32, device=device)
    check_vae({"vae": path}, preset)
    return load_wan_vae(path, dtype=torch.float32, device=device)


def acting(g: Guidance) -> dict:
    """The settings of a Guidance that act on its run: a field of a method (the OPTIONS group whose option names
    equal or start with it: stas, stas_steps -> 'stas'; dg, dg_scale -> 'dg'; zero_init_steps -> 'cfg-zero*') is
    kept only when the run uses that method (STAS: when it is on); method, CFG scale and fields of no group always.
    Values as JSON (Steer / Zero as dicts)."""
    groups = {name: group for name, _, group, _ in OPTIONS}
    out = {}
    for k, v in asdict(g).items():
        group = next((grp for name, grp in groups.items() if name == k or name.startswith(k + "_")), None)
        if k != "capture" and (group is None or uses(g.method, g.stas is not None, group)):
            out[k] = v
    return json.loads(json.dumps(out, default=str))


REPO = Path(__file__).resolve().parent.parent


def code_version() -> dict:
    """minivdit's package version and, when run from a git checkout, its commit (with '+dirty' when the work tree
    has uncommitted changes)."""
    out = {}
    try:
        out["minivdit"] = importlib.metadata.version("minivdit")
    except importlib.metadata.PackageNotFoundError:
        pass
    if (REPO / ".git").exists():
        try:
            git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,  # noqa
                                            timeout=10).stdout.strip()
            commit = git("rev-parse", "HEAD")
            if commit:
                out["minivdit_commit"] = commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no")
                                                   else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return out


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".model", ".json")


def weight_files(info: dict) -> dict:
    """{path: checkpoints.fingerprint} of every file the run read weights or vocabulary from: the DiT files (and
    AutoGuidance guide DiTs loaded from files), the VAE, the text encoder and the tokenizer (a folder: its files with
    a weight / tokenizer suffix)."""
    paths = [Path(f) for f in info.get("dit_files", []) + info.get("guide_files", [])]
    for k in ("vae", "text_encoder", "tokenizer"):
        if k in info:
            p = Path(info[k])
            paths += sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES) if p.is_dir() else [p]
    return {str(f): fingerprint(f) for f in paths if f.is_file()}


def sidecar(pipe: WanPipeline, run: SampleConfig, guidance: Guidance | Mapping[str, Guidance],
            seconds: float | None = None, **extra) -> dict:
    """Everything needed to reproduce a video: model, checkpoint, prompts, sampler, guidance (only the settings that
    act on the run, `acting`), versions and the minivdit commit (`code_version`), each weight file's size and fast
    hash (`weight_files`), the prompts' token counts (when the pipeline encoded them; else pass prompt_tokens); for
    A14B the guidance per expert and which expert ran each step (`expert_steps`, from the last `sample`); extra:
    more keys (e.g. the conditioning image, the command line)."""
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "safetensors")}
    versions.update(code_version())
    as_json = acting
    per_expert = not isinstance(guidance, Guidance)
    if getattr(pipe, "prompt_tokens", None) is not None:
        extra = {"prompt_tokens": pipe.prompt_tokens, **extra}
    record = {**pipe.info, **asdict(run), **extra,
              "guidance": {k: as_json(g) for k, g in guidance.items()} if per_expert else as_json(guidance)}
    record["negative_prompt"] = pipe.family.negative(run)
    record["guidance_scale"] = {k: g.guidance_scale for k, g in guidance.items()} if per_expert else \
        guidance.guidance_scale
    if pipe.preset.experts:
        record["expert_steps"] = list(pipe.expert_steps)
        record["keep_experts"] = pipe.keep_experts
    record["dtype"] = str(patch_weight(pipe.model).dtype)
    record["device"] = str(pipe.device)
    record["versions"] = dict(versions, python=platform.python_version())
    if seconds is not None:
        record["seconds"] = round(seconds, 2)
    record["weight_files"] = weight_files(pipe.info)
    return record


# ----------------------------------------------------------------------------------------------------------
# the embedded default: a tiny Wan-architecture checkpoint made deterministically on first use

def write_once(root: str | Path, write) -> Path:
    """Create the folder `root` once: write(tmp) fills a temporary sibling folder that is then renamed into place,
    so a half-made checkpoint is never used; an existing non-empty `root` is returned as it is."""
    root = Path(root)
    if root.is_dir() and any(root.iterdir()):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        write(tmp)
        for f in (tmp, *tmp.rglob("*")):  # mkdtemp makes 0700: give the folder ordinary permissions (the umask's)
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask())
        if not root.exists():  # else another process finished first
            tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


TINY_DIR = Path(__file__).resolve().parent.parent / "weights" / "wan2.1-tiny"


def tiny_checkpoint(root: str | Path = TINY_DIR, seed: int = 0, preset: str = "wan2.1-tiny") -> Path:
    """Create (once) a tiny Wan checkpoint in the official native layout, from seeded random weights.

    The folder holds diffusion_pytorch_model.safetensors + config.json (for a two-expert preset: one such pair in
    high_noise_model/ and low_noise_model/, seeds seed and seed + 1), Wan2.1_VAE.pth or Wan2.2_VAE.pth (the preset's
    VAE), models_t5_umt5-xxl-enc-bf16.pth (native T5 names) and google/umt5-xxl/
    (a tiny sentencepiece tokenizer trained offline). Its videos are noise-like: it exercises the machinery,
    nothing more. Written to a temporary folder and renamed into place, so a half-made checkpoint is never used.
    """
    from safetensors.torch import save_file
    from transformers import UMT5EncoderModel

    from .text import make_tiny_tokenizer, umt5_to_native

    def write(tmp: Path):
        p = PRESETS[preset]
        c = p.config
        for k, sub in enumerate([e.folder for e in p.experts] or ["."]):
            torch.manual_seed(seed + k)
            model = WanModel(c)
            (tmp / sub).mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      tmp / sub / "diffusion_pytorch_model.safetensors")
            (tmp / sub / "config.json").write_text(json.dumps(native_config(c), indent=2))
        vae = WanVAE(dim=p.vae_dim) if p.vae == "wan2.1" else WanVAE22(dim=p.vae_dim, dec_dim=p.vae_dim)
        torch.save(vae.state_dict(), tmp / ("Wan2.1_VAE.pth" if p.vae == "wan2.1" else "Wan2.2_VAE.pth"))
        tok = make_tiny_tokenizer(tmp / "google" / "umt5-xxl")
        enc = UMT5EncoderModel(tiny_umt5_config(len(tok)))
        torch.save(umt5_to_native(enc.state_dict()), tmp / "models_t5_umt5-xxl-enc-bf16.pth")
    return write_once(root, write)


COG_TINY_DIR = Path(__file__).resolve().parent.parent / "weights" / "cogvideox-tiny"
COG_TINY_VAE = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)


def tiny_cogvideox_checkpoint(root: str | Path = COG_TINY_DIR, seed: int = 0, preset: str = "cogvideox-tiny") -> Path:
    """Create (once) a tiny CogVideoX checkpoint in the diffusers layout (the official HF layout) from seeded random
    weights: transformer/ (config.json + diffusion_pytorch_model.safetensors), vae/ (a 16-32-32-32 channel VAE with
    the preset's scaling factor), text_encoder/ (a 2-layer T5 encoder) and tokenizer/ (the tiny sentencepiece
    tokenizer). Noise-like videos: it exercises the machinery. Written to a temporary folder and renamed into place."""
    from safetensors.torch import save_file
    from transformers import T5EncoderModel

    from .cogvideox import CogVideoXModel, diffusers_config
    from .cogvideox_vae import CogVideoXVAE, CogVideoXVAEConfig, config_dict
    from .text import make_tiny_tokenizer

    def write(tmp: Path):
        p = COG_PRESETS[preset]
        save = lambda m, sub, config: ((tmp / sub).mkdir(), save_file(  # noqa: E731
            {k: v.contiguous() for k, v in m.state_dict().items()}, tmp / sub / "diffusion_pytorch_model.safetensors"),
            (tmp / sub / "config.json").write_text(json.dumps(config, indent=2)))
        torch.manual_seed(seed)
        save(CogVideoXModel(p.config), "transformer",
             {"_class_name": "CogVideoXTransformer3DModel", **diffusers_config(p.config)})
        vae_config = CogVideoXVAEConfig(**COG_TINY_VAE, scaling_factor=p.vae_scaling_factor)
        save(CogVideoXVAE(vae_config), "vae", {"_class_name": "AutoencoderKLCogVideoX", **config_dict(vae_config)})
        tok = make_tiny_tokenizer(tmp / "tokenizer")
        T5EncoderModel(tiny_t5_config(len(tok))).save_pretrained(tmp / "text_encoder")
    return write_once(root, write)
