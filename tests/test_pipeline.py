"""Whole sampling loops against diffusers' WanPipeline, the embedded default end to end, and bad input."""
import json

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline as DiffusersWanPipeline, WanTransformer3DModel

from minivdit import solvers
from minivdit.checkpoints import CheckpointError
from minivdit.guidance import Guidance
from minivdit.pipeline import SampleConfig, WanPipeline, find_checkpoint, tiny_checkpoint
from minivdit.wan import load_wan
from samplers import sample


def diffusers_loop(transformer, context, latents, steps, shift, guidance_scale):
    """The reference: diffusers' WanPipeline with its flow UniPC, given embeddings and the initial latents."""
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                        solver_order=2, solver_type="bh2", lower_order_final=True)
    pipe = DiffusersWanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                                transformer=transformer)
    _, _, f, h, w = latents.shape
    out = pipe(prompt_embeds=context[:1], negative_prompt_embeds=context[1:], height=h * 8, width=w * 8,
               num_frames=(f - 1) * 4 + 1, num_inference_steps=steps, guidance_scale=guidance_scale,
               latents=latents.clone(), output_type="latent", return_dict=False)[0]
    return out, scheduler


def loop_case(cfg, steps, tmp_path, shape=(1, 16, 3, 8, 8), shift=5.0, scale=5.0):
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg).eval()
    ref.save_pretrained(tmp_path / "transformer")
    g = torch.Generator().manual_seed(2)
    context = torch.randn(2, 512, cfg["text_dim"], generator=g)
    context[0, 9:], context[1, 4:] = 0, 0
    latents = torch.randn(shape, generator=g)
    want, scheduler = diffusers_loop(ref, context, latents, steps, shift, scale)
    del ref
    model, preset, layout = load_wan(tmp_path)
    assert layout == "diffusers"
    pipe = WanPipeline(model, None, None, None, preset, {})
    sigmas = solvers.diffusers_unipc_sigmas(steps, shift)
    assert torch.allclose(sigmas.float(), scheduler.sigmas.float(), rtol=0, atol=1e-7)  # same grid on both sides
    _, _, f, h, w = shape
    run = SampleConfig("unused", frames=(f - 1) * 4 + 1, height=h * 8, width=w * 8, steps=steps, shift=shift)
    got = pipe.sample(run, Guidance(guidance_scale=scale), context=context, sigmas=sigmas, x=latents, progress=False)
    return ((got - want).abs().max() / want.abs().max()).item()


TINY = dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=4, text_dim=32, freq_dim=256,
            in_channels=16, out_channels=16, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads",
            cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024)


def test_cfg_loop_matches_diffusers(tmp_path):
    assert loop_case(TINY, 3, tmp_path) <= 1e-4


@pytest.mark.slow
def test_cfg_loop_matches_diffusers_real_1_3b(tmp_path):
    cfg = dict(TINY, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096)
    err = loop_case(cfg, 3, tmp_path, shape=(1, 16, 2, 8, 8))
    print(f"real 1.3B 3-step CFG loop: max|diff|/max|ref| = {err:.2e}")
    assert err <= 1e-4


# --- the embedded default ----------------------------------------------------------------------------------------


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a, b = tiny_checkpoint(tmp_path / "a"), tiny_checkpoint(tmp_path / "b")
    for name in ("diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert find_checkpoint(a)["layout"] == "native"


def test_t2v_end_to_end_on_the_tiny_default(tmp_path):
    out = tmp_path / "v.mp4"
    sample.main(["--ckpt", str(tiny_checkpoint(tmp_path / "ckpt")), "--output", str(out), "--steps", "3",
              "--frames", "5", "--height", "32", "--width", "48"])
    frames = np.stack([f for f in imageio.get_reader(out)])
    assert frames.shape == (5, 32, 48, 3)
    meta = json.loads(out.with_suffix(".json").read_text())
    for key in ("preset", "checkpoint", "layout", "prompt", "negative_prompt", "seed", "steps", "shift",
                "guidance_scale", "solver", "height", "width", "frames", "fps", "versions"):
        assert key in meta, key
    assert meta["preset"] == "wan2.1-tiny" and meta["layout"] == "native" and meta["steps"] == 3
    with pytest.raises(FileExistsError, match="--overwrite"):
        sample.main(["--ckpt", str(tmp_path / "ckpt"), "--output", str(out)])
    before = out.read_bytes()
    sample.main(["--ckpt", str(tmp_path / "ckpt"), "--output", str(out), "--steps", "2", "--frames", "5",
              "--height", "32", "--width", "48", "--seed", "1", "--overwrite"])
    assert out.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


# --- bad input, refused before heavy work ------------------------------------------------------------------------


@pytest.mark.parametrize("args,match", [
    (["--frames", "10"], "4k\\+1"),
    (["--height", "100"], "multiple of 16"),
    (["--width", "8"], "multiple of 16"),
])
def test_bad_request(tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        sample.main(["--ckpt", str(tiny_checkpoint(tmp_path / "ckpt")), "--output", str(tmp_path / "o.mp4"), *args])


def test_missing_empty_and_incomplete_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        sample.main(["--ckpt", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        sample.main(["--ckpt", str(tmp_path / "empty")])
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    (ckpt / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match="missing vae"):
        sample.main(["--ckpt", str(ckpt)])


def test_checkpoint_of_another_size(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        WanPipeline.load(ckpt, preset="wan2.1-t2v-1.3b")
