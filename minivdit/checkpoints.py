"""Checkpoint files: discovery, lazy reading, strict loading with errors that name the problem.

Every model family keeps its own key-rename table next to its parameter names (`wan.py`, `wan_vae.py`,
`text.py`); this file holds what they share:

* `read_state_dict(path)`   safetensors (memory-mapped, tensors read on access), sharded safetensors through
                             their `*.index.json`, and `.pth` pickles through `torch.load(weights_only=True,
                             mmap=True)` -- never an unpickle of code.
* `load_strict(module, sd)`  strict key and shape check against a module built on the meta device, then a
                             tensor-by-tensor dtype conversion and `load_state_dict(assign=True)`, so peak
                             memory stays near the size of the weights.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, unreadable, or does not match the model being loaded."""


def check_readable(path: Path) -> None:
    """Raise CheckpointError if `path` cannot be opened for reading (a permission problem, not a corrupt file)."""
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied, this user cannot read the file: fix its permissions "
                              f"(e.g. chmod a+r {path}) or run as its owner.")


# ----------------------------------------------------------------------------------------------------------
# reading


class LazySafetensors(Mapping):
    """Read-only mapping over one or more safetensors files; a tensor is read only when it is indexed."""

    def __init__(self, files: list[Path]):
        self.files, self.where = files, {}
        for f in files:
            check_readable(f)
            try:
                with safe_open(f, framework="pt", device="cpu") as h:
                    for k in h.keys():
                        self.where[k] = f
            except Exception as e:  # safetensors raises its own error types for bad headers / short files
                raise CheckpointError(f"{f}: cannot read safetensors header ({e}). The file is truncated or "
                                      "corrupt: download it again.") from None
        self._handles = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self.where[key]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt", device="cpu")
        try:
            return self._handles[f].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor {key!r} ({e}). The file is truncated or corrupt: "
                                  "download it again.") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape from the file header, without reading the tensor."""
        f = self.where[key]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt", device="cpu")
        return tuple(self._handles[f].get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


class Renamed(Mapping):
    """A read-only view of a state dict under new key names: `Renamed(sd, rename)[rename(k)] is sd[k]`, lazily."""

    def __init__(self, sd: Mapping[str, torch.Tensor], rename):
        self.sd, self.names = sd, {rename(k): k for k in sd.keys()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.sd[self.names[key]]

    def shape(self, key: str) -> tuple[int, ...]:
        return shape_of(self.sd, self.names[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files behind `path`: a file, a `*.safetensors.index.json`, or a folder holding either."""
    path = Path(path)
    if path.is_dir():
        index = sorted(path.glob("*.safetensors.index.json"))
        files = sorted(path.glob("*.safetensors"))
        if index:
            path = index[0]
        elif len(files) == 1:
            return files
        elif not files:
            raise CheckpointError(f"{path}: no *.safetensors file in this folder.")
        else:
            raise CheckpointError(f"{path}: several *.safetensors files and no *.safetensors.index.json; "
                                  f"pass one file: {[f.name for f in files]}")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors index ({e}).") from None
        files = [path.parent / n for n in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{path}: shards listed in the index are missing: {missing}")
        return files
    if not path.exists():
        raise CheckpointError(f"{path}: no such file.")
    return [path]


def read_state_dict(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """A lazy state dict from a safetensors file / index / folder, or a `.pth` / `.pt` pickle.

    Pickles are read with `torch.load(weights_only=True, mmap=True)`: tensors only, never code.
    Raises `CheckpointError` for a missing, truncated or unreadable file.
    """
    path = Path(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        if not path.exists():
            raise CheckpointError(f"{path}: no such file.")
        check_readable(path)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read this pickle as plain tensors ({e}).") from None
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read this pickle as plain tensors ({e}).") from None
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict.")
        return sd
    return LazySafetensors(safetensors_files(path))


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes=("vae.", "first_stage_model.")) -> Mapping[str, torch.Tensor]:
    """`sd` without a prefix that every key carries (single-file VAEs saved as part of a larger model)."""
    for prefix in prefixes:
        if len(sd) and all(k.startswith(prefix) for k in sd):
            return Renamed(sd, lambda k, n=len(prefix): k[n:])
    return sd


# ----------------------------------------------------------------------------------------------------------
# loading


def _short(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def shape_of(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """A tensor's shape, from the file header when the mapping can tell it without reading the tensor."""
    return sd.shape(key) if hasattr(sd, "shape") else tuple(sd[key].shape)


def check_keys(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, file, layout: str) -> None:
    """Raise `CheckpointError` naming the file, the layout and the missing / unexpected / mis-shaped keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {shape_of(sd, k)} != {tuple(expected[k].shape)}" for k in expected
              if k in sd and shape_of(sd, k) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"{file}: checkpoint does not match {type(module).__name__} (layout detected: {layout})."]
        if missing:
            lines.append(f"  missing keys: {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_short(unexpected)}")
        if shapes:
            lines.append(f"  mis-shaped keys (checkpoint != model): {_short(shapes, 6)}")
        lines.append("  Is this the right checkpoint for the chosen model preset?")
        raise CheckpointError("\n".join(lines))


def load_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, file, layout: str,
                dtype: torch.dtype | None = None, keep_fp32: tuple[str, ...] = (),
                progress: bool = True) -> torch.nn.Module:
    """Load `sd` into `module` (built on the meta device) strictly, converting dtype tensor by tensor.

    Floating tensors go to `dtype` (None: as stored) except names containing a `keep_fp32` substring, which
    go to float32. Tensors are assigned, not copied, so peak memory stays near the size of the weights.
    Every floating tensor is checked once for NaN / inf as it is read (a CheckpointError names the file and the
    tensor); progress: a tqdm bar over the tensors.
    """
    check_keys(module, sd, file=file, layout=layout)
    out = {}
    for k in tqdm(module.state_dict(), desc=f"loading {Path(str(file)).name}", unit="tensor", disable=not progress,
                  leave=False):
        t = sd[k]
        if t.is_floating_point():
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{file}: tensor {k!r} holds {int((~torch.isfinite(t)).sum())} NaN / inf "
                                      "values: the file is corrupt (download it again) or was saved from a diverged "
                                      "model.")
            to = torch.float32 if any(s in k for s in keep_fp32) else (dtype or t.dtype)
            t = t.to(to)
        out[k] = t
    module.load_state_dict(out, strict=True, assign=True)
    return module


def fingerprint(path: str | os.PathLike) -> dict:
    """A weight file's size and a fast content hash, so a video can be traced to its weights: sha256 of the
    safetensors header (names, dtypes, shapes, byte offsets) or, for other files (.pth zip archives end with a
    directory holding every entry's CRC-32), of the last MiB. Returns {"bytes", "sha256", "of"}."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            data, what = f.read(min(n, size - 8)), "safetensors header"
        else:
            f.seek(max(0, size - 2**20))
            data, what = f.read(), "last MiB"
    return {"bytes": size, "sha256": hashlib.sha256(data).hexdigest(), "of": what}
