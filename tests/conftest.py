import pytest
import torch

from minivdit.wan import PRESETS, WanModel


@pytest.fixture(scope="module")
def tiny_model() -> WanModel:
    """The embedded tiny Wan architecture (4 blocks, dim 64), seeded, with every parameter (norms, modulation
    tables) randomized so that no intervention can hide behind an identity initialization."""
    torch.manual_seed(0)
    m = WanModel(PRESETS["wan2.1-tiny"].config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m
