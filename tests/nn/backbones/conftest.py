"""Shared by the backbone tests: a registry that is restored after each test, test images."""

from __future__ import annotations

import pytest
import torch

from sq_spade.nn.backbones import BACKBONES


@pytest.fixture
def registry():
    """Restore the registry after a test that registers backbones."""
    saved = dict(BACKBONES)
    yield BACKBONES
    BACKBONES.clear()
    BACKBONES.update(saved)


def image_like(n: int = 2, size: int = 224) -> torch.Tensor:
    """Deterministic smooth, coloured, textured images in [0, 1] (no RNG)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for i in range(n):
        blob = torch.exp(-((xx - 0.3 - 0.2 * i) ** 2 + (yy - 0.6) ** 2) / 0.02)
        waves = 0.5 + 0.5 * torch.sin(40 * xx * (1 + i) + 25 * yy)
        out.append(torch.stack([0.8 * blob + 0.2 * waves, 0.5 * waves, 1 - 0.7 * blob]))
    return torch.stack(out).clamp(0, 1)

