"""CogVideoX in the one sampling loop: whole 3-step CFG loops against diffusers' CogVideoXPipeline (DDIM on a
2B-style tiny, DPM with a seeded generator on a 5B-style tiny, with and without dynamic CFG), STAS / DG / STG through
the loop, the seeded noise draw, the tiny CogVideoX checkpoint end to end through samplers/sample.py, and bad input."""
import gc
import json
import math

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from diffusers import (CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline,
                       CogVideoXTransformer3DModel)

from minivdit.cogvideox import PRESETS, CogVideoXModel, diffusers_config, load_cogvideox
from minivdit.guidance import Guidance, from_preset
from minivdit.interventions import Steer, Zero
from minivdit.pipeline import (COGVIDEOX, Pipeline, SampleConfig, find_checkpoint, detect_preset,
                               tiny_cogvideox_checkpoint)
from samplers import sample

from test_cogvideox import reference  # noqa: E402 (tests/ is on sys.path under pytest)

# diffusers constructor arguments written out here (as tests/test_cogvideox.py), not taken from minivdit
BASE = dict(num_attention_heads=4, attention_head_dim=16, time_embed_dim=32, text_embed_dim=32, in_channels=16,
            out_channels=16, max_text_seq_length=226, sample_height=8, sample_width=12, sample_frames=9)
CASES = {  # kind -> (diffusers config, scheduler class, snr_shift_scale, our preset, solver, frames, latent shape)
    "2b-ddim": (dict(BASE, num_layers=3), CogVideoXDDIMScheduler, 3.0, "cogvideox-tiny", "ddim", 9, (1, 16, 3, 8, 12)),
    "5b-dpm": (dict(BASE, num_layers=4, use_rotary_positional_embeddings=True), CogVideoXDPMScheduler, 1.0,
               "cogvideox-tiny-rope", "dpm", 9, (1, 16, 3, 8, 12)),
    # 1.5 (patch_t 2): 9 frames = 3 latent frames, run as 4 with one padded in front; we return the last 3, diffusers
    # (output_type="latent") returns all 4
    "1.5-dpm": (dict(BASE, num_layers=3, sample_height=16, sample_width=16, sample_frames=81, patch_size_t=2,
                     patch_bias=False, use_rotary_positional_embeddings=True), CogVideoXDPMScheduler, 1.0,
                "cogvideox1.5-tiny", "dpm", 9, (1, 16, 4, 16, 16)),
}
SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, clip_sample=False,
             timestep_spacing="trailing", steps_offset=0)
TOL = 1e-4


def randomize(module, seed=0):
    """Every parameter random (matrices ~ fan_in^-1/2, norm weights ~ 1, biases ~ 0.1): nothing hides behind an init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(r * p[0].numel() ** -0.5 if p.ndim > 1 else 1 + 0.2 * r if "norm" in name and
                    name.endswith("weight") else 0.1 * r)
    return module


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(kind, diffusers transformer, our Pipeline on the same weights read from the diffusers folder)."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    ref = randomize(CogVideoXTransformer3DModel(**CASES[kind][0]).eval())
    ref.save_pretrained(root / "transformer")
    model, preset, layout = load_cogvideox(root)
    assert (preset, layout) == (CASES[kind][3], "diffusers")
    return kind, ref, Pipeline(model, None, None, None, preset, {})


def inputs(kind, seed=2):
    """Prompt embeddings [cond, uncond] and the initial latent (B, C, F, H, W) on the DiT's (padded) grid."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(2, 226, 32, generator=g)
    latents = torch.randn(CASES[kind][6], generator=g)
    return context, latents


def pad_of(kind):
    return CASES[kind][6][2] - (CASES[kind][5] - 1) // 4 - 1


def diffusers_loop(kind, ref, context, latents, steps, scale, dynamic, gen_seed=5):
    """The reference: diffusers' CogVideoXPipeline (fp32) on prompt embeddings and the initial latents (B, F, C, H, W),
    its scheduler drawing from a generator seeded gen_seed; returns the latent (B, C, F, H, W)."""
    _, sched_cls, snr, _, _, frames, _ = CASES[kind]
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref,
                             scheduler=sched_cls(**SCHED, snr_shift_scale=snr))
    pipe.set_progress_bar_config(disable=True)
    _, _, _, h, w = latents.shape
    out = pipe(prompt_embeds=context[:1], negative_prompt_embeds=context[1:], height=h * 8, width=w * 8,
               num_frames=frames, num_inference_steps=steps, guidance_scale=scale,
               use_dynamic_cfg=dynamic, latents=latents.permute(0, 2, 1, 3, 4).clone(),
               generator=torch.Generator().manual_seed(gen_seed), output_type="latent", return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)[:, :, pad_of(kind):]  # 1.5: the padded frame dropped, as before decoding


def ours(kind, pipe, context, latents, steps, scale, dynamic, guidance=None, gen_seed=5):
    _, _, _, h, w = latents.shape
    run = SampleConfig.from_preset(pipe.preset, "unused", frames=CASES[kind][5], height=h * 8, width=w * 8,
                                   steps=steps, solver=CASES[kind][4], dynamic_cfg=dynamic)
    assert run.shift is None and run.solver == pipe.preset.solver  # the preset's solver is the default
    return pipe.sample(run, guidance or Guidance(guidance_scale=scale), context=context, x=latents.clone(),
                       generator=torch.Generator().manual_seed(gen_seed), progress=False)


@pytest.mark.parametrize("dynamic", [False, True])
def test_cfg_loop_matches_diffusers(case, dynamic):
    kind, ref, pipe = case
    context, latents = inputs(kind)
    want = diffusers_loop(kind, ref, context, latents, 3, 6.0, dynamic)
    got = ours(kind, pipe, context, latents, 3, 6.0, dynamic)
    err = rel_err(got, want)
    print(f"{kind} dynamic={dynamic}: 3-step CFG loop max|diff|/max|ref| = {err:.2e}")
    assert err <= TOL
    if dynamic:  # the dynamic scale matters here: the constant scale is far off
        assert rel_err(ours(kind, pipe, context, latents, 3, 6.0, False), want) > 1e-2


def test_dpm_seed_reproduces_diffusers_generator(case):
    """A seeded run (noise from `seed`, no x given) equals diffusers' run with generator=manual_seed(seed): the same
    (B, F, C, H, W) draw, then the same solver draws."""
    kind, ref, pipe = case
    context, _ = inputs(kind)
    _, sched_cls, snr, _, _, frames, (_, _, _, h, w) = CASES[kind]
    run = SampleConfig.from_preset(pipe.preset, "unused", frames=frames, height=h * 8, width=w * 8, steps=3,
                                   seed=7, dynamic_cfg=False)
    got = pipe.sample(run, Guidance(guidance_scale=6.0), context=context, progress=False)
    dpipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref,
                              scheduler=sched_cls(**SCHED, snr_shift_scale=snr))
    dpipe.set_progress_bar_config(disable=True)
    want = dpipe(prompt_embeds=context[:1], negative_prompt_embeds=context[1:], height=h * 8, width=w * 8,
                 num_frames=run.frames, num_inference_steps=3, guidance_scale=6.0, use_dynamic_cfg=False,
                 generator=torch.Generator().manual_seed(7), output_type="latent", return_dict=False)[0]
    assert rel_err(got, want.permute(0, 2, 1, 3, 4)[:, :, pad_of(kind):]) <= TOL


def test_methods_through_the_loop(case):
    """STAS, DG and STG run through the loop; neutral settings (STAS K = 0, DG w = 0, STG s = 0) are plain CFG
    exactly, the presets' settings change the result."""
    kind, _, pipe = case
    context, latents = inputs(kind)
    cfg = ours(kind, pipe, context, latents, 3, 6.0, True)
    neutral = [Guidance(guidance_scale=6.0, stas=Steer(dims=(3,), block=1, alpha=2.5, p=8.0), stas_steps=0),
               Guidance(method="dg", guidance_scale=6.0, dg=Zero(block=1, dims=(3,)), dg_scale=0.0),
               Guidance(method="stg", guidance_scale=6.0, stg_blocks=(2,), stg_scale=0.0)]
    for g in neutral:
        assert torch.equal(ours(kind, pipe, context, latents, 3, 6.0, True, guidance=g), cfg), g.method
    for method, stas in (("cfg", True), ("dg", False), ("stg", False), ("stg-official", False)):
        g = from_preset(pipe.preset, method, stas=stas, **({"stas_steps": 2} if stas else {}))
        got = ours(kind, pipe, context, latents, 3, 6.0, True, guidance=g)
        assert torch.isfinite(got).all() and rel_err(got, cfg) > 1e-4, (method, stas)


@pytest.mark.parametrize("method", ["apg", "cfg-zero*"])
def test_flow_only_methods_refused(case, method):
    kind, _, pipe = case
    context, latents = inputs(kind)
    with pytest.raises(ValueError, match="v-prediction"):
        ours(kind, pipe, context, latents, 3, 6.0, False, guidance=Guidance(method=method))


def test_sample_config_rules():
    p = COGVIDEOX.presets["cogvideox-tiny"]
    run = SampleConfig.from_preset(p, "x")
    assert (run.shift, run.solver, run.dynamic_cfg) == (None, "ddim", True)
    run.check(16, COGVIDEOX)
    for bad, match in ((dict(frames=10), "CogVideoX needs 4k\\+1"), (dict(height=72), "multiple of 16"),
                       (dict(shift=3.0), "no flow shift"), (dict(solver="unipc"), "unknown solver 'unipc' for "
                                                                                  "CogVideoX")):
        with pytest.raises(ValueError, match=match):
            SampleConfig.from_preset(p, "x", **bad).check(16, COGVIDEOX)
    with pytest.raises(ValueError, match="dynamic CFG is CogVideoX"):
        SampleConfig("x", dynamic_cfg=True).check()


def test_padded_latent_frame_dropped():
    """CogVideoX1.5 (patch_t 2): 9 frames = 3 latent frames, drawn as 4 (one in front), 3 returned."""
    torch.manual_seed(0)
    pipe = Pipeline(CogVideoXModel(PRESETS["cogvideox1.5-tiny"].config).eval(), None, None, None,
                    "cogvideox1.5-tiny", {})
    run = SampleConfig.from_preset(pipe.preset, "x", frames=9, height=128, width=128, steps=2)
    seen = []
    out = pipe.sample(run, Guidance(guidance_scale=6.0), context=torch.randn(2, 226, 32), progress=False,
                      callback=lambda info: seen.append(tuple(info["x"].shape)))
    assert seen[0] == (1, 16, 4, 16, 16) and tuple(out.shape) == (1, 16, 3, 16, 16)


# --- the tiny CogVideoX checkpoint through samplers/sample.py ---------------------------------------------------------


def test_tiny_cogvideox_checkpoint_is_deterministic(tmp_path):
    a, b = tiny_cogvideox_checkpoint(tmp_path / "a"), tiny_cogvideox_checkpoint(tmp_path / "b")
    for name in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    found = find_checkpoint(a)
    assert found["layout"] == "diffusers" and detect_preset(found) == "cogvideox-tiny"


def test_t2v_end_to_end_on_tiny_cogvideox(tmp_path):
    ckpt = tiny_cogvideox_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "v.mp4"
    sample.main(["--ckpt", str(ckpt), "--output", str(out), "--steps", "3"])
    frames = np.stack([f for f in imageio.get_reader(out)])
    assert frames.shape == (9, 64, 96, 3)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["family"], meta["preset"], meta["solver"], meta["dynamic_cfg"], meta["shift"]) == \
        ("CogVideoX", "cogvideox-tiny", "ddim", True, None)
    assert meta["negative_prompt"] == "" and meta["steps"] == 3 and meta["guidance_scale"] == 6.0
    sample.main(["--ckpt", str(ckpt), "--output", str(out), "--steps", "2", "--solver", "dpm", "--no-dynamic-cfg",
              "--method", "stg", "--overwrite"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["solver"], meta["dynamic_cfg"], meta["guidance"]["method"]) == ("dpm", False, "stg")


@pytest.mark.parametrize("args,match", [
    (["--frames", "10"], "CogVideoX needs 4k\\+1"),
    (["--height", "72"], "multiple of 16"),
    (["--width", "8"], "multiple of 16"),
    (["--shift", "3"], "no flow shift"),
    (["--solver", "unipc"], "unknown solver"),
    (["--method", "apg"], "v-prediction"),
])
def test_bad_request_refused_before_heavy_work(tmp_path, monkeypatch, args, match):
    ckpt = tiny_cogvideox_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(sample, "encode_prompts", lambda *a, **k: pytest.fail("encoded before the checks"))
    with pytest.raises(ValueError, match=match):
        sample.main(["--ckpt", str(ckpt), "--output", str(tmp_path / "o.mp4"), *args])


def test_wan_run_refuses_dynamic_cfg(tmp_path):
    from minivdit.pipeline import tiny_checkpoint
    with pytest.raises(ValueError, match="dynamic CFG"):
        sample.main(["--ckpt", str(tiny_checkpoint(tmp_path / "w")), "--output", str(tmp_path / "o.mp4"),
                  "--dynamic-cfg"])


def test_dynamic_scale_is_the_pipeline_formula():
    from minivdit.solvers import dynamic_cfg_scale
    for t in (999, 666, 333):
        assert dynamic_cfg_scale(6.0, t, 3) == 1 + 6.0 * ((1 - math.cos(math.pi * ((3 - t) / 3) ** 5.0)) / 2)


# --- the real CogVideoX-5B configuration (slow) ------------------------------------------------------------------


@pytest.mark.slow
def test_real_5b_forward_and_2_step_loop_bf16(tmp_path):
    """The real CogVideoX-5B (42 blocks, 48 heads x 64, RoPE; random weights, diffusers' own init) written by diffusers
    in the official HF layout, in bf16 as the 5B repo stores it: the DiT forward and a 2-step CFG DPM loop (seeded
    SDE noise) against diffusers. A float32 copy is 22 GB, so two do not fit this 24 GB machine and bf16 is what the
    reference demo runs: the reference runs first, is written and freed, then minivdit loads the written folder (one
    model resident at a time). diffusers' pipeline keeps its latent in the embeddings' dtype; minivdit keeps it in
    float32 and casts at the DiT, returning float32: hooks on the reference's transformer do the same, so the loop
    compares the model and solver, not the latent's storage dtype."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        ref = CogVideoXTransformer3DModel(**diffusers_config(PRESETS["cogvideox-5b"].config)).eval()
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator().manual_seed(1)
    context = torch.randn(2, 226, 4096, generator=g)
    latents = torch.randn(1, 16, 3, 8, 12, generator=g)  # 9 frames 64 x 96: 3 x 4 x 6 = 72 video tokens
    t = torch.tensor([700, 700])
    want_v = reference(ref, latents.expand(2, -1, -1, -1, -1).transpose(1, 2).bfloat16(), t, context.bfloat16())
    ref.register_forward_pre_hook(lambda m, args, kw: (args, {k: v.bfloat16() if torch.is_tensor(v) and
                                  v.is_floating_point() else v for k, v in kw.items()}), with_kwargs=True)
    ref.register_forward_hook(lambda m, args, out: (out[0].float(), *out[1:]))
    dpipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref,
                              scheduler=CogVideoXDPMScheduler(**SCHED, snr_shift_scale=1.0))
    dpipe.set_progress_bar_config(disable=True)
    want = dpipe(prompt_embeds=context[:1], negative_prompt_embeds=context[1:], height=64, width=96, num_frames=9,
                 num_inference_steps=2, guidance_scale=6.0, use_dynamic_cfg=True,
                 latents=latents.permute(0, 2, 1, 3, 4).clone(), generator=torch.Generator().manual_seed(5),
                 output_type="latent", return_dict=False)[0].permute(0, 2, 1, 3, 4)
    ref.save_pretrained(tmp_path / "transformer")
    del ref, dpipe
    gc.collect()
    model, preset, layout = load_cogvideox(tmp_path, dtype=torch.bfloat16)
    assert (preset, layout) == ("cogvideox-5b", "diffusers") and len(model.transformer_blocks) == 42
    with torch.no_grad():
        got_v = model(latents.expand(2, -1, -1, -1, -1), t, context).transpose(1, 2)
    err = rel_err(got_v, want_v.float())
    print(f"real CogVideoX-5B bf16 forward: max|diff|/max|ref| = {err:.2e}")
    assert err <= 1e-3  # as the tiny bf16 test (tests/test_cogvideox.py): diffusers' precision op for op
    pipe = Pipeline(model, None, None, None, preset, {})
    run = SampleConfig.from_preset(pipe.preset, "unused", frames=9, height=64, width=96, steps=2, dynamic_cfg=True)
    got = pipe.sample(run, Guidance(guidance_scale=6.0), context=context, x=latents.clone(),
                      generator=torch.Generator().manual_seed(5), progress=False)
    err = rel_err(got, want)
    print(f"real CogVideoX-5B bf16, 2-step dynamic-CFG DPM loop: max|diff|/max|ref| = {err:.2e}")
    assert run.solver == "dpm" and err <= 1e-3
