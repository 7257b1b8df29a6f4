import numpy as np
import pytest

import sq_spade as sqs
from sq_spade import _constants as K
from sq_spade.models import KNNModel, MclSTExp, RidgeModel, Spade
from sq_spade.tl._baselines import predict_baseline, train_baseline
from sq_spade.tl._contrastive import predict_mclstexp
from sq_spade.tl._experts import predict_spade
from sq_spade.tl._predict import PREDICTORS, predictor_of
from tests.tl.test_contrastive import GENES, _data, _train


def test_predictions_table_for_every_model_type():
    sd = _data()
    base = dict(features_key="X_fake", backbone="fake", panel=GENES, train_sections=["s0", "s1"])
    models = {"mclstexp": _train(sd, epochs=2), "ridge": train_baseline(sd, method="ridge", **base),
              "knn": train_baseline(sd, method="knn", **base),
              "spade": sqs.tl.train_experts(sd, n_fine=2, n_experts=2, epochs=2, **base)}
    for name, m in models.items():
        sqs.tl.predict_expression(sd, m, reference=sd, k=10, key_added=f"pred_{name}")
    table = sd.tables[K.PREDICTED_TABLE]
    assert list(table.var_names) == GENES
    assert {f"pred_{n}" for n in models} <= set(table.layers)
    assert table.uns[K.PREDICTION_UNS]["pred_knn"]["model"] == "KNNModel"
    assert table.uns[K.PREDICTION_UNS]["pred_spade"]["model"] == "Spade"
    for n in models:
        assert np.isfinite(table.layers[f"pred_{n}"]).all()
    # X holds the latest prediction, dense, so the ecosystem reads it without a layer argument
    np.testing.assert_array_equal(table.X, table.layers[f"pred_{list(models)[-1]}"])
    assert table.uns[K.UNS.PREDICTION_X] == f"pred_{list(models)[-1]}"


def test_dispatch_is_one_table_keyed_by_class_and_follows_subclasses():
    assert PREDICTORS == {Spade: predict_spade, MclSTExp: predict_mclstexp, RidgeModel: predict_baseline,
                          KNNModel: predict_baseline}

    class MyRidge(RidgeModel):
        pass

    ridge = train_baseline(_data().tables["table"].copy(), method="ridge", features_key="X_fake", backbone="fake",
                           panel=GENES)
    mine = MyRidge(ridge.regressor, ridge.config)
    assert predictor_of(mine) is predict_baseline
    ad = _data().tables["table"].copy()
    a = sqs.tl.predict_expression(ad, ridge).layers[K.PREDICTED_LAYER]
    b = sqs.tl.predict_expression(ad, mine).layers[K.PREDICTED_LAYER]
    assert np.array_equal(a, b)
    with pytest.raises(TypeError, match=r"`model` must be one of \['KNNModel', 'MclSTExp', 'RidgeModel', 'Spade'\]"):
        predictor_of(object())
