"""CogVideoX DiT: parity with diffusers' CogVideoXTransformer3DModel (2B-style sin-cos, 5B-style RoPE, 1.5-style
patch_t = 2) on checkpoints diffusers wrote; T5 encoding parity with CogVideoXPipeline._get_t5_prompt_embeds; the
intervention seams on the joint [text | video] stream; checkpoint errors; presets."""
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline
from safetensors.torch import save_file
from transformers import T5EncoderModel, T5Tokenizer

from minivdit import wan
from minivdit.checkpoints import CheckpointError
from minivdit.cogvideox import (PRESETS, CogVideoXConfig, CogVideoXModel, diffusers_config, latent_frames,
                                load_cogvideox, rope_cos_sin)
from minivdit.interventions import Perturb, Steer, Zero
from minivdit.text import TINY_CORPUS, encode_t5, load_t5_encoder, load_tokenizer, make_tiny_tokenizer, tiny_t5_config

# diffusers constructor arguments, written out here (not taken from minivdit), for the three tiny architectures
BASE = dict(num_attention_heads=4, attention_head_dim=16, time_embed_dim=32, text_embed_dim=32, in_channels=16,
            out_channels=16, max_text_seq_length=226)
CONFIGS = {
    "2b": (dict(BASE, num_layers=3, sample_height=8, sample_width=12, sample_frames=9), "cogvideox-tiny"),
    "5b": (dict(BASE, num_layers=4, sample_height=8, sample_width=12, sample_frames=9,
                use_rotary_positional_embeddings=True), "cogvideox-tiny-rope"),
    "1.5": (dict(BASE, num_layers=3, sample_height=16, sample_width=16, sample_frames=81, patch_size_t=2,
                 patch_bias=False, use_rotary_positional_embeddings=True), "cogvideox1.5-tiny"),
}
# latent (F, H, W) per case: at the config's sample size (diffusers' stored table / arange grid) and off it
# (recomputed sin-cos table; 1.0 RoPE positions spread fractionally over the crop of the base grid)
GRIDS = {"2b": [(3, 8, 12), (2, 6, 10)], "5b": [(3, 8, 12), (3, 6, 10)], "1.5": [(4, 12, 16), (2, 16, 8)]}


def randomize(module, seed=0):
    """Every parameter random: matrices ~ fan_in^-1/2, norm weights around 1, biases ~ 0.1 (diffusers zero-inits
    nothing here, but a swapped norm or bias must show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(r * p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(0.1 * r)
    return module


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def write_checkpoint(kind, root):
    """The diffusers reference with random weights, saved as a diffusers folder (sharded for 5b) and a single file."""
    ref = randomize(CogVideoXTransformer3DModel(**CONFIGS[kind][0]).eval())
    ref.save_pretrained(root / "diffusers" / "transformer", max_shard_size="300KB" if kind == "5b" else "10GB")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, root / "single.safetensors")
    return ref


@pytest.fixture(scope="module", params=list(CONFIGS))
def ckpt(request, tmp_path_factory):
    """(kind, diffusers reference, checkpoint root) for each tiny architecture."""
    root = tmp_path_factory.mktemp(f"cog{request.param}")
    return request.param, write_checkpoint(request.param, root), root


def inputs(grid, b=2, seed=1):
    f, h, w = grid
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, 16, h, w, generator=g)  # diffusers' (B, F, C, H, W)
    t = torch.tensor([999, 37][:b])
    ctx = torch.randn(b, 226, 32, generator=g)
    return x, t, ctx


def reference(ref, x, t, ctx):
    """diffusers' prediction, with the RoPE inputs prepared as CogVideoXPipeline does."""
    rope = None
    if ref.config.use_rotary_positional_embeddings:
        pipe = SimpleNamespace(vae_scale_factor_spatial=8, transformer=ref)
        rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, x.shape[3] * 8, x.shape[4] * 8,
                                                                       x.shape[1], torch.device("cpu"))
    with torch.no_grad():
        return ref(hidden_states=x, encoder_hidden_states=ctx, timestep=t, image_rotary_emb=rope).sample


@pytest.mark.parametrize("layout", ["diffusers", "single"])
def test_forward_parity(ckpt, layout):
    kind, ref, root = ckpt
    path = root / "diffusers" if layout == "diffusers" else root / "single.safetensors"
    model, preset, detected = load_cogvideox(path, dtype=torch.float32)
    assert (preset, detected) == (CONFIGS[kind][1], "diffusers")
    for grid in GRIDS[kind]:
        x, t, ctx = inputs(grid)
        want = reference(ref, x, t, ctx)
        with torch.no_grad():
            got = model(x.transpose(1, 2), t, ctx)  # minivdit's (B, C, F, H, W)
        err = rel_err(got.transpose(1, 2), want)
        print(f"CogVideoX {kind}-style, grid {grid}, {layout}: max|diff|/max|ref| = {err:.2e}")
        assert got.dtype == torch.float32 and got.shape == x.transpose(1, 2).shape
        assert err <= 1e-4


@pytest.mark.slow
def test_forward_parity_real_2b(tmp_path):
    """The real CogVideoX-2B architecture (random weights, fp32, ~7 GB at a time): diffusers vs minivdit."""
    ref = randomize(CogVideoXTransformer3DModel(**diffusers_config(PRESETS["cogvideox-2b"].config)).eval())
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 2, 16, 8, 12, generator=g), torch.tensor([500]), torch.randn(1, 226, 4096, generator=g)
    want = reference(ref, x, t, ctx)
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="1GB")  # safetensors copies a shard while writing
    del ref
    model, preset, _ = load_cogvideox(tmp_path)
    assert preset == "cogvideox-2b"
    with torch.no_grad():
        got = model(x.transpose(1, 2), t, ctx).transpose(1, 2)
    print(f"real 2B forward: max|diff|/max|ref| = {rel_err(got, want):.2e}")
    assert rel_err(got, want) <= 1e-4


def test_real_presets_have_the_diffusers_state_dict():
    """The three real presets build exactly diffusers' keys and shapes (meta device): 736 / 1024 / 1024 tensors."""
    for name, count in (("cogvideox-2b", 736), ("cogvideox-5b", 1024), ("cogvideox1.5-5b", 1024)):
        c = PRESETS[name].config
        with torch.device("meta"):
            ref = CogVideoXTransformer3DModel(**diffusers_config(c))
            ours = CogVideoXModel(c)
        shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
        assert shapes(ours) == shapes(ref) and len(shapes(ours)) == count


def test_bfloat16_matches_diffusers_in_bfloat16(ckpt):
    """Loaded in bf16 (as cli_demo runs it), minivdit follows diffusers' precision op for op: every weight and
    activation in bf16, the timestep sinusoid and RoPE in fp32 (bitwise equal on CPU here)."""
    kind, _, root = ckpt
    ref16 = CogVideoXTransformer3DModel.from_pretrained(root / "diffusers" / "transformer", torch_dtype=torch.bfloat16)
    model16, _, _ = load_cogvideox(root / "single.safetensors", dtype=torch.bfloat16)
    assert model16.proj_out.weight.dtype == model16.transformer_blocks[0].norm1.linear.weight.dtype == torch.bfloat16
    for grid in GRIDS[kind]:
        x, t, ctx = inputs(grid)
        want = reference(ref16.eval(), x.bfloat16(), t, ctx.bfloat16()).float()  # the pipeline's bf16 latents
        with torch.no_grad():
            got = model16(x.transpose(1, 2), t, ctx).transpose(1, 2)
        print(f"CogVideoX {kind}-style bf16, grid {grid}: max|diff|/max|ref| = {rel_err(got, want):.2e}")
        assert got.dtype == torch.float32 and rel_err(got, want) <= 1e-3


# --- T5 ----------------------------------------------------------------------------------------------------------


def test_t5_encoding_matches_diffusers(tmp_path):
    tokenizer = make_tiny_tokenizer(tmp_path / "tokenizer")
    torch.manual_seed(0)
    ref = T5EncoderModel(tiny_t5_config(len(tokenizer))).eval()
    randomize(ref)
    ref.save_pretrained(tmp_path / "text_encoder")
    prompts = ["A red fox runs through fresh snow in a quiet pine forest at dawn.", "",
               "  two   cats &amp; a dog\n\tplay  ", " ".join(TINY_CORPUS.splitlines()), "Qq zebra ü 猫"]
    pipe = SimpleNamespace(tokenizer=T5Tokenizer.from_pretrained(tmp_path / "tokenizer"), text_encoder=ref)
    with torch.no_grad():  # as CogVideoXPipeline.__call__ runs it
        want = CogVideoXPipeline._get_t5_prompt_embeds(pipe, prompts, max_sequence_length=226, device="cpu",
                                                       dtype=torch.float32)
    encoder = load_t5_encoder(tmp_path, dtype=torch.float32)  # the diffusers root: finds text_encoder/
    got = encode_t5(prompts, load_tokenizer(tmp_path), encoder)
    assert got.shape == want.shape == (5, 226, 32)
    print(f"T5 (tiny) vs diffusers _get_t5_prompt_embeds: max|diff|/max|ref| = {rel_err(got, want):.2e}")
    assert rel_err(got, want) <= 1e-6
    assert got[0, 100:].abs().amax() > 0  # pad rows are encoder outputs: no mask, no trimming, no zeros
    assert encoder.encoder.embed_tokens.weight is encoder.shared.weight


# --- interventions -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["cogvideox-tiny", "cogvideox-tiny-rope", "cogvideox1.5-tiny"])
def model(request):
    """Each tiny architecture (sin-cos, RoPE, 1.5's two-frame patches), every parameter random."""
    return randomize(CogVideoXModel(PRESETS[request.param].config).eval(), seed=3)


def model_inputs(b=2, f=4, h=6, w=8):
    x, t, ctx = inputs((f, h, w), b=b)
    return x.transpose(1, 2), t, ctx


@torch.no_grad()
def test_neutral_settings_equal_the_clean_pass(model):
    x, t, ctx = model_inputs()
    clean = model(x, t, ctx)
    for p in (Perturb(), Perturb(steer=Steer(block=1, dims=())), Perturb(zero=Zero(1, ())),
              Perturb(skip=frozenset()), Perturb(identity_attn=frozenset()), Perturb(capture=lambda i, h: None)):
        assert torch.equal(model(x, t, ctx, p), clean)
    both = model(x, t, ctx, branches=((1, Perturb()),))
    assert torch.allclose(both, torch.cat([clean, clean[1:]]), atol=1e-6, rtol=0)


@torch.no_grad()
def test_interventions_change_the_output(model):
    x, t, ctx = model_inputs()
    clean = model(x, t, ctx)
    outs = [model(x, t, ctx, Perturb(steer=Steer(block=1, dims=(3, 7), alpha=a, p=20))) for a in (1.2, 4.0)]
    outs += [model(x, t, ctx, Perturb(zero=Zero(1, (3, 7)))), model(x, t, ctx, Perturb(skip=frozenset({2}))),
             model(x, t, ctx, Perturb(identity_attn=frozenset({2})))]
    for o in outs:
        assert (o - clean).abs().max() > 1e-4
    assert (outs[0] - outs[1]).abs().max() > 1e-4


@torch.no_grad()
def test_stas_changes_only_video_tokens_of_s_and_channels_m(model):
    x, t, ctx = model_inputs()
    layout = model.layout(x.shape)
    assert layout.text_len == 226 and layout.num_tokens == 226 + layout.token_frames * 3 * 4
    clean, steered = {}, {}
    steer = Steer(block=1, dims=(3, 7), alpha=1.2, p=20)
    model(x, t, ctx, Perturb(capture=lambda i, h: clean.__setitem__(i, h)))
    model(x, t, ctx, Perturb(steer=steer, capture=lambda i, h: steered.__setitem__(i, h)))
    assert torch.equal(clean[0], steered[0])
    s = layout.tokens("first+boundary", 20)
    assert s.min() >= 226  # S is video tokens, offset by the text prefix
    changed = (steered[1] != clean[1]).nonzero()
    assert set(changed[:, 1].tolist()) <= set(s.tolist()) and set(changed[:, 2].tolist()) <= {3, 7}
    assert torch.equal(steered[1][:, :226], clean[1][:, :226])  # text rows untouched
    for d in (3, 7):  # Eq. 3-5 with the per-sample max over the video tokens only
        peak = clean[1][:, 226:, d].abs().amax(dim=1, keepdim=True)
        assert torch.allclose(steered[1][:, s, d], 1.2 * peak * torch.sign(clean[1][:, s, d]), rtol=1e-6, atol=0)


@torch.no_grad()
def test_stas_peak_ignores_the_text_prefix():
    """A text token with a larger |h| in the channel does not set the STAS peak."""
    from minivdit.interventions import TokenLayout
    layout = TokenLayout(frames=2, height=2, width=3, text_len=4)
    h = torch.randn(1, layout.num_tokens, 5)
    h[0, 1, 2] = 100.0  # a text token
    out = Steer(block=0, dims=(2,), alpha=1.0, p=20)(h, layout)
    s = layout.tokens("first+boundary", 20)
    assert out[0, s, 2].abs().max() == h[0, 4:, 2].abs().max()


@torch.no_grad()
def test_stg_a_keeps_the_text_rows_of_joint_attention(model):
    attn = model.transformer_blocks[1].attn1
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 226 + 36, 64, generator=g)
    rope = rope_cos_sin((3, 3, 4), 16, (4, 6), sliced=False)  # RoPE or not, the text rows must not change
    plain, ident = attn(x, 226, rope), attn(x, 226, rope, identity=True)
    assert torch.allclose(ident[:, :226], plain[:, :226], atol=1e-6, rtol=0)  # text rows attend as usual
    assert torch.allclose(ident[:, 226:], attn.to_out[0](attn.to_v(x[:, 226:])), atol=1e-6, rtol=0)
    assert (ident[:, 226:] - plain[:, 226:]).abs().max() > 1e-3


@torch.no_grad()
def test_stg_r_equals_the_model_without_that_block(model):
    x, t, ctx = model_inputs()
    got = model(x, t, ctx, Perturb(skip=frozenset({2})))
    blocks = model.transformer_blocks
    try:
        model.transformer_blocks = torch.nn.ModuleList([b for i, b in enumerate(blocks) if i != 2])
        want = model(x, t, ctx)
    finally:
        model.transformer_blocks = blocks
    assert torch.equal(got, want)


@torch.no_grad()
def test_branches_equal_separate_passes(model):
    x, t, ctx = model_inputs()
    base = Perturb(steer=Steer(block=0, dims=(3,), alpha=3.0, p=10))
    kids = ((1, Perturb(steer=base.steer, zero=Zero(1, (3, 7)))), (0, Perturb(skip=frozenset({2}))),
            (1, Perturb(steer=base.steer, identity_attn=frozenset({1}))), (0, Perturb()))
    got = model(x, t, ctx, base, branches=kids)
    want = [model(x, t, ctx, base)] + [model(x[r:r + 1], t[r:r + 1], ctx[r:r + 1], p) for r, p in kids]
    assert got.shape[0] == 6
    assert torch.allclose(got, torch.cat(want), atol=1e-5, rtol=0)


@torch.no_grad()
def test_cogvideox15_layout_and_shape_rules():
    m = CogVideoXModel(PRESETS["cogvideox1.5-tiny"].config).eval()
    layout = m.layout((1, 16, 4, 6, 8))
    assert (layout.token_frames, layout.n, layout.patch_t) == (2, 12, 2)
    assert layout.first().tolist() == list(range(226, 238))  # F0: the first token frame = 2 latent frames
    with pytest.raises(ValueError, match="even latent frame count"):
        m(torch.zeros(1, 16, 3, 6, 8), torch.tensor([1]), torch.zeros(1, 226, 32))
    with pytest.raises(ValueError, match="exactly 226"):
        m(torch.zeros(1, 16, 4, 6, 8), torch.tensor([1]), torch.zeros(1, 100, 32))
    assert latent_frames(81, PRESETS["cogvideox1.5-5b"].config) == (22, 1)
    assert latent_frames(161, PRESETS["cogvideox1.5-5b"].config) == (42, 1)
    assert latent_frames(49, PRESETS["cogvideox-5b"].config) == (13, 0)


# --- checkpoint errors -------------------------------------------------------------------------------------------


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_cogvideox(tmp_path / "nope")
    (tmp_path / "transformer").mkdir()
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model"):
        load_cogvideox(tmp_path)
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"proj_out.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="shards listed in the index are missing"):
        load_cogvideox(tmp_path)


def test_wrong_preset_names_the_mis_shaped_key(tmp_path):
    root = tmp_path
    write_checkpoint("1.5", root)
    for path in (root / "diffusers", root / "single.safetensors"):
        with pytest.raises(CheckpointError) as e:
            load_cogvideox(path, preset="cogvideox-tiny")  # a 1.5 checkpoint forced to a 1.0 preset
        msg = str(e.value)
        assert "mis-shaped keys" in msg and "patch_embed.proj.weight (64, 128) != (64, 16, 2, 2)" in msg


def test_config_sample_size_only_matters_for_10_rope(tmp_path):
    """1.5's sample size only bounds its RoPE table (an older 1.5 config says 96x170): accepted; 1.0 RoPE positions
    depend on it: refused."""
    write_checkpoint("1.5", tmp_path / "a")
    cfg_path = tmp_path / "a" / "diffusers" / "transformer" / "config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), sample_height=12, sample_width=14)))
    assert load_cogvideox(tmp_path / "a" / "diffusers")[1] == "cogvideox1.5-tiny"
    write_checkpoint("5b", tmp_path / "b")
    cfg_path = tmp_path / "b" / "diffusers" / "transformer" / "config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), sample_height=12)))
    with pytest.raises(CheckpointError, match="sample_height=12"):
        load_cogvideox(tmp_path / "b" / "diffusers", preset="cogvideox-tiny-rope")


def test_real_15_checkpoint_forced_to_5b_preset(tmp_path):
    """The real-size case, without real weights: the header of a 1.5 file holds patch_embed.proj (3072, 128)."""
    c = PRESETS["cogvideox1.5-5b"].config
    with torch.device("meta"):
        keys = {k: tuple(v.shape) for k, v in CogVideoXModel(c).state_dict().items()}
    save_file({k: torch.empty(s if k.startswith("patch_embed.proj") or k.startswith("proj_out") else (0,))
               for k, s in keys.items()}, tmp_path / "t.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_cogvideox(tmp_path / "t.safetensors", preset="cogvideox-5b")
    assert "patch_embed.proj.weight (3072, 128) != (3072, 16, 2, 2)" in str(e.value)


def test_sat_checkpoints_are_refused(tmp_path):
    torch.save({"module": {}}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="official Hugging Face repos .* diffusers-format"):
        load_cogvideox(tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="diffusers-format"):
        load_cogvideox(tmp_path)
    save_file({"model.diffusion_model.mixins.patch_embed.proj.weight": torch.zeros(2),
               "model.diffusion_model.transformer.layers.0.attention.dense.weight": torch.zeros(2)},
              tmp_path / "sat.safetensors")
    with pytest.raises(CheckpointError, match="layout detected: sat.*diffusers-format"):
        load_cogvideox(tmp_path / "sat.safetensors")


def test_other_checkpoint_errors(tmp_path):
    root = tmp_path / "ckpt"
    ref = write_checkpoint("2b", root)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "foo.safetensors")
    with pytest.raises(CheckpointError, match="not a CogVideoX DiT checkpoint"):
        load_cogvideox(tmp_path / "foo.safetensors")
    bad = dict(sd)
    del bad["transformer_blocks.1.attn1.norm_k.bias"]
    bad["extra.weight"] = torch.zeros(1)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_cogvideox(tmp_path / "bad.safetensors", preset="cogvideox-tiny")
    assert "missing keys: transformer_blocks.1.attn1.norm_k.bias" in str(e.value)
    assert "unexpected keys: extra.weight" in str(e.value)
    save_file(dict(sd, **{"ofs_embedding.linear_1.weight": torch.zeros(2)}), tmp_path / "i2v.safetensors")
    with pytest.raises(CheckpointError, match="image-to-video"):
        load_cogvideox(tmp_path / "i2v.safetensors")
    # config.json disagreeing with the weights' preset: a 2B-style file that claims RoPE
    folder = tmp_path / "rope_claim"
    folder.mkdir()
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    cfg = json.loads((root / "diffusers" / "transformer" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, use_rotary_positional_embeddings=True)))
    with pytest.raises(CheckpointError, match="no preset matches"):
        load_cogvideox(folder)
    with pytest.raises(CheckpointError, match="use_rotary_positional_embeddings=True"):
        load_cogvideox(folder, preset="cogvideox-tiny")


# --- presets -----------------------------------------------------------------------------------------------------


def test_presets():
    assert PRESETS["cogvideox-5b"].stas == dict(dims=(1982,), block=8, alpha=1.2, p=8.0, steps=20)  # Table A3
    assert PRESETS["cogvideox-5b"].dg == dict(dims=(1982,), block=8, scale=1.0)
    assert not PRESETS["cogvideox-2b"].stas and not PRESETS["cogvideox1.5-5b"].stas
    for name in ("cogvideox-2b", "cogvideox-5b"):
        p = PRESETS[name]
        assert (p.frames, p.height, p.width, p.fps, p.steps, p.guidance_scale) == (49, 480, 720, 8, 50, 6.0)
    p = PRESETS["cogvideox1.5-5b"]
    assert (p.frames, p.height, p.width, p.fps, p.steps, p.guidance_scale) == (81, 768, 1360, 16, 50, 6.0)
    shared = ("config", "text_encoder", "steps", "guidance_scale", "frames", "height", "width", "fps", "stas", "dg",
              "stg")
    for f in shared:  # the fields the pipeline reads from a preset of either family
        assert f in wan.Preset.__dataclass_fields__ and f in type(p).__dataclass_fields__
    assert CogVideoXConfig().dim == 1920 and PRESETS["cogvideox-5b"].config.dim == 3072


def test_guidance_reads_cogvideox_presets():
    from minivdit.guidance import from_preset
    g = from_preset(PRESETS["cogvideox-5b"], "dg", stas=True)
    assert (g.guidance_scale, g.stas.dims, g.stas.block, g.stas.alpha, g.stas.p, g.stas_steps) == (6.0, (1982,), 8,
                                                                                                  1.2, 8.0, 20)
    assert (g.dg.dims, g.dg.block, g.dg_scale) == ((1982,), 8, 1.0)
    g = from_preset(PRESETS["cogvideox-5b"], "stg")
    assert (g.stg_blocks, g.stg_mode) == ((30,), "R")
    with pytest.raises(ValueError, match="no STAS settings"):
        from_preset(PRESETS["cogvideox-2b"], "cfg", stas=True)
