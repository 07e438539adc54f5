"""Write a Wan checkpoint (Wan2.1-T2V or Wan2.2-TI2V-5B) or a CogVideoX checkpoint (2B, 5B, 1.5-5B) at the REAL
configuration with random weights, built by diffusers (the reference), in the official layouts (Wan: native and
diffusers; CogVideoX: the diffusers layout of the official HF repos) -- for verifying minivdit without downloading
anything.

    python bench/make_reference_checkpoint.py --out weights/wan2.1-1.3b-random            # native + diffusers
    python bench/make_reference_checkpoint.py --out weights/wan2.1-1.3b-random --layouts native
    python bench/make_reference_checkpoint.py --preset wan2.2-ti2v-5b --dtype bfloat16 --layouts native \
        --out weights/wan2.2-ti2v-5b-random           # 5B DiT in bf16 (10 GB) + Wan2.2_VAE.pth + umt5-xxl
    python bench/make_reference_checkpoint.py --preset cogvideox-5b --dtype bfloat16 --out weights/cogvideox-5b-random

<out>/native/     diffusion_pytorch_model.safetensors, config.json, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth,
                  google/umt5-xxl/                                    (the Wan-AI/Wan2.1-T2V-1.3B layout)
<out>/diffusers/  transformer/, vae/, text_encoder/, tokenizer/      (the Wan-AI/Wan2.1-T2V-1.3B-Diffusers layout)

The DiT and VAE are diffusers' WanTransformer3DModel / AutoencoderKLWan at the official configs (models.md §2.1, §2.5);
the text encoder is transformers' UMT5EncoderModel at the umt5-xxl config in bf16 (5.7 B parameters, 11.4 GB per
copy). The umt5-xxl tokenizer cannot be downloaded here, so the tokenizer is minivdit's tiny offline sentencepiece
model (its ids are valid rows of the 256,384-row embedding). Needs about 36 GB of disk for both layouts.

CogVideoX (models.md §3.9): <out>/ transformer/ (CogVideoXTransformer3DModel, --dtype; the 5B repo stores bf16),
vae/ (AutoencoderKLCogVideoX, float32, the preset's scaling factor), text_encoder/ (transformers' T5EncoderModel at
the t5-v1_1-xxl config, bf16, 4.76 B parameters), tokenizer/ (the tiny offline sentencepiece model: ids < 32,128),
scheduler/ (CogVideoXDDIMScheduler with the preset's SNR shift) and model_index.json. 5B in bf16: about 21 GB.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench helpers
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import (AutoencoderKLCogVideoX, AutoencoderKLWan, CogVideoXDDIMScheduler,  # noqa: E402
                       CogVideoXTransformer3DModel, WanTransformer3DModel)
from safetensors.torch import save_file  # noqa: E402
from transformers import T5EncoderModel, UMT5EncoderModel  # noqa: E402

from guidance_speed import build  # noqa: E402 -- parameters created directly in a dtype
from minivdit.cogvideox import PRESETS as COG_PRESETS, diffusers_config  # noqa: E402
from minivdit.text import make_tiny_tokenizer, t5_v1_1_xxl_config, umt5_to_native, umt5_xxl_config  # noqa: E402
from minivdit.wan import PRESETS, from_diffusers, native_config  # noqa: E402
from minivdit.wan_vae import WAN22_LATENT_MEAN, WAN22_LATENT_STD, vae_from_diffusers  # noqa: E402


def log(msg, t0=time.perf_counter()):
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


def write_cogvideox(name: str, out: Path, dtype: torch.dtype) -> None:
    """The diffusers layout of THUDM/CogVideoX-2b, -5b, CogVideoX1.5-5B (models.md §3.5, 3.6, 3.9), random weights."""
    preset = COG_PRESETS[name]
    dit = build(lambda: CogVideoXTransformer3DModel(**diffusers_config(preset.config)), dtype)
    log(f"DiT built: {sum(t.numel() for t in dit.parameters()) / 1e9:.4f} B parameters")
    dit.save_pretrained(out / "transformer")
    del dit
    log("DiT written")
    AutoencoderKLCogVideoX(scaling_factor=preset.vae_scaling_factor,
                           invert_scale_latents=name.startswith("cogvideox1.5")).save_pretrained(out / "vae")
    log("VAE written")
    CogVideoXDDIMScheduler(snr_shift_scale=preset.snr_shift_scale, rescale_betas_zero_snr=True,
                           prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True,
                           clip_sample=False).save_pretrained(out / "scheduler")
    make_tiny_tokenizer(out / "tokenizer")
    build(lambda: T5EncoderModel(t5_v1_1_xxl_config()), torch.bfloat16).save_pretrained(out / "text_encoder")
    log("T5 v1.1-xxl written")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "CogVideoXPipeline", "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLCogVideoX"]},
        indent=2))
    log(f"done: {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b",
                   choices=[k for k in (*PRESETS, *COG_PRESETS) if "tiny" not in k])
    p.add_argument("--layouts", default="native,diffusers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="DiT weights dtype (bfloat16 halves the memory and files of the 5B model)")
    args = p.parse_args()
    layouts = args.layouts.split(",")
    out = Path(args.out)
    if out.exists():
        sys.exit(f"{out} exists; choose another --out")
    torch.manual_seed(args.seed)
    if args.preset in COG_PRESETS:
        return write_cogvideox(args.preset, out, getattr(torch, args.dtype))
    preset = PRESETS[args.preset]
    c = preset.config
    dit = build(lambda: WanTransformer3DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.dim // c.num_heads, in_channels=c.in_dim,
        out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=c.eps, patch_size=c.patch_size),
        getattr(torch, args.dtype))  # built directly in its dtype
    log(f"DiT built: {sum(t.numel() for t in dit.parameters()) / 1e9:.4f} B parameters")
    if "diffusers" in layouts:
        dit.save_pretrained(out / "diffusers" / "transformer")
    if "native" in layouts:
        (out / "native").mkdir(parents=True)
        save_file({from_diffusers(k): v.contiguous() for k, v in dit.state_dict().items()},
                  out / "native" / "diffusion_pytorch_model.safetensors")
        (out / "native" / "config.json").write_text(json.dumps(native_config(c), indent=2))
    del dit
    log("DiT written")

    wan22 = preset.vae == "wan2.2"
    vae = AutoencoderKLWan(  # models.md §2.6 (DC:wan); the Wan2.1 VAE config is diffusers' default
        base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16, temperal_downsample=[False, True, True],
        latents_mean=list(WAN22_LATENT_MEAN), latents_std=list(WAN22_LATENT_STD)) if wan22 else AutoencoderKLWan()
    if "diffusers" in layouts:
        vae.save_pretrained(out / "diffusers" / "vae")
    if "native" in layouts:
        torch.save(vae_from_diffusers(vae.state_dict(), residual=wan22),
                   out / "native" / ("Wan2.2_VAE.pth" if wan22 else "Wan2.1_VAE.pth"))
    del vae
    log("VAE written")

    for layout, sub in (("native", "google/umt5-xxl"), ("diffusers", "tokenizer")):
        if layout in layouts:
            make_tiny_tokenizer(out / layout / sub)
    enc = build(lambda: UMT5EncoderModel(umt5_xxl_config()), torch.bfloat16)  # 11.4 GB instead of 22.7 GB
    log("umt5-xxl built")
    if "diffusers" in layouts:
        enc.save_pretrained(out / "diffusers" / "text_encoder")
    if "native" in layouts:
        torch.save(umt5_to_native(enc.state_dict()), out / "native" / "models_t5_umt5-xxl-enc-bf16.pth")
    log(f"done: {out}")


if __name__ == "__main__":
    main()
