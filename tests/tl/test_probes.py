from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from sq_spade.tl._probes import few_shot_probe, summarize_few_shot


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    n_cls, per, d = 4, 50, 32
    codes = np.repeat(np.arange(n_cls), per)
    labels = np.array(["a", "b", "c", "d"])[codes]
    centers = rng.standard_normal((n_cls, d))
    embs = {
        "separated": centers[codes] * 3 + rng.standard_normal((len(codes), d)),
        "moderate": centers[codes] * 0.3 + rng.standard_normal((len(codes), d)),
        "random": rng.standard_normal((len(codes), d)),
    }
    return embs, labels


def test_logistic_accuracy_high_grows_with_shots_and_chance_on_noise(synthetic):
    embs, labels = synthetic
    df = few_shot_probe(embs, labels, shots=(1, 16), n_repeats=6)
    assert len(df) == 3 * 2 * 6
    assert set(df.columns) >= {"embedding", "shots", "repeat", "balanced_accuracy", "auc_macro_ovr"}
    s = summarize_few_shot(df).set_index(["embedding", "shots"])
    assert s.loc[("separated", 1), "balanced_accuracy_mean"] > 0.95
    assert s.loc[("separated", 16), "auc_macro_ovr_mean"] > 0.99
    assert s.loc[("moderate", 16), "balanced_accuracy_mean"] > s.loc[("moderate", 1), "balanced_accuracy_mean"] + 0.1
    for k in (1, 16):
        assert abs(s.loc[("random", k), "balanced_accuracy_mean"] - 0.25) < 0.08
        assert abs(s.loc[("random", k), "auc_macro_ovr_mean"] - 0.5) < 0.07
    assert (s["n_repeats"] == 6).all()
    # every spot not drawn is tested
    assert (df["n_train"] == df["shots"] * 4).all() and (df["n_test"] == 200 - df["n_train"]).all()


@pytest.mark.parametrize("classifier", ["knn", "prototype"])
def test_other_classifiers(synthetic, classifier):
    embs, labels = synthetic
    df = few_shot_probe(embs, labels, shots=(1, 16), n_repeats=4, classifier=classifier)
    s = summarize_few_shot(df).set_index(["embedding", "shots"])
    assert s.loc[("separated", 16), "balanced_accuracy_mean"] > 0.95
    assert s.loc[("moderate", 16), "balanced_accuracy_mean"] > s.loc[("moderate", 1), "balanced_accuracy_mean"]
    assert abs(s.loc[("random", 16), "balanced_accuracy_mean"] - 0.25) < 0.08


def test_one_shot_knn_equals_prototype(synthetic):
    embs, labels = synthetic
    a = few_shot_probe(embs, labels, shots=1, n_repeats=3, classifier="knn")
    b = few_shot_probe(embs, labels, shots=1, n_repeats=3, classifier="prototype")
    np.testing.assert_allclose(a["balanced_accuracy"], b["balanced_accuracy"])


def test_deterministic_and_paired(synthetic):
    embs, labels = synthetic
    e = {"x": embs["moderate"], "y": embs["moderate"].copy()}
    a = few_shot_probe(e, labels, shots=(2, 4), n_repeats=3, classifier="prototype", seed=3)
    b = few_shot_probe(e, labels, shots=(2, 4), n_repeats=3, classifier="prototype", seed=3)
    pd.testing.assert_frame_equal(a, b)
    # same draws for both embeddings: identical inputs give identical rows
    np.testing.assert_array_equal(a.loc[a.embedding == "x", "balanced_accuracy"],
                                  a.loc[a.embedding == "y", "balanced_accuracy"])
    # a draw depends on (seed, shots, repeat) only, not on the other shots requested
    only4 = few_shot_probe(e, labels, shots=4, n_repeats=3, classifier="prototype", seed=3)
    np.testing.assert_array_equal(only4["balanced_accuracy"], a.loc[a.shots == 4, "balanced_accuracy"])
    c = few_shot_probe(e, labels, shots=(2, 4), n_repeats=3, classifier="prototype", seed=4)
    assert not np.array_equal(a["balanced_accuracy"], c["balanced_accuracy"])


def test_small_classes_dropped_with_one_warning_and_unlabelled_ignored():
    rng = np.random.default_rng(1)
    labels = np.array(["a"] * 20 + ["b"] * 20 + ["c"] * 3 + [None] * 7, dtype=object)
    x = rng.standard_normal((50, 5))
    with pytest.warns(UserWarning, match=r"dropped") as rec:
        df = few_shot_probe({"x": x}, labels, shots=(1, 3), n_repeats=2, classifier="prototype")
    assert len(rec) == 1
    assert df.attrs["dropped_classes"] == {3: ["c"]}
    assert df.groupby("shots")["n_classes"].first().to_dict() == {1: 3, 3: 2}
    one = df[df.shots == 1].iloc[0]
    assert one["n_test"] == 43 - 3  # the 7 unlabelled spots are neither drawn nor tested
    assert np.isfinite(df["auc_macro_ovr"]).all()  # binary case included
    with pytest.warns(UserWarning, match="skipped"):
        out = few_shot_probe({"x": x}, labels, shots=25, n_repeats=1)
    assert out.empty and out.attrs["skipped_shots"] == [25]


def test_no_warning_when_nothing_dropped(synthetic):
    embs, labels = synthetic
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        few_shot_probe({"r": embs["random"]}, labels, shots=2, n_repeats=1, classifier="prototype")


def test_errors(synthetic):
    embs, labels = synthetic
    with pytest.raises(TypeError, match="`embeddings`"):
        few_shot_probe(embs["random"], labels)
    with pytest.raises(ValueError, match=r"`embeddings\['short'\]`"):
        few_shot_probe({"short": embs["random"][:10]}, labels)
    with pytest.raises(ValueError, match="`classifier`"):
        few_shot_probe(embs, labels, classifier="svm")
    with pytest.raises(ValueError, match="`shots`"):
        few_shot_probe(embs, labels, shots=(0,))
    with pytest.raises(ValueError, match="`seed`"):
        few_shot_probe(embs, labels, seed=-1)
    with pytest.raises(ValueError, match="`df`"):
        summarize_few_shot(pd.DataFrame({"a": [1]}))
