from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sq_spade.nn.heads import ProjectionHead


def test_projection_head_matches_formula():
    torch.manual_seed(0)
    head = ProjectionHead(12, 6, dropout=0.1).eval()
    x = torch.randn(5, 12)
    h = x @ head.projection.weight.T + head.projection.bias
    branch = F.gelu(h) @ head.fc.weight.T + head.fc.bias
    expected = F.layer_norm(h + branch, (6,), head.layer_norm.weight, head.layer_norm.bias)
    torch.testing.assert_close(head(x), expected)
    assert head(x).shape == (5, 6)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    head = ProjectionHead(8, 16, dropout=0.5)
    x = torch.randn(4, 8)
    head.train()
    assert not torch.equal(head(x), head(x))
    head.eval()
    assert torch.equal(head(x), head(x))


def test_leading_dims_and_config():
    head = ProjectionHead(3, 4, 0.0)
    assert head(torch.randn(2, 5, 3)).shape == (2, 5, 4)
    again = ProjectionHead(**head.config())
    assert again.config() == head.config() == {"in_dim": 3, "out_dim": 4, "dropout": 0.0}


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"in_dim": 0}, "in_dim"), ({"in_dim": 3, "out_dim": -1}, "out_dim"),
    ({"in_dim": 3, "dropout": 1.0}, "dropout"), ({"in_dim": 2.5}, "in_dim"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ProjectionHead(**kwargs)
