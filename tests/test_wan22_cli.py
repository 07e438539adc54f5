"""samplers/sample.py on Wan2.2: end to end on tiny A14B checkpoints, and bad input refused with a one-line error
before any heavy work, leaving no output file."""
import json
import shutil

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from minivdit.pipeline import tiny_checkpoint
from samplers import sample

SMALL = ["--steps", "4", "--shift", "5", "--frames", "5", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("w22cli")
    c = {name: tiny_checkpoint(root / name, preset=name) for name in
         ("wan2.1-tiny", "wan2.2-ti2v-tiny", "wan2.2-t2v-a14b-tiny", "wan2.2-i2v-a14b-tiny")}
    img = root / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(img)
    (root / "not_an_image.png").write_text("hello")
    c.update(root=root, image=img)
    return c


def test_t2v_a14b_end_to_end(ckpts, tmp_path):
    out = tmp_path / "a.mp4"
    sample.main(["--ckpt", str(ckpts["wan2.2-t2v-a14b-tiny"]), "--output", str(out), *SMALL])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["preset"] == "wan2.2-t2v-a14b-tiny" and meta["expert_steps"] == ["high", "high", "low", "low"]
    assert meta["guidance_scale"] == {"high": 4.0, "low": 3.0} and meta["keep_experts"] is False
    assert np.stack([f for f in imageio.get_reader(out)]).shape == (5, 32, 32, 3)


def test_i2v_a14b_end_to_end_with_an_image(ckpts, tmp_path):
    """The image (56 x 40) takes the official area-preserving size for the run's area 32 x 32: H 32, W 48 ... or
    whatever i2v_size gives; the video has that size and the sidecar names the image."""
    from minivdit.conditioning import i2v_size
    out = tmp_path / "i.mp4"
    sample.main(["--ckpt", str(ckpts["wan2.2-i2v-a14b-tiny"]), "--image", str(ckpts["image"]), "--output", str(out),
              *SMALL])
    h, w = i2v_size(56, 40, 32 * 32)
    assert np.stack([f for f in imageio.get_reader(out)]).shape == (5, h, w, 3)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["image"].endswith("img.png") and (meta["height"], meta["width"]) == (h, w)


def test_single_expert_files_and_keep_experts(ckpts, tmp_path):
    c = ckpts["wan2.2-t2v-a14b-tiny"]
    out = tmp_path / "c.mp4"
    sample.main(["--ckpt-high", str(c / "high_noise_model" / "diffusion_pytorch_model.safetensors"),
              "--ckpt-low", str(c / "low_noise_model" / "diffusion_pytorch_model.safetensors"),
              "--vae", str(c / "Wan2.1_VAE.pth"), "--text-encoder", str(c / "models_t5_umt5-xxl-enc-bf16.pth"),
              "--tokenizer", str(c / "google" / "umt5-xxl"), "--keep-experts", "--output", str(out), *SMALL])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["keep_experts"] is True and meta["layout"] == "single files"


def bad(ckpts, tmp_path, args, match, exc=ValueError):
    out = tmp_path / "o.mp4"
    with pytest.raises(exc, match=match) as e:
        sample.main([*args, "--output", str(out)])
    assert "\n" not in str(e.value)  # one line
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_image_missing_or_unreadable(ckpts, tmp_path):
    ti2v = ["--ckpt", str(ckpts["wan2.2-ti2v-tiny"])]
    bad(ckpts, tmp_path, [*ti2v, "--image", str(tmp_path / "nope.png")], "no such file")
    bad(ckpts, tmp_path, [*ti2v, "--image", str(ckpts["root"] / "not_an_image.png")], "not a readable image")


def test_image_for_a_text_only_model(ckpts, tmp_path):
    for name in ("wan2.1-tiny", "wan2.2-t2v-a14b-tiny"):
        bad(ckpts, tmp_path, ["--ckpt", str(ckpts[name]), "--image", str(ckpts["image"])], "text-to-video model")


def test_i2v_a14b_without_image(ckpts, tmp_path):
    bad(ckpts, tmp_path, ["--ckpt", str(ckpts["wan2.2-i2v-a14b-tiny"])], "pass --image")


@pytest.mark.parametrize("args,match", [
    (["--height", "48"], "height=48: must be a positive multiple of 32 \\(VAE stride 16 x patch 2\\)"),
    (["--width", "80"], "width=80: must be a positive multiple of 32"),
    (["--frames", "8"], "4k\\+1"),
])
def test_ti2v_size_and_frames(ckpts, tmp_path, args, match):
    bad(ckpts, tmp_path, ["--ckpt", str(ckpts["wan2.2-ti2v-tiny"]), *args], match)


def test_vae_of_the_other_family_is_refused(ckpts, tmp_path):
    bad(ckpts, tmp_path, ["--ckpt", str(ckpts["wan2.2-ti2v-tiny"]), "--vae",
                          str(ckpts["wan2.1-tiny"] / "Wan2.1_VAE.pth"), "--image", str(ckpts["image"])],
        "a Wan2.1 VAE .*16 latent channels.*pass the Wan2.2 VAE")
    bad(ckpts, tmp_path, ["--ckpt", str(ckpts["wan2.1-tiny"]), "--vae",
                          str(ckpts["wan2.2-ti2v-tiny"] / "Wan2.2_VAE.pth")],
        "a Wan2.2 VAE .*48 latent channels.*pass the Wan2.1 VAE")


@pytest.mark.parametrize("image", [False, True])
def test_ti2v_end_to_end(ckpts, tmp_path, image):
    """TI2V-5B (tiny) text-to-video and image-to-video through the script, with the tiny Wan2.2 VAE: the video has
    the run's size (T2V) or the official best_output_size of the image for the run's area (I2V)."""
    out = tmp_path / "t.mp4"
    extra = ["--image", str(ckpts["image"])] if image else []
    sample.main(["--ckpt", str(ckpts["wan2.2-ti2v-tiny"]), *extra, "--output", str(out), *SMALL, "--height", "64",
              "--width", "64"])
    frames = np.stack([f for f in imageio.get_reader(out)])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["preset"] == "wan2.2-ti2v-tiny" and frames.shape[0] == 5 and frames.shape[-1] == 3
    assert frames.shape[1:3] == ((meta["height"], meta["width"]) if image else (64, 64))
    assert meta["height"] % 32 == 0 and meta["width"] % 32 == 0


def test_a14b_folder_with_one_expert_missing(ckpts, tmp_path):
    c = tmp_path / "half"
    shutil.copytree(ckpts["wan2.2-t2v-a14b-tiny"], c)
    shutil.rmtree(c / "low_noise_model")
    bad(ckpts, tmp_path, ["--ckpt", str(c)], "low_noise_model/ missing")
    bad(ckpts, tmp_path, ["--ckpt-high", str(c / "high_noise_model")], "--ckpt-high and --ckpt-low go together")


def test_experts_of_different_sizes(ckpts, tmp_path):
    c = tmp_path / "mixed"
    shutil.copytree(ckpts["wan2.2-t2v-a14b-tiny"], c)
    shutil.rmtree(c / "low_noise_model")
    shutil.copytree(ckpts["wan2.2-i2v-a14b-tiny"] / "low_noise_model", c / "low_noise_model")
    bad(ckpts, tmp_path, ["--ckpt", str(c)], "experts of different sizes")


def test_stas_on_a14b_without_channels(ckpts, tmp_path):
    bad(ckpts, tmp_path, ["--ckpt", str(ckpts["wan2.2-t2v-a14b-tiny"]), "--stas"], "samplers/analyze.py")
    bad(ckpts, tmp_path, ["--ckpt", str(ckpts["wan2.2-t2v-a14b-tiny"]), "--method", "dg"], "samplers/analyze.py")


def test_stas_on_one_a14b_expert(ckpts, tmp_path):
    """With channels given, --steer-experts picks the experts STAS steers; the sidecar records it per expert."""
    out = tmp_path / "s.mp4"
    sample.main(["--ckpt", str(ckpts["wan2.2-t2v-a14b-tiny"]), "--stas", "--stas-dims", "3", "--stas-block", "1",
              "--stas-steps", "2", "--steer-experts", "high", "--output", str(out), *SMALL])
    g = json.loads(out.with_suffix(".json").read_text())["guidance"]
    assert g["high"]["stas"]["dims"] == [3] and g["high"]["stas_steps"] == 2 and "stas" not in g["low"]  # STAS did not act there
    bad(ckpts, tmp_path, ["--ckpt", str(ckpts["wan2.2-t2v-a14b-tiny"]), "--stas", "--stas-dims", "3",
                          "--stas-block", "1", "--stas-steps", "2", "--steer-experts", "middle"], "unknown experts")
