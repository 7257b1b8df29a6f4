"""Models remember how their features were computed (layers, TTA, z-score) and query features follow it."""

import numpy as np
import pytest

import sq_spade as sqs
from sq_spade import _constants as K

GEOMETRY = {"patch_size_um": 32, "microns_per_pixel": 1.0}


def _sections(names=("a", "b"), seed=0):
    return sqs.io.combine_sections([sqs.datasets.synthetic_section(section=s, n_rows=4, n_cols=4, seed=seed + i)
                                    for i, s in enumerate(names)])


def _ridge(sd, **kw):
    t = sd.tables["table"]
    return sqs.tl.train_baseline(sd, method="ridge", backbone="dummy", panel=list(t.var_names[:5]),
                                 train_sections=["a", "b"], **kw)


def test_model_records_the_recipe_and_query_features_follow_it(tmp_path):
    train = _sections()
    sqs.pp.compute_features(train, backbone="dummy", layers="pool", tta=True, **GEOMETRY)
    model = _ridge(train)
    recipe = {"layers": ["pool"], "tta": True, "zscore": "section"}
    assert model.feature_recipe == model.config.params["feature_recipe"] == recipe
    assert model.config.feature_dim == 96
    model.save(tmp_path / "m")
    back = sqs.models.RidgeModel.load(tmp_path / "m")
    assert back.feature_recipe == model.feature_recipe
    # a query without features: computed as the model was trained (not with the dummy's default, "final")
    query = _sections(("c", "d"), seed=5)
    pred = sqs.tl.predict_expression(query, back)
    prov = query.tables["table"].uns[K.FEATURES_UNS]["X_dummy"]
    assert list(prov["layers"]) == ["pool"] and prov["tta"] and prov["zscore"] == "section"
    assert pred.n_obs == query.tables["table"].n_obs
    # a query whose features were computed otherwise is refused, naming what differs
    other = _sections(("c", "d"), seed=5)
    sqs.pp.compute_features(other, backbone="dummy", **GEOMETRY)
    with pytest.raises(ValueError, match=r"layers=\['final'\] \(the model expects \['pool'\]\)"):
        sqs.tl.predict_expression(other, back)


def test_models_of_earlier_versions_read_final_raw_features():
    train = _sections()
    sqs.pp.compute_features(train, backbone="dummy", **GEOMETRY)
    model = _ridge(train)
    del model.config.params["feature_recipe"]  # as a model file written before recipes were recorded
    assert model.feature_recipe == {"layers": ["final"], "tta": False, "zscore": None}
    # features recorded before layers existed compare equal to the defaults
    t = train.tables["table"]
    for k in ("layers", "tta", "zscore"):
        t.uns[K.FEATURES_UNS]["X_dummy"].pop(k, None)
    assert sqs.tl.predict_expression(train, model).n_obs == t.n_obs
    t.uns[K.FEATURES_UNS]["X_dummy"]["tta"] = True
    with pytest.raises(ValueError, match="tta=True"):
        sqs.tl.predict_expression(train, model)


def test_feature_recipe_defaults_are_the_provenance_defaults():
    from sq_spade._validation import feature_recipe

    assert feature_recipe({}) == {"layers": list(K.FEATURE_PROVENANCE_DEFAULTS["layers"]),
                                  "tta": K.FEATURE_PROVENANCE_DEFAULTS["tta"],
                                  "zscore": K.FEATURE_PROVENANCE_DEFAULTS["zscore"]}
    stored = {"layers": np.array(["blocks.3", "blocks.4"]), "tta": np.bool_(True), "zscore": "section"}
    assert feature_recipe(stored) == {"layers": ["blocks.3", "blocks.4"], "tta": True, "zscore": "section"}
