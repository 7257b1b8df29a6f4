import numpy as np
import pytest
import torch
from torch import nn

import sq_spade as sqs
from sq_spade import _constants as K
from sq_spade._metrics import expression_metrics
from sq_spade.models._mclstexp import MclSTExp
from sq_spade.nn.retrieval import retrieve_predict
from sq_spade.pp._genes import panel_expression
from sq_spade.tl._common import rows_of
from sq_spade.tl._contrastive import spot_keys, train_contrastive
from sq_spade.train._finetune import last_block_prefixes

GENES = [f"gene{i}" for i in range(12)]
SMALL = dict(out_dim=32, heads=2, dim_head=8, batch_size=32, lr=1e-3, device="cpu")


def _data(n=3, size=8):
    """Sections whose images (mean colour of the patch) and counts share a hidden tissue type."""
    sd = sqs.io.combine_sections([sqs.datasets.synthetic_section(section=f"s{i}", seed=i, n_rows=size, n_cols=size,
                                                                  patient=f"p{i}") for i in range(n)])
    t = sd.tables["table"]
    p = sqs.pp.patches(sd, patch_size_um=30, microns_per_pixel=1.0)
    rng = np.random.default_rng(0)
    colour = np.stack([p[i].reshape(-1, 3).mean(0) for i in range(len(p))]) / 255
    t.obsm["X_fake"] = np.hstack([colour, rng.normal(0, 0.05, (len(p), 5))]).astype(np.float32)
    return sd


def _train(data, **kw):
    args = dict(features_key="X_fake", backbone="fake", panel=GENES, epochs=30, train_sections=["s0", "s1"],
                validation_sections=["s2"], recipe="published", **SMALL)
    args.update(kw)
    return train_contrastive(data, **args)


def _acg(pred, obs):
    return expression_metrics(pred, obs)[0]["ACG"]


def test_mclstexp_learns_and_beats_a_shuffled_reference():
    sd = _data()
    t = sd.tables["table"]
    model = _train(sd)
    assert isinstance(model, MclSTExp) and model.panel == GENES
    assert t.obsm[K.MCLSTEXP_KEY].shape == (t.n_obs, 32)
    uns = t.uns["mclstexp"]
    assert list(uns["train_sections"]) == ["s0", "s1"] and list(uns["validation_sections"]) == ["s2"]
    assert uns["backbone"] == "fake" and uns["embedding_key"] == K.MCLSTEXP_KEY
    val = np.asarray(model.history["val_loss"], dtype=float)
    assert val.min() < val[0]
    ref = t[rows_of(t, ["s0", "s1"])].copy()
    pred = sqs.tl.predict_expression(sd, model, reference=ref, k=20)
    assert list(pred.var_names) == GENES and pred.layers[K.PREDICTED_LAYER].shape == (t.n_obs, 12)
    res = sqs.tl.evaluate_expression(sd).set_index("section")
    assert res.loc["s2", "ACG"] > 0.3
    # control: the same retrieval with the reference's expression shuffled across its spots
    s2 = rows_of(t, ["s2"])
    q = model.embed_images(t.obsm["X_fake"][s2])
    keys = spot_keys(ref, model)
    values, _ = panel_expression(ref, GENES)
    obs, _ = panel_expression(t[s2], GENES)
    real = retrieve_predict(q, keys, values, k=20)
    assert np.allclose(real, pred.layers[K.PREDICTED_LAYER][s2], atol=1e-5)
    perm = np.random.default_rng(0).permutation(len(values))
    shuffled = retrieve_predict(q, keys, values[perm], k=20)
    assert _acg(real, obs) > _acg(shuffled, obs) + 0.2


def test_save_load_predicts_identically_and_keys_are_batch_independent(tmp_path):
    sd = _data()
    ad = sd.tables["table"].copy()
    model = _train(ad, epochs=3, context="tile", position="pixel")
    assert model.config["position_bin_um"] == pytest.approx(40.0)  # the synthetic pitch: 40 px of 1 um
    model.save(tmp_path / "m")
    back = MclSTExp.load(tmp_path / "m")
    a = sqs.tl.predict_expression(ad, model, reference=ad, k=10)
    b = sqs.tl.predict_expression(ad, back, reference=ad, k=10)
    assert np.array_equal(a.layers[K.PREDICTED_LAYER], b.layers[K.PREDICTED_LAYER])
    for m in (model, _train(ad, epochs=2, context="self", seed=1)):
        big = spot_keys(ad, m, batch_size=4096)
        assert np.allclose(spot_keys(ad, m, batch_size=5), big, atol=1e-5)
        # a reference holding other spots besides does not change a spot's key
        s0 = ad[rows_of(ad, ["s0"])].copy()
        assert np.allclose(spot_keys(s0, m), big[rows_of(ad, ["s0"])], atol=1e-5)


def test_batch_context_trains_and_uses_self_keys(tmp_path):
    ad = _data().tables["table"].copy()
    model = _train(ad, epochs=2, context="batch", position=None, validation_sections=None)
    ad.write_h5ad(tmp_path / "t.h5ad")  # the provenance in uns can be written
    assert model.config["n_x"] is None and model.spot_encoder.x_embed is None
    expr, _ = panel_expression(ad, GENES)
    assert np.allclose(spot_keys(ad, model), model.embed_spots(expr, None, "self"), atol=1e-6)


def test_position_tables_are_sized_from_the_data():
    ad = _data().tables["table"].copy()
    s1 = rows_of(ad, ["s1"])
    ad.obs.loc[s1, K.ARRAY_COL] += 1000  # sections are shifted to start at 0
    ad.obs.loc[s1, K.ARRAY_ROW] += 500
    model = _train(ad, epochs=1)
    assert (model.config["n_x"], model.config["n_y"]) == (8, 8)
    assert model.spot_encoder.x_embed.num_embeddings == 8 and model.spot_encoder.y_embed.num_embeddings == 8
    # a reference larger than the training grid is clipped to the tables, with a warning
    big = _data(n=1, size=10).tables["table"]
    with pytest.warns(UserWarning, match="position tables"):
        keys = spot_keys(big, model)
    assert keys.shape == (100, 32) and np.isfinite(keys).all()


class _TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.proj = nn.Linear(4, 6)

    def forward(self, x):
        return self.proj(self.conv(x).mean(dim=(2, 3)))


@pytest.fixture
def registry():
    """The backbone registry, restored after the test, so test backbones do not outlive it."""
    from sq_spade.nn.backbones import BACKBONES

    saved = dict(BACKBONES)
    yield BACKBONES
    BACKBONES.clear()
    BACKBONES.update(saved)


def test_finetune_on_patches_with_small_backbones(tmp_path, registry):
    from sq_spade.nn.backbones import get_backbone, register_backbone

    sd = _data(n=2, size=4)
    t = sd.tables["table"]
    kw = dict(features_key=None, panel=GENES, epochs=1, train_sections=["s0"], validation_sections=["s1"],
              patch_px=16, position="grid", **{**SMALL, "batch_size": 8})
    model = train_contrastive(sd, backbone="dummy", finetune="all", **kw)
    assert model.finetuned and model.config["feature_dim"] == 64 and model.config["patch_px"] == 16
    emb = t.obsm[K.MCLSTEXP_KEY]
    assert emb.shape == (t.n_obs, 32) and np.isfinite(emb).all()
    assert t.uns["mclstexp"]["finetune"] == "all" and "X_dummy" not in t.obsm  # no frozen features needed
    model.save(tmp_path / "m")
    back = MclSTExp.load(tmp_path / "m")
    a = sqs.tl.predict_expression(sd, model, reference=sd, k=5, key_added="a").layers["a"]
    b = sqs.tl.predict_expression(sd, back, reference=sd, k=5, key_added="b").layers["b"]
    assert np.array_equal(a, b)
    with pytest.raises(TypeError, match="SpatialData"):
        sqs.tl.predict_expression(t.copy(), model, reference=sd)
    # "last" trains the last block only, "all" the whole encoder
    register_backbone("tiny_conv_tl_test", lambda weights=None: _TinyConv(), dim=6, input_size=16, overwrite=True)
    assert last_block_prefixes(get_backbone("tiny_conv_tl_test")) == ["model.proj."]
    for mode, changed in (("last", {"model.proj.weight", "model.proj.bias"}),
                          ("all", {"model.proj.weight", "model.proj.bias", "model.conv.weight", "model.conv.bias"})):
        torch.manual_seed(0)
        before = {k: v.clone() for k, v in get_backbone("tiny_conv_tl_test").state_dict().items()}
        torch.manual_seed(0)  # the same initial weights inside train_contrastive's get_backbone
        m = train_contrastive(sd, backbone="tiny_conv_tl_test", finetune=mode, **kw)
        after = m.image_encoder.state_dict()
        assert {k for k in before if not torch.equal(before[k], after[k])} == changed


def test_errors_and_nothing_written_on_failure():
    sd = _data()
    t = sd.tables["table"]
    with pytest.raises(ValueError, match="`method`"):
        _train(sd, method="lasso")
    with pytest.raises(ValueError, match="overlap"):
        _train(sd, train_sections=["s0", "s2"])
    with pytest.raises(ValueError, match="`context`"):
        _train(sd, context="window")
    with pytest.raises(TypeError, match="SpatialData"):
        _train(t.copy(), finetune="all", backbone="dummy")
    with pytest.raises(ValueError, match="regressor_kwargs"):
        _train(sd, regressor_kwargs={"k": 3})
    ad = t.copy()
    del ad.obs[K.ARRAY_COL]
    for kw in ({"position": "grid"}, {"position": None, "context": "tile"}):
        with pytest.raises(KeyError, match="array_col"):
            _train(ad, epochs=1, **kw)
    assert K.MCLSTEXP_KEY not in ad.obsm and "mclstexp" not in ad.uns
    assert _train(ad, epochs=1, position="pixel").config["n_x"] == 8  # pixel positions need no array coordinates
    with pytest.raises(ValueError, match="`reference` is required"):
        sqs.tl.predict_expression(ad, _train(ad, epochs=1, position=None))


def test_train_contrastive_resumes_from_a_checkpoint(tmp_path):
    from sq_spade.train import read_checkpoint
    from tests.train.test_checkpoint import interrupt_after

    for finetune, kw in (("none", {}), ("all", dict(backbone="dummy", features_key=None, patch_px=16))):
        a, b = _data(n=2, size=4), _data(n=2, size=4)
        args = dict(epochs=3, train_sections=["s0"], validation_sections=["s1"], finetune=finetune, **kw,
                    **{**SMALL, "batch_size": 8})
        ma = _train(a, **args)
        with interrupt_after(1):
            _train(b, **args, checkpoint_every=1, checkpoint_dir=tmp_path / finetune)
        assert read_checkpoint(tmp_path / finetune)["epoch"] == 1
        mb = _train(b, **args, checkpoint_every=1, checkpoint_dir=tmp_path / finetune, resume=True)
        assert np.array_equal(a.tables["table"].obsm[K.MCLSTEXP_KEY], b.tables["table"].obsm[K.MCLSTEXP_KEY])
        assert ma.history == mb.history
    with pytest.raises(ValueError, match="`checkpoint_dir` and `resume` apply to method='mclstexp'"):
        train_contrastive(a, method="ridge", features_key="X_fake", panel=GENES, checkpoint_dir=tmp_path)
