"""Text-to-video: encode prompts -> seeded noise -> solve with guidance -> decode -> write. The one sampling loop.

Sources: Wan-Video/Wan2.1 `wan/text2video.py` (WanT2V.generate), `generate.py`; diffusers `pipeline_wan.py`.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import solvers
from .checkpoints import CheckpointError
from .guidance import Guidance
from .text import NEGATIVE_PROMPT, encode_text, load_text_encoder, load_tokenizer, tiny_umt5_config, umt5_xxl_config
from .wan import PRESETS, WanModel, find_transformer, load_wan, native_config
from .wan_vae import WanVAE, load_wan_vae

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
        """Raise ValueError for a frame count, size, step count or solver the model cannot take."""
        if self.frames < 1 or (self.frames - 1) % 4:
            k = max(0, round((self.frames - 1) / 4))
            raise ValueError(f"frames={self.frames}: Wan needs 4k+1 frames (the VAE packs 4 frames per latent after "
                             f"the first); try {4 * k + 1}")
        for name, v in (("height", self.height), ("width", self.width)):
            if v < stride or v % stride:
                raise ValueError(f"{name}={v}: must be a positive multiple of {stride} (VAE stride 8 x patch 2); "
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

    def latent_shape(self, channels: int = 16) -> tuple[int, ...]:
        """(1, C, F, H, W) latent of this run."""
        t, h, w = VAE_STRIDE
        return (1, channels, (self.frames - 1) // t + 1, self.height // h, self.width // w)


def noise(shape, seed: int) -> torch.Tensor:
    """Standard normal float32 noise drawn on the CPU from `seed` (official Wan draws (C, F, H, W) the same way)."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def find_checkpoint(path, vae=None, text_encoder=None, tokenizer=None) -> dict:
    """Locate the four components of a Wan checkpoint, checking they exist before anything heavy is read.

    path: the native folder (Wan-AI/Wan2.1-T2V-1.3B: diffusion_pytorch_model*.safetensors, Wan2.1_VAE.pth,
    models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/), a diffusers folder (transformer/, vae/, text_encoder/,
    tokenizer/), or a single DiT .safetensors (ComfyUI), in which case vae, text_encoder and tokenizer must be given.
    Returns {"transformer", "vae", "text_encoder", "tokenizer", "layout"}; raises CheckpointError naming what is
    missing.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder or file. See weights/README.md for downloads.")
    if path.is_dir() and not any(path.iterdir()):
        raise CheckpointError(f"{path}: the checkpoint folder is empty. See weights/README.md for downloads.")
    if path.is_dir() and (path / "transformer").is_dir():
        found = dict(layout="diffusers", transformer=path, vae=path / "vae", text_encoder=path / "text_encoder",
                     tokenizer=path / "tokenizer")
    elif path.is_dir():
        found = dict(layout="native", transformer=path, vae=path / "Wan2.1_VAE.pth",
                     text_encoder=path / "models_t5_umt5-xxl-enc-bf16.pth", tokenizer=path / "google" / "umt5-xxl")
    else:
        found = dict(layout="single file", transformer=path, vae=None, text_encoder=None, tokenizer=None)
    for k, v in (("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer)):
        found[k] = Path(v) if v is not None else found[k]
        if found[k] is None:
            raise CheckpointError(f"{path} is a single DiT file: also pass --{k.replace('_', '-')} (see README).")
        if not found[k].exists():
            raise CheckpointError(f"{found[k]}: missing {k} of the {found['layout']} checkpoint {path}; pass "
                                  f"--{k.replace('_', '-')} or complete the download (weights/README.md).")
    find_transformer(found["transformer"])  # raises if no DiT weights are there
    return found


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
    """A loaded Wan text-to-video model: DiT, VAE, optionally the text encoder and tokenizer, and their sources."""

    def __init__(self, model: WanModel, vae: WanVAE | None, text_encoder, tokenizer, preset: str, info: dict):
        self.model, self.vae, self.text_encoder, self.tokenizer = model, vae, text_encoder, tokenizer
        self.preset, self.info = PRESETS[preset], dict(info, preset=preset)

    @classmethod
    def load(cls, path, preset: str | None = None, vae=None, text_encoder=None, tokenizer=None,
             dtype: torch.dtype | None = None, text_dtype: torch.dtype = torch.bfloat16, device="cpu",
             with_text_encoder: bool = True):
        """Load the components of a checkpoint (see `find_checkpoint`); dtype: DiT parameter dtype (None: as stored).

        with_text_encoder=False leaves the text encoder out: pass `context` from `encode_prompts` to `sample`.
        """
        found = find_checkpoint(path, vae, text_encoder, tokenizer)
        model, preset, dit_layout = load_wan(found["transformer"], preset=preset, dtype=dtype, device=device)
        tok, enc = load_text(found, preset, text_dtype, device) if with_text_encoder else (None, None)
        vae_model = load_wan_vae(found["vae"], dtype=torch.float32, device=device)
        info = {"checkpoint": str(Path(path).resolve()), "layout": found["layout"], "dit_layout": dit_layout,
                **{k: str(Path(found[k]).resolve()) for k in ("vae", "text_encoder", "tokenizer")}}
        return cls(model, vae_model, enc, tok, preset, info)

    @property
    def device(self):
        return self.model.patch_embedding.weight.device

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> context (B, 512, text_dim) float32, trimmed and zero-padded (text.encode_text)."""
        return encode_text(prompts, self.tokenizer, self.text_encoder, self.model.config.text_len, device=self.device)

    def denoiser(self, context: torch.Tensor, guidance: Guidance, sigmas: torch.Tensor):
        """The solver's `denoise(x, sigma) -> v`: one batched model call per step, combined by `guidance`.

        context: (2, L, D) = [cond, uncond]. Step i is found from sigma on the grid, so STAS knows its first K steps.
        """
        step = {s: i for i, s in enumerate(sigmas.tolist())}
        state: dict = {}

        def denoise(x, sigma):
            i = step[sigma]
            perturb, branches, names = guidance.passes(i)
            t = solvers.timestep(sigma).to(x.device).expand(2)  # int64 model timestep, both rows
            v = self.model(x.expand(2, *x.shape[1:]), t, context, perturb, branches)  # (2 + branches, C, F, H, W)
            preds = dict(zip(("cond", "uncond", *names), v[:, None].unbind(0)))
            return guidance.combine(preds, x, sigma, i, state)

        return denoise

    @torch.no_grad()
    def sample(self, run: SampleConfig, guidance: Guidance, context: torch.Tensor | None = None,
               sigmas: torch.Tensor | None = None, x: torch.Tensor | None = None, callback=None,
               progress: bool = True) -> torch.Tensor:
        """Solve from seeded noise to a latent (1, 16, F, H/8, W/8) float32.

        context: (2, 512, text_dim) [cond, uncond] (None: encode run.prompt / run.negative_prompt); sigmas: the grid
        (None: the official grid of run.solver); x: the initial noise (None: `noise(seed)`). callback(dict) per step.
        """
        run.check()
        guidance.check(run.steps, self.model.config.num_layers, self.model.config.dim)
        solve, grid = SOLVERS[run.solver]
        sigmas = grid(run.steps, run.shift) if sigmas is None else sigmas
        if context is None:
            neg = NEGATIVE_PROMPT if run.negative_prompt is None else run.negative_prompt
            context = self.encode([run.prompt, neg])
        x = noise(run.latent_shape(self.model.config.in_dim), run.seed) if x is None else x
        bar = tqdm(total=len(sigmas) - 1, disable=not progress, desc="sampling", unit="step")

        def step_done(info):
            bar.update(1)
            if callback is not None:
                callback(info)

        x = solve(self.denoiser(context.to(self.device), guidance, sigmas), x.to(self.device), sigmas, step_done)
        bar.close()
        return x

    def __call__(self, run: SampleConfig, guidance: Guidance, **kw) -> torch.Tensor:
        """Generate a video (3, T, H, W) in [-1, 1]."""
        return self.vae.decode(self.sample(run, guidance, **kw))[0]


def sidecar(pipe: WanPipeline, run: SampleConfig, guidance: Guidance, seconds: float | None = None) -> dict:
    """Everything needed to reproduce a video: model, checkpoint, prompts, sampler, guidance, versions."""
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "safetensors")}
    try:
        versions["minivdit"] = importlib.metadata.version("minivdit")
    except importlib.metadata.PackageNotFoundError:
        pass
    record = {**pipe.info, **asdict(run), "guidance": json.loads(json.dumps(asdict(guidance), default=str))}
    record["negative_prompt"] = NEGATIVE_PROMPT if run.negative_prompt is None else run.negative_prompt
    record["guidance_scale"] = guidance.guidance_scale
    record["dtype"] = str(pipe.model.patch_embedding.weight.dtype)
    record["device"] = str(pipe.device)
    record["versions"] = dict(versions, python=platform.python_version())
    if seconds is not None:
        record["seconds"] = round(seconds, 2)
    return record


# ----------------------------------------------------------------------------------------------------------
# the embedded default: a tiny Wan-architecture checkpoint made deterministically on first use

TINY_DIR = Path(__file__).resolve().parent.parent / "weights" / "wan2.1-tiny"


def tiny_checkpoint(root: str | Path = TINY_DIR, seed: int = 0) -> Path:
    """Create (once) a tiny Wan2.1 checkpoint in the official native layout, from seeded random weights.

    The folder holds diffusion_pytorch_model.safetensors + config.json, Wan2.1_VAE.pth,
    models_t5_umt5-xxl-enc-bf16.pth (native T5 names) and google/umt5-xxl/ (a tiny sentencepiece tokenizer trained
    offline). Its videos are noise-like: it exercises the machinery, nothing more. Written to a temporary folder and
    renamed into place, so a half-made checkpoint is never used.
    """
    from safetensors.torch import save_file
    from transformers import UMT5EncoderModel

    from .text import make_tiny_tokenizer, umt5_to_native

    root = Path(root)
    if (root / "config.json").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        preset = PRESETS["wan2.1-tiny"]
        c = preset.config
        torch.manual_seed(seed)
        model = WanModel(c)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "diffusion_pytorch_model.safetensors")
        (tmp / "config.json").write_text(json.dumps(native_config(c), indent=2))
        torch.save(WanVAE(dim=preset.vae_dim).state_dict(), tmp / "Wan2.1_VAE.pth")
        tok = make_tiny_tokenizer(tmp / "google" / "umt5-xxl")
        enc = UMT5EncoderModel(tiny_umt5_config(len(tok)))
        torch.save(umt5_to_native(enc.state_dict()), tmp / "models_t5_umt5-xxl-enc-bf16.pth")
        if root.exists():  # another process finished first
            return root
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
