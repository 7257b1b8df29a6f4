import warnings

import numpy as np
import pytest

import sq_spade as sqs
from sq_spade import _constants as K
from sq_spade.models._baselines import KNNModel, RidgeModel
from sq_spade.tl._baselines import train_baseline
from sq_spade.tl._contrastive import train_contrastive
from tests.tl.test_contrastive import GENES, _data


def _fit(data, **kw):
    args = dict(features_key="X_fake", backbone="fake", panel=GENES, train_sections=["s0", "s1"],
                validation_sections=["s2"])
    args.update(kw)
    return train_baseline(data, **args)


@pytest.mark.parametrize("method,cls,kw", [("ridge", RidgeModel, {"n_components": 4}),
                                           ("knn", KNNModel, {"k_grid": [5, 10]})])
def test_baselines_fit_predict_save_load(tmp_path, method, cls, kw):
    ad = _data().tables["table"].copy()
    obsm_before, uns_before = set(ad.obsm), set(ad.uns)
    model = _fit(ad, method=method, regressor_kwargs=kw)
    assert isinstance(model, cls) and model.panel == GENES and model.backbone == "fake"
    assert set(ad.obsm) == obsm_before and set(ad.uns) == uns_before  # nothing written
    assert model.config["params"]["validation"]["ACG"] > 0.3
    pred = sqs.tl.predict_expression(ad, model)
    assert list(pred.var_names) == GENES
    res = sqs.tl.evaluate_expression(pred).set_index("section")
    assert res.loc["s2", "ACG"] > 0.3
    # the regressor predicted from the query's features alone: a reference changes nothing
    again = sqs.tl.predict_expression(ad, model, reference=ad[:5].copy())
    assert np.array_equal(again.layers[K.PREDICTED_LAYER], pred.layers[K.PREDICTED_LAYER])
    model.save(tmp_path / "m")
    back = cls.load(tmp_path / "m")
    assert np.array_equal(back.predict(ad.obsm["X_fake"]), model.predict(ad.obsm["X_fake"]))
    assert back.config["regressor"] == model.config["regressor"]
    with pytest.raises(sqs.models.ModelFileError):
        (RidgeModel if cls is KNNModel else KNNModel).load(tmp_path / "m")


def test_train_contrastive_still_trains_baselines_with_a_future_warning():
    ad = _data().tables["table"].copy()
    new = _fit(ad, method="knn", regressor_kwargs={"k_grid": [5, 10]})
    with pytest.warns(FutureWarning, match=r"train_baseline\(sdata, method='knn'"):
        old = train_contrastive(ad, method="knn", features_key="X_fake", backbone="fake", panel=GENES,
                                regressor_kwargs={"k_grid": [5, 10]}, train_sections=["s0", "s1"],
                                validation_sections=["s2"])
    assert isinstance(old, KNNModel)
    assert np.array_equal(old.predict(ad.obsm["X_fake"]), new.predict(ad.obsm["X_fake"]))
    assert old.config["params"] == new.config["params"]
    # the public name, as documented
    assert sqs.tl.train_baseline is train_baseline
    # mclSTExp itself does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        train_contrastive(ad, features_key="X_fake", backbone="fake", panel=GENES, epochs=1, out_dim=8, heads=2,
                          dim_head=4, device="cpu")


def test_baseline_errors_and_nothing_written():
    sd = _data()
    t = sd.tables["table"]
    before = (set(t.obsm), set(t.uns))
    with pytest.raises(ValueError, match="`method`"):
        _fit(sd, method="mclstexp")
    with pytest.raises(TypeError, match="regressor_kwargs"):
        _fit(sd, method="knn", regressor_kwargs={"neighbours": 3})
    with pytest.raises(TypeError, match="regressor_kwargs"), pytest.warns(FutureWarning):
        train_contrastive(sd, method="knn", features_key="X_fake", backbone="fake", panel=GENES,
                          regressor_kwargs={"neighbours": 3})
    with pytest.raises(ValueError, match="overlap"):
        _fit(sd, train_sections=["s0", "s2"])
    with pytest.raises(KeyError, match="features_key"):
        _fit(sd, features_key="X_nope")
    assert (set(t.obsm), set(t.uns)) == before
