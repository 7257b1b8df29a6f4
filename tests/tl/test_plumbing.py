"""Documented defaults and passed arguments reach the code that uses them.

Each test fails when one argument (or a config value used by default) is dropped on its way:
the routing temperature of a model's config, ``weighting`` and ``temperature`` of
``predict_expression``, ``gene_input``, and ``by``, ``n_heg`` and ``var['observed']`` of
``evaluate_expression``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import sq_spade as sqs
import sq_spade.nn.retrieval as retrieval
from sq_spade import _constants as K
from sq_spade._metrics import expression_metrics
from sq_spade.pp._genes import panel_expression
from sq_spade.tl._common import rows_of
from tests.tl.test_leak_free import GENES, _data


@pytest.fixture(scope="module")
def fitted():
    """A small SPADE model (routing temperature 2.0, not the default 0.1) and its data."""
    sd = _data(size=6)
    model = sqs.tl.train_experts(sd, features_key="X_fake", backbone="fake", panel=GENES, n_fine=4, n_experts=2,
                                 epochs=2, batch_size=32, routing_temperature=2.0, train_sections=["s0", "s1"],
                                 validation_sections=None, reference_side="genes")
    return sd, model


def _hand_routing(feats, model, t):
    c = model.module.centroids.numpy().astype(np.float64)
    d = np.sqrt(((feats[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1))
    w = np.exp(-(d - d.min(1, keepdims=True)) / t)
    w /= w.sum(1, keepdims=True)
    f2e = model.module.fine_to_expert.numpy()
    return np.stack([w[:, f2e == e].sum(1) for e in range(model.n_experts)], 1)


def test_routing_temperature_of_the_config_is_the_default(fitted, tmp_path):
    sd, model = fitted
    t = sd.tables["table"]
    feats = t.obsm["X_fake"]
    assert model.config.routing_temperature == 2.0
    np.testing.assert_allclose(model.routing_weights(feats), _hand_routing(feats, model, 2.0), atol=1e-5)
    default = model.embed_images(feats)
    np.testing.assert_allclose(default, model.embed_images(feats, temperature=2.0), atol=1e-6)
    assert not np.allclose(default, model.embed_images(feats, temperature=0.1), atol=1e-4)
    # train_experts wrote the default embedding; tl.embed by default uses the config's temperature too
    np.testing.assert_allclose(t.obsm[K.OBSM.SPADE], default, atol=1e-6)
    sqs.tl.embed(sd, model, features_key="X_fake", key_added="X_again")
    np.testing.assert_allclose(t.obsm["X_again"], default, atol=1e-6)
    # and it survives saving: the loaded module routes at 2.0 without being told
    back = sqs.models.Spade.load(model.save(tmp_path / "m"))
    np.testing.assert_allclose(back.embed_images(feats), default, atol=1e-6)
    with torch.inference_mode():
        np.testing.assert_allclose(back.module.route(torch.as_tensor(feats)).numpy(),
                                   _hand_routing(feats, model, 2.0), atol=1e-5)


def _spy_retrieval(monkeypatch):
    calls = []
    real = retrieval.retrieve_predict

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(retrieval, "retrieve_predict", spy)
    return calls


@pytest.mark.parametrize("kind", ["spade", "mclstexp"])
def test_weighting_and_temperature_reach_the_retrieval(fitted, monkeypatch, kind):
    sd, model = fitted
    t = sd.tables["table"]
    if kind == "mclstexp":
        model = sqs.tl.train_contrastive(t.copy(), features_key="X_fake", backbone="fake", panel=GENES, epochs=1,
                                         out_dim=8, heads=2, dim_head=4, batch_size=32, device="cpu",
                                         train_sections=["s0", "s1"])
    ref, query = t[rows_of(t, ["s0", "s1"])].copy(), t[rows_of(t, ["s2"])].copy()
    calls = _spy_retrieval(monkeypatch)
    preds = {}
    for weighting, temp in (("uniform", 1.0), ("softmax", 0.01), ("softmax", 50.0), ("inverse_sq_l2", 1.0)):
        out = sqs.tl.predict_expression(query, model, reference=ref, k=10, weighting=weighting, temperature=temp,
                                        features_key="X_fake", reference_features_key="X_fake")
        preds[weighting, temp] = out.layers[K.LAYERS.PREDICTED]
        assert calls[-1]["weighting"] == weighting and calls[-1]["temperature"] == temp
        info = out.uns[K.UNS.PREDICTION][K.LAYERS.PREDICTED]
        assert info["weighting"] == weighting and info["temperature"] == temp
    # the settings change the predictions (a dropped argument would make two of these equal)
    keys = list(preds)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not np.allclose(preds[keys[i]], preds[keys[j]], atol=1e-6), (keys[i], keys[j])
    # a hot softmax is close to the plain mean, a cold one is not
    assert np.abs(preds["softmax", 50.0] - preds["uniform", 1.0]).max() < np.abs(
        preds["softmax", 0.01] - preds["uniform", 1.0]).max()


def test_gene_input_raw_feeds_raw_counts_to_the_gene_heads(fitted, monkeypatch):
    sd, model = fitted
    t = sd.tables["table"]
    ref, query = t[rows_of(t, ["s0", "s1"])].copy(), t[rows_of(t, ["s2"])].copy()
    raw, _ = panel_expression(ref, GENES, gene_input="raw")
    norm, _ = panel_expression(ref, GENES)
    assert model.config.reference_side == "genes"
    fed = []
    real = model.embed_genes
    monkeypatch.setattr(model, "embed_genes", lambda genes, expert, **kw: fed.append(np.asarray(genes))
                        or real(genes, expert, **kw))
    preds = {}
    for gin in ("raw", "log1p_cp10k"):
        model.config["gene_input"] = gin
        fed.clear()
        preds[gin] = sqs.tl.predict_expression(query, model, reference=ref, k=10, features_key="X_fake",
                                               reference_features_key="X_fake").layers[K.LAYERS.PREDICTED]
        # every row the gene heads embedded is a reference spot's row of that input (raw counts or log1p CP10k)
        rows = {r.tobytes() for r in (raw if gin == "raw" else norm).astype(np.float32)}
        assert sum(len(f) for f in fed) >= 1
        assert all(r.tobytes() in rows for f in fed for r in f.astype(np.float32))
    model.config["gene_input"] = "log1p_cp10k"
    assert not np.allclose(preds["raw"], preds["log1p_cp10k"])
    # what the original repository's checkpoints expect is the default of the importer
    import inspect

    assert inspect.signature(sqs.models.Spade.from_original).parameters["gene_input"].default == "raw"


def test_train_experts_trains_on_the_gene_input_it_is_given(monkeypatch):
    import sq_spade.train as train_pkg

    seen = []
    real = train_pkg.fit_experts
    monkeypatch.setattr(train_pkg, "fit_experts", lambda *a, **kw: seen.append(a[1]) or real(*a, **kw))
    sd = _data(n=2, size=5)
    t = sd.tables["table"]
    model = sqs.tl.train_experts(sd, features_key="X_fake", backbone="fake", panel=GENES, n_fine=2, n_experts=1,
                                 epochs=1, gene_input="raw")
    assert model.config.gene_input == "raw"
    # (the last call trains a member on all training spots; the first ones, selection runs, on some)
    np.testing.assert_array_equal(seen[-1], panel_expression(t, GENES, gene_input="raw")[0])


# --- evaluate_expression --------------------------------------------------------------------------------------------
def _predictions(n=40, genes=8, seed=0):
    """A predictions table by hand: known observations, noisy predictions, two sections and a crossing group."""
    rng = np.random.default_rng(seed)
    obs_vals = rng.gamma(2.0, 1.0, (n, genes)) * np.linspace(0.2, 3.0, genes)  # gene means differ
    pred = obs_vals + rng.normal(0, 1.0, (n, genes)) * np.linspace(0.1, 3.0, genes)[::-1]
    obs = pd.DataFrame({"section": np.repeat(["a", "b"], n // 2), "grp": np.tile(["x", "y"], n // 2)},
                       index=[f"c{i}" for i in range(n)])
    table = ad.AnnData(X=np.zeros((n, genes), np.float32), obs=obs,
                       var=pd.DataFrame(index=[f"g{j}" for j in range(genes)]))
    table.layers[K.LAYERS.PREDICTED] = pred.astype(np.float32)
    table.layers[K.LAYERS.NORMALIZED] = obs_vals.astype(np.float32)
    table.var[K.VAR.OBSERVED] = True
    return table, pred, obs_vals


def test_by_groups_the_spots_it_names():
    table, pred, obs = _predictions()
    res = sqs.tl.evaluate_expression(table, by="grp")
    assert list(res["grp"]) == ["x", "y"]
    for g in ("x", "y"):
        m = (table.obs["grp"] == g).to_numpy()
        assert res.set_index("grp").loc[g, "ACG"] == pytest.approx(expression_metrics(pred[m], obs[m])[0]["ACG"],
                                                                   rel=1e-5)
    default = sqs.tl.evaluate_expression(table)
    assert list(default["section"]) == ["a", "b"]
    every = sqs.tl.evaluate_expression(table, by=None)
    assert len(every) == 1 and every["n_spots"].iloc[0] == table.n_obs
    assert every["ACG"].iloc[0] == pytest.approx(expression_metrics(pred, obs)[0]["ACG"], rel=1e-5)


def test_n_heg_sets_the_genes_of_heg():
    table, pred, obs = _predictions()
    res, per_gene = sqs.tl.evaluate_expression(table, by=None, n_heg=3, return_per_gene=True)
    assert int(per_gene["is_heg"].sum()) == 3
    top = np.argsort(-obs.mean(0))[:3]
    r = [np.corrcoef(pred[:, j], obs[:, j])[0, 1] for j in top]
    assert res["HEG"].iloc[0] == pytest.approx(np.mean(r), rel=1e-4)
    assert res["HEG"].iloc[0] != pytest.approx(res["ACG"].iloc[0], rel=1e-3)
    wide = sqs.tl.evaluate_expression(table, by=None, n_heg=6)
    assert wide["HEG"].iloc[0] != pytest.approx(res["HEG"].iloc[0], rel=1e-3)


def test_only_observed_genes_are_scored():
    from sq_spade.tl._predict import _reclose

    table, pred, obs = _predictions()
    table.var[K.VAR.OBSERVED] = [True, False, True, True, False, True, True, True]
    keep = table.var[K.VAR.OBSERVED].to_numpy()
    res, per_gene = sqs.tl.evaluate_expression(table, by=None, return_per_gene=True)
    assert res["n_genes"].iloc[0] == 6 and set(per_gene["gene"]) == set(table.var_names[keep])
    # a partial panel: the prediction is renormalised over the measured genes, as the observed values are
    expected = expression_metrics(_reclose(pred.astype(np.float64), keep), obs[:, keep])[0]["ACG"]
    assert res["ACG"].iloc[0] == pytest.approx(expected, rel=1e-5)


def test_predict_flags_the_panel_genes_the_query_never_measured(fitted):
    sd, model = fitted
    t = sd.tables["table"]
    ref = t[rows_of(t, ["s0", "s1"])].copy()
    query = t[rows_of(t, ["s2"])].copy()
    query = query[:, [g for g in query.var_names if g not in ("gene0", "gene5")]].copy()
    pred = sqs.tl.predict_expression(query, model, reference=ref, k=10, features_key="X_fake",
                                     reference_features_key="X_fake")
    observed = pred.var[K.VAR.OBSERVED]
    assert not observed["gene0"] and not observed["gene5"] and observed.sum() == len(GENES) - 2
    res = sqs.tl.evaluate_expression(pred)
    assert res["n_genes"].iloc[0] == len(GENES) - 2
