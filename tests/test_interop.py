"""Predictions where the ecosystem looks: spatialdata-plot, scanpy and squidpy read them with no layer argument.

Each test calls the real library on a predictions table written by ``tl.predict_expression``.
"""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest

import sq_spade as sqs
from sq_spade import _constants as K
from tests.tl.test_contrastive import GENES, _data


@pytest.fixture(scope="module")
def predicted():
    """Three synthetic sections; a ridge model trained on two predicts all three."""
    sd = _data(n=3, size=6)
    model = sqs.tl.train_baseline(sd, method="ridge", features_key="X_fake", backbone="fake", panel=GENES,
                                  train_sections=["s0", "s1"])
    sqs.tl.predict_expression(sd, model, features_key="X_fake")
    return sd


def test_x_holds_the_latest_prediction(predicted):
    table = predicted.tables[K.TABLES.PREDICTED]
    assert isinstance(table.X, np.ndarray) and table.X.dtype == np.float32
    np.testing.assert_array_equal(table.X, table.layers[K.LAYERS.PREDICTED])
    assert table.uns[K.UNS.PREDICTION_X] == K.LAYERS.PREDICTED
    assert np.std(table.X, axis=0).min() > 0


def test_spatialdata_plot_draws_the_predicted_gene():
    pytest.importorskip("spatialdata_plot")
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor)

    sd = _data(n=1, size=6)
    model = sqs.tl.train_baseline(sd, method="ridge", features_key="X_fake", backbone="fake", panel=GENES)
    sqs.tl.predict_expression(sd, model, features_key="X_fake")
    gene = GENES[0]
    values = sd.tables["predicted"][:, gene].X.ravel()
    assert np.std(values) > 0
    fig, ax = plt.subplots()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (sd.pl.render_shapes(element="s0_spots", color=gene, table_name="predicted")
         .pl.show(ax=ax, coordinate_systems="s0_um"))
    colours = np.concatenate([np.asarray(c.get_facecolor()).reshape(-1, 4) for c in ax.collections
                              if len(np.asarray(c.get_facecolor()).reshape(-1, 4)) == len(values)])
    assert len(colours) == len(values)
    # the drawn colours vary with the predictions (an all-zero X drew one colour)
    assert len(np.unique(np.round(colours[:, :3], 4), axis=0)) > len(values) // 2
    plt.close(fig)


@pytest.mark.slow  # scanpy's neighbours compile numba code on first use (~40 s)
def test_scanpy_pca_and_neighbors_run_on_the_predictions(predicted):
    import scanpy as sc

    table = predicted.tables[K.TABLES.PREDICTED].copy()
    sc.pp.pca(table, n_comps=3)
    sc.pp.neighbors(table, n_neighbors=5)
    assert table.obsm["X_pca"].shape == (table.n_obs, 3) and np.isfinite(table.obsm["X_pca"]).all()
    assert table.obsp["connectivities"].nnz > 0


def test_squidpy_morans_i_on_predicted_and_observed(predicted):
    import squidpy as sq

    out = {}
    for key in (K.TABLES.PREDICTED, K.TABLES.DEFAULT):
        table = predicted.tables[key].copy()
        table = table[table.obs["section"] == "s2"].copy()  # one section: spatial coordinates of one image
        sq.gr.spatial_neighbors(table, coord_type="generic", n_neighs=6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sq.gr.spatial_autocorr(table, mode="moran", genes=GENES, n_perms=None)
        out[key] = table.uns["moranI"].loc[GENES, "I"]
    # the synthetic tissue types are spatially clustered: observed and predicted genes autocorrelate
    assert np.isfinite(out[K.TABLES.PREDICTED]).all() and np.isfinite(out[K.TABLES.DEFAULT]).all()
    assert out[K.TABLES.PREDICTED].mean() > 0.1
