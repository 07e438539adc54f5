"""Wan2.2: TI2V-5B (per-token timesteps, clean first frame) and A14B (two experts, I2V channel concat) against
diffusers, in the one sampling loop; image sizing; expert memory behaviour.

Every reference is built here with seeded random weights (all parameters perturbed, tables included) and run in
float32 on the same sigma grid as minivdit (diffusers' flow UniPC grid, `solvers.diffusers_unipc_sigmas`).
"""
import weakref

import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline
from diffusers import WanPipeline as DiffusersWanPipeline
from diffusers import WanTransformer3DModel
from PIL import Image

from minivdit import solvers
from minivdit.conditioning import best_output_size, i2v_condition, i2v_size, ti2v_image
from minivdit.guidance import Guidance
from minivdit.pipeline import SampleConfig, WanPipeline, detect_preset, guidance_per_expert
from minivdit.wan import PRESETS, find_experts, from_diffusers, load_wan
from minivdit.wan_vae import load_wan_vae

from test_wan import write_layouts  # noqa: E402 (tests/ is on sys.path under pytest)

TI2V = dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=4, text_dim=32, freq_dim=256,
            in_channels=48, out_channels=48, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads",
            cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024)  # = preset wan2.2-ti2v-tiny
A14B = dict(TI2V, in_channels=16, out_channels=16)  # = each expert of wan2.2-t2v-a14b-tiny
I2V = dict(TI2V, in_channels=36, out_channels=16)  # = each expert of wan2.2-i2v-a14b-tiny


def reference(cfg: dict, seed=0) -> WanTransformer3DModel:
    """A diffusers DiT with every parameter randomized (modulation tables and norm weights are not left at init)."""
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def native(ref) -> dict:
    return {from_diffusers(k): v.contiguous() for k, v in ref.state_dict().items()}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def context(text_dim, seed=2):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(2, 512, text_dim, generator=g)
    ctx[0, 9:], ctx[1, 4:] = 0, 0  # [cond, uncond] prompts of 9 and 4 tokens, zero-padded
    return ctx


def scheduler(shift):
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                   solver_order=2, solver_type="bh2", lower_order_final=True)


def run_for(latent_shape, steps, shift, stride):
    _, _, f, h, w = latent_shape
    return SampleConfig("unused", frames=(f - 1) * 4 + 1, height=h * stride, width=w * stride, steps=steps,
                        shift=shift)


# --- TI2V-5B: image sizing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("w,h,want", [(1920, 1080, (1248, 704)), (1080, 1920, (704, 1248)), (800, 600, (1088, 800)),
                                      (1024, 1024, (960, 928))])
def test_best_output_size_official_examples(w, h, want):
    """models.md §2.10: the official function's outputs (W, H) at the default area 704 x 1280, stride 32."""
    assert best_output_size(w, h, 32, 32, 704 * 1280) == want


def test_ti2v_image_preprocessing():
    """Resize by the larger scale (LANCZOS), centre crop, [-1, 1]: a 1920 x 1080 image becomes (3, 704, 1248)."""
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(1080, 1920, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(pixels)
    x = ti2v_image(img, 704, 1280)
    assert x.shape == (3, 704, 1248) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1
    # scale = max(1248/1920, 704/1080) = 0.6519; resized to 1252 x 704, cropped 2 px left and right
    ref = img.resize((round(1920 * 704 / 1080), 704), Image.LANCZOS).crop((2, 0, 1250, 704))
    want = torch.from_numpy(__import__("numpy").asarray(ref).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(x, want, atol=1e-6)
    assert i2v_size(1920, 1080, 720 * 1280) == (720, 1280)
    with pytest.raises(ValueError, match="does not fit an area"):  # the official function divides by zero here
        best_output_size(1920, 1080, 32, 32, 32 * 32)


# --- TI2V-5B: the DiT with per-token timesteps -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti2v")
    ref = reference(TI2V)
    write_layouts(ref, root)
    return ref, root


@pytest.mark.parametrize("layout", ["native", "diffusers"])
def test_ti2v_forward_per_token_timesteps(ti2v, layout):
    """Frame-0 tokens at t = 0, the rest at t = 700 / 300 per row: (B, L) timesteps, as TI2V image-to-video."""
    ref, root = ti2v
    model, preset, detected = load_wan(root / layout)
    assert (preset, detected) == ("wan2.2-ti2v-tiny", layout)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 48, 3, 6, 8, generator=g)
    n = 3 * 4  # tokens per latent frame
    t = torch.tensor([[700], [300]]).expand(2, 3 * n).clone()
    t[:, :n] = 0
    ctx = context(32)
    with torch.no_grad():
        want = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx).sample
        got = model(x, t, ctx)
        batch_t = model(x, torch.tensor([700, 300]), ctx)
    err = rel_err(got, want)
    print(f"TI2V forward, per-token t, {layout}: max|diff|/max|ref| = {err:.2e}")
    assert err <= 1e-4
    assert rel_err(batch_t, want) > 1e-2  # frame-0 t = 0 matters: the batch-t path is far from it


# --- TI2V-5B: whole loops ----------------------------------------------------------------------------------------


def ti2v_pipe(root):
    model, preset, _ = load_wan(root / "native")
    return WanPipeline(model, None, None, None, preset, {})


def test_ti2v_text_to_video_loop_matches_diffusers(ti2v):
    """3 steps of TI2V text-to-video vs diffusers WanPipeline(expand_timesteps=True): every token at t, (B, L)."""
    ref, root = ti2v
    steps, shift, scale = 3, 5.0, 5.0
    latents = torch.randn(1, 48, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    ctx = context(32)
    sch = scheduler(shift)
    want = DiffusersWanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sch, transformer=ref,
                                expand_timesteps=True)(
        prompt_embeds=ctx[:1], negative_prompt_embeds=ctx[1:], height=4 * 8, width=6 * 8, num_frames=9,
        num_inference_steps=steps, guidance_scale=scale, latents=latents.clone(), output_type="latent",
        return_dict=False)[0]
    pipe = ti2v_pipe(root)
    seen = []
    orig = pipe.model.forward
    pipe.model.forward = lambda x, t, *a, **k: (seen.append(t), orig(x, t, *a, **k))[1]
    sigmas = solvers.diffusers_unipc_sigmas(steps, shift)
    assert torch.allclose(sigmas.float(), sch.sigmas.float(), rtol=0, atol=1e-7)
    got = pipe.sample(run_for(latents.shape, steps, shift, 16), Guidance(guidance_scale=scale), context=ctx,
                      sigmas=sigmas, x=latents, progress=False)
    err = rel_err(got, want)
    print(f"TI2V t2v 3-step loop: max|diff|/max|ref| = {err:.2e}")
    assert err <= 1e-4
    assert seen[0].shape == (2, 3 * 2 * 3) and (seen[0] == 999).all()  # per-token timesteps, all at t


def tiny_vae22(seed=5):
    """A diffusers Wan2.2 VAE (z 48, patch 2, stride 4 x 16 x 16), tiny, seeded, with non-trivial latent stats."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=16, decoder_base_dim=16, z_dim=48, is_residual=True, patch_size=2,
                           in_channels=12, out_channels=12, scale_factor_spatial=16,
                           latents_mean=(0.1 * torch.randn(48)).tolist(),
                           latents_std=(0.05 + 0.1 * torch.rand(48)).tolist()).eval()
    return vae


def ti2v_i2v_reference(ref, image, latents, ctx, steps, shift, scale):
    """diffusers WanImageToVideoPipeline(expand_timesteps=True) with its own tiny Wan2.2 VAE; returns (latent, z0)."""
    vae = tiny_vae22()
    sch = scheduler(shift)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sch, transformer=ref,
                                   expand_timesteps=True)
    _, _, f, h, w = latents.shape
    want = pipe(image=(image[None] + 1) / 2, prompt_embeds=ctx[:1], negative_prompt_embeds=ctx[1:], height=h * 16,
                width=w * 16, num_frames=(f - 1) * 4 + 1, num_inference_steps=steps, guidance_scale=scale,
                latents=latents.clone(), output_type="latent", return_dict=False)[0]
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z0 = (vae.encode(image[None, :, None]).latent_dist.mode() - mean) / std  # (1, 48, 1, h, w)
    return want, z0, sch


def official_form_loop(ref, z0, latents, ctx, steps, shift, guidance):
    """The official `textimage2video.py` i2v loop written with diffusers parts: latent frame 0 := z0 at the start
    and after every scheduler step, frame-0 tokens at t = 0, the guidance combine on the re-imposed latent."""
    sch = scheduler(shift)
    sch.set_timesteps(steps)
    mask = torch.ones_like(latents)
    mask[:, :, 0] = 0
    x, state = (1 - mask) * z0 + mask * latents, {}
    for i, t in enumerate(sch.timesteps):
        ts = (mask[0, 0][:, ::2, ::2] * t).flatten()[None]
        with torch.no_grad():
            c, u = (ref(hidden_states=x, timestep=ts, encoder_hidden_states=e).sample for e in (ctx[:1], ctx[1:]))
        v = guidance.combine({"cond": c, "uncond": u}, x, sch.sigmas[i].item(), i, state)
        x = (1 - mask) * z0 + mask * sch.step(v, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("guidance", ["cfg", "apg"])
def test_ti2v_image_to_video_loop_matches_diffusers(ti2v, guidance):
    """3 steps of TI2V image-to-video vs diffusers WanImageToVideoPipeline(expand_timesteps=True), with diffusers'
    own tiny Wan2.2 VAE encoding the image; its normalized latent is handed to minivdit as first_frame.

    diffusers blends only the model input and replaces frame 0 at the end; minivdit pins frame 0 in the solver
    state (official form). For CFG (element-wise) the two agree. For APG, whose x0 = x - sigma v uses x, they do
    not: there minivdit must equal the official form (`official_form_loop`) and differ from diffusers'."""
    ref, root = ti2v
    steps, shift, scale = 3, 5.0, 5.0
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 48, 3, 4, 6, generator=g)
    image = torch.rand(3, 64, 96, generator=g) * 2 - 1
    ctx = context(32)
    want, z0, sch = ti2v_i2v_reference(ref, image, latents, ctx, steps, shift, scale)
    pipe = ti2v_pipe(root)
    sigmas = solvers.diffusers_unipc_sigmas(steps, shift)
    assert torch.allclose(sigmas.float(), sch.sigmas.float(), rtol=0, atol=1e-7)
    seen_t, seen_x = [], []
    orig = pipe.model.forward
    pipe.model.forward = lambda x, t, *a, **k: (seen_t.append(t), seen_x.append(x[:, :, :1]), orig(x, t, *a, **k))[2]
    method = Guidance(guidance_scale=scale) if guidance == "cfg" else \
        Guidance(method="apg", guidance_scale=scale, apg_norm_threshold=0.0)
    got = pipe.sample(run_for(latents.shape, steps, shift, 16), method, context=ctx, sigmas=sigmas, x=latents,
                      progress=False, first_frame=z0)
    err = rel_err(got, want)
    print(f"TI2V i2v 3-step loop ({guidance}): max|diff|/max|ref| = {err:.2e}")
    if guidance == "cfg":
        assert err <= 1e-4
    else:  # APG's x0 sees the pinned frame 0 here and diffusers' drifting one there: frames >= 1 differ ...
        assert err > 1e-3
        official = official_form_loop(ref, z0, latents, ctx, steps, shift, method)  # ... and the official form agrees
        err = rel_err(got, official)
        print(f"TI2V i2v 3-step loop (apg) vs the official re-impose form: max|diff|/max|ref| = {err:.2e}")
        assert err <= 1e-4
    n = 2 * 3
    assert all((t[:, :n] == 0).all() and (t[:, n:] > 0).all() for t in seen_t)  # frame-0 tokens at t = 0
    assert all(torch.equal(x0, z0.expand(2, -1, -1, -1, -1)) for x0 in seen_x)  # model input frame 0 = z0
    assert torch.equal(got[:, :, :1], z0)


def test_ti2v_sizes_and_conditions_are_checked(ti2v):
    pipe = ti2v_pipe(ti2v[1])
    with pytest.raises(ValueError, match="multiple of 32 \\(VAE stride 16 x patch 2\\)"):
        pipe.sample(SampleConfig("x", frames=5, height=48, width=64, steps=2), Guidance(), context=context(32))
    z0 = torch.zeros(1, 48, 1, 2, 2)
    with pytest.raises(ValueError, match="first_frame has shape"):
        pipe.sample(SampleConfig("x", frames=5, height=64, width=64, steps=2), Guidance(), context=context(32),
                    first_frame=z0[:, :16])
    with pytest.raises(ValueError, match="no concatenated image condition"):
        pipe.sample(SampleConfig("x", frames=5, height=64, width=64, steps=2), Guidance(), context=context(32),
                    concat=torch.zeros(1, 20, 2, 4, 4))


# --- A14B: two experts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,high_steps,last_high,first_low", [("wan2.2-t2v-a14b", 26, 877, 865),
                                                                  ("wan2.2-i2v-a14b", 15, 902, 892)])
def test_a14b_presets_switch_where_the_official_scheduler_does(name, high_steps, last_high, first_low):
    """models.md §2.11 (RUN with the official scheduler): on the official grid at the preset's steps and shift, the
    high-noise expert runs `high_steps` steps, the last at t = last_high, then the low-noise one from first_low."""
    p = PRESETS[name]
    pipe = WanPipeline(None, None, None, None, name, {}, experts={"high": None, "low": None})
    ts = solvers.timestep(solvers.wan_unipc_sigmas(p.steps, p.shift)[:-1]).tolist()
    names = [pipe.expert_for(t) for t in ts]
    assert names == ["high"] * high_steps + ["low"] * (p.steps - high_steps)
    assert (ts[high_steps - 1], ts[high_steps]) == (last_high, first_low)


SWITCH_STEP = 2  # 4 steps, shift 5, diffusers grid: timesteps 999, 937 (high) | 833, 625 (low) at boundary 875 / 900


def a14b_loop_reference(high, low, ctx, latents, steps, shift, scales, boundary_ratio, image=None, vae=None):
    sch = scheduler(shift)
    kw = dict(tokenizer=None, text_encoder=None, scheduler=sch, transformer=high, transformer_2=low,
              boundary_ratio=boundary_ratio)
    _, _, f, h, w = latents.shape
    args = dict(prompt_embeds=ctx[:1], negative_prompt_embeds=ctx[1:], height=h * 8, width=w * 8,
                num_frames=(f - 1) * 4 + 1, num_inference_steps=steps, guidance_scale=scales[0],
                guidance_scale_2=scales[1], latents=latents.clone(), output_type="latent", return_dict=False)
    if image is None:
        pipe = DiffusersWanPipeline(vae=None, **kw)
    else:
        pipe = WanImageToVideoPipeline(vae=vae, **kw)
        args["image"] = (image[None] + 1) / 2  # diffusers takes image tensors in [0, 1] and maps them to [-1, 1]
    return pipe(**args)[0], sch


def expert_loaders(high, low, root, preset, log=None):
    """{'high', 'low'} loaders of minivdit experts from native files written from the references."""
    from safetensors.torch import save_file
    paths = {}
    for name, ref in (("high", high), ("low", low)):
        (root / name).mkdir(exist_ok=True)
        save_file(native(ref), root / name / "diffusion_pytorch_model.safetensors")
        paths[name] = root / name

    def loader(name):
        def load():
            if log is not None:
                log(name)
            return load_wan(paths[name], preset=preset)[0]
        return load
    return {name: loader(name) for name in paths}


@pytest.fixture(scope="module")
def t2v_experts():
    high, low = reference(A14B, seed=10), reference(A14B, seed=11)
    return high, low


def test_a14b_t2v_loop_matches_diffusers(t2v_experts, tmp_path):
    """4 steps of T2V-A14B vs diffusers WanPipeline(transformer=high, transformer_2=low, boundary_ratio=0.875),
    guidance_scale 4 (high) / guidance_scale_2 3 (low): the expert switches at step SWITCH_STEP = 2 (t 937 -> 833)."""
    high, low = t2v_experts
    steps, shift = 4, 5.0
    latents = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(6))
    ctx = context(32)
    want, sch = a14b_loop_reference(high, low, ctx, latents, steps, shift, (4.0, 3.0), 0.875)
    timesteps = solvers.timestep(solvers.diffusers_unipc_sigmas(steps, shift)[:-1]).tolist()
    assert timesteps == sch.timesteps.tolist() == [999, 937, 833, 625]
    pipe = WanPipeline(None, None, None, None, "wan2.2-t2v-a14b-tiny", {},
                       experts=expert_loaders(high, low, tmp_path, "wan2.2-t2v-a14b-tiny"))
    preset = PRESETS["wan2.2-t2v-a14b-tiny"]
    guidance = guidance_per_expert(preset, Guidance())
    assert {k: g.guidance_scale for k, g in guidance.items()} == {"high": 4.0, "low": 3.0}
    got = pipe.sample(run_for(latents.shape, steps, shift, 8), guidance, context=ctx,
                      sigmas=solvers.diffusers_unipc_sigmas(steps, shift), x=latents, progress=False)
    err = rel_err(got, want)
    print(f"T2V-A14B 4-step loop, switch at step {SWITCH_STEP}: max|diff|/max|ref| = {err:.2e}")
    assert err <= 1e-4
    assert pipe.expert_steps == ["high"] * SWITCH_STEP + ["low"] * (steps - SWITCH_STEP)
    assert pipe.loads == ["high", "low"]


@pytest.mark.parametrize("layout", ["native", "diffusers"])
def test_a14b_layouts_are_found_and_detected(t2v_experts, tmp_path, layout):
    high, low = t2v_experts
    from safetensors.torch import save_file
    if layout == "diffusers":
        high.save_pretrained(tmp_path / "transformer")
        low.save_pretrained(tmp_path / "transformer_2")
        want = {"high": tmp_path / "transformer", "low": tmp_path / "transformer_2"}
    else:
        for name, ref in (("high_noise_model", high), ("low_noise_model", low)):
            (tmp_path / name).mkdir()
            save_file(native(ref), tmp_path / name / "diffusion_pytorch_model.safetensors")
        want = {"high": tmp_path / "high_noise_model", "low": tmp_path / "low_noise_model"}
    experts = find_experts(tmp_path)
    assert experts == want
    assert detect_preset({"experts": experts, "transformer": experts["high"]}) == "wan2.2-t2v-a14b-tiny"
    m = load_wan(experts["low"], preset="wan2.2-t2v-a14b-tiny")[0]
    assert torch.equal(m.head.modulation, low.scale_shift_table)


def test_only_one_expert_resident(t2v_experts, tmp_path):
    """The high expert is released (no reference left) before the low expert's loader runs; keep_experts keeps both
    and loads each once over two runs."""
    high, low = t2v_experts
    alive = {}

    def log(name):
        if name == "low":
            alive["high at low load"] = alive["high"]() is not None
    loaders = expert_loaders(high, low, tmp_path, "wan2.2-t2v-a14b-tiny", log)

    def tracked_high():
        m = loaders["high"]()
        alive["high"] = weakref.ref(m)
        return m
    pipe = WanPipeline(None, None, None, None, "wan2.2-t2v-a14b-tiny", {},
                       experts={"high": tracked_high, "low": loaders["low"]})
    run = SampleConfig("x", frames=5, height=32, width=32, steps=4, shift=5.0)
    pipe.sample(run, Guidance(), context=context(32), sigmas=solvers.diffusers_unipc_sigmas(4, 5.0), progress=False)
    assert alive["high at low load"] is False
    assert list(pipe.resident) == ["low"] and pipe.loads == ["high", "low"]

    keep = WanPipeline(None, None, None, None, "wan2.2-t2v-a14b-tiny", {}, experts=loaders, keep_experts=True)
    for _ in range(2):
        keep.sample(run, Guidance(), context=context(32), sigmas=solvers.diffusers_unipc_sigmas(4, 5.0),
                    progress=False)
    assert sorted(keep.resident) == ["high", "low"] and keep.loads == ["high", "low"]


def test_i2v_a14b_loop_matches_diffusers(tmp_path):
    """4 steps of I2V-A14B (boundary 0.9, scales 3.5 / 2.5) vs diffusers WanImageToVideoPipeline: minivdit builds
    the 36-channel input itself, y = [mask, latent of [image, 0, ...]] from its own Wan2.1 VAE loaded from the
    diffusers VAE's weights (conditioning.i2v_condition); diffusers does the same with its VAE."""
    from test_wan_vae import make_reference

    high, low = reference(I2V, seed=20), reference(I2V, seed=21)
    vae = make_reference(8)
    vae.save_pretrained(tmp_path / "vae")
    steps, shift = 4, 5.0
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 16, 3, 4, 6, generator=g)
    image = torch.rand(3, 32, 48, generator=g) * 2 - 1
    ctx = context(32)
    want, sch = a14b_loop_reference(high, low, ctx, latents, steps, shift, (3.5, 2.5), 0.9, image=image, vae=vae)
    ours_vae = load_wan_vae(tmp_path / "vae")
    y = i2v_condition(ours_vae, image, frames=9)
    assert y.shape == (1, 20, 3, 4, 6) and (y[:, :4, 0] == 1).all() and (y[:, :4, 1:] == 0).all()
    pipe = WanPipeline(None, None, None, None, "wan2.2-i2v-a14b-tiny", {},
                       experts=expert_loaders(high, low, tmp_path, "wan2.2-i2v-a14b-tiny"))
    guidance = {"high": Guidance(guidance_scale=3.5), "low": Guidance(guidance_scale=2.5)}
    got = pipe.sample(run_for(latents.shape, steps, shift, 8), guidance, context=ctx,
                      sigmas=solvers.diffusers_unipc_sigmas(steps, shift), x=latents, progress=False, concat=y)
    err = rel_err(got, want)
    print(f"I2V-A14B 4-step loop, 36-channel input, switch at step {SWITCH_STEP}: max|diff|/max|ref| = {err:.2e}")
    assert err <= 1e-4
    assert pipe.expert_steps == ["high"] * SWITCH_STEP + ["low"] * (steps - SWITCH_STEP)
    with pytest.raises(ValueError, match="image-to-video: pass concat"):
        pipe.sample(run_for(latents.shape, steps, shift, 8), guidance, context=ctx, progress=False)


# --- guidance methods on Wan2.2 ----------------------------------------------------------------------------------


def test_branches_equal_separate_passes_with_per_token_timesteps(ti2v):
    """Shared-prefix branches copy their row's per-token timesteps: batched == one pass per branch (TI2V, t (B, L))."""
    from minivdit.interventions import Perturb, Steer, Zero

    model, _, _ = load_wan(ti2v[1] / "native")
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 48, 3, 4, 6, generator=g)
    t = torch.tensor([[600], [600]]).expand(2, 18).clone()
    t[:, :6] = 0
    ctx = context(32)
    steer = Perturb(steer=Steer(block=0, dims=(3,), alpha=3.0, p=12))
    kids = ((0, Perturb(steer=steer.steer, zero=Zero(1, (3, 7)))), (1, Perturb(steer=steer.steer,
                                                                                skip=frozenset({2}))))
    with torch.no_grad():
        got = model(x, t, ctx, steer, branches=kids)
        want = [model(x, t, ctx, steer)] + [model(x[r:r + 1], t[r:r + 1], ctx[r:r + 1], p) for r, p in kids]
    assert torch.allclose(got, torch.cat(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["stas", "dg", "stg", "cfg-zero*", "apg"])
def test_guidance_methods_run_on_ti2v_image_to_video(ti2v, method):
    """Every method runs with TI2V's pinned first frame; it changes frames >= 1 and never the image frame.

    STAS steers F0 too when F0 is the given image (see WanPipeline.sample): its own prediction is discarded, so
    the image is never altered, but its tokens stay keys of every other token, which is what STAS acts on."""
    from minivdit.pipeline import guidance_for

    pipe = ti2v_pipe(ti2v[1])
    preset = PRESETS["wan2.2-ti2v-tiny"]
    g = torch.Generator().manual_seed(9)
    z0 = torch.randn(1, 48, 1, 4, 4, generator=g)
    x = torch.randn(1, 48, 3, 4, 4, generator=g)
    run = SampleConfig("x", frames=9, height=64, width=64, steps=4, shift=5.0)
    kw = dict(context=context(32), x=x, progress=False, first_frame=z0)
    base = pipe.sample(run, guidance_for(preset, "cfg"), **kw)
    guided = guidance_for(preset, "cfg" if method == "stas" else method, stas=method == "stas")
    out = pipe.sample(run, guided, **kw)
    assert torch.equal(out[:, :, :1], z0) and torch.equal(base[:, :, :1], z0)
    assert torch.isfinite(out).all() and rel_err(out, base) > 1e-4


def test_stas_on_the_image_frame_only_still_steers(ti2v):
    """STAS restricted to F0 (tokens='first') changes the video although F0 is the pinned image: F0 is steered."""
    from minivdit.interventions import Steer

    pipe = ti2v_pipe(ti2v[1])
    g = torch.Generator().manual_seed(10)
    z0 = torch.randn(1, 48, 1, 4, 4, generator=g)
    x = torch.randn(1, 48, 3, 4, 4, generator=g)
    run = SampleConfig("x", frames=9, height=64, width=64, steps=2, shift=5.0)
    kw = dict(context=context(32), x=x, progress=False, first_frame=z0)
    base = pipe.sample(run, Guidance(), **kw)
    steered = pipe.sample(run, Guidance(stas=Steer(block=1, dims=(3,), alpha=4.0, tokens="first"), stas_steps=2), **kw)
    assert torch.equal(steered[:, :, :1], z0) and rel_err(steered, base) > 1e-4


def test_a14b_guidance_per_expert(t2v_experts, tmp_path):
    """A14B: no STAS / DG settings in the preset (asking errors, pointing to analyze.py); with channels given,
    STAS steers only the experts named, and each expert keeps its own scale; STG's shared-prefix branch runs on
    both experts."""
    from minivdit.pipeline import guidance_for

    high, low = t2v_experts
    preset = PRESETS["wan2.2-t2v-a14b"]
    assert not preset.stas and not preset.dg
    for kw in (dict(stas=True), dict(method="dg")):
        with pytest.raises(ValueError, match="samplers/analyze.py"):
            guidance_for(preset, **kw)
    tiny = PRESETS["wan2.2-t2v-a14b-tiny"]
    only_high = guidance_for(tiny, stas=True, stas_dims=(3,), stas_block=1, stas_steps=4, steer=("high",))
    assert only_high["high"].stas is not None and only_high["low"].stas is None
    assert (only_high["high"].guidance_scale, only_high["low"].guidance_scale) == (4.0, 3.0)
    pipe = WanPipeline(None, None, None, None, "wan2.2-t2v-a14b-tiny", {},
                       experts=expert_loaders(high, low, tmp_path, "wan2.2-t2v-a14b-tiny"), keep_experts=True)
    run = SampleConfig("x", frames=5, height=32, width=32, steps=4, shift=5.0)
    sigmas = solvers.diffusers_unipc_sigmas(4, 5.0)
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(11))
    kw = dict(context=context(32), sigmas=sigmas, x=x, progress=False)
    base = pipe.sample(run, guidance_for(tiny), **kw)
    both = pipe.sample(run, guidance_for(tiny, stas=True, stas_dims=(3,), stas_block=1, stas_steps=4), **kw)
    high_only = pipe.sample(run, only_high, **kw)
    assert rel_err(both, base) > 1e-4 and rel_err(high_only, base) > 1e-4 and rel_err(both, high_only) > 1e-4
    stg = pipe.sample(run, guidance_for(tiny, "stg"), **kw)
    assert pipe.expert_steps == ["high", "high", "low", "low"] and rel_err(stg, base) > 1e-4
    for method, extra in (("dg", dict(dg_dims=(3,), dg_block=1)), ("cfg-zero*", {}), ("apg", {})):
        out = pipe.sample(run, guidance_for(tiny, method, **extra), **kw)
        assert torch.isfinite(out).all() and rel_err(out, base) > 1e-4, method
    assert pipe.loads == ["high", "low"]  # keep_experts: each loaded once over all these runs
