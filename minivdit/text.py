"""Text encoding: umt5-xxl (Wan) and T5-v1.1-xxl (CogVideoX) through transformers, prompt cleaning, pad/trim rules.

References (read, not copied):
  Wan2.1 `wan/modules/t5.py` (native umt5 encoder, `HuggingfaceTokenizer(clean='whitespace')`),
  Wan2.1 `wan/configs/shared_config.py` (`sample_neg_prompt`, `text_len = 512`),
  diffusers `pipelines/wan/pipeline_wan.py` (`prompt_clean`, `WanPipeline._get_t5_prompt_embeds`).

Encoding (both references): clean -> tokenize to `text_len` (EOS appended, pad id 0) -> run the encoder WITH the
attention mask -> keep the first `mask.sum()` rows (EOS included) -> zero-pad back to `text_len` rows. The DiT
sees the zero rows (no cross-attention mask), so they are part of the conditioning.

CogVideoX (`encode_t5`, `load_t5_encoder`; diffusers `CogVideoXPipeline._get_t5_prompt_embeds`, models.md §3.6): no
cleaning -> tokenize padded to 226 tokens (EOS appended, pad id 0, truncated) -> run `T5EncoderModel` WITHOUT an
attention mask -> use all 226 rows as they come (pad rows are encoder outputs, not zeros).

Checkpoint layouts accepted by `load_text_encoder` (detected from the key names):
  native      `models_t5_umt5-xxl-enc-bf16.pth` (Wan names, renamed by `umt5_from_native`; no config file)
  transformers `text_encoder/` folder (config.json + safetensors, possibly sharded) or a single safetensors
              file with transformers names (ComfyUI `umt5_xxl_*.safetensors`; its `spiece_model` entry is dropped)
"""
from __future__ import annotations

import html
import io
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import ftfy
import torch
from transformers import AutoTokenizer, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from .checkpoints import CheckpointError, load_strict, read_state_dict

# Wan2.1 / Wan2.2 `shared_config.py` `sample_neg_prompt`, used when the negative prompt is "" (diffusers uses "").
NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                   "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
                   "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning (`t5.py` basic_clean + whitespace_clean; diffusers `prompt_clean`)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------------------------------------
# configs


# the encoder structure shared by umt5-xxl and T5 v1.1-xxl (gated-GELU FFN, 32 relative-position buckets), and the
# sizes of the real xxl encoders and of the tiny test ones
ENCODER = dict(relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
               dense_act_fn="gelu_new", layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0,
               eos_token_id=1, is_encoder_decoder=False)
XXL = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24)
TINY = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)


def umt5_xxl_config() -> UMT5Config:
    """google/umt5-xxl encoder as used by every Wan model (models.md §2.7): 5.68 B params."""
    return UMT5Config(vocab_size=256384, **XXL, **ENCODER)


def tiny_umt5_config(vocab_size: int) -> UMT5Config:
    """A tiny umt5 with the xxl structure (gated-gelu, per-layer relative bias) for tests and demos."""
    return UMT5Config(vocab_size=vocab_size, **TINY, **ENCODER)


def t5_v1_1_xxl_config() -> T5Config:
    """google/t5-v1_1-xxl encoder as used by CogVideoX (models.md §3.6): relative bias in block 0 only, 4.76 B
    params."""
    return T5Config(vocab_size=32128, **XXL, **ENCODER)


def tiny_t5_config(vocab_size: int) -> T5Config:
    """A tiny T5 with the v1.1-xxl structure (gated-gelu, shared relative bias) for tests and demos."""
    return T5Config(vocab_size=vocab_size, **TINY, **ENCODER)


# ----------------------------------------------------------------------------------------------------------
# checkpoints

# native Wan name inside `blocks.{i}.` -> transformers name inside `encoder.block.{i}.` (models.md §2.7)
BLOCK_RENAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",     # linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
TOP_RENAMES = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
TIED = "encoder.embed_tokens.weight"  # transformers ties it to `shared.weight`; both names are in its state dict


def umt5_from_native(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native Wan umt5 names -> `UMT5EncoderModel` names; unknown keys pass through (strict loading names them).

    The tied `encoder.embed_tokens.weight` is not added here (see `load_text_encoder`).
    """
    out = {}
    for k, v in sd.items():
        if k in TOP_RENAMES:
            out[TOP_RENAMES[k]] = v
        elif k.startswith("blocks.") and k.split(".", 2)[-1] in BLOCK_RENAMES:
            _, i, rest = k.split(".", 2)
            out[f"encoder.block.{i}.{BLOCK_RENAMES[rest]}"] = v
        else:
            out[k] = v
    return out


def umt5_to_native(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`UMT5EncoderModel` names -> native Wan names (the tied `encoder.embed_tokens.weight` is dropped): the inverse
    of `umt5_from_native`, used to write checkpoints in the official `models_t5_umt5-xxl-enc-bf16.pth` layout."""
    top = {v: k for k, v in TOP_RENAMES.items()}
    block = {v: k for k, v in BLOCK_RENAMES.items()}
    out = {}
    for k, v in sd.items():
        if k == TIED:
            continue
        if k in top:
            out[top[k]] = v
        else:
            _, _, i, rest = k.split(".", 3)  # encoder.block.{i}.<rest>
            out[f"blocks.{i}.{block[rest]}"] = v
    return out


class _View(Mapping):
    """`base` without the `drop` keys, with `extra` tensors added; tensors of `base` are read only on access."""

    def __init__(self, base: Mapping[str, torch.Tensor], drop: tuple[str, ...] = (), extra=None):
        self.base, self.extra = base, dict(extra or {})
        self.keys_ = dict.fromkeys([k for k in base if k not in drop] + list(self.extra))

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        return self.extra[key] if key in self.extra else self.base[key]

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def detect_layout(keys) -> str:
    """'native' (Wan .pth names) or 'transformers' (UMT5EncoderModel names), from the key names."""
    keys = set(keys)
    if "token_embedding.weight" in keys or any(k.startswith("blocks.") for k in keys):
        return "native"
    return "transformers"


def load_text_encoder(path: str | os.PathLike, config: UMT5Config | None = None,
                      dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> UMT5EncoderModel:
    """Load umt5 strictly from a native `.pth`, a transformers folder, or a single transformers-named file.

    config: the architecture; None reads `config.json` from a folder, else the umt5-xxl config.
    Returns the encoder in eval mode on `device`, floating weights in `dtype`. Raises `CheckpointError`
    naming the file, the layout and the missing / unexpected / mis-shaped keys.
    """
    path = Path(path)
    if config is None and path.is_dir() and (path / "config.json").exists():
        config = UMT5Config.from_json_file(path / "config.json")
    config = config or umt5_xxl_config()
    sd = read_state_dict(path)
    layout = detect_layout(sd)
    if layout == "native":
        sd = umt5_from_native(sd)
    else:
        layout = "transformers folder" if path.is_dir() else "transformers single file (ComfyUI)"
    # one embedding tensor under both tied names, converted once, so they stay one tensor after loading
    embed_key = "shared.weight" if "shared.weight" in sd else TIED if TIED in sd else None
    embed = {}
    if embed_key is not None:
        t = sd[embed_key]
        embed = dict.fromkeys(["shared.weight", TIED], t.to(dtype) if t.is_floating_point() else t)
    sd = _View(sd, drop=("spiece_model",), extra=embed)  # ComfyUI files keep the tokenizer as `spiece_model`
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    load_strict(model, sd, file=path, layout=layout, dtype=dtype)
    model.encoder.embed_tokens.weight = model.shared.weight  # re-tie: one Parameter, as transformers builds it
    return model.to(device).eval()


def load_t5_encoder(path: str | os.PathLike, config: T5Config | None = None, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str = "cpu") -> T5EncoderModel:
    """Load CogVideoX's T5 encoder strictly from a diffusers `text_encoder/` folder (config.json + safetensors, maybe
    sharded), a diffusers root holding it, or a single transformers-named safetensors file.

    config: None reads `config.json` from the folder, else the T5-v1.1-xxl config. Returns the encoder in eval mode
    on `device`, floating weights in `dtype` (diffusers' cli_demo runs it in bf16, SAT in fp32).
    """
    path = Path(path)
    if path.is_dir() and (path / "text_encoder").is_dir():
        path = path / "text_encoder"
    if config is None and path.is_dir() and (path / "config.json").exists():
        config = T5Config.from_json_file(path / "config.json")
    config = config or t5_v1_1_xxl_config()
    sd = read_state_dict(path)
    embed_key = "shared.weight" if "shared.weight" in sd else TIED if TIED in sd else None
    embed = {}
    if embed_key is not None:  # one tensor under both tied names (see load_text_encoder)
        t = sd[embed_key]
        embed = dict.fromkeys(["shared.weight", TIED], t.to(dtype) if t.is_floating_point() else t)
    sd = _View(sd, drop=("spiece_model",), extra=embed)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    load_strict(model, sd, file=path, layout="transformers folder" if path.is_dir() else "transformers single file",
                dtype=dtype)
    model.encoder.embed_tokens.weight = model.shared.weight  # re-tie
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike):
    """A local transformers tokenizer: a tokenizer folder, or a checkpoint dir holding `google/umt5-xxl/`
    (native Wan) or `tokenizer/` (diffusers). Never contacts a hub."""
    path = Path(path)
    for sub in (path, path / "google" / "umt5-xxl", path / "tokenizer"):
        if (sub / "tokenizer_config.json").exists() or (sub / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(sub, local_files_only=True)
    raise CheckpointError(f"{path}: no tokenizer here (looked for tokenizer.json / tokenizer_config.json in it, "
                          "in google/umt5-xxl/ and in tokenizer/).")


# ----------------------------------------------------------------------------------------------------------
# encoding


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file, one per line; blank lines and lines starting with '#' are skipped. Raises
    ValueError for a file with no usable line, FileNotFoundError / PermissionError for one that cannot be read."""
    lines = [s.strip() for s in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [s for s in lines if s and not s.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompt in this file (every line is blank or a # comment); write one prompt "
                         "per line")
    return prompts


def prompt_tokens(prompts: list[str], tokenizer, text_len: int, clean: bool = True,
                  encoder: str = "text encoder") -> list[int]:
    """The tokens of each prompt the encoder reads (EOS included): its token count, at most text_len. A longer
    prompt is truncated by `encode_text` / `encode_t5` (EOS kept); this warns (UserWarning) with the number of
    tokens dropped. clean: count after `clean_prompt` (Wan), as `encode_text` tokenizes."""
    counts = []
    for k, p in enumerate(prompts):
        n = len(tokenizer(clean_prompt(p) if clean else p, add_special_tokens=True).input_ids)
        if n > text_len:
            warnings.warn(f"prompt {k + 1} ({p[:40]!r}...) is {n} tokens long; the {encoder} reads {text_len}: "
                          f"truncated, its last {n - text_len} tokens are dropped", stacklevel=2)
        counts.append(min(n, text_len))
    return counts


@torch.no_grad()
def encode_text(prompts: str | list[str], tokenizer, encoder: UMT5EncoderModel, text_len: int = 512,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Prompts -> context (B, text_len, d_model): encoder output trimmed to each prompt's tokens, zero-padded.

    Row j of prompt b is the encoder output for token j for j < L_b (its token count, EOS included, at most
    text_len) and exactly 0 after. The encoder runs in its own dtype/device; the result is cast to `dtype`
    (default float32) on `device` (default: the encoder's device).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    # Official Wan pads every prompt to text_len and masks the pad keys. Masked keys do not change the real tokens'
    # outputs, so padding only to the longest prompt gives the same rows (up to float summation order) for a
    # fraction of the cost; the rows after each prompt are zeros either way.
    tokens = tokenizer([clean_prompt(p) for p in prompts], padding="longest", max_length=text_len,
                       truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    enc_device = encoder.shared.weight.device
    ids, mask = tokens.input_ids.to(enc_device), tokens.attention_mask.to(enc_device)  # (B, L), L <= text_len
    h = encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
    h = torch.where(mask[..., None].bool(), h, torch.zeros((), dtype=h.dtype, device=h.device))
    out = h.new_zeros(h.shape[0], text_len, h.shape[2])
    out[:, : h.shape[1]] = h
    return out.to(device=device or enc_device, dtype=dtype)  # (B, text_len, D)


@torch.no_grad()
def encode_t5(prompts: str | list[str], tokenizer, encoder: T5EncoderModel, text_len: int = 226,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CogVideoX prompts -> context (B, text_len, d_model), as diffusers `CogVideoXPipeline._get_t5_prompt_embeds`:
    no cleaning, padding to exactly text_len tokens (truncation keeps EOS), the encoder called on the ids alone (no
    attention mask, so pad tokens take part), every row kept. The negative prompt of diffusers' CFG is "" encoded
    this way (SAT uses zeros instead). Runs in the encoder's dtype/device; returns `dtype` on `device`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tokens = tokenizer(prompts, padding="max_length", max_length=text_len, truncation=True, add_special_tokens=True,
                       return_tensors="pt")
    enc_device = encoder.shared.weight.device
    h = encoder(tokens.input_ids.to(enc_device))[0]  # (B, text_len, D)
    return h.to(device=device or enc_device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# a tiny tokenizer for tests and the embedded default checkpoint

TINY_CORPUS = """\
A red fox runs through fresh snow in a quiet pine forest at dawn.
The camera slowly pans left across a busy city street at night, neon lights reflecting on wet asphalt.
Two cats play with a ball of yarn on a wooden floor near a sunny window.
Heavy rain falls on a lake while thunder rolls over distant mountains.
A small boat drifts on calm blue water under a clear summer sky.
An astronaut walks on the surface of the moon, dust rising with every step.
The camera zooms in on a golden retriever jumping to catch a frisbee in the park.
Waves crash against rocky cliffs as seagulls fly above the ocean.
A girl with long hair rides a bicycle down a country road lined with tall trees.
Autumn leaves swirl in the wind around an old stone bridge.
A horse gallops across a green field, its mane flowing in the breeze.
Fog rolls over the hills at sunrise, and birds begin to sing.
The drone camera flies over a snowy mountain range, revealing a frozen river below.
A chef chops vegetables quickly in a bright kitchen, steam rising from a pot.
Fireworks explode over the harbor, colorful sparks falling into the dark water.
A panda eats bamboo slowly while sitting in the shade of a tree.
Lightning flashes across a stormy purple sky above an empty desert.
The camera tracks a running cheetah chasing an antelope across the savanna.
Children build a sandcastle on the beach as the tide comes in.
A butterfly lands gently on a pink flower in a garden full of bees.
A slow motion shot of water droplets splashing into a glass of milk.
An old man reads a newspaper on a park bench while pigeons gather at his feet.
The sun sets behind a wheat field, painting the clouds orange and purple.
A train crosses a high bridge over a deep canyon, smoke trailing behind it.
Snowflakes drift past a street lamp on a cold winter evening.
A jellyfish glows softly as it floats through the deep dark sea.
The camera orbits around a dancer spinning on a stage under a single spotlight.
A dog shakes water from its fur after swimming in a muddy pond.
Hot air balloons rise over a valley at sunrise, casting long shadows on the ground.
A squirrel gathers nuts beneath an oak tree, its tail twitching nervously.
Close-up of a candle flame flickering in a dark room.
A tiger walks through tall grass, its stripes hidden among the shadows.
A crowd cheers as a soccer player kicks the ball into the goal.
A wide shot of a volcano erupting, glowing lava flowing down its slopes.
A couple walks hand in hand along a rainy boulevard holding a yellow umbrella.
Time-lapse of clouds moving quickly over a mountain village.
A robot arm assembles small parts in a clean factory.
A flock of sheep crosses a narrow road as a farmer watches.
A whale breaches the surface, spraying water high into the air.
The handheld camera follows a skateboarder rolling down a steep hill.
"""


def make_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 256):
    """Train a tiny sentencepiece unigram (pad 0, `</s>` 1, `<unk>` 2, no BOS) on `TINY_CORPUS`, offline and
    deterministically (one thread, fixed seed, no shuffling), and save it as a T5 tokenizer in `out_dir`.

    Writes `spiece.model`, `tokenizer.json`, `tokenizer_config.json`; returns the tokenizer (len = vocab_size).
    Identity normalization (no NFKC table): the saved tokenizer needs neither protobuf nor a hub.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(0)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS.splitlines()), model_writer=proto, model_type="unigram",
        vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, character_coverage=1.0,
        shuffle_input_sentence=False, normalization_rule_name="identity", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]  # pieces in id order
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "spiece.model").write_bytes(proto.getvalue())
    return tokenizer
