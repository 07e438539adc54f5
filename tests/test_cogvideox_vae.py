"""CogVideoX VAE: parity with diffusers AutoencoderKLCogVideoX on checkpoints it wrote, frame batching, streaming,
latent scaling, loader errors."""
import time

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan
from safetensors.torch import save_file

from minivdit.checkpoints import CheckpointError
from minivdit.cogvideox_vae import (CogVideoXVAE, CogVideoXVAEConfig, Tiling, config_dict, frame_batches,
                                    load_cogvideox_vae)

TOL = 1e-5  # max|ours - ref| <= TOL * max|ref|
TINY = CogVideoXVAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)


def make_reference(config: CogVideoXVAEConfig, seed: int = 0) -> AutoencoderKLCogVideoX:
    """A seeded random diffusers CogVideoX VAE; the GroupNorm weights and biases (init 1 / 0) are randomized too."""
    torch.manual_seed(seed)
    with torch.device("cpu"):
        ref = AutoencoderKLCogVideoX(**config_dict(config)).eval()
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return ref


def ref_encode(ref, video, image_condition=False):
    """Diffusers encode: posterior mode, scaled as the pipelines scale it."""
    with torch.no_grad():
        mode = ref.encode(video).latent_dist.mode()
    sf = ref.config.scaling_factor
    return (1 / sf) * mode if image_condition and ref.config.invert_scale_latents else sf * mode


def ref_decode(ref, latent):
    """Diffusers pipeline `decode_latents` (without its permute): `vae.decode(1 / sf * latents)`."""
    with torch.no_grad():
        return ref.decode(1 / ref.config.scaling_factor * latent).sample


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny reference saved as a diffusers `vae/` folder."""
    d = tmp_path_factory.mktemp("cog_vae")
    ref = make_reference(TINY)
    ref.save_pretrained(d / "vae")
    return ref, d


def test_keys_and_shapes_match_diffusers_real_config():
    """Every diffusers tensor exists under the same name and shape (real config, meta device); 215.58 M params."""
    with torch.device("meta"):
        ref, ours = AutoencoderKLCogVideoX(), CogVideoXVAE()
    expected, sd = ours.state_dict(), ref.state_dict()
    assert set(sd) == set(expected)
    assert all(sd[k].shape == expected[k].shape for k in expected)
    assert tuple(expected["encoder.conv_in.conv.weight"].shape) == (128, 3, 3, 3, 3)
    assert tuple(expected["encoder.down_blocks.0.downsamplers.0.conv.weight"].shape) == (128, 128, 3, 3)
    assert tuple(expected["decoder.mid_block.resnets.0.norm1.conv_y.conv.weight"].shape) == (512, 16, 1, 1, 1)
    assert tuple(expected["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"].shape) == (256, 512, 1, 1, 1)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) and abs(n / 1e6 - 215.58) < 0.01


def test_frame_batches_are_diffusers():
    sizes = lambda n, k: [len(range(n)[s]) for s in frame_batches(n, k)]  # noqa: E731
    assert sizes(49, 8) == [9, 8, 8, 8, 8, 8] and frame_batches(49, 8)[-1].stop == 49
    assert sizes(13, 2) == [3, 2, 2, 2, 2, 2]
    assert sizes(9, 8) == [9] and sizes(1, 8) == [1] and sizes(1, 2) == [1] and sizes(3, 2) == [3]
    assert sizes(4, 2) == [2, 2] and sizes(21, 8) == [13, 8]


@pytest.mark.parametrize("frames", [1, 9, 13, 17])
def test_parity_with_diffusers(tiny, frames):
    """T = 1, 9, 13, 17 -> latent frames 1, 3, 4, 5: one and two encode batches (9 + 8 frames at T = 17), one and
    two decode batches (3 + 2 latents at 5, 2 + 2 at 4: the even count decodes to 16 frames)."""
    ref, d = tiny
    vae = load_cogvideox_vae(d / "vae")
    assert not vae.training and vae.scaling_factor == pytest.approx(1.15258426)
    torch.manual_seed(1)
    video = torch.rand(2, 3, frames, 24, 32) * 2 - 1
    z, z_ref = vae.encode(video), ref_encode(ref, video)
    t_lat = 1 + (frames - 1) // 4
    assert z.shape == (2, 16, t_lat, 3, 4)
    assert rel_err(z, z_ref) <= TOL, rel_err(z, z_ref)
    latent = torch.randn_like(z_ref)
    x, x_ref = vae.decode(latent), ref_decode(ref, latent)
    assert x.shape == x_ref.shape == (2, 3, vae.num_frames(t_lat), 24, 32)
    print(f"\nT={frames}: encode rel err {rel_err(z, z_ref):.2e}, decode rel err {rel_err(x, x_ref):.2e}")
    assert rel_err(x, x_ref) <= TOL, rel_err(x, x_ref)
    assert x_ref.abs().max() > 1  # not clamped, by either


def test_streaming_matches_full_decode(tiny):
    _, d = tiny
    vae = load_cogvideox_vae(d / "vae")
    torch.manual_seed(2)
    for t_lat, sizes in [(7, [9, 8, 8]), (4, [8, 8]), (1, [1])]:
        latent = torch.randn(1, 16, t_lat, 2, 3)
        chunks = list(vae.decode_frames(latent))
        assert [c.shape[2] for c in chunks] == sizes
        assert all(c.shape == (1, 3, c.shape[2], 16, 24) for c in chunks)
        assert torch.equal(torch.cat(chunks, dim=2), vae.decode(latent))


def test_tiled_decode_matches_diffusers(tiny):
    """Optional H x W tiling = diffusers enable_tiling() + tiled_decode (tiles 48 x 40 px, overlaps 1/6, 1/5, as the
    240 x 360 defaults scaled down): 3 x ... tiles with partial last ones, two time batches, streamed."""
    ref, d = tiny
    vae = load_cogvideox_vae(d / "vae")
    tiling = Tiling(tile=(48, 40), overlap=(1 / 6, 1 / 5))
    torch.manual_seed(6)
    latent = torch.randn(1, 16, 5, 8, 9)
    ref.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=40, tile_overlap_factor_height=1 / 6,
                      tile_overlap_factor_width=1 / 5)
    try:
        x_ref = ref_decode(ref, latent)
    finally:
        ref.disable_tiling()
    x = vae.decode(latent, tiling=tiling)
    assert x.shape == x_ref.shape == (1, 3, 17, 64, 72)
    print(f"\ntiled decode rel err {rel_err(x, x_ref):.2e}")
    assert rel_err(x, x_ref) <= TOL, rel_err(x, x_ref)
    assert rel_err(x, vae.decode(latent)) > 1e-3  # tiling changes the result (per-tile GroupNorm statistics)
    small = torch.randn(1, 16, 3, 6, 5)  # one tile: the plain decode
    assert torch.equal(vae.decode(small, tiling=tiling), vae.decode(small))
    with pytest.raises(ValueError, match="does not tile evenly"):
        vae.decode_frames(latent, tiling=Tiling(tile=(32, 48)))


def test_scaling_and_invert_scale_latents(tmp_path):
    """CogVideoX1.5-style config (scaling 0.7, invert_scale_latents): the video latent is mode * 0.7, the I2V image
    latent mode / 0.7, and decode divides by 0.7."""
    config = CogVideoXVAEConfig(**{**config_dict(TINY), "block_out_channels": (16, 32, 32, 32),
                                   "scaling_factor": 0.7, "invert_scale_latents": True})
    ref = make_reference(config, seed=3)
    ref.save_pretrained(tmp_path / "vae")
    vae = load_cogvideox_vae(tmp_path / "vae")
    assert vae.scaling_factor == 0.7 and vae.config.invert_scale_latents
    torch.manual_seed(4)
    video = torch.rand(1, 3, 5, 16, 24) * 2 - 1
    assert rel_err(vae.encode(video), ref_encode(ref, video)) <= TOL
    image = video[:, :, :1]
    z_img = vae.encode(image, image_condition=True)
    assert rel_err(z_img, ref_encode(ref, image, image_condition=True)) <= TOL
    assert rel_err(z_img * 0.7 * 0.7, vae.encode(image)) <= TOL
    latent = torch.randn(1, 16, 3, 2, 3)
    assert rel_err(vae.decode(latent), ref_decode(ref, latent)) <= TOL


def test_single_safetensors_file(tmp_path):
    """A lone diffusers-key file (with a `vae.` prefix, fp16): architecture from the shapes (32 groups, the
    official value, cannot be read from shapes), the scaling factor passed."""
    config = CogVideoXVAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=2, scaling_factor=0.7)
    ref = make_reference(config, seed=5)
    sd = {"vae." + k: v.half() for k, v in ref.state_dict().items()}
    save_file(sd, tmp_path / "cogvideox_vae.safetensors")
    with pytest.raises(CheckpointError, match="carries no scaling factor.*1.15258426"):
        load_cogvideox_vae(tmp_path / "cogvideox_vae.safetensors")
    vae = load_cogvideox_vae(tmp_path / "cogvideox_vae.safetensors", scaling_factor=0.7)
    assert vae.config == config
    w = vae.state_dict()["decoder.conv_in.conv.weight"]
    assert w.dtype == torch.float32 and torch.equal(w, sd["vae.decoder.conv_in.conv.weight"].float())
    ref = ref.half().float()
    latent = torch.randn(1, 16, 3, 2, 3)
    assert rel_err(vae.decode(latent), ref_decode(ref, latent)) <= TOL
    assert load_cogvideox_vae(tmp_path / "cogvideox_vae.safetensors", scaling_factor=0.7,
                              dtype=torch.bfloat16).dtype == torch.bfloat16


def test_single_file_inside_diffusers_folder_uses_its_config(tiny):
    ref, d = tiny
    vae = load_cogvideox_vae(d / "vae" / "diffusion_pytorch_model.safetensors")
    assert vae.config == CogVideoXVAEConfig(**{**config_dict(TINY), "block_out_channels": (16, 32, 32, 32)})
    latent = torch.randn(1, 16, 3, 2, 2)
    assert rel_err(vae.decode(latent), ref_decode(ref, latent)) <= TOL


def test_wan_vae_is_refused(tmp_path):
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=16).save_pretrained(tmp_path / "vae")
    with pytest.raises(CheckpointError, match="this is a Wan VAE .keys .*decoder.conv_in.weight.*load_wan_vae"):
        load_cogvideox_vae(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").unlink()  # the bare weights: recognised by their keys
    with pytest.raises(CheckpointError, match="this is a Wan VAE .keys .*decoder.conv_in.weight.*load_wan_vae"):
        load_cogvideox_vae(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", scaling_factor=0.7)


def test_not_a_vae_checkpoint(tmp_path):
    save_file({"blocks.0.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not a CogVideoX VAE checkpoint"):
        load_cogvideox_vae(tmp_path / "x.safetensors", scaling_factor=0.7)


def test_wrong_checkpoint_names_misshaped_and_missing_keys(tiny, tmp_path):
    ref, _ = tiny
    sd = dict(ref.state_dict())
    big = make_reference(CogVideoXVAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                                            norm_num_groups=8)).state_dict()
    sd["encoder.conv_in.conv.weight"] = big["encoder.conv_in.conv.weight"]
    del sd["decoder.norm_out.conv_b.conv.bias"]
    ref.save_config(tmp_path)
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_cogvideox_vae(tmp_path)
    msg = str(e.value)
    assert "diffusion_pytorch_model.safetensors" in msg or str(tmp_path) in msg
    assert "layout detected: diffusers" in msg
    assert "missing keys: decoder.norm_out.conv_b.conv.bias" in msg
    assert "encoder.conv_in.conv.weight (32, 3, 3, 3, 3) != (16, 3, 3, 3, 3)" in msg


def test_bad_input_raises_value_error(tiny):
    _, d = tiny
    vae = load_cogvideox_vae(d / "vae")
    with pytest.raises(ValueError, match=r"1 \+ 4k frames.*T=6.*trim it to 5"):
        vae.encode(torch.zeros(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match="multiples of 8; got 20x32"):
        vae.encode(torch.zeros(1, 3, 5, 20, 32))
    with pytest.raises(ValueError, match="3 .RGB. channels"):
        vae.encode(torch.zeros(1, 4, 5, 32, 32))
    with pytest.raises(ValueError, match="5D tensor"):
        vae.encode(torch.zeros(3, 5, 32, 32))
    with pytest.raises(ValueError, match="16 channels"):
        vae.decode_frames(torch.zeros(1, 8, 2, 4, 4))  # raised at the call, not at the first frame


@pytest.mark.slow
def test_parity_real_config():
    """Real config (215.58 M params, 2B scaling): encode + decode of 9 frames at 64x64 against diffusers."""
    ref = make_reference(CogVideoXVAEConfig())
    vae = CogVideoXVAE().eval()
    vae.load_state_dict(ref.state_dict(), strict=True)
    torch.manual_seed(1)
    video = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    t0 = time.perf_counter()
    z = vae.encode(video)
    latent = torch.randn_like(z)
    x = vae.decode(latent)
    t1 = time.perf_counter()
    z_ref, x_ref = ref_encode(ref, video), ref_decode(ref, latent)
    t2 = time.perf_counter()
    print(f"\nreal config: minivdit {t1 - t0:.1f} s, diffusers {t2 - t1:.1f} s; "
          f"encode rel err {rel_err(z, z_ref):.2e}, decode rel err {rel_err(x, x_ref):.2e}")
    assert z.shape == (1, 16, 3, 8, 8) and x.shape == video.shape
    assert rel_err(z, z_ref) <= TOL
    assert rel_err(x, x_ref) <= TOL
