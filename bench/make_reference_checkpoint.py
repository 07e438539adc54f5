"""Write a Wan checkpoint (Wan2.1-T2V or Wan2.2-TI2V-5B) at the REAL configuration with random weights, built by
diffusers (the reference), in the official native layout and in diffusers' layout -- for verifying minivdit without
downloading anything.

    python bench/make_reference_checkpoint.py --out weights/wan2.1-1.3b-random            # native + diffusers
    python bench/make_reference_checkpoint.py --out weights/wan2.1-1.3b-random --layouts native
    python bench/make_reference_checkpoint.py --preset wan2.2-ti2v-5b --dtype bfloat16 --layouts native \
        --out weights/wan2.2-ti2v-5b-random           # 5B DiT in bf16 (10 GB) + Wan2.2_VAE.pth + umt5-xxl

<out>/native/     diffusion_pytorch_model.safetensors, config.json, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth,
                  google/umt5-xxl/                                    (the Wan-AI/Wan2.1-T2V-1.3B layout)
<out>/diffusers/  transformer/, vae/, text_encoder/, tokenizer/      (the Wan-AI/Wan2.1-T2V-1.3B-Diffusers layout)

The DiT and VAE are diffusers' WanTransformer3DModel / AutoencoderKLWan at the official configs (models.md §2.1, §2.5);
the text encoder is transformers' UMT5EncoderModel at the umt5-xxl config in bf16 (5.7 B parameters, 11.4 GB per
copy). The umt5-xxl tokenizer cannot be downloaded here, so the tokenizer is minivdit's tiny offline sentencepiece
model (its ids are valid rows of the 256,384-row embedding). Needs about 36 GB of disk for both layouts.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import UMT5EncoderModel  # noqa: E402

from minivdit.text import make_tiny_tokenizer, umt5_to_native, umt5_xxl_config  # noqa: E402
from minivdit.wan import PRESETS, from_diffusers, native_config  # noqa: E402
from minivdit.wan_vae import WAN22_LATENT_MEAN, WAN22_LATENT_STD, vae_from_diffusers  # noqa: E402


def log(msg, t0=time.perf_counter()):
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b", choices=[k for k in PRESETS if "tiny" not in k])
    p.add_argument("--layouts", default="native,diffusers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="DiT weights dtype (bfloat16 halves the memory and files of the 5B model)")
    args = p.parse_args()
    layouts = args.layouts.split(",")
    out = Path(args.out)
    if out.exists():
        sys.exit(f"{out} exists; choose another --out")
    preset = PRESETS[args.preset]
    c = preset.config
    torch.manual_seed(args.seed)

    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))  # build the DiT directly in its dtype
    dit = WanTransformer3DModel(num_attention_heads=c.num_heads, attention_head_dim=c.dim // c.num_heads,
                                in_channels=c.in_dim, out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim,
                                ffn_dim=c.ffn_dim, num_layers=c.num_layers, cross_attn_norm=True,
                                qk_norm="rms_norm_across_heads", eps=c.eps, patch_size=c.patch_size)
    torch.set_default_dtype(default)
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
    torch.set_default_dtype(torch.bfloat16)  # build umt5-xxl directly in bf16 (11.4 GB instead of 22.7 GB)
    try:
        enc = UMT5EncoderModel(umt5_xxl_config())
    finally:
        torch.set_default_dtype(default)
    log("umt5-xxl built")
    if "diffusers" in layouts:
        enc.save_pretrained(out / "diffusers" / "text_encoder")
    if "native" in layouts:
        torch.save(umt5_to_native(enc.state_dict()), out / "native" / "models_t5_umt5-xxl-enc-bf16.pth")
    log(f"done: {out}")


if __name__ == "__main__":
    main()
