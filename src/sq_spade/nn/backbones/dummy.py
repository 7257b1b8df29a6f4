"""``"dummy"``: a weight-free, deterministic 64-d stand-in, for unit tests only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sq_spade.nn.backbones._registry import WeightsArg, register_backbone, tag_weights

__all__ = ["DummyBackbone"]


class DummyBackbone(nn.Module):
    """Weight-free 64-d feature extractor, **for unit tests only** (its features mean nothing).

    Average-pools the image to a 4 x 4 grid, appends the pooled squares (a contrast term),
    multiplies the 96 values by a fixed matrix of cosines (no random numbers, no trainable
    parameters) and applies ``tanh``. Any input size works; it is deterministic and fast.

    Examples
    --------
    >>> DummyBackbone()(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 64])
    """

    def __init__(self, dim: int = 64, grid: int = 4) -> None:
        super().__init__()
        self.grid = grid
        n_in = 2 * 3 * grid * grid
        idx = torch.arange(n_in * dim, dtype=torch.float64).reshape(n_in, dim)
        # golden-angle cosines: a fixed, well-spread matrix without any RNG
        weight = torch.cos(idx * 2.399963229728653) * (3.0 / n_in**0.5)
        self.register_buffer("weight", weight.float(), persistent=False)

    def pool(self, x: Tensor) -> Tensor:
        """The 96 pooled values (means and mean squares on the grid): the ``"pool"`` layer."""
        p = F.adaptive_avg_pool2d(x, self.grid).flatten(1)
        q = F.adaptive_avg_pool2d(x * x, self.grid).flatten(1)
        return torch.cat([p, q], 1)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return torch.tanh(self.pool(x) @ self.weight.to(x.dtype))


def _dummy_layers(model: nn.Module, x: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    assert isinstance(model, DummyBackbone)
    pooled = model.pool(x)
    return {"pool": pooled, "final": torch.tanh(pooled @ model.weight.to(x.dtype))}


def _dummy_factory(weights: WeightsArg = None, pretrained: bool = True) -> nn.Module:
    if weights is not None:
        raise ValueError("backbone 'dummy' has no weights; pass `weights=None`.")
    return tag_weights(DummyBackbone(), "none")


register_backbone("dummy", _dummy_factory, dim=64, input_size=32,
                  weights_source="none (weight-free, deterministic; for unit tests only)",
                  license="n/a", layers={"pool": 2 * 3 * 4 * 4}, forward_layers=_dummy_layers)
