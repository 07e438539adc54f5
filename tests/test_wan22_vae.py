"""Wan2.2 VAE: parity with diffusers AutoencoderKLWan(is_residual=True) on checkpoints it wrote in the three
layouts (diffusers folder, native .pth, ComfyUI safetensors), patchify order, streaming, version detection, errors."""
import time

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import patchify as ref_patchify
from safetensors.torch import save_file

from minivdit.checkpoints import CheckpointError
from minivdit.wan_vae import (WAN22_LATENT_MEAN, WAN22_LATENT_STD, WanVAE, WanVAE22, load_wan_vae, patchify,
                              unpatchify, vae_from_diffusers)

MEAN = torch.tensor(WAN22_LATENT_MEAN).view(1, -1, 1, 1, 1)
STD = torch.tensor(WAN22_LATENT_STD).view(1, -1, 1, 1, 1)
TOL = 1e-5  # max|ours - ref| <= TOL * max|ref|
TINY = dict(dim=8, dec_dim=12)  # encoder 8..32 channels, decoder 48..12: different widths catch enc/dec mix-ups


def make_reference(dim: int, dec_dim: int, seed: int = 0) -> AutoencoderKLWan:
    """A seeded random diffusers Wan2.2 VAE (official TI2V-5B layout at other widths). Convs draw random weights
    and biases at init; the RMS-norm gammas init to ones, so they are redrawn too."""
    torch.manual_seed(seed)
    ref = AutoencoderKLWan(base_dim=dim, decoder_base_dim=dec_dim, z_dim=48, is_residual=True, in_channels=12,
                           out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                           temperal_downsample=[False, True, True], latents_mean=list(WAN22_LATENT_MEAN),
                           latents_std=list(WAN22_LATENT_STD)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    assert all(p.std() > 0 for p in ref.parameters() if p.numel() > 1), "a constant parameter would hide bugs"
    return ref


def ref_encode(ref, video):
    """Diffusers encode: posterior mode, normalized as the Wan pipelines do."""
    with torch.no_grad():
        return (ref.encode(video).latent_dist.mode() - MEAN) / STD


def ref_decode(ref, latent):
    """Diffusers decode of a normalized latent (its `_decode` unpatchifies, then clamps to [-1, 1])."""
    with torch.no_grad():
        return ref.decode(latent * STD + MEAN).sample


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


FILES = {"diffusers": "vae", "native": "Wan2.2_VAE.pth", "comfyui": "wan2.2_vae.safetensors"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny reference saved as a diffusers `vae/` folder, a native `.pth` and a native-key safetensors."""
    d = tmp_path_factory.mktemp("wan22_vae")
    ref = make_reference(**TINY)
    ref.save_pretrained(d / FILES["diffusers"])
    native = vae_from_diffusers(ref.state_dict(), residual=True)
    torch.save(native, d / FILES["native"])
    save_file({k: v.contiguous() for k, v in native.items()}, d / FILES["comfyui"])
    return ref, d


@pytest.fixture(scope="module")
def references(tiny):
    """Seeded videos / latents and diffusers' encode / decode of them, per frame count (computed once)."""
    ref, _ = tiny
    out = {}
    for frames in (1, 5, 9):
        torch.manual_seed(frames)
        video = torch.rand(2, 3, frames, 32, 48) * 2 - 1  # H != W catches height / width swaps
        z_ref = ref_encode(ref, video)
        latent = torch.randn_like(z_ref)
        out[frames] = video, z_ref, latent, ref_decode(ref, latent)
    return out


def test_rename_table_real_config():
    """All 196 diffusers tensors map onto the 196 native names with equal shapes (real config, meta device)."""
    with torch.device("meta"):
        ref = AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                               out_channels=12, patch_size=2, scale_factor_spatial=16)
        ours = WanVAE22()
    sd, expected = vae_from_diffusers(ref.state_dict(), residual=True), ours.state_dict()
    assert len(sd) == len(expected) == 196
    assert set(sd) == set(expected)
    assert all(sd[k].shape == expected[k].shape for k in expected)
    # spot checks of native names and shapes (models.md section 2.6)
    shapes = {"encoder.conv1.weight": (160, 12, 3, 3, 3), "encoder.head.2.weight": (96, 640, 3, 3, 3),
              "conv1.weight": (96, 96, 1, 1, 1), "conv2.weight": (48, 48, 1, 1, 1),
              "decoder.conv1.weight": (1024, 48, 3, 3, 3), "decoder.head.2.weight": (12, 256, 3, 3, 3),
              "decoder.upsamples.0.upsamples.3.time_conv.weight": (2048, 1024, 3, 1, 1),
              "decoder.upsamples.2.upsamples.3.resample.1.weight": (512, 512, 3, 3),  # C -> C, not C/2
              "encoder.downsamples.1.downsamples.2.time_conv.weight": (320, 320, 3, 1, 1),
              "encoder.downsamples.1.downsamples.0.shortcut.weight": (320, 160, 1, 1, 1)}
    assert {k: tuple(expected[k].shape) for k in shapes} == shapes
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 704_688_668
    assert ours.z_dim == 48 and ours.stride == (4, 16, 16)


def test_patchify_channel_order():
    """Channel c*4 + r*2 + q holds pixel (row offset q, column offset r): the official / diffusers order."""
    x = torch.randn(2, 3, 5, 8, 12)
    y = patchify(x, 2)
    assert y.shape == (2, 12, 5, 4, 6)
    for c in range(3):
        for q in range(2):
            for r in range(2):
                assert torch.equal(y[:, c * 4 + r * 2 + q], x[:, c, :, q::2, r::2])
    assert torch.equal(y, ref_patchify(x, 2))
    assert torch.equal(unpatchify(y, 2), x)


@pytest.mark.parametrize("layout", list(FILES))
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_parity_with_diffusers(tiny, references, layout, frames):
    """Encode and decode equal diffusers' at T = 1, 5 and 9 frames: chunks after the first use the cache, the
    first_chunk rule and the temporal AvgDown3D / DupUp3D folds."""
    _, d = tiny
    vae = load_wan_vae(d / FILES[layout])
    assert type(vae) is WanVAE22 and not vae.training
    video, z_ref, latent, x_ref = references[frames]
    z = vae.encode(video)
    assert z.shape == (2, 48, 1 + (frames - 1) // 4, 2, 3)
    x = vae.decode(latent)
    assert x.shape == video.shape
    print(f"\n{layout} T={frames}: encode rel err {rel_err(z, z_ref):.2e}, decode rel err {rel_err(x, x_ref):.2e}")
    assert rel_err(z, z_ref) <= TOL, rel_err(z, z_ref)
    assert rel_err(x, x_ref) <= TOL, rel_err(x, x_ref)
    assert x.abs().max() <= 1.0 and (x_ref.abs() < 1).float().mean() > 0.9  # clamped, but not saturated


def test_parity_narrowing_temporal_stage():
    """temperal_downsample [True, True, False] (the official `_video_vae` default that the Wan2.2 wrapper
    overrides): the decoder's third stage upsamples in time while halving the width, so DupUp3D repeats each
    channel 4 times, not 8, its two output frames differ, and only keeping frame ft-1 on the first chunk matches
    (in the real config every temporal stage keeps its width and both frames are equal)."""
    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=48, is_residual=True, in_channels=12,
                           out_channels=12, patch_size=2, scale_factor_spatial=16,
                           temperal_downsample=[True, True, False]).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    vae = WanVAE22(dim=8, dec_dim=12, temperal_downsample=(True, True, False)).eval()
    vae.load_state_dict(vae_from_diffusers(ref.state_dict(), residual=True), strict=True)
    assert vae.decoder.upsamples[2].avg_shortcut.repeats == 4 and vae.decoder.upsamples[2].avg_shortcut.factor_t == 2
    torch.manual_seed(1)
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    latent = torch.randn(1, 48, 3, 2, 2)
    z, x = vae.encode(video), vae.decode(latent)
    z_ref, x_ref = ref_encode(ref, video), ref_decode(ref, latent)
    assert x.shape == video.shape
    assert rel_err(z, z_ref) <= TOL, rel_err(z, z_ref)
    assert rel_err(x, x_ref) <= TOL, rel_err(x, x_ref)


def test_streaming_matches_full_decode(tiny):
    _, d = tiny
    vae = load_wan_vae(d / FILES["native"])
    torch.manual_seed(2)
    latent = torch.randn(1, 48, 4, 3, 5)
    chunks = list(vae.decode_frames(latent))
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4]
    assert all(c.shape == (1, 3, c.shape[2], 48, 80) for c in chunks)
    assert torch.equal(torch.cat(chunks, dim=2), vae.decode(latent))


@pytest.mark.parametrize("frames,latent_frames", [(1, 1), (5, 2), (9, 3), (13, 4)])
def test_frame_counts_round_trip(tiny, frames, latent_frames):
    _, d = tiny
    vae = load_wan_vae(d / FILES["native"])
    z = vae.encode(torch.zeros(1, 3, frames, 32, 16))
    assert z.shape == (1, 48, latent_frames, 2, 1)
    assert vae.decode(z).shape == (1, 3, frames, 32, 16)


def test_bad_input_raises_value_error(tiny):
    _, d = tiny
    vae = load_wan_vae(d / FILES["native"])
    with pytest.raises(ValueError, match="multiples of 16; got 24x32"):
        vae.encode(torch.zeros(1, 3, 5, 24, 32))  # a multiple of 8 is not enough
    with pytest.raises(ValueError, match=r"1 \+ 4k frames.*T=3"):
        vae.encode(torch.zeros(1, 3, 3, 32, 32))
    with pytest.raises(ValueError, match="48 channels"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))  # a Wan2.1 latent
    with pytest.raises(ValueError, match="need z_dim=16 values"):
        WanVAE22(**TINY, z_dim=16)  # the official statistics are 48-channel; others must be given


def test_detection_picks_the_version(tiny, tmp_path):
    """Wan2.1 and Wan2.2 files in each layout load as the right class, sizes read from the shapes."""
    _, d = tiny
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=16).save_pretrained(tmp_path / "vae21")
    for path, cls, stride, z_dim in [(d / FILES["diffusers"], WanVAE22, (4, 16, 16), 48),
                                     (d / FILES["native"], WanVAE22, (4, 16, 16), 48),
                                     (d / FILES["comfyui"], WanVAE22, (4, 16, 16), 48),
                                     (tmp_path / "vae21", WanVAE, (4, 8, 8), 16)]:
        vae = load_wan_vae(path)
        assert type(vae) is cls and vae.stride == stride and vae.z_dim == z_dim, path
    vae = load_wan_vae(d / FILES["native"])
    assert vae.encoder.conv1.out_channels == 8 and vae.decoder.head[2].in_channels == 12  # dim, dec_dim


def test_bad_files_name_layout_and_keys(tiny, tmp_path):
    ref, d = tiny
    sd = vae_from_diffusers(ref.state_dict(), residual=True)
    other = vae_from_diffusers(make_reference(dim=8, dec_dim=16).state_dict(), residual=True)
    mixed = {**sd, "decoder.middle.0.residual.2.weight": other["decoder.middle.0.residual.2.weight"]}
    torch.save(mixed, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="mis-shaped keys") as e:
        load_wan_vae(tmp_path / "mixed.pth")
    assert "mixed.pth" in str(e.value) and "layout detected: native, Wan2.2 VAE" in str(e.value)
    assert "decoder.middle.0.residual.2.weight (64, 64, 3, 3, 3) != (48, 48, 3, 3, 3)" in str(e.value)

    dsd = ref.state_dict()  # a diffusers file missing a tensor: reported under its native name
    del dsd["decoder.up_blocks.1.upsampler.time_conv.bias"]
    save_file(dsd, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: decoder.upsamples.1.upsamples.3.time_conv.bias") as e:
        load_wan_vae(tmp_path / "diffusion_pytorch_model.safetensors")
    assert "layout detected: diffusers, Wan2.2 VAE" in str(e.value)

    torch.save({**sd, "encoder.conv1.weight": torch.zeros(8, 6, 3, 3, 3)}, tmp_path / "six.pth")
    with pytest.raises(CheckpointError, match="6 input channels: neither a Wan2.1 VAE .3, RGB. nor a Wan2.2 VAE .12"):
        load_wan_vae(tmp_path / "six.pth")
    torch.save({**sd, "conv2.weight": torch.zeros(16, 16, 1, 1, 1)}, tmp_path / "z16.pth")
    with pytest.raises(CheckpointError, match="native Wan2.2 VAE with z_dim=16"):
        load_wan_vae(tmp_path / "z16.pth")
    torch.save({k: v for k, v in sd.items() if not k.startswith("decoder.head.")}, tmp_path / "nohead.pth")
    with pytest.raises(CheckpointError, match="cannot infer dec_dim"):
        load_wan_vae(tmp_path / "nohead.pth")


@pytest.mark.parametrize("prefix", ["", "vae.", "first_stage_model."])
def test_native_half_safetensors_with_prefix(tiny, tmp_path, prefix):
    """ComfyUI-style single file: native keys, fp16, optional prefix; loads into the requested dtype."""
    ref, _ = tiny
    sd = {prefix + k: v.half() for k, v in vae_from_diffusers(ref.state_dict(), residual=True).items()}
    save_file(sd, tmp_path / "wan2.2_vae.safetensors")
    vae = load_wan_vae(tmp_path / "wan2.2_vae.safetensors", dtype=torch.bfloat16)
    w = vae.state_dict()["decoder.upsamples.0.upsamples.3.time_conv.weight"]
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, sd[prefix + "decoder.upsamples.0.upsamples.3.time_conv.weight"].bfloat16())
    x = vae.decode(torch.randn(1, 48, 2, 2, 2))
    assert x.dtype == torch.bfloat16 and x.shape == (1, 3, 5, 32, 32) and torch.isfinite(x).all()


@pytest.mark.slow
def test_parity_real_config(tmp_path):
    """Real config (dim 160 / dec_dim 256, z 48, 704.7 M params): encode + decode of 5 frames at 64x64 against
    diffusers, loading the native .pth that the reference's weights were written to."""
    ref = make_reference(160, 256)
    torch.save(vae_from_diffusers(ref.state_dict(), residual=True), tmp_path / "Wan2.2_VAE.pth")
    torch.manual_seed(1)
    video = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    latent = torch.randn(1, 48, 2, 4, 4)
    t0 = time.perf_counter()
    z_ref, x_ref = ref_encode(ref, video), ref_decode(ref, latent)
    t1 = time.perf_counter()
    del ref  # at most one 2.8 GB model alive besides the memory-mapped file
    vae = load_wan_vae(tmp_path / "Wan2.2_VAE.pth")
    t2 = time.perf_counter()
    z, x = vae.encode(video), vae.decode(latent)
    t3 = time.perf_counter()
    print(f"\nreal config: minivdit {t3 - t2:.1f} s, diffusers {t1 - t0:.1f} s; "
          f"encode rel err {rel_err(z, z_ref):.2e}, decode rel err {rel_err(x, x_ref):.2e}")
    assert z.shape == (1, 48, 2, 4, 4) and x.shape == video.shape
    assert rel_err(z, z_ref) <= TOL
    assert rel_err(x, x_ref) <= TOL
    assert (x_ref.abs() < 1).float().mean() > 0.9
