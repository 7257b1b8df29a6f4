import pytest
import torch
from torch import nn

from sq_spade.train._finetune import finetune_prefixes, last_block_prefixes, select_finetune


class Wrapped(nn.Module):
    """A registry backbone's shape: one child holding the network."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)),
                                   nn.BatchNorm2d(4))


def test_last_means_the_last_block_wrapped_or_not():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.LayerNorm(4))
    assert last_block_prefixes(net) == ["1.1.", "2."]
    assert last_block_prefixes(Wrapped()) == ["model.1.1.", "model.2."]
    enc = Wrapped()
    params, modules = select_finetune(enc, "last")
    names = {n for n, p in enc.named_parameters() if any(p is q for q in params)}
    assert names == {"model.1.1.weight", "model.1.1.bias", "model.2.weight", "model.2.bias"}
    assert {id(m) for m in modules} == {id(enc.model[1][1]), id(enc.model[2])}
    assert finetune_prefixes(enc, "last") == ["model.1.1.", "model.2."]
    assert finetune_prefixes(enc, "all") == "all" and finetune_prefixes(enc, ("model.0.",)) == ["model.0."]


def test_all_none_prefixes_and_errors():
    enc = Wrapped()
    assert len(select_finetune(enc, "all")[0]) == len(list(enc.parameters()))
    assert select_finetune(enc, "none") == ([], [])
    params, _ = select_finetune(enc, ["model.0."])
    assert len(params) == 2
    with pytest.raises(ValueError, match="finetune"):
        select_finetune(enc, "some")
    with pytest.raises(ValueError, match="match no parameter"):
        select_finetune(enc, ["nope."])
    leaf = nn.Linear(2, 2)  # no child holds parameters: the whole encoder trains, with a warning
    with pytest.warns(UserWarning, match="no child with parameters"):
        params, modules = select_finetune(leaf, "last")
    assert len(params) == 2 and modules == [leaf]


def test_fit_contrastive_last_trains_the_last_block_of_a_wrapped_encoder():
    import numpy as np

    from sq_spade.train import fit_contrastive

    class Enc(Wrapped):
        def forward(self, x):
            return self.model(x).mean(dim=(2, 3))

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (16, 4, 4, 3), dtype=np.uint8)
    torch.manual_seed(0)
    enc = Enc()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    fit = fit_contrastive(None, rng.random((16, 3)).astype("f4"), images=list(imgs), image_encoder=enc,
                          finetune="last", augment=False, epochs=1, batch_size=8, out_dim=4, heads=1, dim_head=2,
                          lr=1e-2, device="cpu")
    changed = {k for k, v in fit.image_encoder.state_dict().items() if not torch.equal(before[k], v)}
    assert {"model.1.1.weight", "model.2.weight"} <= changed
    assert not changed & {"model.0.weight", "model.1.0.weight"}
