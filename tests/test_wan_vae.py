"""Wan2.1 VAE: parity with diffusers AutoencoderKLWan on checkpoints it wrote in both layouts, streaming, errors."""
import time

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from minivdit.checkpoints import CheckpointError
from minivdit.wan_vae import (WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAE, load_wan_vae, vae_from_diffusers)

MEAN = torch.tensor(WAN21_LATENT_MEAN).view(1, -1, 1, 1, 1)
STD = torch.tensor(WAN21_LATENT_STD).view(1, -1, 1, 1, 1)
TOL = 1e-5  # max|ours - ref| <= TOL * max|ref|


def make_reference(base_dim: int, seed: int = 0) -> AutoencoderKLWan:
    """A seeded random diffusers Wan2.1 VAE; RMS-norm gammas are randomized too (they init to ones)."""
    torch.manual_seed(seed)
    ref = AutoencoderKLWan(base_dim=base_dim, z_dim=16).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return ref


def ref_encode(ref, video):
    """Diffusers encode: posterior mode, normalized as the Wan pipelines do."""
    with torch.no_grad():
        return (ref.encode(video).latent_dist.mode() - MEAN) / STD


def ref_decode(ref, latent):
    """Diffusers decode of a normalized latent (its `_decode` clamps to [-1, 1])."""
    with torch.no_grad():
        return ref.decode(latent * STD + MEAN).sample


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A base_dim=8 reference saved as a diffusers `vae/` folder and as a native-key `.pth`."""
    d = tmp_path_factory.mktemp("wan_vae")
    ref = make_reference(8)
    ref.save_pretrained(d / "vae")
    torch.save(vae_from_diffusers(ref.state_dict()), d / "Wan2.1_VAE.pth")
    return ref, d


def test_rename_table_real_config():
    """All 194 diffusers tensors map onto the 194 native names with equal shapes (real config, meta device)."""
    with torch.device("meta"):
        ref, ours = AutoencoderKLWan(), WanVAE()
    sd, expected = vae_from_diffusers(ref.state_dict()), ours.state_dict()
    assert len(sd) == len(expected) == 194
    assert set(sd) == set(expected)
    assert all(sd[k].shape == expected[k].shape for k in expected)
    # spot checks of native names and shapes (models.md section 2.5)
    assert tuple(expected["encoder.downsamples.5.time_conv.weight"].shape) == (192, 192, 3, 1, 1)
    assert tuple(expected["decoder.middle.1.to_qkv.weight"].shape) == (1152, 384, 1, 1)
    assert tuple(expected["decoder.upsamples.3.resample.1.weight"].shape) == (192, 384, 3, 3)
    assert tuple(expected["decoder.upsamples.3.time_conv.weight"].shape) == (768, 384, 3, 1, 1)
    assert tuple(expected["conv1.weight"].shape) == (32, 32, 1, 1, 1)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("layout", ["diffusers", "native"])
@pytest.mark.parametrize("frames,height,width", [(1, 32, 32), (9, 64, 48)])
def test_parity_with_diffusers(tiny, layout, frames, height, width):
    ref, d = tiny
    vae = load_wan_vae(d / "vae" if layout == "diffusers" else d / "Wan2.1_VAE.pth")
    assert not vae.training
    torch.manual_seed(1)
    video = torch.rand(2, 3, frames, height, width) * 2 - 1
    z, z_ref = vae.encode(video), ref_encode(ref, video)
    assert z.shape == (2, 16, 1 + (frames - 1) // 4, height // 8, width // 8)
    assert rel_err(z, z_ref) <= TOL, rel_err(z, z_ref)
    latent = torch.randn_like(z_ref)
    x, x_ref = vae.decode(latent), ref_decode(ref, latent)
    assert x.shape == video.shape
    print(f"\n{layout} T={frames}: encode rel err {rel_err(z, z_ref):.2e}, decode rel err {rel_err(x, x_ref):.2e}")
    assert rel_err(x, x_ref) <= TOL, rel_err(x, x_ref)
    assert x.abs().max() <= 1.0 and (x_ref.abs() < 1).float().mean() > 0.9  # clamped, but not saturated


def test_streaming_matches_full_decode(tiny):
    _, d = tiny
    vae = load_wan_vae(d / "Wan2.1_VAE.pth")
    torch.manual_seed(2)
    latent = torch.randn(1, 16, 4, 3, 5)
    chunks = list(vae.decode_frames(latent))
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4]
    assert all(c.shape == (1, 3, c.shape[2], 24, 40) for c in chunks)
    assert torch.equal(torch.cat(chunks, dim=2), vae.decode(latent))


@pytest.mark.parametrize("frames,latent_frames", [(1, 1), (5, 2), (9, 3), (13, 4)])
def test_frame_counts_round_trip(tiny, frames, latent_frames):
    _, d = tiny
    vae = load_wan_vae(d / "Wan2.1_VAE.pth")
    z = vae.encode(torch.zeros(1, 3, frames, 16, 24))
    assert z.shape == (1, 16, latent_frames, 2, 3)
    assert vae.decode(z).shape == (1, 3, frames, 16, 24)


def test_bad_input_raises_value_error(tiny):
    _, d = tiny
    vae = load_wan_vae(d / "Wan2.1_VAE.pth")
    with pytest.raises(ValueError, match=r"1 \+ 4k frames.*T=6.*trim it to 5"):
        vae.encode(torch.zeros(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match="multiples of 8; got 20x32"):
        vae.encode(torch.zeros(1, 3, 5, 20, 32))
    with pytest.raises(ValueError, match="3 .RGB. channels"):
        vae.encode(torch.zeros(1, 4, 5, 32, 32))
    with pytest.raises(ValueError, match="5D tensor"):
        vae.encode(torch.zeros(3, 5, 32, 32))
    with pytest.raises(ValueError, match="16 channels"):
        vae.decode(torch.zeros(1, 8, 2, 4, 4))  # raised before any decoding, not at the first frame


def test_wrong_size_checkpoint_names_misshaped_keys(tiny, tmp_path):
    ref, _ = tiny
    sd = vae_from_diffusers(ref.state_dict())  # dim 8
    big = vae_from_diffusers(make_reference(16).state_dict())
    sd.update({k: v for k, v in big.items() if k.startswith("decoder.")})  # decoder of a dim-16 VAE
    torch.save(sd, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="mis-shaped keys") as e:
        load_wan_vae(tmp_path / "mixed.pth")
    assert "mixed.pth" in str(e.value) and "layout detected: native" in str(e.value)
    assert "decoder.conv1.weight (64, 16, 3, 3, 3) != (32, 16, 3, 3, 3)" in str(e.value)
    del sd["conv2.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing keys: conv2.bias"):
        load_wan_vae(tmp_path / "missing.pth")


@pytest.mark.parametrize("prefix", ["", "vae.", "first_stage_model."])
def test_native_half_safetensors_with_prefix(tiny, tmp_path, prefix):
    """ComfyUI-style single file: native keys, fp16, optional prefix; loads into the requested dtype."""
    ref, _ = tiny
    sd = {prefix + k: v.half() for k, v in vae_from_diffusers(ref.state_dict()).items()}
    save_file(sd, tmp_path / "wan_2.1_vae.safetensors")
    vae = load_wan_vae(tmp_path / "wan_2.1_vae.safetensors", dtype=torch.bfloat16)
    w = vae.state_dict()["decoder.middle.1.to_qkv.weight"]
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, sd[prefix + "decoder.middle.1.to_qkv.weight"].bfloat16())
    x = vae.decode(torch.randn(1, 16, 2, 2, 2))
    assert x.dtype == torch.bfloat16 and x.shape == (1, 3, 5, 16, 16) and torch.isfinite(x).all()


def test_not_a_vae_checkpoint(tmp_path):
    torch.save({"blocks.0.weight": torch.zeros(2)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="not a Wan VAE checkpoint"):
        load_wan_vae(tmp_path / "x.pth")


@pytest.mark.slow
def test_parity_real_config(tmp_path):
    """Real config (dim 96, 126.9 M params): encode + decode of 5 frames at 64x64 against diffusers."""
    ref = make_reference(96)
    torch.save(vae_from_diffusers(ref.state_dict()), tmp_path / "Wan2.1_VAE.pth")
    vae = load_wan_vae(tmp_path / "Wan2.1_VAE.pth")
    torch.manual_seed(1)
    video = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    t0 = time.perf_counter()
    z = vae.encode(video)
    latent = torch.randn_like(z)
    x = vae.decode(latent)
    t1 = time.perf_counter()
    z_ref, x_ref = ref_encode(ref, video), ref_decode(ref, latent)
    t2 = time.perf_counter()
    print(f"\nreal config: minivdit {t1 - t0:.1f} s, diffusers {t2 - t1:.1f} s; "
          f"encode rel err {rel_err(z, z_ref):.2e}, decode rel err {rel_err(x, x_ref):.2e}")
    assert z.shape == (1, 16, 2, 8, 8) and x.shape == video.shape
    assert rel_err(z, z_ref) <= TOL
    assert rel_err(x, x_ref) <= TOL
