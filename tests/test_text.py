"""minivdit.text: prompt cleaning, umt5 checkpoint layouts, encoding parity with diffusers, tiny tokenizer."""
import re
import time
from types import SimpleNamespace

import pytest
import torch
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from safetensors.torch import save_file
from transformers import UMT5EncoderModel

from minivdit.checkpoints import CheckpointError
from minivdit.text import (NEGATIVE_PROMPT, clean_prompt, encode_text, load_text_encoder, load_tokenizer,
                           make_tiny_tokenizer, tiny_umt5_config, umt5_from_native,
                           umt5_xxl_config)

PROMPTS = [
    "A red fox runs through fresh snow in a quiet pine forest at dawn.",
    "",
    "  two   cats &amp;amp; a dog\n\tplay  ",
    "The drone camera flies over a snowy mountain range, revealing a frozen river below, while fog rolls "
    "over the hills at sunrise and birds begin to sing above the old stone bridge.",  # longer than TEXT_LEN
    "Qq zebra ü 猫",  # unknown pieces
]
TEXT_LEN = 32


def hf_to_native(k: str) -> str:
    """Inverse of models.md §2.7, written independently of minivdit.text."""
    top = {"shared.weight": "token_embedding.weight", "encoder.final_layer_norm.weight": "norm.weight"}
    if k in top:
        return top[k]
    i, rest = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", k).groups()
    rest = (rest.replace("layer.0.layer_norm", "norm1").replace("layer.1.layer_norm", "norm2")
            .replace("layer.0.SelfAttention.relative_attention_bias", "pos_embedding.embedding")
            .replace("layer.0.SelfAttention.", "attn.").replace("layer.1.DenseReluDense.wi_0", "ffn.gate.0")
            .replace("layer.1.DenseReluDense.wi_1", "ffn.fc1").replace("layer.1.DenseReluDense.wo", "ffn.fc2"))
    return f"blocks.{i}.{rest}"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny umt5 in float32 with every weight random (norms too, so a swapped norm would show)."""
    torch.manual_seed(0)
    m = UMT5EncoderModel(tiny_umt5_config(len(tokenizer))).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * p.shape[-1] ** -0.5)
    return m


def run(m, tokenizer):
    tok = tokenizer(PROMPTS, padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return m(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state


def hf_sd(m):
    return {k: v.clone() for k, v in m.state_dict().items() if k != "encoder.embed_tokens.weight"}


# ----------------------------------------------------------------------------------------------------------
# cleaning


@pytest.mark.parametrize("raw, clean", [
    ("  a \t\n cat   sits \n", "a cat sits"),
    ("fish &amp;amp; chips", "fish & chips"),           # html.unescape twice
    ("&amp;lt;b&amp;gt;bold", "<b>bold"),
    ("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "The Mona Lisa doesn't have eyebrows."),  # ftfy mojibake
    ("cafÃ© au lait", "café au lait"),
    ("", ""),
])
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean == prompt_clean(raw)


def test_negative_prompt():
    assert NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态，") and NEGATIVE_PROMPT.endswith("，背景人很多，倒着走")
    assert len(NEGATIVE_PROMPT.split("，")) == 28 and "JPEG压缩残留" in NEGATIVE_PROMPT
    # ftfy turns the full-width commas into ASCII ones, in both references: the text the encoder sees
    assert clean_prompt(NEGATIVE_PROMPT) == NEGATIVE_PROMPT.replace("，", ",") == prompt_clean(NEGATIVE_PROMPT)


# ----------------------------------------------------------------------------------------------------------
# checkpoint layouts


def test_native_pth_loads_strictly(model, tokenizer, tmp_path):
    native = {hf_to_native(k): v for k, v in hf_sd(model).items()}
    assert len(native) == 1 + 10 * 2 + 1  # 242 for the 24-layer xxl
    assert set(umt5_from_native(native)) == set(hf_sd(model))
    f = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(native, f)
    m = load_text_encoder(f, config=tiny_umt5_config(len(tokenizer)), dtype=torch.float32)
    assert not m.training and m.encoder.embed_tokens.weight is m.shared.weight
    assert torch.equal(run(m, tokenizer), run(model, tokenizer))

    bf = load_text_encoder(f, config=tiny_umt5_config(len(tokenizer)))  # default dtype: bf16, as official
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    assert bf.encoder.embed_tokens.weight is bf.shared.weight


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_transformers_folder(model, tokenizer, tmp_path, shard):
    kw = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path / "text_encoder", **kw)
    assert bool(list((tmp_path / "text_encoder").glob("*.index.json"))) == (shard is not None)
    m = load_text_encoder(tmp_path / "text_encoder", dtype=torch.float32)  # config from config.json
    assert m.encoder.embed_tokens.weight is m.shared.weight
    assert torch.equal(run(m, tokenizer), run(model, tokenizer))


@pytest.mark.parametrize("with_tied_key", [False, True])
def test_comfy_single_file(model, tokenizer, tmp_path, with_tied_key):
    sd = hf_sd(model)
    sd["spiece_model"] = torch.frombuffer(bytearray(b"not a tensor we load"), dtype=torch.uint8)
    if with_tied_key:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()
    save_file(sd, tmp_path / "umt5_xxl_fp32.safetensors")
    m = load_text_encoder(tmp_path / "umt5_xxl_fp32.safetensors", config=tiny_umt5_config(len(tokenizer)),
                          dtype=torch.float32)
    assert torch.equal(run(m, tokenizer), run(model, tokenizer))


def test_errors(model, tokenizer, tmp_path):
    for missing in (tmp_path / "nope.pth", tmp_path / "nope_dir", tmp_path / "nope.safetensors"):
        with pytest.raises(CheckpointError, match=re.escape(str(missing))):
            load_text_encoder(missing, config=tiny_umt5_config(len(tokenizer)))
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path)

    native = {hf_to_native(k): v for k, v in hf_sd(model).items()}
    f = tmp_path / "t5.pth"
    torch.save(native, f)
    wide = tiny_umt5_config(len(tokenizer))
    wide.d_model = 48
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(f, config=wide)
    msg = str(e.value)
    assert str(f) in msg and "native" in msg and "mis-shaped" in msg
    assert "shared.weight (256, 32) != (256, 48)" in msg and "(21 in all)" in msg  # every weight is mis-shaped

    del native["blocks.1.ffn.fc1.weight"]
    native["blocks.1.ffn.fc3.weight"] = torch.zeros(1)
    torch.save(native, f)
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(f, config=tiny_umt5_config(len(tokenizer)))
    assert "missing keys: encoder.block.1.layer.1.DenseReluDense.wi_1.weight" in str(e.value)
    assert "unexpected keys: blocks.1.ffn.fc3.weight" in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# encoding


def test_encode_text_matches_diffusers(model, tokenizer):
    ours = encode_text(PROMPTS, tokenizer, model, text_len=TEXT_LEN)
    pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=model, _execution_device=torch.device("cpu"))
    with torch.no_grad():  # as in `WanPipeline.__call__`; with grad on, SDPA picks another CPU kernel (~3e-7 rel)
        ref = WanPipeline._get_t5_prompt_embeds(pipe, PROMPTS, max_sequence_length=TEXT_LEN, dtype=torch.float32)
    assert ours.shape == ref.shape == (len(PROMPTS), TEXT_LEN, 32) and ours.dtype == torch.float32
    assert (ours - ref).abs().max() <= 1e-6 * ref.abs().max()

    lens = [min(len(tokenizer(clean_prompt(p)).input_ids), TEXT_LEN) for p in PROMPTS]
    assert lens[1] == 1 and lens[3] == TEXT_LEN and len(set(lens)) >= 4  # "" is EOS alone; one is truncated
    for row, n in zip(ours, lens):
        assert (row[n:] == 0).all() and (row[:n].abs().sum(-1) > 0).all()  # EOS row kept, the rest exactly 0
    # each prompt encoded on its own equals its row of the batch: batching and padding never change a row beyond
    # float summation order (a lone prompt runs unpadded, so SDPA may take another kernel)
    for p, row in zip(PROMPTS, ours):
        err = (encode_text(p, tokenizer, model, text_len=TEXT_LEN)[0] - row).abs().max()
        assert err <= 1e-6 * row.abs().max(), (p, err.item())


def test_encode_text_bf16_encoder_returns_float32(model, tokenizer):
    bf = UMT5EncoderModel(tiny_umt5_config(len(tokenizer))).eval()
    bf.load_state_dict(model.state_dict())
    bf = bf.to(torch.bfloat16)
    out = encode_text(PROMPTS[:2], tokenizer, bf, text_len=TEXT_LEN)
    ref = encode_text(PROMPTS[:2], tokenizer, model, text_len=TEXT_LEN)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()  # bf16 rounding only
    assert (out[1, 1:] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# tiny tokenizer


def test_tiny_tokenizer_deterministic(tmp_path):
    t0 = time.perf_counter()
    a, b = make_tiny_tokenizer(tmp_path / "a"), make_tiny_tokenizer(tmp_path / "b")
    assert time.perf_counter() - t0 < 5.0
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    la, lb = load_tokenizer(tmp_path / "a"), load_tokenizer(tmp_path / "b")
    assert len(la) == len(a) == len(b) == 256
    assert (la.pad_token_id, la.eos_token_id, la.unk_token_id, la.bos_token_id) == (0, 1, 2, None)
    for p in PROMPTS:
        ids = la(clean_prompt(p)).input_ids
        assert ids == lb(clean_prompt(p)).input_ids == a(clean_prompt(p)).input_ids
        assert ids[-1] == 1 and 1 not in ids[:-1] and 0 not in ids
    padded = la(["a cat", "the slow camera pans left"], padding="max_length", max_length=12, truncation=True)
    n = len(la("a cat").input_ids)
    assert padded.input_ids[0] == la("a cat").input_ids + [0] * (12 - n)
    assert padded.attention_mask[0] == [1] * n + [0] * (12 - n) and padded.input_ids[0][n - 1] == 1
    # unigram pieces, not characters: a sentence from the corpus takes few tokens
    assert len(la("A red fox runs through fresh snow.").input_ids) < 20


def test_load_tokenizer_from_checkpoint_dirs(tmp_path):
    make_tiny_tokenizer(tmp_path / "native" / "google" / "umt5-xxl")
    make_tiny_tokenizer(tmp_path / "diffusers" / "tokenizer")
    for d in ("native", "diffusers"):
        assert load_tokenizer(tmp_path / d)("a fox").input_ids[-1] == 1


def test_umt5_xxl_config_matches_models_md():
    with torch.device("meta"):
        m = UMT5EncoderModel(umt5_xxl_config())
    assert sum(p.numel() for p in m.parameters()) == 5_680_910_336  # models.md §2.7: 5.6809 B
    assert len(m.state_dict()) == 243  # 242 native tensors + the tied embed_tokens
    native = {hf_to_native(k): torch.empty(0) for k in m.state_dict() if k != "encoder.embed_tokens.weight"}
    assert len(native) == 242 and set(umt5_from_native(native)) | {"encoder.embed_tokens.weight"} == set(m.state_dict())
