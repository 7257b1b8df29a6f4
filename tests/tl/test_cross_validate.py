import numpy as np
import pytest
import scipy.sparse as sp

import sq_spade as sqs
from sq_spade.tl._cross_validate import cross_validate

FAST = {"ridge": {}, "knn": {}, "mclstexp": dict(epochs=3, out_dim=16, heads=2, dim_head=4, batch_size=32),
        "spade": dict(epochs=3, n_experts=2, n_fine=4)}


def _data(patients=("p0", "p1", "p2")):
    sd = sqs.io.combine_sections([sqs.datasets.synthetic_section(section=f"s{i}", seed=i, n_rows=8, n_cols=8,
                                                                  patient=p) for i, p in enumerate(patients)])
    t = sd.tables["table"]
    p = sqs.pp.patches(sd, patch_size_um=30, microns_per_pixel=1.0)
    rng = np.random.default_rng(0)
    colour = np.stack([p[i].reshape(-1, 3).mean(0) for i in range(len(p))]) / 255
    t.obsm["X_fake"] = np.hstack([colour, rng.normal(0, 0.05, (len(p), 5))]).astype(np.float32)
    return sd


def _cv(data, method="ridge", **kw):
    args = dict(method=method, panel="heg", n_top=10, features_key="X_fake", backbone="fake", k=20, **FAST.get(method, {}))
    args.update(kw)
    return cross_validate(data, **args)


@pytest.mark.parametrize("method", ["ridge", "knn", "mclstexp", "spade"])
def test_leave_one_section_out_gives_one_row_per_section(method):
    sd = _data()
    t = sd.tables["table"]
    obsm, uns, tables = set(t.obsm), set(t.uns), set(sd.tables)
    df, per_gene = _cv(sd, method, return_per_gene=True)
    assert list(df["section"]) == ["s0", "s1", "s2"] and list(df["fold"]) == ["s0", "s1", "s2"]
    assert (df["method"] == method).all() and (df["split"] == "leave_one_section_out").all()
    assert np.isfinite(df["ACG"]).all() and (df["n_spots"] == 64).all() and (df["n_genes"] == 10).all()
    for col in ("HEG", "MSE", "MAE", "n_skipped_constant"):
        assert col in df
    assert list(df["train_sections"]) == ["s1,s2", "s0,s2", "s0,s1"]
    assert len(per_gene) == 3 * 10 and set(per_gene["fold"]) == {"s0", "s1", "s2"}
    # the user's object is left as it was
    assert set(t.obsm) == obsm and set(t.uns) == uns and set(sd.tables) == tables


def test_panel_is_chosen_without_the_test_section():
    clean = _data()
    ref = _cv(clean).attrs["panels"]
    sick = _data()
    t = sick.tables["table"]
    X = t.X.tolil()
    rows = np.flatnonzero(t.obs["section"].to_numpy() == "s0")
    X[rows, t.var_names.get_loc("gene40")] = 10_000  # pathological in s0 only
    t.X = sp.csr_matrix(X)
    got = _cv(sick).attrs["panels"]
    assert got["s0"] == ref["s0"] and "gene40" not in got["s0"]  # s0 held out: its data cannot matter
    assert "gene40" in got["s1"] and "gene40" in got["s2"]  # where s0 trains, it does


def test_by_patient_groups_sections_and_validation_auto():
    sd = _data(patients=("p0", "p0", "p1"))
    df = _cv(sd, split="by_patient")
    assert list(df["fold"]) == ["p0", "p0", "p1"] and list(df["section"]) == ["s0", "s1", "s2"]
    assert list(df["train_sections"]) == ["s2", "s2", "s0,s1"]
    four = sqs.io.combine_sections([sqs.datasets.synthetic_section(section=f"s{i}", seed=i, n_rows=4, n_cols=4,
                                                                    patient=f"p{i}") for i in range(4)])
    t = four.tables["table"]
    t.obsm["X_fake"] = np.random.default_rng(0).normal(size=(t.n_obs, 4)).astype(np.float32)
    df = cross_validate(four, method="ridge", panel="heg", n_top=5, features_key="X_fake", backbone="fake",
                        sections=["s0", "s1", "s2", "s3"])
    # default: every method trains on all the fold's training sections, as a user's call would
    assert (df["validation_sections"] == "").all()
    assert list(df["train_sections"]) == ["s1,s2,s3", "s0,s2,s3", "s0,s1,s3", "s0,s1,s2"]
    df = cross_validate(four, method="ridge", panel="heg", n_top=5, features_key="X_fake", backbone="fake",
                        sections=["s0", "s1", "s2", "s3"], validation="auto")
    assert list(df["validation_sections"]) == ["s3", "s3", "s3", "s2"]  # the last training section validates
    assert list(df["train_sections"]) == ["s1,s2", "s0,s2", "s0,s1", "s0,s1"]
    df = cross_validate(four, method="ridge", panel="heg", n_top=5, features_key="X_fake", backbone="fake",
                        validation=None, sections=["s0", "s1"])
    assert len(df) == 2 and (df["validation_sections"] == "").all()


def test_errors():
    sd = _data()
    with pytest.raises(ValueError, match="`method`"):
        _cv(sd, method="lasso")
    with pytest.raises(ValueError, match="`split`"):
        _cv(sd, split="random")
    with pytest.raises(ValueError, match="validation_sections"):
        _cv(sd, validation_sections=["s2"])
    with pytest.raises(ValueError, match="`sections`"):
        _cv(sd, sections=["s0", "s9"])
    with pytest.raises(ValueError, match="leak"):
        _cv(sd, panel="sq_spade_panel")
    with pytest.raises(ValueError, match="at least 2"):
        _cv(sd, sections=["s0"])
    ad = sd.tables["table"].copy()
    del ad.obs["patient"]
    with pytest.raises(KeyError, match="patient"):
        _cv(ad, split="by_patient")
    with pytest.raises(TypeError, match="SpatialData"):
        _cv(ad, method="mclstexp", finetune="all")


def test_finetuned_mclstexp_folds_share_the_images():
    sd = sqs.io.combine_sections([sqs.datasets.synthetic_section(section=f"s{i}", seed=i, n_rows=4, n_cols=4)
                                  for i in range(2)])
    df = cross_validate(sd, method="mclstexp", finetune="all", backbone="dummy", patch_px=16, panel="heg", n_top=5,
                        k=5, epochs=1, batch_size=8, out_dim=8, heads=2, dim_head=4, device="cpu")
    assert list(df["section"]) == ["s0", "s1"] and np.isfinite(df["ACG"]).all()
    assert set(sd.tables) == {"table"} and "X_dummy" not in sd.tables["table"].obsm
