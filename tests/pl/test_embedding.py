from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import Normalize, to_rgba

import sq_spade as sqs


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def sd():
    a = sqs.datasets.synthetic_section(section="a", n_rows=5, n_cols=5)
    b = sqs.datasets.synthetic_section(section="b", n_rows=4, n_cols=5, seed=1)
    sd = sqs.io.combine_sections([a, b])
    tab = sd.tables["table"]
    rng = np.random.default_rng(0)
    types = pd.Categorical(tab.obs["tissue_type"]).codes
    tab.obsm["X_spade"] = (rng.normal(size=(tab.n_obs, 8)) + 4 * types[:, None]).astype(np.float32)
    tab.obsm["X_umap"] = rng.normal(size=(tab.n_obs, 2))
    tab.obs["depth"] = rng.uniform(0, 5, tab.n_obs)
    return sd


def panels(fig):
    return [a for a in fig.axes if a.get_label() != "<colorbar>"]


def test_two_dimensional_basis_drawn_as_is_with_categorical_colours(sd):
    tab = sd.tables["table"]
    fig = sqs.pl.embedding(sd, basis="X_umap", color=["section", "tissue_type"],
                           palette={"a": "red", "b": "blue", "type0": "k", "type1": "y", "type2": "c"},
                           return_fig=True)
    axs = panels(fig)
    assert [a.get_title() for a in axs] == ["section", "tissue_type"]
    (pts,) = axs[0].collections
    np.testing.assert_allclose(pts.get_offsets(), tab.obsm["X_umap"])
    expected = np.array([to_rgba("red" if s == "a" else "blue")[:3] for s in tab.obs["section"]])
    np.testing.assert_allclose(pts.get_facecolor()[:, :3], expected)
    assert [t.get_text() for t in axs[0].get_legend().get_texts()] == ["a", "b"]
    assert axs[0].get_xlabel() == "UMAP1"


def test_numeric_column_and_gene_get_colourbars(sd):
    tab = sd.tables["table"]
    sqs.pp.normalize(sd)
    fig = sqs.pl.embedding(sd, basis="X_umap", color=["depth", "gene0"], layer="log1p_cp10k", return_fig=True)
    fig.canvas.draw()
    axs = panels(fig)
    assert len(fig.axes) == 4  # two panels, two colourbars
    depth = tab.obs["depth"].to_numpy()
    (pts,) = axs[0].collections
    order = np.argsort(depth, kind="stable")  # high values drawn last
    np.testing.assert_allclose(pts.get_offsets(), tab.obsm["X_umap"][order])
    cm = matplotlib.colormaps["viridis"]
    np.testing.assert_allclose(pts.get_facecolor()[:, :3], cm(Normalize(depth.min(), depth.max())(depth[order]))[:, :3],
                               atol=1e-6)
    gene = tab[:, "gene0"].layers["log1p_cp10k"].toarray().ravel()
    (pts,) = axs[1].collections
    np.testing.assert_allclose(np.sort(pts.get_array()), np.sort(gene))


def test_errors(sd):
    with pytest.raises(KeyError, match="basis='X_nope'"):
        sqs.pl.embedding(sd, basis="X_nope")
    with pytest.raises(KeyError, match="color='nope'"):
        sqs.pl.embedding(sd, color="nope")  # before any UMAP is computed
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="single panel"):
        sqs.pl.embedding(sd, basis="X_umap", color=["section", "depth"], ax=ax)
    with pytest.raises(KeyError, match="layer='nope'"):
        sqs.pl.embedding(sd, basis="X_umap", color="gene0", layer="nope")


def test_single_panel_into_axes_and_save(sd, tmp_path):
    fig, ax = plt.subplots()
    assert sqs.pl.embedding(sd, basis="X_umap", color="section", ax=ax) is None
    assert ax.get_title() == "section" and len(ax.collections) == 1
    sqs.pl.embedding(sd, basis="X_umap", color="section", save=tmp_path / "umap.pdf")
    assert (tmp_path / "umap.pdf").read_bytes()[:4] == b"%PDF"


@pytest.mark.slow
def test_umap_is_computed_once_stored_and_reused(sd, monkeypatch):
    tab = sd.tables["table"]
    before = (sorted(tab.obsp), sorted(k for k in tab.uns), list(tab.obs.columns))
    x_before = tab.obsm["X_spade"].copy()
    fig = sqs.pl.embedding(sd, color=("section", "tissue_type"), n_neighbors=10, return_fig=True)
    # the UMAP is stored (scanpy's neighbours graph is not): obsm["X_umap_spade"] + its parameters
    assert (sorted(tab.obsp), sorted(k for k in tab.uns if k != "sq_spade_umap"), list(tab.obs.columns)) == before
    assert tab.uns["sq_spade_umap"]["X_umap_spade"]["n_neighbors"] == 10
    np.testing.assert_array_equal(tab.obsm["X_spade"], x_before)
    (pts,) = panels(fig)[1].collections
    xy = np.asarray(pts.get_offsets())
    assert xy.shape == (tab.n_obs, 2) and np.isfinite(xy).all()
    np.testing.assert_allclose(tab.obsm["X_umap_spade"], xy, rtol=1e-5, atol=1e-5)
    # the tissue types are separated in X_spade: UMAP keeps each type's points together
    types = tab.obs["tissue_type"].to_numpy()
    centroids = {t: xy[types == t].mean(0) for t in np.unique(types)}
    within = np.mean([np.linalg.norm(xy[types == t] - c, axis=1).mean() for t, c in centroids.items()])
    between = np.mean([np.linalg.norm(c1 - c2) for t1, c1 in centroids.items() for t2, c2 in centroids.items() if t1 < t2])
    assert between > 2 * within
    # deterministic: computed again from scratch, the same layout
    again = sqs.pl._embedding.umap_coordinates(tab.copy(), "X_spade", n_neighbors=10, store=False)
    np.testing.assert_allclose(again, xy, rtol=1e-4, atol=1e-4)
    # reused: a second plot does not run scanpy's UMAP
    import scanpy as sc

    def boom(*a, **k):
        raise AssertionError("UMAP recomputed")

    monkeypatch.setattr(sc.tl, "umap", boom)
    sqs.pl.embedding(sd, color="section", n_neighbors=10, return_fig=True)
    # other parameters: recomputed
    with pytest.raises(AssertionError, match="recomputed"):
        sqs.pl.embedding(sd, color="section", n_neighbors=5, return_fig=True)
    assert isinstance(tab.obs, pd.DataFrame)
