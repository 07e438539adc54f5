"""Frame consistency on synthetic videos with known answers; massive-activation statistics (streaming == stored,
injected MA / weak-MA channels detected, positional split sizes); the analysis script end to end on the tiny model."""
import json
import math

import numpy as np
import pytest
import torch

from minivdit.analysis import frame_consistency, hf_image_features, wan_latent_frame


def chunk_video(t=13, h=8, w=8, seed=0):
    """(T, H, W, 3) uint8 whose frames change only where the latent frame changes (Wan: 0 | 1-4 | 5-8 | 9-12)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(wan_latent_frame(t - 1) + 1, h, w, 3), dtype=np.uint8)
    return images[[wan_latent_frame(j) for j in range(t)]]


def test_wan_latent_frame_layout():
    assert [wan_latent_frame(j) for j in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_frame_consistency_chunk_seams():
    video = chunk_video()
    r = frame_consistency(video)
    assert r["cross"] == [j in (0, 4, 8) for j in range(12)]
    assert r["within_chunk"] == pytest.approx(1.0, abs=1e-12)
    assert abs(r["cross_chunk"]) < 0.2  # independent random images: correlation near 0
    assert r["all"] == pytest.approx(np.mean(r["per_transition"]))
    # the same video as a (3, T, H, W) tensor in [-1, 1] gives the same numbers
    tensor = torch.from_numpy(video).permute(3, 0, 1, 2).double() / 255 * 2 - 1
    r2 = frame_consistency(tensor)
    np.testing.assert_allclose(r2["per_transition"], r["per_transition"], atol=1e-12)


def test_frame_consistency_known_cosine_and_custom_layout():
    # frame j = base + j * direction with mean-centred orthogonal parts: cosine has a closed form
    t, n = 5, 64
    base = torch.zeros(n, dtype=torch.float64)
    base[: n // 2], base[n // 2:] = 1, -1  # mean 0
    d = torch.zeros(n, dtype=torch.float64)
    d[0::2], d[1::2] = 1, -1  # mean 0, orthogonal to base
    frames = [0.1 * (base + 0.5 * j * d) for j in range(t)]
    video = torch.stack([f.view(1, 8, 8).expand(3, 8, 8) for f in frames], dim=1)  # (3, T, 8, 8)
    r = frame_consistency(video, latent_frame_of=[0, 0, 1, 1, 1])
    for j, s in enumerate(r["per_transition"]):
        a, b = 0.5 * j, 0.5 * (j + 1)
        assert s == pytest.approx((1 + a * b) / math.sqrt((1 + a * a) * (1 + b * b)), abs=1e-12)
    assert r["cross"] == [False, True, False, False]
    assert r["cross_chunk"] == pytest.approx(r["per_transition"][1])
    with pytest.raises(ValueError, match="entries"):
        frame_consistency(video, latent_frame_of=[0, 1])


def test_frame_consistency_custom_features_and_errors():
    video = chunk_video(t=9)
    calls = []

    def mean_colour(frames):  # (N, 3, H, W) in [0, 1] -> (N, 3)
        calls.append(frames.shape[0])
        assert frames.min() >= 0 and frames.max() <= 1
        return frames.mean(dim=(2, 3)) - 0.5

    r = frame_consistency(video, features=mean_colour, batch=4)
    assert calls == [4, 4, 1]
    assert r["within_chunk"] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        frame_consistency(video[:1])
    with pytest.raises(ValueError, match="uint8"):
        frame_consistency(video.astype(np.float32))


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_hf_image_features_local_tiny_model(tmp_path, kind):
    from transformers import (CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, ViTImageProcessor)

    torch.manual_seed(0)
    if kind == "dinov2":
        model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, image_size=32, patch_size=8))
    else:
        model = CLIPModel(CLIPConfig(
            text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8), projection_dim=16))
    model.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)

    features = hf_image_features(tmp_path)
    video = chunk_video(t=9, h=40, w=48)
    frames = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255
    f = features(frames)
    assert f.shape == (9, 32 if kind == "dinov2" else 16)
    # the embedding equals running the saved model by hand on the processed frames
    proc = ViTImageProcessor.from_pretrained(tmp_path)
    pixels = proc(images=list(video), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        if kind == "dinov2":
            ref = model.eval()(pixel_values=pixels).last_hidden_state[:, 0]
        else:
            ref = model.eval().visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(f, ref, rtol=1e-5, atol=1e-5)
    r = frame_consistency(video, features=features)
    assert r["within_chunk"] == pytest.approx(1.0, abs=1e-6)
    assert r["cross_chunk"] < 0.9999
    with pytest.raises(FileNotFoundError):
        hf_image_features(tmp_path / "missing")
