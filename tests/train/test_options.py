import pytest

from sq_spade.train import FitOptions


def test_presets_and_replace():
    assert (FitOptions.experts().epochs, FitOptions.experts().loss, FitOptions.experts().patience) == (100, "bleep", None)
    c = FitOptions.contrastive(epochs=5)
    assert (c.epochs, c.loss, c.weight_decay, c.patience) == (5, "clip", 1e-3, 10)
    assert c.replace(seed=3).seed == 3 and c.seed == 0  # frozen: replace makes a copy
    with pytest.raises(TypeError, match=r"Unknown training options \['epoch'\]"):
        c.replace(epoch=3)
    with pytest.raises(AttributeError):
        c.epochs = 3


@pytest.mark.parametrize(("kw", "exc", "match"), [
    ({"epochs": 0}, ValueError, "`epochs` must be a positive integer"),
    ({"batch_size": 2.5}, ValueError, "`batch_size` must be a positive integer"),
    ({"lr": -1.0}, ValueError, "`lr` must be a positive number"),
    ({"weight_decay": -0.1}, ValueError, "`weight_decay` must be a non-negative number"),
    ({"loss": "mse"}, ValueError, "`loss` must be one of"),
    ({"patience": 0}, ValueError, "`patience` must be a positive integer or None"),
    ({"seed": 1.5}, TypeError, "`seed` must be an integer"),
    ({"checkpoint_every": 0}, ValueError, "`checkpoint_every` must be a positive integer"),
    ({"resume": 3}, TypeError, "`resume`"),
    ({"checkpoint_dir": 3}, TypeError, "`checkpoint_dir`"),
    ({"resume": True}, ValueError, "`resume=True`.*`checkpoint_dir`"),
])
def test_every_option_is_checked_once_with_its_name(kw, exc, match):
    with pytest.raises(exc, match=match):
        FitOptions(**kw)


def test_trainers_take_options_or_single_keywords():
    import numpy as np

    from sq_spade.train import fit_experts

    rng = np.random.default_rng(0)
    f, g = rng.normal(size=(24, 4)).astype("f4"), rng.normal(size=(24, 3)).astype("f4")
    ex = np.arange(24) % 2
    a = fit_experts(f, g, ex, n_experts=2, out_dim=4, options=FitOptions(epochs=2, batch_size=8, device="cpu"))[2]
    b = fit_experts(f, g, ex, n_experts=2, out_dim=4, epochs=2, batch_size=8, device="cpu")[2]
    assert np.array_equal(a["train_loss"], b["train_loss"]) and a["n_epochs"] == 2
    c = fit_experts(f, g, ex, n_experts=2, out_dim=4, options=FitOptions(epochs=3, batch_size=8, device="cpu"),
                    epochs=2)[2]  # a keyword changes one option of `options`
    assert c["n_epochs"] == 2
    with pytest.raises(TypeError, match="`options` must be a sq_spade.train.FitOptions"):
        fit_experts(f, g, ex, n_experts=2, options={"epochs": 2})
    with pytest.raises(TypeError, match=r"Unknown training options \['epochz'\]"):
        fit_experts(f, g, ex, n_experts=2, epochz=2)
