from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr

from sq_spade._metrics import expression_metrics, gene_correlations


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    obs = rng.gamma(2.0, 1.0, size=(60, 12))
    pred = 0.5 * obs + rng.standard_normal((60, 12))
    return pred, obs


def test_gene_correlations_match_scipy(data):
    pred, obs = data
    r = gene_correlations(pred, obs)
    expected = [pearsonr(pred[:, g], obs[:, g])[0] for g in range(obs.shape[1])]
    np.testing.assert_allclose(r, expected, rtol=1e-10, atol=1e-12)


def test_constant_genes_are_nan_without_warnings(data):
    pred, obs = data
    pred, obs = pred.copy(), obs.copy()
    pred[:, 2] = 0.1  # constant prediction
    obs[:, 5] = 3.7  # constant observation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = gene_correlations(pred, obs)
        summary, per_gene = expression_metrics(pred, obs)
    assert np.isnan(r[[2, 5]]).all()
    assert np.isfinite(np.delete(r, [2, 5])).all()
    assert summary["n_skipped_constant"] == 2
    assert summary["ACG"] == pytest.approx(np.delete(r, [2, 5]).mean())
    assert per_gene["pearson_r"].isna().sum() == 2


def test_summary_values(data):
    pred, obs = data
    summary, per_gene = expression_metrics(pred, obs, gene_names=[f"g{i}" for i in range(12)], n_heg=4)
    assert summary["n_spots"] == 60 and summary["n_genes"] == 12
    assert summary["MSE"] == pytest.approx(np.mean((pred - obs) ** 2))
    assert summary["MAE"] == pytest.approx(np.mean(np.abs(pred - obs)))
    assert list(per_gene.columns) == ["gene", "pearson_r", "mean_observed", "mse", "mae", "is_heg"]
    assert per_gene["gene"].tolist()[:2] == ["g0", "g1"]
    np.testing.assert_allclose(per_gene["mse"], ((pred - obs) ** 2).mean(axis=0))
    assert per_gene["is_heg"].sum() == 4


def test_heg_ranks_by_observed_mean():
    rng = np.random.default_rng(1)
    n, g = 80, 10
    obs = rng.random((n, g)) + np.arange(g)  # gene 9 has the highest observed mean
    pred = np.empty_like(obs)
    # The 3 highest observed genes are predicted perfectly but with a low mean; the others are
    # anti-correlated but predicted with a very high mean (a ranking by prediction would pick them).
    pred[:, 7:] = obs[:, 7:] - 100
    pred[:, :7] = -obs[:, :7] + 100
    summary, per_gene = expression_metrics(pred, obs, n_heg=3)
    assert per_gene.loc[per_gene["is_heg"], "gene"].tolist() == ["gene_7", "gene_8", "gene_9"]
    assert summary["HEG"] == pytest.approx(1.0)
    assert summary["ACG"] == pytest.approx((3 - 7) / 10)


def test_constant_heg_gene_keeps_its_rank_and_is_skipped():
    rng = np.random.default_rng(2)
    obs = rng.random((50, 6)) + np.arange(6)
    obs[:, 5] = 10.0  # highest mean, constant
    pred = obs + 0.01 * rng.standard_normal(obs.shape)
    summary, per_gene = expression_metrics(pred, obs, n_heg=2)
    assert per_gene["is_heg"].tolist() == [False, False, False, False, True, True]
    assert summary["n_heg_scored"] == 1
    assert summary["HEG"] == pytest.approx(per_gene["pearson_r"][4])


def test_n_heg_capped_and_single_spot():
    rng = np.random.default_rng(3)
    s, pg = expression_metrics(rng.random((5, 3)), rng.random((5, 3)), n_heg=50)
    assert pg["is_heg"].all() and s["HEG"] == pytest.approx(s["ACG"])
    s1, _ = expression_metrics(rng.random((1, 3)), rng.random((1, 3)))
    assert np.isnan(s1["ACG"]) and s1["n_skipped_constant"] == 3


@pytest.mark.parametrize(("pred", "obs", "match"), [
    (np.ones((3, 2)), np.ones((3, 3)), "same shape"),
    (np.ones(3), np.ones(3), "`predicted` must be 2-D"),
    (np.array([[np.nan, 1.0], [1.0, 2.0]]), np.ones((2, 2)), "`predicted` contains"),
    (np.ones((2, 2)), np.array([[np.inf, 1.0], [1.0, 2.0]]), "`observed` contains"),
])
def test_input_errors(pred, obs, match):
    with pytest.raises(ValueError, match=match):
        expression_metrics(pred, obs)


def test_argument_errors(data):
    pred, obs = data
    with pytest.raises(ValueError, match="gene_names"):
        expression_metrics(pred, obs, gene_names=["a"])
    with pytest.raises(ValueError, match="n_heg"):
        expression_metrics(pred, obs, n_heg=0)
    assert isinstance(expression_metrics(pd.DataFrame(pred), obs)[1], pd.DataFrame)
