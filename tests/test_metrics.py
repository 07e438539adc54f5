"""Video metrics on synthetic videos with hand-computable answers: static, alternating and constant-step videos,
a known per-frame shift recovered by the flow, a copy of the baseline, the cross-/within-chunk split at the latent
boundaries of a VAE of stride 4 or 2; DINO / CLIP loading on tiny random models written here; plots; VBench export."""
import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from minivdit.metrics import (VBENCH_DIMENSIONS, cross_chunk, dense_flow, export_vbench, fidelity, frame_consistency,
                              frame_difference_energy, latent_frame, load_backbone, mean_std, plot_summary,
                              plot_transitions, split, temporal_flickering, transition_columns, video_metrics,
                              warping_error)


def textured(h, w, seed=0, blur=2.0):
    """(h, w, 3) uint8 smooth random texture (Gaussian-blurred noise, contrast stretched): what dense flow can track."""
    import cv2

    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), blur)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).round().astype(np.uint8)


def chunk_video(t=13, h=8, w=8, stride=4, seed=0):
    """(T, H, W, 3) uint8 whose frames change only where the latent frame changes (stride 4: 0 | 1-4 | 5-8 | 9-12)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(latent_frame(t - 1, stride) + 1, h, w, 3), dtype=np.uint8)
    return images[[latent_frame(j, stride) for j in range(t)]]


def shifted_video(t, h, w, dx, dy, seed=0):
    """Frame k shows a texture moved by (k dx, k dy) pixels: frame_k(y, x) = I(y - k dy, x - k dx) (crops of a
    larger image, so no wrap-around)."""
    m = 2 * (t * max(abs(dx), abs(dy)) + 2)
    big = textured(h + m, w + m, seed)
    o = m // 2
    return np.stack([big[o - k * dy:o - k * dy + h, o - k * dx:o - k * dx + w] for k in range(t)])


def as_tensor(video):
    """(T, H, W, 3) uint8 -> (3, T, H, W) float in [-1, 1] that to_uint8 maps back exactly."""
    return torch.from_numpy(video).permute(3, 0, 1, 2).double() / 255 * 2 - 1


# ----------------------------------------------------------------------------------------------------------
# layout and split


def test_latent_layout_and_cross_chunk_follow_the_stride():
    assert [latent_frame(j) for j in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]  # Wan2.1 / 2.2, CogVideoX
    assert [latent_frame(j, 2) for j in range(6)] == [0, 1, 1, 2, 2, 3]
    assert np.flatnonzero(cross_chunk(13)).tolist() == [0, 4, 8]
    assert np.flatnonzero(cross_chunk(9, stride=2)).tolist() == [0, 2, 4, 6]
    assert cross_chunk(4, stride=1).all()
    r = split([1.0, 2.0, 3.0, math.nan], [True, False, False, True])
    assert (r["all"], r["cross_chunk"], r["within_chunk"]) == (2.0, 1.0, 2.5)
    assert r["per_transition"] == [1.0, 2.0, 3.0, None]
    assert split([1.0], [False])["cross_chunk"] is None


# ----------------------------------------------------------------------------------------------------------
# flicker and frame-difference energy


def test_static_video():
    video = np.repeat(textured(48, 64)[None], 9, axis=0)
    m = video_metrics(video, flow_size=None)["columns"]
    assert m["flicker"] == m["flicker_cross"] == m["flicker_within"] == 1.0
    assert m["diff_energy"] == 0.0
    assert m["warp_error"] < 1e-3 and m["flow_mag"] < 0.05  # ~0: Farneback's residual flow on equal frames
    assert m["pixel_cos"] == pytest.approx(1.0, abs=1e-12)
    assert m["psnr_vs_cfg"] is None and m["ssim_vs_cfg"] is None  # no reference given


def test_alternating_frames_flicker_maximally():
    black, white = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    video = np.stack([black, white] * 3)  # every pixel jumps by 255 each frame
    f = temporal_flickering(video)
    assert f["per_transition"] == [0.0] * 5 and f["all"] == 0.0  # (255 - 255) / 255: the minimum score
    assert frame_difference_energy(video)["all"] == 1.0


def test_constant_steps_hand_computed():
    video = np.stack([np.full((4, 6, 3), 51 * k, np.uint8) for k in range(5)])  # 0, 51, 102, 153, 204
    f, e = temporal_flickering(video), frame_difference_energy(video)
    assert f["per_transition"] == pytest.approx([(255 - 51) / 255] * 4)  # 0.8
    assert e["per_transition"] == pytest.approx([0.2 ** 2] * 4)  # (51 / 255)^2 = 0.04
    # the float form gives the same numbers
    assert temporal_flickering(as_tensor(video))["per_transition"] == pytest.approx(f["per_transition"], abs=1e-12)


def test_split_at_latent_boundaries_for_the_given_stride():
    for stride in (4, 2):
        video = chunk_video(t=13, h=32, w=32, stride=stride)
        m = video_metrics(video, stride=stride, flow_size=None)
        c = m["columns"]
        assert m["cross"] == cross_chunk(13, stride).tolist()
        assert c["flicker_within"] == 1.0 and c["diff_energy_within"] == 0.0  # no change inside a chunk
        assert c["warp_error_within"] < 2e-3 and c["pixel_cos_within"] == pytest.approx(1.0, abs=1e-12)
        assert c["flicker_cross"] < 0.8 and c["diff_energy_cross"] > 0.05  # independent random images at the seams
        assert c["warp_error_cross"] > 0.1  # no flow explains a new random image
        n_cross = sum(m["cross"])
        assert c["flicker"] == pytest.approx((n_cross * c["flicker_cross"] + 12 - n_cross) / 12)
    # read with the wrong stride, some changing transitions count as within-chunk
    assert temporal_flickering(chunk_video(t=13, stride=2), stride=4)["within_chunk"] < 1.0


# ----------------------------------------------------------------------------------------------------------
# optical flow and warping error


def test_flow_recovers_a_known_shift():
    dx, dy = 2, 1
    video = shifted_video(5, 64, 80, dx, dy)
    flow = dense_flow(video[0].mean(axis=-1).astype(np.uint8), video[1].mean(axis=-1).astype(np.uint8))
    inner = flow[8:-8, 8:-8].reshape(-1, 2)
    assert np.abs(np.median(inner, axis=0) - [dx, dy]).max() < 1.0  # within a pixel (it is ~0.05 here)
    w = warping_error(video, size=None)
    assert w["flow_magnitude"]["per_transition"] == pytest.approx([math.hypot(dx, dy)] * 4, abs=1.0)
    mae = 1 - temporal_flickering(video)["all"]  # unwarped mean |difference|, frames in [0, 1]
    assert w["warp_error"]["all"] < 0.02 and w["warp_error"]["all"] < mae / 4
    # the strip that enters the frame (2 columns, 1 row of 64 x 80: 3.7 %) has no source in frame t: masked
    assert all(0.8 < v < 0.985 for v in w["valid_fraction"])


def test_threads_give_the_loop_results():
    video, ref = shifted_video(6, 32, 40, 1, 1), shifted_video(6, 32, 40, 1, 1, seed=1)
    assert warping_error(video, size=None, workers=1) == warping_error(video, size=None, workers=3)
    assert fidelity(video, ref, workers=1) == fidelity(video, ref, workers=3)


def test_flow_at_reduced_size_reports_full_size_pixels():
    dx, dy = 4, 2
    video = shifted_video(3, 96, 128, dx, dy)
    w = warping_error(video, size=64)
    assert w["size"] == (48, 64)
    assert w["flow_magnitude"]["all"] == pytest.approx(math.hypot(dx, dy), abs=1.0)


# ----------------------------------------------------------------------------------------------------------
# fidelity to a baseline


def test_fidelity_copy_and_known_offset():
    video = shifted_video(4, 32, 32, 1, 0)
    same = fidelity(video, video.copy())
    assert same["psnr"] == math.inf and same["ssim"] == 1.0
    ref = np.full((2, 16, 16, 3), 100, np.uint8)
    out = fidelity(ref + 10, ref)  # MSE 100 everywhere
    assert out["psnr_per_frame"] == pytest.approx([10 * math.log10(255 ** 2 / 100)] * 2)  # 28.13 dB
    c1 = (0.01 * 255) ** 2  # SSIM of two constant images: (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    assert out["ssim"] == pytest.approx((2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1), abs=1e-6)
    m = video_metrics(video, reference=video.copy(), flow_size=None)["columns"]
    assert (m["psnr_vs_cfg"], m["ssim_vs_cfg"]) == (math.inf, 1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        fidelity(video, video[:2])


# ----------------------------------------------------------------------------------------------------------
# frame consistency (pixel, custom, DINO / CLIP)


def test_frame_consistency_chunk_seams_and_tensor_input():
    video = chunk_video()
    r = frame_consistency(video)
    assert r["cross"] == [j in (0, 4, 8) for j in range(12)]
    assert r["within_chunk"] == pytest.approx(1.0, abs=1e-12)
    assert abs(r["cross_chunk"]) < 0.2  # independent random images: correlation near 0
    assert r["all"] == pytest.approx(np.mean(r["per_transition"]))
    r2 = frame_consistency(as_tensor(video))
    np.testing.assert_allclose(r2["per_transition"], r["per_transition"], atol=1e-12)


def test_frame_consistency_known_cosine_and_stride():
    # frame j = base + j * direction with mean-centred orthogonal parts: cosine has a closed form
    t, n = 5, 64
    base = torch.zeros(n, dtype=torch.float64)
    base[: n // 2], base[n // 2:] = 1, -1  # mean 0
    d = torch.zeros(n, dtype=torch.float64)
    d[0::2], d[1::2] = 1, -1  # mean 0, orthogonal to base
    frames = [0.1 * (base + 0.5 * j * d) for j in range(t)]
    video = torch.stack([f.view(1, 8, 8).expand(3, 8, 8) for f in frames], dim=1)  # (3, T, 8, 8)
    r = frame_consistency(video, stride=2)
    for j, s in enumerate(r["per_transition"]):
        a, b = 0.5 * j, 0.5 * (j + 1)
        assert s == pytest.approx((1 + a * b) / math.sqrt((1 + a * a) * (1 + b * b)), abs=1e-12)
    assert r["cross"] == [True, False, True, False]
    assert r["cross_chunk"] == pytest.approx((r["per_transition"][0] + r["per_transition"][2]) / 2)


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
    with pytest.raises(ValueError, match="at least 2"):
        temporal_flickering(video[:1])


def tiny_backbone(kind, folder, patch=None):
    """A randomly initialised model of the class the backbone loads (ViTModel for DINO, CLIPModel), saved with an
    image processor in `folder`."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    if kind == "dino":
        size, patch = 32, patch or 16
        model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   image_size=size, patch_size=patch), add_pooling_layer=False)
    else:
        size, patch = 64, patch or 32
        model = CLIPModel(CLIPConfig(
            text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=size, patch_size=patch), projection_dim=16))
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("kind", ["dino", "clip"])
def test_backbone_from_local_tiny_model(tmp_path, kind):
    model = tiny_backbone(kind, tmp_path)
    features = load_backbone(kind, tmp_path)
    video = chunk_video(t=9, h=40, w=48)
    f = features(torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255)
    assert f.shape == (9, 32 if kind == "dino" else 16)
    # the embedding equals running the saved model by hand on the processed frames (STAS: cosine of these)
    from transformers import ViTImageProcessor

    pixels = ViTImageProcessor.from_pretrained(tmp_path)(images=list(video), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        if kind == "dino":
            ref = model(pixel_values=pixels).last_hidden_state[:, 0]
        else:
            ref = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(f, ref, rtol=1e-5, atol=1e-5)
    r = frame_consistency(video, features=features)
    cos = torch.nn.functional.cosine_similarity(ref[:-1].double(), ref[1:].double(), dim=1)
    np.testing.assert_allclose(r["per_transition"], cos.numpy(), atol=1e-5)
    assert r["within_chunk"] == pytest.approx(1.0, abs=1e-6) and r["cross_chunk"] < 0.9999
    m = video_metrics(video, backbones={kind: features}, flow_size=None)["columns"]
    assert m[f"{kind}_cross"] == pytest.approx(r["cross_chunk"], abs=1e-6)


def test_backbone_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--dino .*no such folder"):
        load_backbone("dino", tmp_path / "missing")
    tiny_backbone("clip", tmp_path / "clip")
    with pytest.raises(ValueError, match="holds a 'clip' model; expected DINO ViT-B/16"):
        load_backbone("dino", tmp_path / "clip")
    tiny_backbone("dino", tmp_path / "vit8", patch=8)
    with pytest.raises(ValueError, match="patch size 8; expected DINO"):
        load_backbone("dino", tmp_path / "vit8")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_backbone("clip", tmp_path / "empty")
    tiny_backbone("dino", tmp_path / "noproc")
    (tmp_path / "noproc" / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        load_backbone("dino", tmp_path / "noproc")
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("dinov3", tmp_path / "clip")


# ----------------------------------------------------------------------------------------------------------
# summary statistics, plots, VBench export


def test_mean_std_over_seeds():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std (ddof 1)
    assert mean_std([5.0]) == (5.0, None)
    assert mean_std([math.inf, 30.0]) == (math.inf, None)
    assert mean_std([1.0, None]) == (None, None) and mean_std([]) == (None, None)
    assert transition_columns(["flicker"]) == ["flicker", "flicker_cross", "flicker_within"]


def test_plots(tmp_path):
    import matplotlib.image as mpimg

    cross = cross_chunk(9).tolist()
    curves = {m: {"flicker": list(np.linspace(0.9, 1, 8) - k * 0.01), "warp_error": [0.01 * k] * 7 + [None]}
              for k, m in enumerate(("cfg", "cfg+stas"))}
    a = plot_transitions(curves, cross, tmp_path / "t.png")
    summary = [{"method": "cfg", "flicker": 0.98, "flicker_std": 0.01, "psnr_vs_cfg": None},
               {"method": "dg", "flicker": 0.97, "flicker_std": None, "psnr_vs_cfg": 31.0, "psnr_vs_cfg_std": 0.5}]
    b = plot_summary(summary, ["flicker", "psnr_vs_cfg"], tmp_path / "s.png")
    for p in (a, b):
        img = mpimg.imread(p)  # a readable PNG with something drawn on it
        assert img.ndim == 3 and img.shape[0] > 100 and img[..., :3].std() > 0.05
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_export_vbench(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    long = "A cat/dog " + "walks " * 60  # a '/' and more than 255 bytes: not a file name as it is
    videos = []
    for k, prompt in enumerate(("a red ball rolls", long)):
        for i in range(2):
            for m in ("cfg", "cfg-zero*"):
                path = src / f"{m}{k}{i}.mp4"
                path.write_bytes(f"{m} {k} {i}".encode())
                videos.append({"method": m, "prompt": prompt, "sample": i, "path": path})
    dest = tmp_path / "vb"
    commands = export_vbench(dest, videos)
    assert sorted(p.name for p in dest.iterdir()) == ["cfg", "cfg-zerostar", "prompts.txt", "run_vbench.sh"]
    assert (dest / "cfg" / "a red ball rolls-1.mp4").read_bytes() == b"cfg 0 1"
    mapping = json.loads((dest / "cfg-zerostar" / "prompts.json").read_text())
    assert len(mapping) == 4 and set(mapping.values()) == {"a red ball rolls", long}
    for name, prompt in mapping.items():
        assert (dest / "cfg-zerostar" / name).exists() and len(name.encode()) < 255 and "/" not in name
        k, i = (0 if prompt == "a red ball rolls" else 1), int(name[-5])
        assert (dest / "cfg-zerostar" / name).read_bytes() == f"cfg-zero* {k} {i}".encode()
    assert (dest / "prompts.txt").read_text().splitlines() == ["a red ball rolls", long]
    assert len(commands) == 2 and all("vbench evaluate --mode=custom_input" in c and "temporal_flickering" in c
                                      and '--dimension "$d"; done' in c for c in commands)
    assert f"--videos_path {dest.resolve() / 'cfg'} " in commands[0]
    assert "--prompt_file" in commands[0] and commands[1] in (dest / "run_vbench.sh").read_text()
    # the script is valid bash and calls `vbench evaluate` once per dimension (a stand-in vbench echoes its arguments)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "vbench").write_text('#!/bin/sh\necho "$@"\n')
    (fake / "vbench").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    calls = subprocess.run(["bash", str(dest / "run_vbench.sh")], env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert len(calls) == 2 * len(VBENCH_DIMENSIONS) and calls[2].endswith("--dimension temporal_flickering")
    assert calls[0].startswith(f"evaluate --mode=custom_input --videos_path {dest.resolve() / 'cfg'} --prompt_file")
    with pytest.raises(FileExistsError, match="--vbench-export"):
        export_vbench(dest, videos)
