import numpy as np
import pandas as pd
import pytest

import sq_spade as sqs
from sq_spade import _constants as K

GENES = [f"gene{i}" for i in range(12)]


def _data(n=3, size=10):
    sd = sqs.io.combine_sections([sqs.datasets.synthetic_section(section=f"s{i}", seed=i, n_rows=size, n_cols=size,
                                                                  patient=f"p{i}") for i in range(n)])
    t = sd.tables["table"]
    p = sqs.pp.patches(sd, patch_size_um=30, microns_per_pixel=1.0)
    rng = np.random.default_rng(0)
    colour = np.stack([p[i].reshape(-1, 3).mean(0) for i in range(len(p))]) / 255
    t.obsm["X_fake"] = np.hstack([colour, rng.normal(0, 0.05, (len(p), 5))]).astype(np.float32)
    return sd


def _train(sd, **kw):
    args = dict(features_key="X_fake", backbone="fake", panel=GENES, n_fine=4, n_experts=2, epochs=40,
                batch_size=32, lr=1e-3, train_sections=["s0", "s1"], validation_sections=["s2"])
    args.update(kw)
    return sqs.tl.train_experts(sd, **args)


def test_train_experts_writes_results_and_learns():
    sd = _data()
    t = sd.tables["table"]
    model = _train(sd)
    assert t.obsm[K.SPADE_KEY].shape == (t.n_obs, 256)
    assert set(t.obs[K.SPADE_EXPERT].cat.categories) <= {"0", "1"}
    uns = t.uns[K.SPADE_UNS]
    assert list(uns["train_sections"]) == ["s0", "s1"] and list(uns["validation_sections"]) == ["s2"]
    hist = model.history
    val = np.asarray(hist["val_loss"], dtype=float)
    assert np.nanmean(val[-1]) < np.nanmean(val[0])  # validation loss went down
    # retrieval from a reference without the held-out s2 predicts it (tests/tl/test_leak_free.py adds the
    # shuffled control)
    ref = t[np.isin(t.obs[K.SECTION_KEY].astype(str), ["s0", "s1"])].copy()
    assert "s2" not in set(ref.obs[K.SECTION_KEY].astype(str))
    pred = sqs.tl.predict_expression(sd, model, reference=ref, k=20, features_key="X_fake",
                                     reference_features_key="X_fake")
    res = sqs.tl.evaluate_expression(sd).set_index("section")
    assert res.loc["s2", "ACG"] > 0.3
    assert pred.uns[K.PREDICTION_UNS]["predicted"]["model"] == "Spade"


def test_train_experts_is_deterministic():
    a, b = _data(), _data()
    ma, mb = _train(a, epochs=5), _train(b, epochs=5)
    assert np.array_equal(a.tables["table"].obsm[K.SPADE_KEY], b.tables["table"].obsm[K.SPADE_KEY])
    assert ma.config["reference_side"] == mb.config["reference_side"]
    pa = sqs.tl.predict_expression(a, ma, reference=a, k=10)
    pb = sqs.tl.predict_expression(b, mb, reference=b, k=10)
    assert np.array_equal(pa.layers["predicted"], pb.layers["predicted"])


def test_embed_other_slide_and_refuse_other_backbone():
    sd = _data()
    model = _train(sd, epochs=3)
    new = _data(n=1)
    t = new.tables["table"]
    sqs.tl.embed(new, model, features_key="X_fake", key_added="X_new", weights_key="W")
    assert t.obsm["X_new"].shape == (t.n_obs, 256)
    assert np.allclose(t.obsm["W"].sum(1), 1, atol=1e-5)
    hard = sqs.tl.embed(new, model, features_key="X_fake", key_added="X_hard", routing="hard")
    assert hard is None and not np.allclose(t.obsm["X_hard"], t.obsm["X_new"])
    t.uns[K.FEATURES_UNS] = {"X_fake": {"backbone": "resnet50"}}
    with pytest.raises(ValueError, match="resnet50"):
        sqs.tl.embed(new, model, features_key="X_fake")


def test_panel_leak_guard_and_bad_arguments():
    sd = _data()
    t = sd.tables["table"]
    sqs.pp.select_genes(sd, "heg", n_top=5)  # chosen on all sections, test included
    with pytest.raises(ValueError, match="leak"):
        _train(sd, panel=None)
    with pytest.raises(ValueError, match="overlap"):
        _train(sd, train_sections=["s0", "s2"])
    with pytest.raises(ValueError, match="`loss`"):
        _train(sd, loss="mse")
    with pytest.raises(KeyError, match="features_key"):
        _train(sd, features_key="X_none")
    assert K.SPADE_KEY not in t.obsm  # nothing half-written


def test_evaluate_expression_on_known_predictions():
    sd = _data(n=2)
    t = sd.tables["table"]
    model = _train(sd, train_sections=["s0"], validation_sections=None, epochs=2)
    sqs.tl.predict_expression(sd, model, reference=sd, k=5)
    pt = sd.tables["predicted"]
    pt.layers["perfect"] = pt.layers[K.NORMALIZED_LAYER].copy()
    res, per_gene = sqs.tl.evaluate_expression(sd, layer="perfect", return_per_gene=True)
    assert np.allclose(res["ACG"], 1.0) and np.allclose(res["MSE"], 0.0)
    assert set(per_gene["section"]) == {"s0", "s1"}
    with pytest.raises(KeyError, match="`layer="):
        sqs.tl.evaluate_expression(sd, layer="nope")
    assert isinstance(res, pd.DataFrame) and t.n_obs == 200


def test_results_survive_h5ad_and_zarr(tmp_path):
    sd = _data(n=2)
    model = _train(sd, train_sections=["s0"], validation_sections=["s1"], epochs=2)
    sqs.tl.predict_expression(sd, model, reference=sd, k=5)
    sd.tables["table"].write_h5ad(tmp_path / "t.h5ad")
    sd.tables["predicted"].write_h5ad(tmp_path / "p.h5ad")
    sd.write(tmp_path / "sd.zarr")
    import spatialdata

    back = spatialdata.read_zarr(tmp_path / "sd.zarr")
    assert np.allclose(back.tables["predicted"].layers["predicted"], sd.tables["predicted"].layers["predicted"])


def test_train_experts_resumes_from_a_checkpoint(tmp_path):
    from sq_spade.train import read_checkpoint
    from tests.train.test_checkpoint import interrupt_after

    a, b = _data(size=6), _data(size=6)
    ma = _train(a, epochs=4, dropout=0.3, recipe="published")
    with pytest.raises(ValueError, match="n_seeds=1"):  # checkpoints hold one training run
        _train(b, epochs=4, checkpoint_dir=tmp_path)
    with interrupt_after(2):
        _train(b, epochs=4, dropout=0.3, recipe="published", checkpoint_every=1, checkpoint_dir=tmp_path)
    assert K.SPADE_KEY not in b.tables["table"].obsm  # the interrupted run wrote nothing
    assert read_checkpoint(tmp_path)["epoch"] == 2
    mb = _train(b, epochs=4, dropout=0.3, recipe="published", checkpoint_every=1, checkpoint_dir=tmp_path,
                resume=True)
    assert np.array_equal(a.tables["table"].obsm[K.SPADE_KEY], b.tables["table"].obsm[K.SPADE_KEY])
    assert ma.history == mb.history


def test_train_experts_from_store_streams_sections(tmp_path):
    secs = [sqs.datasets.synthetic_section(section=f"s{i}", n_rows=6, n_cols=6, seed=i) for i in range(4)]
    sd = sqs.io.combine_sections(secs)
    sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0)
    t = sd.tables["table"]
    panel = list(t.var_names[:12])
    store = sqs.pp.write_feature_store(sd, tmp_path / "f.zarr", panel=panel)
    # a budget of about two sections' rows: training must go window by window
    budget = 2 * 36 * store.row_bytes * 2
    assert len(store.training_windows({s: np.zeros(36, int) for s in store.sections}, n_experts=1,
                                      memory_budget_bytes=budget)["loaders"]) > 1
    model = sqs.tl.train_experts_from_store(tmp_path / "f.zarr", validation_sections="s3", n_fine=4, n_experts=3,
                                            epochs=3, batch_size=16, memory_budget_bytes=budget, seed=0)
    assert model.panel == panel and model.config["train_sections"] == ["s0", "s1", "s2"]
    assert model.config["validation_sections"] == ["s3"] and model.n_experts == 3
    assert len(model.config["centroid_groups"]) == 12  # 4 fine centroids per training section
    hist = model.history
    assert np.asarray(hist["train_loss"], float).shape == (3, 3)
    emb = model.embed_images(t.obsm["X_dummy"])
    assert emb.shape == (t.n_obs, model.config["out_dim"]) and np.isfinite(emb).all()
    again = sqs.models.Spade.load(model.save(tmp_path / "m"))
    np.testing.assert_allclose(again.embed_images(t.obsm["X_dummy"]), emb, rtol=1e-5, atol=1e-6)
    pred = sqs.tl.predict_expression(sd, model, reference=sd, k=10)
    assert pred.shape == (t.n_obs, len(panel))
    with pytest.raises(ValueError, match="not in the store"):
        sqs.tl.train_experts_from_store(tmp_path / "f.zarr", validation_sections="nope")
