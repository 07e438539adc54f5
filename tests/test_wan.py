"""Wan DiT: parity with diffusers' WanTransformer3DModel on checkpoints written in the diffusers, native and ComfyUI
layouts; checkpoint errors; the perturbation seams of the block loop."""
import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from minivdit.checkpoints import CheckpointError, load_strict, read_state_dict
from minivdit.interventions import Perturb, Steer, Zero
from minivdit.wan import PRESETS, WanConfig, WanModel, from_diffusers, load_wan

TINY = dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=3, text_dim=32, freq_dim=256,
            in_channels=16, out_channels=16, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads",
            cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024)


def reference(cfg: dict, seed=0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but randomize the tables to exercise them
        for name, p in ref.named_parameters():
            if "scale_shift_table" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return ref


def native_state(ref) -> dict:
    """The reference weights under native Wan names; checked below to invert diffusers' own native->diffusers map."""
    return {from_diffusers(k): v.contiguous() for k, v in ref.state_dict().items()}


def write_layouts(ref, root):
    """Write the reference model as diffusers (transformer/), native (root + config.json) and ComfyUI files."""
    ref.save_pretrained(root / "diffusers" / "transformer", max_shard_size="200KB")  # sharded, with an index
    sd = native_state(ref)
    (root / "native").mkdir()
    save_file(sd, root / "native" / "diffusion_pytorch_model.safetensors")
    (root / "native" / "config.json").write_text(json.dumps({"_class_name": "WanModel"}))
    save_file({"model.diffusion_model." + k: v.half() for k, v in sd.items()}, root / "comfy_fp16.safetensors")
    return sd


def inputs(cfg, b=2, f=3, h=6, w=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg["in_channels"], f, h, w, generator=g)
    t = torch.tensor([999, 500][:b], dtype=torch.int64)
    ctx = torch.randn(b, 512, cfg["text_dim"], generator=g)
    ctx[:, 7:] = 0  # a 7-token prompt, zero-padded to 512 as the pipeline does
    return x, t, ctx


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    ref = reference(TINY)
    sd = write_layouts(ref, root)
    return ref, sd, root


def test_native_names_invert_diffusers_converter(tiny):
    ref, sd, _ = tiny
    back = convert_wan_transformer_to_diffusers(dict(sd))
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("layout", ["diffusers", "native", "comfy"])
def test_forward_parity(tiny, layout, monkeypatch):
    ref, _, root = tiny
    monkeypatch.setitem(PRESETS, "test-tiny", PRESETS["wan2.1-tiny"].__class__(
        WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=3, text_dim=32)))
    path = {"diffusers": root / "diffusers", "native": root / "native", "comfy": root / "comfy_fp16.safetensors"}
    model, preset, detected = load_wan(path[layout], dtype=torch.float32)
    assert (preset, detected) == ("test-tiny", layout)
    x, t, ctx = inputs(TINY)
    with torch.no_grad():
        want = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx).sample
        got = model(x, t, ctx)
    tol = 1e-2 if layout == "comfy" else 1e-4  # comfy weights were rounded to fp16 on the way
    if layout == "comfy":
        ref16 = reference(TINY)
        ref16.load_state_dict({k: v.half().float() for k, v in ref.state_dict().items()})
        with torch.no_grad():
            want = ref16(hidden_states=x, timestep=t, encoder_hidden_states=ctx).sample
        tol = 1e-4
    assert got.shape == want.shape == x.shape
    assert rel_err(got, want) <= tol


def test_per_token_timesteps_match_batch_timesteps(tiny):
    """Wan2.2's (B, L) timestep path equals the (B,) path when every token has the same t."""
    ref, _, root = tiny
    model = WanModel(WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=3, text_dim=32))
    model.load_state_dict(native_state(ref))
    x, t, ctx = inputs(TINY)
    L = 3 * 3 * 4
    with torch.no_grad():
        a = model(x, t, ctx)
        b = model(x, t[:, None].expand(-1, L), ctx)
        want = ref(hidden_states=x, timestep=t[:, None].expand(-1, L), encoder_hidden_states=ctx).sample
    assert rel_err(a, b) <= 1e-6
    assert rel_err(b, want) <= 1e-4


@pytest.mark.slow
def test_forward_parity_real_1_3b(tmp_path):
    cfg = dict(TINY, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096)
    ref = reference(cfg)
    write_layouts(ref, tmp_path)
    x, t, ctx = inputs(cfg, b=1, f=2, h=8, w=8)
    with torch.no_grad():
        want = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx).sample
    del ref
    for layout in ("native", "diffusers"):
        model, preset, detected = load_wan(tmp_path / layout)
        assert (preset, detected) == ("wan2.1-t2v-1.3b", layout)
        with torch.no_grad():
            got = model(x, t, ctx)
        print(f"real 1.3B forward, {layout} layout: max|diff|/max|ref| = {rel_err(got, want):.2e}")
        assert rel_err(got, want) <= 1e-4
        del model


# --- checkpoint errors -------------------------------------------------------------------------------------------


def test_missing_and_empty_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_wan(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model"):
        load_wan(tmp_path)


def test_truncated_safetensors(tiny, tmp_path):
    _, _, root = tiny
    data = (root / "native" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_wan(tmp_path, preset="wan2.1-tiny")


def test_wrong_model_names_layout_and_keys(tiny, tmp_path):
    _, sd, _ = tiny
    with pytest.raises(CheckpointError) as e:
        load_wan(tiny[2] / "native", preset="wan2.1-tiny")  # 3 blocks in the file, 4 in the preset
    msg = str(e.value)
    assert "layout detected: native" in msg and "missing keys: blocks.3." in msg
    with pytest.raises(CheckpointError, match="no preset matches"):
        load_wan(tiny[2] / "native")
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="not a Wan DiT checkpoint"):
        load_wan(tmp_path)
    bad = dict(sd)
    bad["blocks.0.ffn.0.weight"] = torch.zeros(5, 64)
    bad["extra.weight"] = torch.zeros(1)
    save_file(bad, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_wan(tmp_path, preset="wan2.1-tiny")
    assert "mis-shaped keys" in str(e.value) and "blocks.0.ffn.0.weight (5, 64)" in str(e.value)
    assert "unexpected keys: extra.weight" in str(e.value)


# --- perturbation seams ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny):
    m = WanModel(WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=3, text_dim=32)).eval()
    m.load_state_dict(native_state(tiny[0]))
    return m


def test_capture_records_every_block_output(model):
    x, t, ctx = inputs(TINY)
    seen = {}
    with torch.no_grad():
        a = model(x, t, ctx)
        b = model(x, t, ctx, Perturb(capture=lambda i, h: seen.__setitem__(i, h.clone())))
    assert torch.equal(a, b) and sorted(seen) == [0, 1, 2] and seen[0].shape == (2, 36, 64)


def test_block_output_edit_changes_only_later_blocks(model):
    x, t, ctx = inputs(TINY)
    clean, edited = {}, {}
    with torch.no_grad():
        model(x, t, ctx, Perturb(capture=lambda i, h: clean.__setitem__(i, h)))
        out = model(x, t, ctx, Perturb(zero=Zero(1, (5, 9)), capture=lambda i, h: edited.__setitem__(i, h)))
    assert torch.equal(clean[0], edited[0])
    assert (edited[1][..., [5, 9]] == 0).all()
    assert torch.equal(clean[1][..., :5], edited[1][..., :5])
    assert not torch.equal(out, model(x, t, ctx))


def test_branches_equal_separate_passes(model):
    """A branch that shares the prefix equals the same pass run on its own (shared-prefix exactness)."""
    x, t, ctx = inputs(TINY)
    steer = Perturb(steer=Steer(block=0, dims=(3,), alpha=3.0, p=10))
    kids = ((1, Perturb(steer=steer.steer, zero=Zero(1, (3, 7)))), (0, Perturb(skip=frozenset({2}))),
            (1, Perturb(steer=steer.steer, identity_attn=frozenset({1}))))
    with torch.no_grad():
        got = model(x, t, ctx, steer, branches=kids)
        want = [model(x, t, ctx, steer)] + [model(x[r:r + 1], t[r:r + 1], ctx[r:r + 1], p) for r, p in kids]
    assert got.shape[0] == 5
    assert torch.allclose(got, torch.cat(want), atol=1e-5, rtol=0)


def test_bfloat16_load_runs_close_to_float32(tiny):
    """bf16 weights (modulation, time MLP and the cross-attn LN kept fp32) give the fp32 result to bf16 precision."""
    _, _, root = tiny
    cfg = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=3, text_dim=32)
    with torch.device("meta"):
        model16 = WanModel(cfg)
    load_strict(model16, read_state_dict(root / "native"), file="native", layout="native", dtype=torch.bfloat16,
                keep_fp32=WanModel.keep_fp32)
    assert model16.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model16.blocks[0].modulation.dtype == model16.time_embedding[0].weight.dtype == torch.float32
    model32 = WanModel(cfg)
    model32.load_state_dict(read_state_dict(root / "native"))
    x, t, ctx = inputs(TINY)
    with torch.no_grad():
        got, want = model16(x, t, ctx), model32(x, t, ctx)
    assert got.dtype == torch.float32 and rel_err(got, want) <= 5e-2
