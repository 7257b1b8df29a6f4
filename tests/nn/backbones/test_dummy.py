"""sq_spade.nn.backbones.dummy: the weight-free test backbone."""

from __future__ import annotations

import pytest
import torch

from sq_spade.nn.backbones import get_backbone
from tests.nn.backbones.conftest import image_like


def test_dummy_is_weight_free_and_deterministic():
    bb = get_backbone("dummy")
    assert bb.weights_sha256 == "none" and sum(p.numel() for p in bb.parameters()) == 0
    x = image_like(2, 32)
    a, b = bb(x), get_backbone("dummy")(x)
    assert a.shape == (2, 64) and torch.equal(a, b)
    assert (a[0] - a[1]).abs().max() > 0.05  # different images, different features
    with pytest.raises(ValueError, match="no weights"):
        get_backbone("dummy", weights=__file__)
