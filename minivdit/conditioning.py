"""Image conditioning of Wan2.2: image file -> model-sized tensor -> what the sampling loop is given.

Two forms, both arguments of the one loop (`WanPipeline.sample`):

* TI2V-5B (`first_frame`): the image's VAE latent z0 (1, 48, 1, h, w) is latent frame 0. The loop pins it there
  (model input frame 0 = z0, re-imposed after every solver step) and gives its tokens t = 0
  (official `wan/textimage2video.py` i2v; models.md §2.10).
* I2V-A14B (`concat`): y = [mask (4 ch), VAE latent of the video [image, 0, ..., 0] (16 ch)], (1, 20, F, h, w),
  concatenated to the noisy latent on the channel axis, so the model input has 16 + 4 + 16 = 36 channels
  (Wan `image2video.py`: the Wan2.1 file and a Wan2.2 fork's were read, the official Wan2.2 one was not in the
  index; diffusers `WanImageToVideoPipeline.prepare_latents`, which the tests match; models.md §2.3).

The VAE is read generically: `vae.encode(video (B, 3, T, H, W) in [-1, 1]) -> normalized latent (B, z_dim, ...)`
and `vae.z_dim`; its stride comes from the model preset until the VAE object carries it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """The TI2V output size (W, H) for an image of w x h: multiples of (dw, dh) with area about expected_area and the
    image's aspect ratio (official `wan/utils/utils.py` best_output_size, models.md §2.10).

    Two candidates, width-first and height-first rounding down; the one whose aspect ratio is closer (by
    max(r/r', r'/r)) wins, ties go to the height-first one (so a square image gives W960 x H928 at 704 x 1280).
    """
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    if min(ow // dw, oh // dh) < 1:
        raise ValueError(f"a {w} x {h} image does not fit an area of {expected_area} px in multiples of {dw} x {dh}: "
                         "raise --height / --width")
    ow1 = int(ow // dw * dw)
    oh1 = int(expected_area / ow1 // dh * dh)
    oh2 = int(oh // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw)
    r1, r2 = ow1 / oh1, ow2 / oh2
    if max(ratio / r1, r1 / ratio) < max(ratio / r2, r2 / ratio):
        return ow1, oh1
    return ow2, oh2


def open_image(path):
    """An RGB PIL image from a file; ValueError naming the file if it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--image {path}: no such file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {path}: not a readable image ({e})") from None


def to_model_range(img) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1] (torchvision to_tensor, then (x - 0.5) / 0.5)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (x - 0.5) / 0.5


def ti2v_image(img, height: int, width: int, stride: int = 32) -> torch.Tensor:
    """TI2V preprocessing (official `textimage2video.py` i2v): the output size is best_output_size for the area
    height * width; the image is resized by max(ow/iw, oh/ih) with LANCZOS (sizes rounded), centre-cropped to
    (oh, ow) and mapped to [-1, 1]. img: PIL RGB. Returns (3, oh, ow) float32; stride = VAE stride x patch (32)."""
    from PIL import Image

    iw, ih = img.size
    ow, oh = best_output_size(iw, ih, stride, stride, height * width)
    scale = max(ow / iw, oh / ih)
    img = img.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    x1, y1 = (img.width - ow) // 2, (img.height - oh) // 2
    return to_model_range(img.crop((x1, y1, x1 + ow, y1 + oh)))


def i2v_size(iw: int, ih: int, max_area: int, stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """I2V-A14B output size (H, W) for an iw x ih image (official Wan `image2video.py`): latent sizes
    sqrt(area * ratio) // stride // patch * patch with ratio = ih / iw, times the VAE stride."""
    ratio = ih / iw
    lat_h = round(math.sqrt(max_area * ratio) // stride // patch * patch)
    lat_w = round(math.sqrt(max_area / ratio) // stride // patch * patch)
    return lat_h * stride, lat_w * stride


def i2v_image(img, height: int, width: int, stride: int = 8) -> torch.Tensor:
    """I2V-A14B preprocessing: [-1, 1], then bicubic interpolation to i2v_size (no crop; the aspect ratio is kept up
    to the rounding). img: PIL RGB. Returns (3, H, W) float32."""
    h, w = i2v_size(*img.size, height * width, stride)
    x = to_model_range(img)[None]
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic")[0]


def first_frame_latent(vae, image: torch.Tensor) -> torch.Tensor:
    """TI2V: the image's normalized VAE latent z0 (1, z_dim, 1, h, w); image (3, H, W) in [-1, 1]."""
    return vae.encode(image[None, :, None].float())


def i2v_condition(vae, image: torch.Tensor, frames: int, temporal_stride: int = 4) -> torch.Tensor:
    """I2V-A14B: y = cat([mask, latent]) (1, 4 + z_dim, F_lat, h, w) for `frames` pixel frames.

    latent: vae.encode of the video [image, zeros x (frames - 1)] (B, 3, frames, H, W). mask: 1 on pixel frame 0,
    0 after; frame 0 repeated temporal_stride times so the pixel mask packs into (4, F_lat) like the latents: latent
    frame 0's four mask channels are 1, every other latent frame's are 0 (official `image2video.py` msk).
    """
    _, h, w = image.shape
    video = torch.cat([image[:, None].float(), image.new_zeros(3, frames - 1, h, w).float()], dim=1)[None]
    latent = vae.encode(video)  # (1, z_dim, F_lat, h', w')
    f_lat, hl, wl = latent.shape[2:]
    mask = torch.zeros(1, temporal_stride, f_lat, hl, wl, dtype=latent.dtype, device=latent.device)
    mask[:, :, 0] = 1
    return torch.cat([mask, latent], dim=1)
