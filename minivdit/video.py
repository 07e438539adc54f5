"""Writing results: mp4 through imageio-ffmpeg, labelled side-by-side grids, JSON sidecars, PNG figures; all written
atomically.

Nothing is lost: an existing output is refused unless `overwrite=True`, and every file is written under a temporary
name in the same folder and renamed into place, so an interrupted run never leaves a half-written output.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check, before any heavy work, that `path` can receive an mp4 and its .json sidecar; returns it as a Path.

    Raises ValueError for a name not ending in .mp4, a path that is a folder, a file (or an unwritable folder) in
    the way of its folder; FileExistsError if it or its sidecar exists and overwrite is False. Nothing is created:
    the folder is made when the output is written (`atomic_write`)."""
    path = Path(path)
    if path.suffix != ".mp4":
        raise ValueError(f"output {path} must end in .mp4")
    for p in (path, path.with_suffix(".json")):
        if p.is_dir():
            raise ValueError(f"output {p} is a folder: give a file name, e.g. {p / 'sample.mp4'}")
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} already exists; choose another --output or pass --overwrite to replace it")
    parent = path.parent.absolute()
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"output {path}: {existing} is a file, not a folder, so the output folder cannot be made; "
                         "choose another --output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output {path}: no permission to write in {existing}; choose another --output")
    return path


def numbered(path: str | os.PathLike) -> Path:
    """The first of path, path-1, path-2, ... (same suffix) that neither exists nor has an existing .json sidecar:
    re-running a command with its default output name writes a new file instead of failing."""
    path = Path(path)
    k, p = 0, path
    while p.exists() or p.with_suffix(".json").exists():
        k += 1
        p = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return p


def umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, x -> round((x + 1) / 2 * 255)."""
    frames = ((video.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def atomic_write(path: Path, write) -> None:
    """Call write(tmp) on a temporary file in path's folder (made if missing), then rename it to path: never a
    half-written file, and an exception or interrupt (Ctrl-C, SIGTERM via cli.run) leaves no temporary file. The file
    gets the ordinary permissions of a new file (0666 less the umask, e.g. 0644), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~umask())
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int, overwrite: bool = False) -> Path:
    """Write (T, H, W, 3) uint8 frames as an H.264 mp4 at `fps` frames per second, atomically."""
    path = check_output(path, overwrite)

    def write(tmp):
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                macro_block_size=1, ffmpeg_log_level="error") as w:
            for frame in frames:
                w.append_data(frame)

    atomic_write(path, write)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (a table, a report), atomically."""
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def write_figure(path: str | os.PathLike, draw, figsize: tuple[float, float] = (9, 3.6), dpi: int = 110) -> Path:
    """Draw a matplotlib figure (Agg) with draw(fig) and save it as a PNG, atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = plt.figure(figsize=figsize)
    try:
        draw(fig)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi))
    finally:
        plt.close(fig)
    return path


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write `data` as indented JSON, atomically (the sidecar of an mp4 or a report)."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def grid(videos: list[np.ndarray], labels: list[str], cols: int | None = None) -> np.ndarray:
    """Tile equal-size (T, H, W, 3) uint8 videos side by side, each with its label drawn in a top band."""
    from PIL import Image, ImageDraw  # Pillow comes with imageio

    cols = cols or len(videos)
    t, h, w, _ = videos[0].shape
    band = 14
    rows = -(-len(videos) // cols)
    out = np.zeros((t, rows * (h + band), cols * w, 3), np.uint8)
    for k, (v, label) in enumerate(zip(videos, labels)):
        r, c = divmod(k, cols)
        tag = Image.new("RGB", (w, band))
        ImageDraw.Draw(tag).text((2, 1), label, fill=(255, 255, 255))
        y, x = r * (h + band), c * w
        out[:, y:y + band, x:x + w] = np.asarray(tag)
        out[:, y + band:y + band + h, x:x + w] = v
    return out
