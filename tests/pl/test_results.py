from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

import sq_spade as sqs
from sq_spade.pl import _utils


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def results():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(30)]
    rows = []
    for method, shift in (("spade", 0.3), ("ridge", 0.1)):
        for section in ("C3", "C4"):
            r = np.clip(rng.normal(shift, 0.15, len(genes)), -1, 1)
            r[0] = np.nan  # a constant gene: no correlation
            rows.append(pd.DataFrame({"method": method, "section": section, "gene": genes, "pearson_r": r}))
    return pd.concat(rows, ignore_index=True)


def expected_ranked(results, method):
    sub = results[results["method"] == method].dropna(subset=["pearson_r"])
    return np.sort(sub.groupby("gene")["pearson_r"].mean().to_numpy())[::-1]


def test_gene_correlation_ranks_per_method(results):
    fig = sqs.pl.gene_correlation(results, return_fig=True)
    ax_rank, ax_strip = fig.axes
    lines = [ln for ln in ax_rank.get_lines() if len(ln.get_xdata()) > 2]
    assert len(lines) == 2
    for ln, method in zip(lines, ("spade", "ridge"), strict=True):
        exp = expected_ranked(results, method)
        assert len(exp) == 29
        np.testing.assert_allclose(ln.get_ydata(), exp)
        np.testing.assert_array_equal(ln.get_xdata(), np.arange(1, 30))
    legend = [t.get_text() for t in ax_rank.get_legend().get_texts()]
    assert legend[0].startswith("spade") and f"{expected_ranked(results, 'spade').mean():.3f}" in legend[0]
    assert [t.get_text() for t in ax_strip.get_xticklabels()] == ["spade", "ridge"]
    pts = ax_strip.collections[0].get_offsets()
    np.testing.assert_allclose(np.sort(pts[:, 1]), np.sort(expected_ranked(results, "spade")))
    assert np.abs(pts[:, 0]).max() <= 0.25


def test_gene_correlation_names_the_best_and_worst_genes(results):
    fig = sqs.pl.gene_correlation(results, n_labels=2, return_fig=True)
    ax_rank = fig.axes[0]
    labels = {(t.get_text(), t.get_color()) for t in ax_rank.texts}
    for method in ("spade", "ridge"):
        sub = results[results["method"] == method].dropna(subset=["pearson_r"])
        mean = sub.groupby("gene")["pearson_r"].mean().sort_values(ascending=False)
        want = {*mean.index[:2], *mean.index[-2:]}
        drawn = {text for text, _ in labels}
        assert want <= drawn
        # each label sits on its gene's point
        for t in ax_rank.texts:
            if t.get_text() in want and t.xy[1] == pytest.approx(mean[t.get_text()]):
                assert t.xy[0] == list(mean.index).index(t.get_text()) + 1
    assert len(ax_rank.texts) == 8
    fig = sqs.pl.gene_correlation(results, n_labels=0, return_fig=True)
    assert not fig.axes[0].texts


def test_gene_correlation_top_order_dict_and_single_panel(results):
    per_method = {m: results[results["method"] == m].drop(columns="method") for m in ("spade", "ridge")}
    fig, ax = plt.subplots()
    sqs.pl.gene_correlation(per_method, top=5, order=["ridge", "spade"], strip=False, ax=ax)
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 2]
    np.testing.assert_allclose(lines[0].get_ydata(), expected_ranked(results, "ridge")[:5])
    np.testing.assert_allclose(lines[1].get_ydata(), expected_ranked(results, "spade")[:5])


def test_gene_correlation_errors(results):
    with pytest.raises(KeyError, match="value_key='r'"):
        sqs.pl.gene_correlation(results, value_key="r")
    with pytest.raises(ValueError, match="order"):
        sqs.pl.gene_correlation(results, order=["spade", "bleep"])
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="single panel"):
        sqs.pl.gene_correlation(results, ax=ax)
    with pytest.raises(TypeError, match="results"):
        sqs.pl.gene_correlation([1, 2, 3])
    with pytest.raises(ValueError, match="top"):
        sqs.pl.gene_correlation(results, top=0)


def test_training_history_one_dimensional():
    hist = {"train_loss": np.array([1.0, 0.6, 0.5, 0.45]), "val_loss": np.array([1.1, 0.8, 0.7, 0.75]),
            "best_epoch": 2}
    fig = sqs.pl.training_history(hist, return_fig=True)
    (ax,) = fig.axes
    train, val, best = ax.get_lines()
    np.testing.assert_allclose(train.get_ydata(), hist["train_loss"])
    np.testing.assert_allclose(val.get_ydata(), hist["val_loss"])
    np.testing.assert_array_equal(train.get_xdata(), [1, 2, 3, 4])
    assert best.get_xdata()[0] == 3  # 0-based best epoch 2 is the third epoch
    assert ax.get_xlabel() == "epoch"


class _Model:
    def __init__(self, history):
        self.history = history


def test_training_history_per_expert_from_a_saved_model():
    rng = np.random.default_rng(0)
    train = rng.uniform(0.5, 1.5, size=(6, 3))
    val = rng.uniform(0.5, 1.5, size=(6, 3))
    val[4:, 1] = np.nan  # expert 1 stopped early
    # a model's history went through JSON: NaN became None, arrays lists
    saved = json.loads(json.dumps({"train_loss": train.tolist(),
                                   "val_loss": [[None if np.isnan(v) else v for v in row] for row in val],
                                   "best_epoch": [3, 2, 5]}))
    fig = sqs.pl.training_history(_Model(saved), return_fig=True)
    (ax,) = fig.axes
    means = [ln.get_ydata() for ln in ax.get_lines()]
    assert len(means) == 2  # per-expert best epochs are not one line
    np.testing.assert_allclose(means[0], train.mean(1))
    np.testing.assert_allclose(means[1], np.nanmean(val, 1))
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(train.min()) and ys.max() == pytest.approx(train.max())
    fig = sqs.pl.training_history(saved, experts="lines", keys=["train_loss"], return_fig=True)
    assert len(fig.axes[0].get_lines()) == 3 + 1


def test_training_history_errors():
    with pytest.raises(TypeError, match="model_or_history"):
        sqs.pl.training_history(42)
    with pytest.raises(ValueError, match="experts"):
        sqs.pl.training_history({"train_loss": [1.0, 0.5]}, experts="all")
    with pytest.raises(ValueError, match="no finite value"):
        sqs.pl.training_history({"train_loss": [], "val_loss": [None, None]})
    with pytest.raises(KeyError, match="keys"):
        sqs.pl.training_history({"train_loss": [1.0]}, keys=["loss"])


def test_show_only_on_interactive_backends(monkeypatch, tmp_path):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    hist = {"train_loss": [1.0, 0.5]}
    assert sqs.pl.training_history(hist) is None  # Agg: show=None does not show
    assert shown == []
    sqs.pl.training_history(hist, show=True)
    assert shown == [1]
    monkeypatch.setattr(_utils, "is_interactive_backend", lambda: True)
    sqs.pl.training_history(hist)
    assert shown == [1, 1]
    with pytest.raises(ValueError, match="extension"):
        sqs.pl.training_history(hist, save=tmp_path / "noext")
    sqs.pl.training_history(hist, save=str(tmp_path / "h.svg"))
    assert b"<svg" in (tmp_path / "h.svg").read_bytes()[:400]


def test_show_none_leaves_a_callers_axes_alone(monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    monkeypatch.setattr(_utils, "is_interactive_backend", lambda: True)
    _, ax = plt.subplots()
    sqs.pl.training_history({"train_loss": [1.0, 0.5]}, ax=ax)
    assert shown == [] and len(ax.get_lines()) == 1
