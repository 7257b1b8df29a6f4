import numpy as np
import pytest

import sq_spade as sqs


def _data():
    sd = sqs.datasets.synthetic_section(n_rows=10, n_cols=10)
    t = sd.tables["table"]
    rng = np.random.default_rng(0)
    y = t.obs["tissue_type"].cat.codes.to_numpy()
    t.obsm["good"] = (np.eye(3)[y] * 3 + rng.normal(size=(100, 3))).astype("f4")
    t.obsm["bad"] = rng.normal(size=(100, 3)).astype("f4")
    return sd


def test_informative_embedding_wins_and_improves_with_shots():
    sd = _data()
    res = sqs.tl.few_shot(sd, label_key="tissue_type", embedding_keys=["good", "bad"], shots=(1, 8), n_repeats=8)
    r = res.set_index(["embedding", "shots"])["balanced_accuracy_mean"]
    assert r["good", 8] > 0.9 and r["bad", 8] < 0.6
    assert r["good", 8] >= r["good", 1]
    raw = sqs.tl.few_shot(sd, label_key="tissue_type", embedding_keys=["good"], shots=(2,), n_repeats=3,
                          summarize=False)
    assert len(raw) == 3


def test_errors():
    sd = _data()
    with pytest.raises(KeyError, match="label_key"):
        sqs.tl.few_shot(sd, label_key="nope", embedding_keys=["good"])
    with pytest.raises(KeyError, match="embedding_keys"):
        sqs.tl.few_shot(sd, label_key="tissue_type", embedding_keys=["nope"])
    with pytest.raises(ValueError, match="classifier"):
        sqs.tl.few_shot(sd, label_key="tissue_type", embedding_keys=["good"], classifier="svm")
