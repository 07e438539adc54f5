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
import platform
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import solvers
from .checkpoints import CheckpointError, shape_of
from .guidance import Guidance, from_preset
from .text import NEGATIVE_PROMPT, encode_text, load_text_encoder, load_tokenizer, tiny_umt5_config, umt5_xxl_config
from .wan import PRESETS, WanModel, find_experts, find_transformer, load_wan, native_config, open_wan
from .wan_vae import WanVAE, WanVAE22, load_wan_vae, open_wan_vae

SOLVERS = {  # name -> (solver, official grid)
    "unipc": (solvers.sample_unipc, solvers.wan_unipc_sigmas),
    "dpm++": (solvers.sample_dpmpp_2m, solvers.flow_sigmas),
    "euler": (solvers.sample_euler, solvers.flow_sigmas),
}
VAE_STRIDE = (4, 8, 8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype names


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
    shift: float = 5.0
    solver: str = "unipc"
    seed: int = 0
    fps: int = 16

    def check(self, stride: int = 16) -> None:
        """Raise ValueError for a frame count, size, step count or solver the model cannot take. stride: the size
        multiple, VAE stride x patch 2 (16 for the Wan2.1 VAE, 32 for Wan2.2 TI2V-5B)."""
        if self.frames < 1 or (self.frames - 1) % 4:
            k = max(0, round((self.frames - 1) / 4))
            raise ValueError(f"frames={self.frames}: Wan needs 4k+1 frames (the VAE packs 4 frames per latent after "
                             f"the first); try {4 * k + 1}")
        for name, v in (("height", self.height), ("width", self.width)):
            if v < stride or v % stride:
                raise ValueError(f"{name}={v}: must be a positive multiple of {stride} (VAE stride {stride // 2} x "
                                 f"patch 2); "
                                 f"try {max(stride, v // stride * stride)}")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {list(SOLVERS)}")
        if self.shift <= 0:
            raise ValueError(f"shift={self.shift} must be > 0")

    @classmethod
    def from_preset(cls, preset, prompt: str, **overrides) -> "SampleConfig":
        """A run with the preset's frames / size / steps / shift / fps; overrides that are None are ignored."""
        defaults = {k: getattr(preset, k) for k in ("frames", "height", "width", "steps", "shift", "fps")}
        return cls(prompt=prompt, **{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    def latent_shape(self, channels: int = 16, stride: tuple[int, int, int] = VAE_STRIDE) -> tuple[int, ...]:
        """(1, C, F, H, W) latent of this run for a VAE of this (t, h, w) stride."""
        t, h, w = stride
        return (1, channels, (self.frames - 1) // t + 1, self.height // h, self.width // w)


def noise(shape, seed: int) -> torch.Tensor:
    """Standard normal float32 noise drawn on the CPU from `seed` (official Wan draws (C, F, H, W) the same way)."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


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


def detect_preset(found: dict, preset: str | None = None) -> str:
    """The preset of a checkpoint (`find_checkpoint`) from its DiT shapes, reading headers only. For two experts
    both are read: they must have the same shapes and fit a two-expert preset. Raises CheckpointError."""
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
    """The tokenizer and umt5 encoder of a checkpoint (`find_checkpoint`); umt5-xxl unless the preset is tiny."""
    tok = load_tokenizer(found["tokenizer"])
    path = Path(found["text_encoder"])
    config = tiny_umt5_config(len(tok)) if PRESETS[preset].text_encoder == "tiny" else \
        None if path.is_dir() else umt5_xxl_config()  # a transformers folder brings its config.json
    return tok, load_text_encoder(path, config=config, dtype=dtype, device=device)


def encode_prompts(found: dict, preset: str, prompts: list[str], dtype: torch.dtype = torch.bfloat16,
                   device="cpu") -> torch.Tensor:
    """Encode prompts with a text encoder that is loaded for this call only, so that its memory (11 GB for
    umt5-xxl in bf16) is never held together with the DiT's. Returns (B, text_len, text_dim) float32."""
    tok, enc = load_text(found, preset, dtype, device)
    return encode_text(prompts, tok, enc, PRESETS[preset].config.text_len, device=device)


class WanPipeline:
    """A loaded Wan model: its DiT (or A14B experts), VAE, optionally the text encoder and tokenizer, and their sources.

    model: the DiT; for a two-expert preset (Wan2.2 A14B) pass `experts` = {name: loader() -> WanModel} instead
    (model may be one already-loaded expert, under the name of the preset's first expert). Only one expert is
    resident at a time: when the step's timestep crosses the boundary, the pipeline drops the resident expert and
    then calls the next loader, unless keep_experts=True (both stay loaded after their first use). `loads` lists
    the experts loaded so far in order; `expert_steps` names the expert that ran each step of the last `sample`.
    """

    def __init__(self, model: WanModel | None, vae: WanVAE | None, text_encoder, tokenizer, preset: str, info: dict,
                 experts: Mapping[str, Callable[[], WanModel]] | None = None, keep_experts: bool = False):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.preset, self.info = PRESETS[preset], dict(info, preset=preset)
        self.names = [e.name for e in self.preset.experts] or ["dit"]  # in timestep order, high noise first
        self.loaders, self.keep_experts = dict(experts or {}), keep_experts
        self.resident = {} if model is None else {self.names[0]: model}  # name -> loaded DiT
        missing = [n for n in self.names if n not in self.loaders and n not in self.resident]
        if missing:
            raise ValueError(f"preset {preset!r} needs the DiTs {self.names}; no model or loader for {missing}")
        self.current = None if model is None else self.names[0]
        self.loads, self.expert_steps = [], []

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
            self.resident[name] = self.loaders[name]()
            self.loads.append(name)
        self.current = name
        return self.resident[name]

    @classmethod
    def load(cls, path, preset: str | None = None, vae=None, text_encoder=None, tokenizer=None,
             dtype: torch.dtype | None = None, text_dtype: torch.dtype = torch.bfloat16, device="cpu",
             with_text_encoder: bool = True, ckpt_high=None, ckpt_low=None, keep_experts: bool = False):
        """Load the components of a checkpoint (see `find_checkpoint`); dtype: DiT parameter dtype (None: as stored).

        with_text_encoder=False leaves the text encoder out: pass `context` from `encode_prompts` to `sample`.
        A14B (two experts: native high_noise_model/ + low_noise_model/, diffusers transformer/ + transformer_2/, or
        ckpt_high + ckpt_low files): the first expert is loaded now, the other when sampling reaches it.
        """
        found = find_checkpoint(path, vae, text_encoder, tokenizer, ckpt_high, ckpt_low)
        preset = detect_preset(found, preset)
        experts = None
        if found["experts"] is not None:
            experts = {name: (lambda f=f: load_wan(f, preset=preset, dtype=dtype, device=device)[0])
                       for name, f in found["experts"].items()}
            model, dit_layout = None, open_wan(found["transformer"], preset)[1]
        else:
            model, preset, dit_layout = load_wan(found["transformer"], preset=preset, dtype=dtype, device=device)
        tok, enc = load_text(found, preset, text_dtype, device) if with_text_encoder else (None, None)
        vae_model = load_vae(found["vae"], preset, device)
        info = {"checkpoint": str(Path(path or found["transformer"]).resolve()), "layout": found["layout"],
                "dit_layout": dit_layout,
                **{k: str(Path(found[k]).resolve()) for k in ("vae", "text_encoder", "tokenizer")}}
        if experts:
            info["experts"] = {k: str(Path(v).resolve()) for k, v in found["experts"].items()}
        pipe = cls(model, vae_model, enc, tok, preset, info, experts=experts, keep_experts=keep_experts)
        pipe.model  # noqa: B018 -- the first expert is loaded now: errors surface before sampling
        return pipe

    @property
    def device(self):
        return self.model.patch_embedding.weight.device

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> context (B, 512, text_dim) float32, trimmed and zero-padded (text.encode_text)."""
        return encode_text(prompts, self.tokenizer, self.text_encoder, self.preset.config.text_len, device=self.device)

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
                 first_frame: bool = False, concat: torch.Tensor | None = None):
        """The solver's `denoise(x, sigma) -> v`: one batched model call per step, combined by `guidance`.

        context: (2, L, D) = [cond, uncond]. Step i is found from sigma on the grid, so STAS knows its first K steps.
        The step's integer timestep picks the expert (A14B) and its Guidance (a mapping: one per expert name; an
        expert not in it runs plain CFG at its preset scale). first_frame: frame 0 of x is the clean image latent
        (the loop pins it), so its tokens get t = 0. concat: (1, C', F, H, W) channels appended to x for the model
        input (I2V-A14B's mask + image latent); v has x's channels. The combine sees x as the solver holds it.
        """
        step = {s: i for i, s in enumerate(sigmas.tolist())}
        state: dict = {}

        def denoise(x, sigma):
            i = step[sigma]
            t = solvers.timestep(sigma).to(x.device)  # int64 model timestep
            name = self.expert_for(int(t))
            model = self.use_expert(name)
            self.expert_steps.append(name)
            g = guidance if isinstance(guidance, Guidance) else \
                guidance.get(name, Guidance(guidance_scale=self.expert_scale(name)))
            perturb, branches, names = g.passes(i)
            xin = x if concat is None else torch.cat([x, concat.to(x)], dim=1)  # (1, C + C', F, H, W)
            v = model(xin.expand(2, *xin.shape[1:]), self.timesteps(t, x.shape, first_frame), context, perturb,
                      branches)  # (2 + branches, C, F, H, W)
            preds = dict(zip(("cond", "uncond", *names), v[:, None].unbind(0)))
            return g.combine(preds, x, sigma, i, state)

        return denoise

    def expert_scale(self, name: str) -> float:
        """The preset's CFG scale of an expert (A14B: high 4.0 / low 3.0 for T2V); the preset's scale otherwise."""
        return next((e.guidance_scale for e in self.preset.experts if e.name == name), self.preset.guidance_scale)

    @torch.no_grad()
    def sample(self, run: SampleConfig, guidance: Guidance | Mapping[str, Guidance],
               context: torch.Tensor | None = None, sigmas: torch.Tensor | None = None, x: torch.Tensor | None = None,
               callback=None, progress: bool = True, first_frame: torch.Tensor | None = None,
               concat: torch.Tensor | None = None) -> torch.Tensor:
        """Solve from seeded noise to a latent (1, C, F, H/s, W/s) float32 (C = the DiT's out_dim, s its VAE stride).

        context: (2, 512, text_dim) [cond, uncond] (None: encode run.prompt / run.negative_prompt); sigmas: the grid
        (None: the official grid of run.solver); x: the initial noise (None: `noise(seed)`). callback(dict) per step.
        guidance: one Guidance, or {expert name: Guidance} for A14B (see `guidance_per_expert`).
        first_frame: TI2V image-to-video, the normalized image latent z0 (1, C, 1, H/s, W/s): latent frame 0 is z0
        from the start and after every solver step (official textimage2video.py; the guidance combine sees that
        pinned x), its tokens get t = 0; the result's frame 0 is z0. concat: I2V-A14B, y = [mask, image latent]
        (1, 20, F, H/8, W/8) from `conditioning.i2v_condition`, appended to the model input's channels.
        STAS with first_frame: the token set S keeps F0 (the image frame, t = 0). Its own prediction is discarded
        (the frame is re-pinned), so steering it can never alter the image; its tokens remain keys of every other
        token's attention, which is the path STAS acts through; and S stays the same positional set as in T2V, so
        T2V and I2V runs are comparable. Steer(tokens='boundary') leaves F0 out.
        Raises ValueError for a run, guidance or conditioning the model cannot take.
        """
        p, c = self.preset, self.preset.config
        run.check(p.vae_stride[1] * c.patch_size[1])
        for g in ([guidance] if isinstance(guidance, Guidance) else guidance.values()):
            g.check(run.steps, c.num_layers, c.dim)
        shape = run.latent_shape(c.out_dim, p.vae_stride)
        self.check_conditioning(shape, first_frame, concat)
        solve, grid = SOLVERS[run.solver]
        sigmas = grid(run.steps, run.shift) if sigmas is None else sigmas
        if context is None:
            neg = NEGATIVE_PROMPT if run.negative_prompt is None else run.negative_prompt
            context = self.encode([run.prompt, neg])
        x = noise(shape, run.seed) if x is None else x
        project = None
        if first_frame is not None:
            z0 = first_frame.to(self.device, torch.float32)
            project = lambda x: torch.cat([z0, x[:, :, 1:]], dim=2)  # noqa: E731 -- pin latent frame 0 to z0
        bar = tqdm(total=len(sigmas) - 1, disable=not progress, desc="sampling", unit="step")

        def step_done(info):
            bar.update(1)
            if callback is not None:
                callback(info)

        self.expert_steps = []
        denoise = self.denoiser(context.to(self.device), guidance, sigmas, first_frame is not None,
                                None if concat is None else concat.to(self.device, torch.float32))
        x = solve(denoise, x.to(self.device), sigmas, step_done, project=project)
        bar.close()
        return x

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
        """Generate a video (3, T, H, W) in [-1, 1]."""
        return self.vae.decode(self.sample(run, guidance, **kw))[0]


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
    return guidance_per_expert(preset, g, scale, steer)


def check_vae(found: dict, preset: str) -> None:
    """Cheap check, before heavy work (keys and shapes only), that the checkpoint's VAE fits the DiT: a Wan2.1 VAE
    (z 16, stride 8) given to TI2V-5B, or the Wan2.2 VAE (z 48, stride 16) given to a Wan2.1 / A14B model, raises a
    CheckpointError naming the file and the VAE the model needs."""
    p = PRESETS[preset]
    _, layout, version, _, z_dim = open_wan_vae(found["vae"])
    if z_dim != p.config.out_dim:
        need = "the Wan2.2 VAE (Wan2.2_VAE.pth)" if p.vae == "wan2.2" else "the Wan2.1 VAE (Wan2.1_VAE.pth)"
        raise CheckpointError(f"{found['vae']}: a {version} VAE ({layout} layout, {z_dim} latent channels), but "
                              f"{preset} works on {p.config.out_dim}-channel latents: pass {need} with --vae")


def load_vae(path, preset: str, device="cpu"):
    """The VAE of a preset (Wan2.1 or Wan2.2, detected from the file), float32 as the official pipelines run it;
    raises CheckpointError when it does not fit the DiT (`check_vae`)."""
    check_vae({"vae": path}, preset)
    return load_wan_vae(path, dtype=torch.float32, device=device)


def sidecar(pipe: WanPipeline, run: SampleConfig, guidance: Guidance | Mapping[str, Guidance],
            seconds: float | None = None, **extra) -> dict:
    """Everything needed to reproduce a video: model, checkpoint, prompts, sampler, guidance, versions; for A14B the
    guidance per expert and which expert ran each step (`expert_steps`, from the last `sample`); extra: more keys
    (e.g. the conditioning image)."""
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "safetensors")}
    try:
        versions["minivdit"] = importlib.metadata.version("minivdit")
    except importlib.metadata.PackageNotFoundError:
        pass
    as_json = lambda g: json.loads(json.dumps(asdict(g), default=str))  # noqa: E731
    per_expert = not isinstance(guidance, Guidance)
    record = {**pipe.info, **asdict(run), **extra,
              "guidance": {k: as_json(g) for k, g in guidance.items()} if per_expert else as_json(guidance)}
    record["negative_prompt"] = NEGATIVE_PROMPT if run.negative_prompt is None else run.negative_prompt
    record["guidance_scale"] = {k: g.guidance_scale for k, g in guidance.items()} if per_expert else \
        guidance.guidance_scale
    if pipe.preset.experts:
        record["expert_steps"] = list(pipe.expert_steps)
        record["keep_experts"] = pipe.keep_experts
    record["dtype"] = str(pipe.model.patch_embedding.weight.dtype)
    record["device"] = str(pipe.device)
    record["versions"] = dict(versions, python=platform.python_version())
    if seconds is not None:
        record["seconds"] = round(seconds, 2)
    return record


# ----------------------------------------------------------------------------------------------------------
# the embedded default: a tiny Wan-architecture checkpoint made deterministically on first use

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

    root = Path(root)
    if root.is_dir() and any(root.iterdir()):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
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
        if root.exists():  # another process finished first
            return root
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
