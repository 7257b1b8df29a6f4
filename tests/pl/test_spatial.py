from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import EllipseCollection
from matplotlib.colors import Normalize, to_rgba
from matplotlib.testing.compare import compare_images
from spatialdata.models import TableModel

import sq_spade as sqs

BASELINE = Path(__file__).parent / "baseline"
GENES = ["gene0", "gene3", "gene6"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def add_predictions(sd, genes=GENES, *, observed=True, seed=0):
    """A predictions table like predict_expression's: same obs, var = panel, layers."""
    sqs.pp.normalize(sd)
    tab = sd.tables["table"]
    obs = tab[:, genes].layers["log1p_cp10k"].toarray().astype(np.float32)
    rng = np.random.default_rng(seed)
    pred = (0.6 * obs + rng.normal(0, 0.5, obs.shape)).astype(np.float32)
    p = ad.AnnData(obs=tab.obs.copy(), var=pd.DataFrame(index=pd.Index(genes)))
    p.layers["predicted"] = pred
    if observed:
        p.layers["log1p_cp10k"] = obs
        p.var["observed"] = True
    attrs = tab.uns["spatialdata_attrs"]
    p = TableModel.parse(p, region=attrs["region"], region_key="region", instance_key="spot_id")
    sd.tables["predicted"] = p
    return sd


@pytest.fixture
def sd():
    return add_predictions(sqs.datasets.synthetic_section(n_rows=6, n_cols=6, microns_per_pixel=0.5))


def panels(fig):
    return [a for a in fig.axes if a.get_label() != "<colorbar>"]


def colorbars(fig):
    return [a for a in fig.axes if a.get_label() == "<colorbar>"]


def spots_of(ax) -> EllipseCollection:
    (coll,) = [c for c in ax.collections if isinstance(c, EllipseCollection)]
    return coll


def test_observed_next_to_predicted_with_pearson_r(sd):
    fig = sqs.pl.spatial(sd, GENES[:2], return_fig=True)
    axs = panels(fig)
    assert len(axs) == 4 and len(colorbars(fig)) == 4  # one scale per panel by default
    tab = sd.tables["predicted"]
    for i, g in enumerate(GENES[:2]):
        t_obs, t_pred = axs[2 * i].get_title(), axs[2 * i + 1].get_title()
        assert g in t_obs and "observed" in t_obs
        assert g in t_pred and "predicted" in t_pred
        j = list(tab.var_names).index(g)
        r = np.corrcoef(tab.layers["predicted"][:, j], tab.layers["log1p_cp10k"][:, j])[0, 1]
        assert f"r = {r:.2f}" in t_pred
        assert "r =" not in t_obs


def test_spot_colours_are_the_layer_values_on_one_shared_scale(sd):
    fig = sqs.pl.spatial(sd, "gene3", scale="shared", return_fig=True, cmap="magma", alpha=0.8)
    fig.canvas.draw()
    ax_obs, ax_pred = panels(fig)
    tab = sd.tables["predicted"]
    obs = tab[:, "gene3"].layers["log1p_cp10k"].ravel().astype(float)
    pred = tab[:, "gene3"].layers["predicted"].ravel().astype(float)
    both = np.concatenate([obs, pred])
    norm = Normalize(both.min(), both.max())
    cmap = matplotlib.colormaps["magma"]
    for ax, vals in ((ax_obs, obs), (ax_pred, pred)):
        fc = spots_of(ax).get_facecolor()
        assert fc.shape == (len(vals), 4)
        np.testing.assert_allclose(fc[:, :3], cmap(norm(vals))[:, :3], atol=1e-6)
        np.testing.assert_allclose(fc[:, 3], 0.8)
    (cb,) = colorbars(fig)
    lo, hi = sorted(cb.get_ylim())
    assert lo == pytest.approx(both.min()) and hi == pytest.approx(both.max())
    assert "shared scale" in cb.get_ylabel()


def test_each_panel_has_its_own_scale_by_default_and_says_so(sd):
    tab = sd.tables["predicted"]
    obs = tab[:, "gene3"].layers["log1p_cp10k"].ravel().astype(float)
    pred = tab[:, "gene3"].layers["predicted"].ravel().astype(float)
    fig = sqs.pl.spatial(sd, "gene3", return_fig=True)
    fig.canvas.draw()
    cmap = matplotlib.colormaps["viridis"]
    for ax, vals in zip(panels(fig), (obs, pred), strict=True):
        fc = spots_of(ax).get_facecolor()
        np.testing.assert_allclose(fc[:, :3], cmap(Normalize(vals.min(), vals.max())(vals))[:, :3], atol=1e-6)
    cb_obs, cb_pred = colorbars(fig)
    assert sorted(float(v) for v in cb_pred.get_ylim()) == pytest.approx([float(pred.min()), float(pred.max())])
    assert "own scale" in cb_obs.get_ylabel() and "own scale" in cb_pred.get_ylabel()
    # z-scores: each panel standardised, one symmetric scale, said in the label
    fig = sqs.pl.spatial(sd, "gene3", scale="zscore", return_fig=True)
    fig.canvas.draw()
    z = (pred - pred.mean()) / pred.std()
    (cb,) = colorbars(fig)
    lo, hi = sorted(cb.get_ylim())
    assert lo == pytest.approx(-hi) and "z-score" in cb.get_ylabel()
    fc = spots_of(panels(fig)[1]).get_facecolor()
    np.testing.assert_allclose(fc[:, :3], cmap(Normalize(lo, hi)(z))[:, :3], atol=1e-6)
    with pytest.raises(ValueError, match="scale"):
        sqs.pl.spatial(sd, "gene3", scale="log")


def test_spots_drawn_at_true_position_and_size_in_micrometres():
    mpp, pitch, margin, diam = 0.5, 40.0, 40.0, 30.0
    sd = sqs.datasets.synthetic_section(n_rows=4, n_cols=5, pitch_px=pitch, margin_px=margin,
                                        microns_per_pixel=mpp, spot_diameter_um=diam)
    sqs.pp.normalize(sd)
    fig = sqs.pl.spatial(sd, "gene1", predictions_key=None, layer="log1p_cp10k", compare=False,
                         spot_size=0.5, return_fig=True)
    (ax,) = panels(fig)
    coll = spots_of(ax)
    cols, rows = sd.tables["table"].obs["array_col"], sd.tables["table"].obs["array_row"]
    expected = np.column_stack([margin + cols * pitch, margin + rows * pitch]) * mpp
    np.testing.assert_allclose(coll.get_offsets(), expected)
    np.testing.assert_allclose(coll.get_widths(), 0.5 * diam)
    np.testing.assert_allclose(coll.get_heights(), 0.5 * diam)
    (im,) = ax.images
    h, w = np.asarray(im.get_array()).shape[:2]
    left, right, bottom, top = im.get_extent()
    assert (left, top) == (0, 0)
    assert right == pytest.approx(w * mpp) and bottom == pytest.approx(h * mpp)
    # cropped to the spots plus a margin, y downwards like the image
    x0, x1 = ax.get_xlim()
    y1, y0 = ax.get_ylim()
    assert x0 < expected[:, 0].min() - diam / 2 and x1 > expected[:, 0].max() + diam / 2
    assert y0 < expected[:, 1].min() and y1 > expected[:, 1].max() and y1 > y0


def test_image_is_placed_where_its_pixels_belong():
    # pattern image: a pixel's colour encodes its column and row; a 2031-px image has a
    # lazily derived second pyramid level, read as a strided view of level 0
    mpp = 0.8
    sd = sqs.datasets.synthetic_section(n_rows=4, n_cols=4, pitch_px=550, margin_px=190, image="pattern",
                                        microns_per_pixel=mpp, n_genes=12)
    sqs.pp.normalize(sd)
    fig = sqs.pl.spatial(sd, "gene0", predictions_key=None, layer="log1p_cp10k", compare=False,
                         crop=False, return_fig=True)
    (ax,) = panels(fig)
    (im,) = ax.images
    arr = np.asarray(im.get_array())
    assert 1000 <= max(arr.shape[:2]) < 2031  # coarser than full resolution, still sharp
    left, right, bottom, top = im.get_extent()
    h, w = arr.shape[:2]
    rng = np.random.default_rng(1)
    ii, jj = rng.integers(0, h, 200), rng.integers(0, w, 200)
    rgb = arr[ii, jj].astype(int)
    col = (rgb[:, 2] // 8) * 256 + rgb[:, 0]
    row = (rgb[:, 2] % 8) * 256 + rgb[:, 1]
    x_um = left + (jj + 0.5) * (right - left) / w
    y_um = top + (ii + 0.5) * (bottom - top) / h
    block = max((right - left) / w, (bottom - top) / h)
    assert np.abs((col + 0.5) * mpp - x_um).max() <= block
    assert np.abs((row + 0.5) * mpp - y_um).max() <= block


def test_predictions_only_gives_one_panel_per_gene():
    sd = add_predictions(sqs.datasets.synthetic_section(n_rows=4, n_cols=4), observed=False)
    fig = sqs.pl.spatial(sd, GENES, return_fig=True, ncols=2)
    axs = panels(fig)
    assert len(axs) == 3 and len(colorbars(fig)) == 3
    assert [g in a.get_title() for g, a in zip(GENES, axs, strict=True)] == [True] * 3
    assert all("r =" not in a.get_title() for a in axs)
    # ncols=2: two rows
    assert len({round(a.get_position().y0, 3) for a in axs}) == 2


def test_gene_not_measured_in_query_has_no_observed_panel(sd):
    sd.tables["predicted"].var["observed"] = [True, False, True]
    fig = sqs.pl.spatial(sd, ["gene0", "gene3"], return_fig=True)
    axs = panels(fig)
    assert len(axs) == 4
    assert not [c for c in axs[2].collections if isinstance(c, EllipseCollection)]
    assert "not measured" in [t.get_text() for t in axs[2].texts]
    assert "r =" not in axs[3].get_title()
    assert "r =" in axs[1].get_title()


def test_layer_of_main_table_and_fallback_without_predictions():
    sd = sqs.datasets.synthetic_section(n_rows=4, n_cols=4)
    sqs.pp.normalize(sd)
    # no "predicted" table: the default table_key falls back to "table"
    fig = sqs.pl.spatial(sd, ["gene0", "gene1"], layer="log1p_cp10k", compare=False, return_fig=True)
    axs = panels(fig)
    assert len(axs) == 2
    fig.canvas.draw()
    vals = sd.tables["table"][:, "gene1"].layers["log1p_cp10k"].toarray().ravel()
    fc = spots_of(axs[1]).get_facecolor()
    np.testing.assert_allclose(fc[:, :3], matplotlib.colormaps["viridis"](Normalize(vals.min(), vals.max())(vals))[:, :3],
                               atol=1e-6)


def test_limits_numbers_and_percentiles(sd):
    tab = sd.tables["predicted"]
    obs, pred = tab[:, "gene0"].layers["log1p_cp10k"].ravel(), tab[:, "gene0"].layers["predicted"].ravel()
    fig = sqs.pl.spatial(sd, "gene0", vmin=0.5, vmax="p90", scale="shared", return_fig=True)
    for ax in panels(fig):
        norm = spots_of(ax).norm
        assert norm.vmin == 0.5 and norm.vmax == pytest.approx(np.percentile(np.concatenate([obs, pred]), 90))
    fig = sqs.pl.spatial(sd, "gene0", vmin=0.5, vmax="p90", return_fig=True)  # percentiles of each panel
    for ax, vals in zip(panels(fig), (obs, pred), strict=True):
        norm = spots_of(ax).norm
        assert norm.vmin == 0.5 and norm.vmax == pytest.approx(np.percentile(vals, 90))
    with pytest.raises(ValueError, match="vmax"):
        sqs.pl.spatial(sd, "gene0", vmax="top")


def test_one_section_of_several():
    a = sqs.datasets.synthetic_section(section="a", n_rows=3, n_cols=3)
    b = sqs.datasets.synthetic_section(section="b", n_rows=4, n_cols=5, margin_px=80, seed=1)
    sd = sqs.io.combine_sections([a, b])
    sqs.pp.normalize(sd)
    with pytest.raises(ValueError, match=r"section=.*\['a', 'b'\]"):
        sqs.pl.spatial(sd, "gene0", predictions_key=None, layer="log1p_cp10k", compare=False)
    with pytest.raises(ValueError, match="'c'.*expected one of"):
        sqs.pl.spatial(sd, "gene0", predictions_key=None, layer="log1p_cp10k", compare=False, section="c")
    fig = sqs.pl.spatial(sd, "gene0", predictions_key=None, layer="log1p_cp10k", compare=False, section="b",
                         return_fig=True)
    (ax,) = panels(fig)
    coll = spots_of(ax)
    tab = sd.tables["table"]
    in_b = (tab.obs["section"] == "b").to_numpy()
    assert len(coll.get_offsets()) == in_b.sum() == 20
    np.testing.assert_allclose(coll.get_offsets().min(0), [80, 80])
    fig.canvas.draw()
    vals = tab[in_b, "gene0"].layers["log1p_cp10k"].toarray().ravel()
    cm = matplotlib.colormaps["viridis"]
    np.testing.assert_allclose(spots_of(ax).get_facecolor()[:, :3], cm(Normalize(vals.min(), vals.max())(vals))[:, :3],
                               atol=1e-6)


def test_errors_name_the_argument(sd):
    with pytest.raises(KeyError, match=r"nope.*gene0"):
        sqs.pl.spatial(sd, ["gene0", "nope"])
    with pytest.raises(KeyError, match="layer='missing'"):
        sqs.pl.spatial(sd, "gene0", layer="missing")
    with pytest.raises(KeyError, match="predictions_key='other'"):
        sqs.pl.spatial(sd, "gene0", predictions_key="other")
    with pytest.raises(KeyError, match="table_key='other'"):
        sqs.pl.spatial(sd, "gene0", table_key="other", predictions_key=None)
    with pytest.raises(KeyError, match="image_key='nope'"):
        sqs.pl.spatial(sd, "gene0", image_key="nope")
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="single panel"):
        sqs.pl.spatial(sd, "gene0", ax=ax)  # observed + predicted: two panels
    with pytest.raises(ValueError, match="spot_size"):
        sqs.pl.spatial(sd, "gene0", spot_size=0)
    with pytest.raises(TypeError, match="SpatialData"):
        sqs.pl.spatial(sd.tables["predicted"], "gene0")


def test_single_panel_into_given_axes(sd):
    fig, ax = plt.subplots()
    out = sqs.pl.spatial(sd, "gene6", compare=False, ax=ax)
    assert out is None
    assert "gene6" in ax.get_title() and spots_of(ax) is not None
    assert plt.fignum_exists(fig.number)


def test_save_writes_a_file_and_closes_the_figure(sd, tmp_path):
    before = set(plt.get_fignums())
    out = sqs.pl.spatial(sd, GENES, save=tmp_path / "sub" / "genes.png", dpi=40)
    assert out is None
    data = (tmp_path / "sub" / "genes.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert set(plt.get_fignums()) == before
    # written atomically through a temporary name: the format still follows the extension
    sqs.pl.spatial(sd, GENES, save=tmp_path / "sub" / "genes.PDF", dpi=40)
    assert (tmp_path / "sub" / "genes.PDF").read_bytes()[:5] == b"%PDF-"
    assert sorted(f.name for f in (tmp_path / "sub").iterdir()) == ["genes.PDF", "genes.png"]


def _baseline_figure(scale):
    sd = add_predictions(sqs.datasets.synthetic_section(n_rows=5, n_cols=5, seed=3), genes=["gene0", "gene1"])
    return sqs.pl.spatial(sd, ["gene0", "gene1"], scale=scale, return_fig=True, figsize=(10, 3.2), dpi=40)


@pytest.mark.parametrize(("scale", "name"), [("shared", "spatial_compare.png"), ("panel", "spatial_compare_panel.png")])
def test_matches_baseline_image(tmp_path, scale, name):
    baseline = BASELINE / name
    fig = _baseline_figure(scale)
    actual = tmp_path / name
    fig.savefig(actual, dpi=40)
    if os.environ.get("SQ_SPADE_UPDATE_BASELINE"):
        baseline.parent.mkdir(exist_ok=True)
        baseline.write_bytes(actual.read_bytes())
    assert baseline.exists(), f"missing {baseline}: run with SQ_SPADE_UPDATE_BASELINE=1 to create it"
    assert compare_images(str(baseline), str(actual), tol=2) is None


# --- experts ----------------------------------------------------------------------------------


def test_experts_categorical_colours_and_legend():
    sd = sqs.datasets.synthetic_section(n_rows=5, n_cols=5)
    tab = sd.tables["table"]
    labels = np.array(["0", "1", "10", "2"] * 7)[: tab.n_obs]
    tab.obs["spade_expert"] = pd.Categorical(labels)
    palette = {"0": "red", "1": "green", "2": "blue", "10": "black"}
    fig = sqs.pl.experts(sd, palette=palette, return_fig=True)
    (ax,) = panels(fig)
    fc = spots_of(ax).get_facecolor()
    np.testing.assert_allclose(fc[:, :3], np.array([to_rgba(palette[v])[:3] for v in labels]))
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["0", "1", "2", "10"]  # numeric order


def test_experts_routing_weights():
    sd = sqs.datasets.synthetic_section(n_rows=4, n_cols=4)
    tab = sd.tables["table"]
    w = np.random.default_rng(0).dirichlet(np.ones(3), size=tab.n_obs)
    tab.obsm["spade_weights"] = w
    fig = sqs.pl.experts(sd, weights_key="spade_weights", expert=2, return_fig=True)
    fig.canvas.draw()
    (ax,) = panels(fig)
    fc = spots_of(ax).get_facecolor()
    np.testing.assert_allclose(fc[:, :3], matplotlib.colormaps["viridis"](w[:, 2])[:, :3], atol=1e-6)
    fig = sqs.pl.experts(sd, weights_key="spade_weights", return_fig=True)
    assert [a.get_title() for a in panels(fig)] == [f"expert {e} weight" for e in range(3)]
    assert len(colorbars(fig)) == 1
    with pytest.raises(ValueError, match="expert"):
        sqs.pl.experts(sd, weights_key="spade_weights", expert=3)
    with pytest.raises(KeyError, match="weights_key='w'"):
        sqs.pl.experts(sd, weights_key="w")
    with pytest.raises(KeyError, match="color='spade_expert'"):
        sqs.pl.experts(sd)


# --- real data --------------------------------------------------------------------------------


@pytest.mark.realdata
def test_her2st_genes_on_tissue(her2st_section, tmp_path):
    sd = sqs.io.combine_sections([her2st_section("C2")])  # a copy: the cached fixture stays as is
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sqs.pp.normalize(sd, table_key="table")
    out = tmp_path / "her2st_C2.png"
    fig = sqs.pl.spatial(sd, ["ERBB2", "FASN"], predictions_key=None, layer="log1p_cp10k", compare=False,
                         return_fig=True, save=out, dpi=60)
    assert out.stat().st_size > 10_000
    axs = panels(fig)
    assert [a.get_title().split()[0] for a in axs] == ["ERBB2", "FASN"]
    coll = spots_of(axs[0])
    assert len(coll.get_offsets()) == sd.tables["table"].n_obs
    np.testing.assert_allclose(coll.get_widths(), 100.0)  # legacy ST spots: 100 um
    # the image (read from a coarse level) covers every spot
    left, right, bottom, top = axs[0].images[0].get_extent()
    xy = coll.get_offsets()
    assert left <= xy[:, 0].min() and xy[:, 0].max() <= right
    assert top <= xy[:, 1].min() and xy[:, 1].max() <= bottom
    assert "log1p_cp10k" not in her2st_section("C2").tables["table"].layers
