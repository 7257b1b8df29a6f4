"""Accuracy tests that a leaked reference cannot pass, and one guard per leak.

Every end-to-end accuracy test here retrieves from a *clean* reference (the held-out section
is not in it, asserted) and must beat a shuffled control by a stated margin: the same model
and reference predicting the held-out section from its images permuted across its spots (each
spot gets another spot's image), so a score owed to anything but the spot's own image fails.
Each leakage guard is its own test and fails when its leak is put back (benchmarks/mutation.py
plants each one).
"""

from __future__ import annotations

import numpy as np
import pytest

import sq_spade as sqs
from sq_spade import _constants as K
from sq_spade._validation import section_labels
from sq_spade.tl._common import rows_of
from tests.conftest import colour_feature_sections

GENES = [f"gene{i}" for i in range(12)]
#: what a clean prediction of the held-out section must beat its shuffled control by (ACG)
MARGIN = 0.2


def _data(n=3, size=10):
    """Sections whose images (mean patch colour, the fake features) and counts share a hidden tissue type."""
    return colour_feature_sections(n, size)


def _split(sd, test="s2"):
    """(clean reference, query): the reference holds every section but ``test``; asserted."""
    t = sd.tables["table"]
    ref = t[~rows_of(t, [test])].copy()
    query = t[rows_of(t, [test])].copy()
    assert test not in set(section_labels(ref)) and set(section_labels(query)) == {test}
    assert not set(ref.obs_names) & set(query.obs_names)
    return ref, query


def _shuffled_images(query, seed=0):
    """The query with its image features permuted across its spots."""
    out = query.copy()
    perm = np.random.default_rng(seed).permutation(out.n_obs)
    out.obsm["X_fake"] = out.obsm["X_fake"][perm]
    return out


def _acg(query, model, ref, **kw):
    pred = sqs.tl.predict_expression(query, model, reference=ref, features_key="X_fake",
                                     reference_features_key="X_fake", **kw)
    return float(sqs.tl.evaluate_expression(pred)["ACG"].iloc[0]), pred


def _check_beats_control(model, ref, query, **kw):
    real, pred = _acg(query, model, ref, **kw)
    control, _ = _acg(_shuffled_images(query), model, ref, **kw)
    assert real > control + MARGIN, (real, control)
    info = pred.uns[K.UNS.PREDICTION][K.LAYERS.PREDICTED]
    if "n_reference" in info:  # retrieval models record how many spots they retrieved from
        assert int(info["n_reference"]) == ref.n_obs
    return real, control


def test_spade_beats_its_shuffled_control_from_a_clean_reference():
    sd = _data()
    ref, query = _split(sd)
    model = sqs.tl.train_experts(ref, features_key="X_fake", backbone="fake", panel=GENES, n_fine=4, n_experts=2,
                                 epochs=15, batch_size=32, lr=1e-3, train_sections=["s0"],
                                 validation_sections=["s1"])
    assert "s2" not in model.config["train_sections"] + model.config["validation_sections"]
    _check_beats_control(model, ref, query, k=20)


def test_mclstexp_beats_its_shuffled_control_from_a_clean_reference():
    sd = _data(size=8)
    ref, query = _split(sd)
    model = sqs.tl.train_contrastive(ref, features_key="X_fake", backbone="fake", panel=GENES, epochs=30,
                                     out_dim=32, heads=2, dim_head=8, batch_size=32, lr=1e-3, device="cpu",
                                     train_sections=["s0"], validation_sections=["s1"])
    _check_beats_control(model, ref, query, k=20)


@pytest.mark.parametrize("method,kw", [("ridge", {"n_components": 4}), ("knn", {"k_grid": [5, 10]})])
def test_baselines_beat_their_shuffled_control_on_an_unseen_section(method, kw):
    sd = _data(size=8)
    ref, query = _split(sd)
    model = sqs.tl.train_baseline(ref, method=method, features_key="X_fake", backbone="fake", panel=GENES,
                                  train_sections=["s0"], validation_sections=["s1"], regressor_kwargs=kw)
    assert "s2" not in (model.config["train_sections"] or [])
    _check_beats_control(model, None, query)


# --- leakage guards ----------------------------------------------------------------------------------------------
def _with_test_section_marker(n_genes=30, marker="gene29"):
    """Three sections; in the held-out s2 alone, ``marker`` is by far the most expressed gene."""
    sd = sqs.io.combine_sections([sqs.datasets.synthetic_section(section=f"s{i}", seed=i, n_genes=n_genes)
                                  for i in range(3)])
    t = sd.tables["table"]
    X = t.X.toarray()
    X[rows_of(t, ["s2"]), list(t.var_names).index(marker)] = 5000
    import scipy.sparse as sp

    t.X = sp.csr_matrix(X)
    return sd, t


def test_heg_panel_is_computed_without_the_held_out_section():
    sd, t = _with_test_section_marker()
    heg = sqs.pp.select_genes(sd, "heg", n_top=5, train_sections=["s0", "s1"], inplace=False)
    # the same panel as on a table that never held s2 (the leak guard that subsets first cannot see this)
    alone = sqs.pp.select_genes(t[rows_of(t, ["s0", "s1"])].copy(), "heg", n_top=5, inplace=False)
    assert heg == alone and "gene29" not in heg
    # and with every section, the marker is in: the test above is not vacuous
    assert "gene29" in sqs.pp.select_genes(sd, "heg", n_top=5, inplace=False)


def test_spade_panel_is_the_union_over_training_sections():
    sd = sqs.io.combine_sections([sqs.datasets.synthetic_section(section=f"s{i}", seed=10 + i, n_genes=40)
                                  for i in range(2)])
    per = [set(sqs.pp.select_genes(sd, "spade", n_top=6, train_sections=[s], inplace=False)) for s in ("s0", "s1")]
    assert per[0] - per[1] and per[1] - per[0]  # each section brings genes of its own
    both = sqs.pp.select_genes(sd, "spade", n_top=6, train_sections=["s0", "s1"], inplace=False)
    assert set(both) == per[0] | per[1]


def test_spade_panel_ignores_the_held_out_section():
    sd, _ = _with_test_section_marker(n_genes=40)
    p = sqs.pp.select_genes(sd, "spade", n_top=5, train_sections=["s0", "s1"], inplace=False)
    q = sqs.pp.select_genes(_with_test_section_marker(n_genes=40, marker="gene5")[0], "spade", n_top=5,
                            train_sections=["s0", "s1"], inplace=False)
    assert p == q


def test_cross_validation_retrieves_from_a_reference_without_the_test_section(monkeypatch):
    import sq_spade.tl._cross_validate as cv

    seen = []
    real = cv.predict_expression

    def spy(query, model, *, reference=None, **kw):
        seen.append((set(section_labels(query.tables["table"] if hasattr(query, "tables") else query)),
                     None if reference is None else set(section_labels(
                         reference.tables["table"] if hasattr(reference, "tables") else reference)),
                     list(model.config["train_sections"] or [])))
        return real(query, model, reference=reference, **kw)

    monkeypatch.setattr(cv, "predict_expression", spy)
    sd = _data(size=6)
    df = cv.cross_validate(sd, method="spade", panel="heg", n_top=8, features_key="X_fake", backbone="fake", k=10,
                           epochs=2, n_experts=2, n_fine=3)
    assert len(seen) == 3 == len(df)
    for (q, r, train), fold in zip(seen, ["s0", "s1", "s2"], strict=True):
        assert q == {fold}
        assert r is not None and fold not in r and r == {"s0", "s1", "s2"} - {fold}
        assert fold not in train


def test_validation_spots_are_routed_to_their_nearest_centroid(monkeypatch):
    import sq_spade.train as train_pkg

    captured = {}
    real = train_pkg.fit_experts

    def spy(*args, **kw):
        captured.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(train_pkg, "fit_experts", spy)
    sd = _data(size=8)
    t = sd.tables["table"]
    model = sqs.tl.train_experts(sd, features_key="X_fake", backbone="fake", panel=GENES, n_fine=6, n_experts=3,
                                 epochs=1, batch_size=32, train_sections=["s0", "s1"], validation_sections=["s2"])
    val = t.obsm["X_fake"][rows_of(t, ["s2"])]
    got = np.asarray(captured["val_expert"])
    d = ((val[:, None, :] - model.module.centroids.numpy()[None]) ** 2).sum(-1)
    expected = model.module.fine_to_expert.numpy()[d.argmin(1)]
    assert np.array_equal(got, expected)
    assert np.array_equal(got, model.assign(val))
    assert len(np.unique(expected)) > 1  # more than one expert among validation spots: the test can tell
