"""mclSTExp's small-data recipe: epochs by validation ACG, refit, seed ensembles, keys, views, uncertainty."""

import numpy as np
import pytest

import sq_spade as sqs
from sq_spade import _constants as K
from sq_spade.models._mclstexp import MclSTExp
from sq_spade.nn.retrieval import combine_keys, neighbor_variance, retrieve_predict
from sq_spade.pp._genes import panel_expression
from sq_spade.tl import _contrastive
from sq_spade.tl._common import rows_of
from sq_spade.tl._contrastive import (
    calibrate_conformal,
    conformal_calibration,
    held_out_sections,
    spot_keys,
    train_contrastive,
)
from sq_spade.train import fit_contrastive
from tests.tl.test_contrastive import GENES, SMALL, _data

FAST = dict(features_key="X_fake", backbone="fake", panel=GENES, **SMALL)


@pytest.fixture(scope="module")
def sdata():
    return _data()


@pytest.fixture(scope="module")
def recipe_model(sdata):
    # the default recipe on three sections without validation_sections: s2 then s1 validate, then refit on s0-s2
    return train_contrastive(sdata, n_seeds=2, epochs=6, patience=3, **FAST)


def test_fit_contrastive_selects_the_epoch_of_best_validation_acg():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(60, 6)).astype("f4")
    e = np.abs(f @ rng.normal(size=(6, 5))).astype("f4")
    kw = dict(val_features=f[40:], val_expr=e[40:], epochs=6, batch_size=20, heads=2, dim_head=4, out_dim=8,
              device="cpu", patience=None)
    fit = fit_contrastive(f[:40], e[:40], select="acg", keys="both", k=10, **kw)
    acg = np.asarray(fit.history["val_acg"])
    assert acg.shape == (6,) and np.isfinite(acg).all()
    assert fit.history["best_epoch"] == int(np.argmax(acg))
    # the loss picks its own epoch; select="acg" needs validation data
    by_loss = fit_contrastive(f[:40], e[:40], **kw)
    assert "val_acg" not in by_loss.history
    assert by_loss.history["best_epoch"] == int(np.argmin(by_loss.history["val_loss"]))
    with pytest.raises(ValueError, match="select='acg'"):
        fit_contrastive(f[:40], e[:40], select="acg", epochs=1, heads=2, dim_head=4, out_dim=8, device="cpu")


def test_fit_contrastive_trains_on_random_views_of_frozen_features():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(32, 6)).astype("f4")
    e = rng.random((32, 4)).astype("f4")
    kw = dict(epochs=2, batch_size=16, heads=2, dim_head=4, out_dim=8, device="cpu")
    one = fit_contrastive(f, e, **kw)
    # a single view is the features themselves: the same weights
    same = fit_contrastive(f[:, None], e, **kw)
    x = np.ones((1, 6), "f4")
    import torch

    # two different views: another training
    two = fit_contrastive(np.stack([f, -f], axis=1), e, **kw)
    with torch.no_grad():
        assert torch.allclose(one.image_head(torch.from_numpy(x)), same.image_head(torch.from_numpy(x)))
        assert not torch.allclose(one.image_head(torch.from_numpy(x)), two.image_head(torch.from_numpy(x)))
    with pytest.raises(ValueError, match="val_features"):
        fit_contrastive(np.stack([f, f], axis=1), e, val_features=f[:4, :3], val_expr=e[:4], **kw)


def test_combine_keys_and_retrieval_spread():
    rng = np.random.default_rng(2)
    q, s, i = rng.normal(size=(3, 4)), rng.normal(size=(7, 4)), rng.normal(size=(7, 4))
    qq, kk = combine_keys(q, spot_keys=s, image_keys=i, keys="both")

    def cos(a, b):
        return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T

    assert np.allclose(cos(qq, kk), (cos(q, s) + cos(q, i)) / 2, atol=1e-5)
    assert np.array_equal(combine_keys(q, spot_keys=s, keys="spot")[1], s.astype("f4"))
    with pytest.raises(ValueError, match="image_keys"):
        combine_keys(q, spot_keys=s, keys="both")
    values = rng.random((7, 3))
    pred, idx, w = retrieve_predict(q, s, values, k=4, return_neighbors=True)
    var = neighbor_variance(values, idx, w, pred)
    brute = np.stack([(w[b][:, None] * (values[idx[b]] - pred[b]) ** 2).sum(0) for b in range(3)])
    assert np.allclose(var, brute, atol=1e-5)


def test_default_recipe_chooses_epochs_on_rotated_held_out_sections_then_refits_every_seed(recipe_model, sdata):
    m = recipe_model
    sel = m.history["selection"]
    # the held-out section rotates: seed 0 holds out s2, seed 1 s1
    assert sel["held_out_sections"] == ["s2", "s1"] and sel["validation_sections"] == ["s2", "s1"]
    assert sel["select"] == "acg" and len(sel["best_epochs"]) == 2
    assert sel["refit_epochs"] == max(1, int(np.round(np.median(sel["best_epochs"]))))
    assert len(m.history["train_loss"]) == sel["refit_epochs"]  # the refit ran that many epochs, no validation
    assert m.config["train_sections"] == ["s0", "s1", "s2"] and m.config["validation_sections"] == []
    p = m.config["params"]
    assert p["recipe"] == "small_data" and p["refit"] and p["temperature"] == 32.0 and p["n_seeds"] == 2
    assert m.n_members == 2 and m.config["keys"] == "both"
    conf = m.config["conformal"]
    assert conf["coverage"] == 0.9 and conf["sections"] == ["s2", "s1"] and len(conf["q"]) == len(GENES)
    # the members are different seeds
    f = sdata.tables["table"].obsm["X_fake"][:5]
    assert not np.allclose(m.embed_images(f, member=0), m.embed_images(f, member=1))


def test_held_out_section_rotates_from_the_last_training_section():
    assert held_out_sections(["a", "b", "c"], 1) == ["c"]
    assert held_out_sections(["a", "b", "c"], 5) == ["c", "b", "a", "c", "b"]
    assert held_out_sections(["a", "b"], 2) == ["b", "a"]


def test_refit_selects_and_calibrates_on_every_training_section_in_turn(sdata, monkeypatch):
    calls = []
    retrieve = _contrastive._retrieve

    def spy(model, fq, ref_gin, *args, **kw):
        out = retrieve(model, fq, ref_gin, *args, **kw)
        calls.append((len(fq), len(ref_gin), model.n_members, out))
        return out

    monkeypatch.setattr(_contrastive, "_retrieve", spy)
    m = train_contrastive(sdata, n_seeds=4, epochs=2, patience=None, **FAST)
    t = sdata.tables["table"]
    n = {s: int(rows_of(t, [s]).sum()) for s in ("s0", "s1", "s2")}
    sel = m.history["selection"]
    assert sel["held_out_sections"] == ["s2", "s1", "s0", "s2"] and len(sel["best_epochs"]) == 4
    assert sel["refit_epochs"] == max(1, int(np.round(np.median(sel["best_epochs"]))))
    conf = m.config["conformal"]
    assert conf["sections"] == ["s2", "s1", "s0"] and conf["held_out_sections"] == sel["held_out_sections"]
    assert conf["n_spots"] == sum(n.values()) and conf["n_spots_per_section"] == n
    # each held-out section predicted from the two others by the ensemble of the runs that held it out
    assert [(q, r, k) for q, r, k, _ in calls] == [(n["s2"], n["s0"] + n["s1"], 2), (n["s1"], n["s0"] + n["s2"], 1),
                                                  (n["s0"], n["s1"] + n["s2"], 1)]
    # one quantile per gene over the pooled normalised residuals
    y = np.concatenate([panel_expression(t[rows_of(t, [s])], GENES)[0] for s in conf["sections"]])
    pooled = conformal_calibration(y, np.concatenate([c[3][0] for c in calls]),
                                   np.concatenate([c[3][1] for c in calls]), coverage=0.9)
    assert np.allclose(conf["q"], pooled["q"]) and np.allclose(conf["sd_floor"], pooled["sd_floor"])


def test_one_seed_holds_out_the_last_training_section(sdata):
    m = train_contrastive(sdata, n_seeds=1, epochs=2, patience=None, **FAST)
    assert m.history["selection"]["held_out_sections"] == ["s2"]
    conf = m.config["conformal"]
    assert conf["sections"] == ["s2"] and conf["n_spots"] == int(rows_of(sdata.tables["table"], ["s2"]).sum())


def test_given_validation_sections_validate_every_seed_without_rotation(sdata):
    m = train_contrastive(sdata, train_sections=["s0", "s1"], validation_sections=["s2"], n_seeds=2, epochs=2,
                          patience=None, **FAST)
    sel = m.history["selection"]
    assert sel["validation_sections"] == ["s2"] and "held_out_sections" not in sel and not m.config["params"]["refit"]
    conf = m.config["conformal"]
    assert conf["sections"] == ["s2"] and conf["n_spots"] == int(rows_of(sdata.tables["table"], ["s2"]).sum())


def test_ensemble_saves_in_one_folder_and_predicts_identically(recipe_model, sdata, tmp_path):
    path = recipe_model.save(tmp_path / "m")
    back = MclSTExp.load(path)
    assert back.n_members == 2 and back.config["conformal"] == recipe_model.config["conformal"]
    a = sqs.tl.predict_expression(sdata, recipe_model, reference=sdata, k=20, key_added="a")
    b = sqs.tl.predict_expression(sdata, back, reference=sdata, k=20, key_added="b")
    for suffix in ("", "_sd", "_lower", "_upper"):
        assert np.array_equal(a.layers["a" + suffix], b.layers["b" + suffix])
    # tensors of two members under a config of one are refused before anything is built
    from sq_spade._files import ModelFileError
    from sq_spade.models._mclstexp import MclSTExpConfig

    one = MclSTExpConfig.from_mapping({**back.config.to_json(), "n_members": 1})
    shapes = {k: tuple(v.shape) for k, v in back._to_files()[1].items()}
    with pytest.raises(ModelFileError, match="member1"):
        MclSTExp._check_shapes(one, shapes)


def test_prediction_sd_is_retrieval_plus_ensemble_spread_and_intervals_cover(recipe_model, sdata):
    m = recipe_model
    t = sdata.tables["table"]
    pred = sqs.tl.predict_expression(sdata, m, reference=sdata, k=20)
    mean, sd = pred.layers[K.LAYERS.PREDICTED], pred.layers[K.LAYERS.PREDICTED_SD]
    lo, hi = pred.layers[K.LAYERS.PREDICTED_LOWER], pred.layers[K.LAYERS.PREDICTED_UPPER]
    assert (sd > 0).all() and (lo <= mean).all() and (mean <= hi).all()
    assert pred.uns["sq_spade_prediction"]["predicted"]["conformal_coverage"] == 0.9
    # by hand: each member retrieves with both keys; variance = mean spread + spread of the means
    values, _ = panel_expression(t, GENES)
    preds, spreads = [], []
    for i in range(2):
        q = m.embed_images(t.obsm["X_fake"], member=i)
        qq, kk = combine_keys(q, spot_keys=spot_keys(sdata, m, member=i), image_keys=m.embed_images(
            t.obsm["X_fake"], member=i), keys="both")
        p, idx, w = retrieve_predict(qq, kk, values, k=20, return_neighbors=True)
        preds.append(p)
        spreads.append(neighbor_variance(values, idx, w, p))
    assert np.allclose(mean, np.mean(preds, 0), atol=1e-5)
    assert np.allclose(sd, np.sqrt(np.mean(spreads, 0) + np.var(preds, 0)), atol=1e-4)


def test_calibrate_conformal_covers_its_calibration_section(sdata):
    model = train_contrastive(sdata, train_sections=["s0", "s1"], n_seeds=1, epochs=3, refit=False, **FAST)
    assert model.config["conformal"] is None and model.history.get("selection") is None
    out = calibrate_conformal(sdata, model, calibration_sections="s2", reference_sections=["s0", "s1"],
                              coverage=0.8, k=20)
    assert model.config["conformal"] is out and out["sections"] == ["s2"]
    t = sdata.tables["table"]
    s2 = rows_of(t, ["s2"])
    pred = sqs.tl.predict_expression(t[s2].copy(), model, reference=t[rows_of(t, ["s0", "s1"])].copy(), k=20)
    y, _ = panel_expression(t[s2], GENES)
    inside = (pred.layers["predicted_lower"] <= y) & (y <= pred.layers["predicted_upper"])
    assert (inside.mean(axis=0) >= 0.8 - 1e-9).all()  # every gene at least at the nominal level
    with pytest.raises(ValueError, match="overlap"):
        calibrate_conformal(sdata, model, calibration_sections="s2", reference_sections=["s1", "s2"])
    with pytest.raises(ValueError, match="coverage"):
        calibrate_conformal(sdata, model, calibration_sections="s2", coverage=1.0)


def test_published_recipe_is_mclstexps_settings(sdata):
    m = train_contrastive(sdata, recipe="published", epochs=2, train_sections=["s0", "s1"],
                          validation_sections=["s2"], **FAST)
    p = m.config["params"]
    assert (p["temperature"], p["select"], p["n_seeds"], p["refit"], p["coverage"]) == (1.0, "loss", 1, False, None)
    assert m.config["keys"] == "spot" and m.n_members == 1 and m.config["conformal"] is None
    assert "val_acg" not in m.history
    pred = sqs.tl.predict_expression(sdata, m, reference=sdata, k=20)
    assert K.LAYERS.PREDICTED_SD in pred.layers and K.LAYERS.PREDICTED_LOWER not in pred.layers


@pytest.mark.parametrize(("kw", "err", "match"), [
    (dict(n_seeds=0), ValueError, "n_seeds"),
    (dict(keys="genes"), ValueError, "keys"),
    (dict(select="mse"), ValueError, "select"),
    (dict(recipe="fast"), ValueError, "recipe"),
    (dict(coverage=1.5), ValueError, "coverage"),
    (dict(refit=True, validation_sections=["s2"]), ValueError, "refit"),
    (dict(views=True), KeyError, "X_fake_views"),
    (dict(n_seeds=2, checkpoint_dir="ckpt"), ValueError, "n_seeds"),
])
def test_recipe_arguments_are_checked(sdata, kw, err, match):
    args = dict(FAST, train_sections=["s0", "s1"], epochs=1)
    args.update(kw)
    with pytest.raises(err, match=match):
        train_contrastive(sdata, **args)


def test_explicit_arguments_override_the_recipe_and_views_are_used(sdata):
    t = sdata.tables["table"]
    t.obsm["X_fake_views"] = np.stack([t.obsm["X_fake"], t.obsm["X_fake"] * 1.1], axis=1)
    try:
        m = train_contrastive(sdata, train_sections=["s0", "s1"], validation_sections=["s2"], n_seeds=1,
                              temperature=5.0, keys="image", epochs=2, **FAST)
    finally:
        del t.obsm["X_fake_views"]
    p = m.config["params"]
    assert p["temperature"] == 5.0 and p["views"] and not p["refit"] and m.config["keys"] == "image"
    assert m.history["selection"]["validation_sections"] == ["s2"]
    pred = sqs.tl.predict_expression(sdata, m, reference=sdata, k=20)
    assert pred.uns["sq_spade_prediction"]["predicted"]["keys"] == "image"
    # the uncertainty map draws like any layer
    sdata.tables["predicted"] = pred
    fig = sqs.pl.spatial(sdata, GENES[0], layer=K.LAYERS.PREDICTED_SD, section="s0", return_fig=True)
    assert len(fig.axes) >= 1
