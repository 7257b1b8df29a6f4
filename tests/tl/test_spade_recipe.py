"""SPADE's training recipe: seed ensembles, the loss temperature, the epoch count (issues 13/14)."""

import warnings

import numpy as np
import pytest

import sq_spade as sqs
from sq_spade import _constants as K
from sq_spade.models import Spade
from sq_spade.pp._genes import panel_expression
from sq_spade.tl._experts import spade_retrieve
from tests.tl.test_experts import GENES, _data

BASE = dict(features_key="X_fake", backbone="fake", panel=GENES, n_fine=4, n_experts=2, batch_size=32, seed=0)


def _train(sd, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small experts
        return sqs.tl.train_experts(sd, **{**BASE, **kw})


def _member(model, m):
    """Member ``m`` of an ensemble as a model of its own."""
    return Spade(model.members[m], {**model.config.to_json(), "n_members": 1})


def _arrays(sd, train=("s0", "s1"), query=("s2",)):
    t = sd.tables["table"]
    sec = t.obs[K.OBS.SECTION].astype(str).to_numpy()
    tr, q = np.isin(sec, train), np.isin(sec, query)
    vals, _ = panel_expression(t, GENES, gene_input="log1p_cp10k")
    f = t.obsm["X_fake"]
    return f[q], f[tr], vals[tr], vals


@pytest.fixture(scope="module")
def ensemble():
    sd = _data()
    return sd, _train(sd, n_seeds=3, epochs=6, train_sections=["s0", "s1"], validation_sections=["s2"])


def test_n_seeds_gives_members_that_differ_on_the_same_experts(ensemble):
    sd, model = ensemble
    f = sd.tables["table"].obsm["X_fake"]
    assert model.n_members == 3 and model.config["n_members"] == 3 and model.config["params"]["n_seeds"] == 3
    embs = [model.embed_images(f, member=m) for m in range(3)]
    assert not np.allclose(embs[0], embs[1]) and not np.allclose(embs[1], embs[2])
    for m in model.members[1:]:  # one clustering: the routing is shared
        assert np.array_equal(m.centroids.numpy(), model.module.centroids.numpy())
    # the table's embedding is member 0's
    np.testing.assert_array_equal(sd.tables["table"].obsm[K.OBSM.SPADE], embs[0])
    with pytest.raises(ValueError, match="member"):
        model.embed_images(f, member=3)


def test_prediction_is_the_members_mean_and_sd_covers_their_spread(ensemble):
    sd, model = ensemble
    fq, fr, vr, _ = _arrays(sd)
    pred, info, sd_ = spade_retrieve(model, fq, fr, vr, k=20, side="images", return_sd=True)
    assert info["n_members"] == 3
    each = np.stack([spade_retrieve(_member(model, m), fq, fr, vr, k=20, side="images")[0] for m in range(3)])
    np.testing.assert_allclose(pred, each.mean(0), rtol=1e-6, atol=1e-6)
    assert not np.allclose(each[0], each[1])
    assert sd_.shape == pred.shape and (sd_ >= each.std(0) - 1e-6).all() and (sd_ > each.std(0) + 1e-4).any()
    # predict_expression writes the sd layer beside the prediction
    t = sd.tables["table"]
    ref = t[np.isin(t.obs[K.OBS.SECTION].astype(str), ["s0", "s1"])].copy()
    out = sqs.tl.predict_expression(sd, model, reference=ref, k=20, features_key="X_fake",
                                    reference_features_key="X_fake")
    assert "predicted_sd" in out.layers
    s = np.asarray(out.layers["predicted_sd"])
    assert s.shape == out.layers["predicted"].shape and (s >= 0).all() and (s > 0).any()


def test_ensemble_round_trip_preserves_predictions_exactly(ensemble, tmp_path):
    sd, model = ensemble
    fq, fr, vr, _ = _arrays(sd)
    again = Spade.load(model.save(tmp_path / "m"))
    assert again.n_members == 3
    for side in ("images", "genes"):
        g = vr if side == "genes" else None
        a = spade_retrieve(model, fq, fr, vr, reference_genes=g, k=20, side=side, return_sd=True)
        b = spade_retrieve(again, fq, fr, vr, reference_genes=g, k=20, side=side, return_sd=True)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[2], b[2])


def test_ensemble_tensors_are_checked_against_the_config(ensemble):
    from sq_spade._files import ModelFileError

    _, model = ensemble
    config, tensors = model._to_files()
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert any(k.startswith("member2.image_heads.") for k in shapes) and "member1.centroids" not in shapes
    cfg = model.config_class.from_json(config)
    Spade._check_shapes(cfg, shapes)  # fits
    with pytest.raises(ModelFileError, match="missing"):
        Spade._check_shapes(cfg, {k: v for k, v in shapes.items() if not k.startswith("member2.")})
    fewer = model.config_class.from_json({**config, "n_members": 2})
    with pytest.raises(ModelFileError, match="unexpected"):
        Spade._check_shapes(fewer, shapes)


def test_published_recipe_is_one_member_at_temperature_1_for_100_epochs():
    sd = _data(size=6)
    pub = _train(sd, recipe="published", train_sections=["s0", "s1"])
    assert pub.n_members == 1 and pub.config["params"]["temperature"] == 1.0
    assert np.asarray(pub.history["train_loss"], float).shape[0] == 100
    # the same as the small-data recipe with every setting given explicitly
    same = _train(_data(size=6), recipe="small_data", n_seeds=1, temperature=1.0, epochs=100, refit=False,
                  train_sections=["s0", "s1"])
    f = sd.tables["table"].obsm["X_fake"]
    np.testing.assert_array_equal(pub.embed_images(f), same.embed_images(f))


def test_small_data_defaults_and_explicit_arguments_override_the_recipe():
    sd = _data(size=6)
    # one training section and no validation: the fixed epoch count, 5 seeds at temperature 32
    small = _train(sd, train_sections=["s0"])
    assert small.n_members == 5 and small.config["params"]["temperature"] == 32.0
    assert np.asarray(small.history["train_loss"], float).shape[0] == 15
    assert small.config["selection"]["fixed_epochs"] == 15
    over = _train(sd, recipe="published", n_seeds=2, temperature=8.0, epochs=3, train_sections=["s0"])
    assert over.n_members == 2 and over.config["params"]["temperature"] == 8.0
    assert np.asarray(over.history["train_loss"], float).shape[0] == 3
    with pytest.raises(ValueError, match="recipe"):
        _train(sd, recipe="large")
    with pytest.raises(ValueError, match="n_seeds"):
        _train(sd, n_seeds=0)


# --- stage B: the epoch count by validation ACG -------------------------------------------------------------------
def test_fit_experts_epoch_score_keeps_the_best_scoring_epoch_for_every_expert():
    import torch

    from sq_spade.train import fit_experts

    rng = np.random.default_rng(0)
    f, g = rng.normal(size=(60, 8)).astype("f4"), rng.normal(size=(60, 5)).astype("f4")
    scripted = iter([0.1, 0.5, 0.3, 0.2, 0.4, 0.0])
    states = []

    def score(img, gene):
        assert not img.training and not torch.is_grad_enabled()
        states.append({k: v.detach().clone() for k, v in img.state_dict().items()})
        return next(scripted)

    img, _, hist = fit_experts(f, g, np.repeat([0, 1], 30), n_experts=2, epochs=6, batch_size=16, out_dim=4,
                               device="cpu", epoch_score=score)
    assert list(hist["val_score"]) == [0.1, 0.5, 0.3, 0.2, 0.4, 0.0] and hist["best_val_score"] == 0.5
    assert list(hist["best_epoch"]) == [1, 1]  # for every expert jointly
    for k, v in img.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), states[1][k].numpy())
    # with patience, the run ends after `patience` epochs without a better score
    scripted = iter([0.1, 0.5, 0.3, 0.2, 0.4, 0.0])
    _, _, hist = fit_experts(f, g, np.repeat([0, 1], 30), n_experts=2, epochs=6, batch_size=16, out_dim=4,
                             device="cpu", epoch_score=lambda i, g_: next(scripted), patience=2)
    assert hist["n_epochs"] == 4 and list(hist["best_epoch"]) == [1, 1]
    with pytest.raises(TypeError, match="epoch_score"):
        fit_experts(f, g, np.repeat([0, 1], 30), n_experts=2, epochs=1, device="cpu", epoch_score=0.5)


@pytest.fixture(scope="module")
def refit_model():
    sd = _data(size=7)
    return sd, _train(sd, n_seeds=4, epochs=6, train_sections=["s0", "s1", "s2"])


def test_refit_rotates_the_held_out_section_and_trains_the_median_best_epoch(refit_model):
    _, model = refit_model
    sel = model.config["selection"]
    assert sel["held_out_sections"] == ["s2", "s1", "s0", "s2"] and sel["validation_sections"] == ["s2", "s1", "s0"]
    assert sel["select"] == "acg" and model.config["params"]["refit"] is True
    best = sel["best_epochs"]
    assert len(best) == 4 and all(1 <= b <= 6 for b in best)
    assert sel["refit_epochs"] == max(1, int(np.round(np.median(best))))
    for curve, b, top in zip(sel["val_acg"], best, sel["best_val_acg"], strict=True):
        assert len(curve) == 6 and curve[b - 1] == top == max(curve)
    # every member trained on all training sections for the refit epoch count, on one clustering
    assert model.n_members == 4
    assert np.asarray(model.history["train_loss"], float).shape[0] == sel["refit_epochs"]
    assert model.history["n_train"] == [int(n) for n in np.bincount(model.assign(
        refit_model[0].tables["table"].obsm["X_fake"]), minlength=model.n_experts)]


def test_given_validation_sections_select_by_acg_without_refit(ensemble):
    sd, model = ensemble
    sel = model.config["selection"]
    assert sel["select"] == "acg" and sel["validation_sections"] == ["s2"]
    assert "held_out_sections" not in sel and "refit_epochs" not in sel and not model.config["params"]["refit"]
    assert len(sel["best_epochs"]) == 3 and np.isfinite(np.asarray(model.history["val_loss"], float)).any()
    # the score is the prediction's: member 0 (its best epoch) retrieves s2 from s0, s1 with that ACG
    fq, fr, vr, vals = _arrays(sd)
    t = sd.tables["table"]
    vq = vals[np.isin(t.obs[K.OBS.SECTION].astype(str).to_numpy(), ["s2"])]
    pred, _ = spade_retrieve(_member(model, 0), fq, fr, vr, side="images", k=min(200, len(fr)))
    from sq_spade._metrics import expression_metrics

    assert float(expression_metrics(pred, vq)[0]["ACG"]) == pytest.approx(sel["best_val_acg"][0], abs=1e-6)


def test_refit_arguments_are_checked():
    sd = _data(size=5)
    with pytest.raises(ValueError, match="validation_sections"):
        _train(sd, refit=True, train_sections=["s0", "s1"], validation_sections=["s2"])
    with pytest.raises(ValueError, match="at least 2"):
        _train(sd, refit=True, train_sections=["s0"])
    with pytest.raises(TypeError, match="refit"):
        _train(sd, refit="yes", train_sections=["s0"])
