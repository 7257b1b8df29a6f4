"""Expression prediction into ``layers`` for every model type, and its evaluation.

:func:`predict_expression` dispatches through :data:`PREDICTORS`, one table keyed by model
class: each predictor lives beside its trainer (SPADE in :mod:`~sq_spade.tl._experts`, mclSTExp
in :mod:`~sq_spade.tl._contrastive`, the baselines in :mod:`~sq_spade.tl._baselines`), and a
subclass of a model follows its base class.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sq_spade import _constants as K
from sq_spade._deprecate import renamed_arguments
from sq_spade._docs import inject_docs
from sq_spade._logging import info as log_info
from sq_spade._metrics import expression_metrics
from sq_spade._serialize import storable
from sq_spade._utils import copy_data
from sq_spade._validation import (
    check_choice,
    check_positive,
    get_table,
    is_spatialdata,
    section_labels,
)
from sq_spade._version import __version__
from sq_spade.models import KNNModel, MclSTExp, RidgeModel, Spade
from sq_spade.pp._genes import panel_expression
from sq_spade.tl._baselines import predict_baseline
from sq_spade.tl._contrastive import predict_mclstexp
from sq_spade.tl._experts import predict_spade

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

Predictor = Callable[..., tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]]

#: How :func:`predict_expression` handles each model class:
#: ``predictor(query, q_table, reference, r_table, *, model, k, weighting, ...) -> (pred, obsm, info)``.
PREDICTORS: dict[type, Predictor] = {
    Spade: predict_spade,
    MclSTExp: predict_mclstexp,
    RidgeModel: predict_baseline,
    KNNModel: predict_baseline,
}


def predictor_of(model: Any) -> Predictor:
    """The predictor of ``model``'s class, or of its nearest base class in :data:`PREDICTORS`."""
    for cls in type(model).__mro__:
        if cls in PREDICTORS:
            return PREDICTORS[cls]
    raise TypeError(f"`model` must be one of {sorted(c.__name__ for c in PREDICTORS)}, got {type(model).__name__}.")


def _observed(q_table: Any, panel: list[str]) -> tuple[np.ndarray | None, np.ndarray]:
    """Observed log1p-CP10k of the panel genes the query measured (library over those genes)."""
    present = q_table.var_names.isin(panel)
    if not present.any() or q_table.X is None:
        return None, np.zeros(len(panel), bool)
    try:
        obs, mask = panel_expression(q_table, panel, gene_input="log1p_cp10k", allow_missing=True)
    except ValueError:  # X holds no raw counts
        return None, np.zeros(len(panel), bool)
    return obs, mask


def _store(query: Any, q_table: Any, pred: np.ndarray, panel: list[str], *, key_added: str, predictions_key: str,
           obsm: dict[str, np.ndarray], uns: dict[str, Any], observed_layer: str,
           extra_layers: dict[str, np.ndarray] | None = None) -> AnnData:
    import anndata as ad

    obs_vals, mask = _observed(q_table, panel)
    existing = query.tables.get(predictions_key) if is_spatialdata(query) else None
    fits = (existing is not None and list(existing.var_names) == list(panel)
            and list(existing.obs_names) == list(q_table.obs_names))
    if existing is not None and not fits:
        warnings.warn(f"Table {predictions_key!r} holds predictions of other spots or genes; it is replaced by the "
                      f"new predictions. To keep both, pass another `predictions_key`.", UserWarning, stacklevel=3)
    pred = pred.astype(np.float32)
    if fits:
        out = existing
    else:
        out = ad.AnnData(X=pred.copy(), obs=q_table.obs.copy(), var=pd.DataFrame(index=pd.Index(panel, name=None)))
        out.var[K.VAR.OBSERVED] = mask
        if K.OBSM.SPATIAL in q_table.obsm:
            out.obsm[K.OBSM.SPATIAL] = np.asarray(q_table.obsm[K.OBSM.SPATIAL])
    out.layers[key_added] = pred
    for suffix in K.UNCERTAINTY_SUFFIXES:  # none left over from an earlier model's prediction
        if suffix not in (extra_layers or {}):
            out.layers.pop(f"{key_added}_{suffix}", None)
    for suffix, val in (extra_layers or {}).items():
        out.layers[f"{key_added}_{suffix}"] = np.asarray(val, dtype=np.float32)
    # X holds the latest prediction (dense), so scanpy, squidpy and spatialdata-plot read it
    # without a layer argument; uns names the layer it copies
    out.X = pred.copy()
    out.uns[K.UNS.PREDICTION_X] = key_added
    if obs_vals is not None:  # refreshed every run: the query's counts may have changed
        out.layers[observed_layer] = obs_vals
        out.var[K.VAR.OBSERVED] = mask
    elif fits and observed_layer in out.layers:  # the query no longer measures the panel
        del out.layers[observed_layer]
        out.var[K.VAR.OBSERVED] = mask
    for key, val in obsm.items():
        out.obsm[key] = val
    out.uns.setdefault(K.UNS.PREDICTION, {})[key_added] = storable(uns)
    if is_spatialdata(query) and not fits:
        from spatialdata.models import TableModel

        attrs = q_table.uns.get(K.UNS.SPATIALDATA_ATTRS, {})
        out.uns.pop(K.UNS.SPATIALDATA_ATTRS, None)
        out = TableModel.parse(out, region=attrs.get("region"), region_key=attrs.get("region_key"),
                               instance_key=attrs.get("instance_key"))
        query.tables[predictions_key] = out
    return out


@renamed_arguments(query="sdata", layer_added="key_added", table_added="predictions_key")
@inject_docs
def predict_expression(
    sdata: SpatialData | AnnData,
    model: Spade | MclSTExp | RidgeModel | KNNModel,
    *,
    reference: SpatialData | AnnData | None = None,
    k: int = 200,
    weighting: K.Weighting = "inverse_sq_l2",
    temperature: float = 1.0,
    key_added: str = K.LAYERS.PREDICTED,
    predictions_key: str = K.TABLES.PREDICTED,
    observed_layer: str = K.LAYERS.NORMALIZED,
    table_key: str = K.TABLES.DEFAULT,
    reference_table_key: str = K.TABLES.DEFAULT,
    features_key: str | None = None,
    reference_features_key: str | None = None,
    routing: K.Routing = "soft",
    device: str | None = None,
    copy: bool = False,
) -> AnnData | SpatialData:
    """Predict the model's gene panel for every spot of ``query`` from its H&E image alone.

    Retrieval models (SPADE, mclSTExp) embed the query spots' images, find the ``k`` most
    similar reference spots by cosine similarity, and average their normalised expression
    (log1p CP10k over the panel) with weights by ``weighting``. Regression models (ridge,
    knn) predict from the query's frozen features directly. The query needs an image and spot
    positions, no counts.

    Where predictions go: a table ``predictions_key`` (default ``"predicted"``) annotating the
    same spots as the query table (same region and instance columns), with ``var`` = the panel,
    ``layers[key_added]`` = predictions (mclSTExp and SPADE also write ``layers[key_added + "_sd"]``,
    the predictive standard deviation: the weighted spread of the retrieved neighbours' values
    plus the spread of the ensemble's members, and, for a model calibrated by
    :func:`~sq_spade.tl.calibrate_conformal` or ``train_contrastive(coverage=...)``,
    ``_lower`` / ``_upper``: the conformal interval of that coverage), ``X`` = the latest
    prediction (dense, so scanpy, squidpy and spatialdata-plot read it with no layer argument;
    ``uns['sq_spade_prediction_x']`` names the layer it copies) and, when the query has counts,
    ``layers[observed_layer]`` = the observed log1p CP10k of the panel genes it measured
    (``var['observed']`` flags them). Several models can write different ``key_added`` into
    one predictions table. Query embeddings go to its ``obsm``, parameters and provenance to
    ``uns['sq_spade_prediction'][key_added]``. For an AnnData query, the new table is returned
    without being attached anywhere.

    Parameters
    ----------
    sdata
        The query: SpatialData (features computed when missing) or AnnData with features in
        ``obsm``.
    model
        :class:`~sq_spade.models.Spade`, :class:`~sq_spade.models.MclSTExp` or a baseline
        (:class:`~sq_spade.models.RidgeModel`, :class:`~sq_spade.models.KNNModel`).
    reference
        Annotated spots to retrieve from (retrieval models), usually the training data.
    k
        Neighbours retrieved (200 for mclSTExp on her2st).
    weighting
        ``"inverse_sq_l2"`` (mclSTExp: inverse squared L2 distance of the unnormalised
        embeddings), ``"softmax"`` (of cosine similarity / ``temperature``) or ``"uniform"``
        (BLEEP).
    temperature
        Softmax temperature.
    key_added
        Layer of the predictions table that receives the predictions (default ``"predicted"``).
    predictions_key
        Table of a SpatialData query that receives the predictions (default ``"predicted"``).
    observed_layer
        Layer of the observed values in the predictions table.
    table_key, reference_table_key
        Tables of the query and the reference (default ``"table"``).
    features_key, reference_features_key
        ``obsm`` keys of frozen features (default ``"X_<backbone>"``), computed with the
        model's backbone when absent from a SpatialData.
    routing
        SPADE only: ``"soft"`` weighs each expert's retrieval by the query's routing weights,
        ``"hard"`` uses the query's expert only. Each expert compares the query, embedded by its
        image head, with the reference spots of that expert only, embedded by its own heads (see
        :func:`sq_spade.tl.spade_retrieve`).
    %(device)s
    copy
        Predict into a copy of ``sdata`` (tables copied, images shared) and return the copy.

    Returns
    -------
    The predictions table (AnnData), or the copy of ``sdata`` when ``copy=True``.

    Examples
    --------
    >>> pred = sqs.tl.predict_expression(sdata_c4, model, reference=sdata_train)  # doctest: +SKIP
    >>> sqs.tl.evaluate_expression(sdata_c4)  # doctest: +SKIP
    """
    predictor = predictor_of(model)
    query = copy_data(sdata) if copy else sdata
    check_choice(weighting, "weighting", K.WEIGHTINGS)
    check_positive(k, "k", integer=True)
    check_positive(temperature, "temperature")
    check_choice(routing, "routing", K.ROUTINGS)
    if key_added == observed_layer:
        raise ValueError(f"`key_added` and `observed_layer` must differ, both are {key_added!r}.")
    q_table = get_table(query, table_key, arg="sdata")
    r_table = get_table(reference, reference_table_key, arg="reference") if reference is not None else None
    out = predictor(
        query, q_table, reference, r_table, model=model, k=k, weighting=weighting, temperature=temperature,
        features_key=features_key, reference_features_key=reference_features_key, device=device,
        table_key=table_key, reference_table_key=reference_table_key,
        **({"routing": routing} if predictor is predict_spade else {}))
    # a predictor returns (pred, obsm, info) or (pred, obsm, info, layers by suffix: "sd", "lower"...)
    pred, obsm, info = out[:3]
    extra = out[3] if len(out) > 3 else {}
    for name in extra:
        if f"{key_added}_{name}" == observed_layer:
            raise ValueError(f"`observed_layer={observed_layer!r}` collides with the layer {key_added}_{name}.")
    panel = list(model.panel)
    if pred.shape != (q_table.n_obs, len(panel)):
        raise RuntimeError(f"predictor returned {pred.shape}, expected {(q_table.n_obs, len(panel))}")
    for what, val in {"predictions": pred, **{f"obsm[{k!r}]": v for k, v in obsm.items()}}.items():
        if not np.isfinite(np.asarray(val, dtype=np.float64)).all():  # nothing non-finite is ever written
            raise FloatingPointError(f"The model gave NaN or infinite {what} for this query (a model with "
                                     f"broken parameters, or extreme features); nothing was written.")
    uns = {"model": type(model).__name__, "backbone": getattr(model, "backbone", None), "k": int(k), "weighting": weighting,
           "temperature": float(temperature), "sections": sorted(set(section_labels(q_table))),
           "sq_spade_version": __version__, **info}
    for key, val in obsm.items():
        q_table.obsm[key] = val
    out = _store(query, q_table, pred, panel, key_added=key_added, predictions_key=predictions_key, obsm=obsm,
                 uns=uns, observed_layer=observed_layer, extra_layers=extra)
    where = f"table {predictions_key!r}" if is_spatialdata(query) else "the returned AnnData"
    log_info("predicted %d genes for %d spots with %s: layers[%r] and X of %s", len(panel), q_table.n_obs,
             type(model).__name__, key_added, where)
    return query if copy else out


@renamed_arguments(data="sdata", predicted_layer="layer", table_key="predictions_key")
def evaluate_expression(
    sdata: SpatialData | AnnData,
    *,
    layer: str = K.LAYERS.PREDICTED,
    observed_layer: str = K.LAYERS.NORMALIZED,
    predictions_key: str = K.TABLES.PREDICTED,
    by: str | None = "section",
    n_heg: int = 50,
    return_per_gene: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Per-section ACG, HEG, MSE and MAE of predictions against observations.

    ACG is the mean over genes of the Pearson r across spots; HEG the same over the ``n_heg``
    genes with the highest observed mean in the section; genes constant in the prediction or
    the observation are skipped and counted (``n_skipped_constant``). Only genes the query
    measured (``var['observed']``) are scored. When it measured only part of the panel, its
    observed log1p CP10k is normalised over those genes, so each spot's prediction is divided by
    the share the prediction gives those genes before scoring (``observed_layer="log1p_cp10k"``):
    both sides on one scale, without adding an averaging predictor's per-spot offset.

    Parameters
    ----------
    sdata
        SpatialData (its predictions table ``predictions_key``) or the predictions AnnData.
    layer, observed_layer
        Layers compared: predicted and observed.
    predictions_key
        Table of predictions written by :func:`predict_expression` (default ``"predicted"``).
    by
        ``obs`` column to group by (``None``: all spots together).
    n_heg
        Highly expressed genes for HEG.
    return_per_gene
        Also return the per-gene table (section, gene, pearson_r, mean_observed, mse, is_heg).

    Returns
    -------
    One row per group: ``section, n_spots, n_genes, ACG, HEG, MSE, MAE, n_skipped_constant``.

    Examples
    --------
    >>> sqs.tl.evaluate_expression(sdata_c4)  # doctest: +SKIP
    """
    table = get_table(sdata, predictions_key, arg="sdata", key_arg="predictions_key",
                      hint=" Run sqs.tl.predict_expression first.")
    for arg, name in (("layer", layer), ("observed_layer", observed_layer)):
        if name not in table.layers:
            raise KeyError(f"`{arg}={name!r}` is not a layer of table {predictions_key!r}; available: "
                           f"{sorted(table.layers)}.")
    check_positive(n_heg, "n_heg", integer=True)
    genes = (table.var[K.VAR.OBSERVED].to_numpy(bool) if K.VAR.OBSERVED in table.var
             else np.ones(table.n_vars, bool))
    if not genes.any():
        raise ValueError("No predicted gene was observed in this table: nothing to evaluate.")
    pred = _dense(table.layers[layer])
    obs = _dense(table.layers[observed_layer])[:, genes]
    if observed_layer == K.LAYERS.NORMALIZED and not genes.all():
        pred = _reclose(pred, genes)
    else:
        pred = pred[:, genes]
    names = table.var_names[genes].astype(str).to_numpy()
    if by is None:
        groups = np.full(table.n_obs, "all", dtype=object)
    else:
        if by not in table.obs:
            raise KeyError(f"`by={by!r}` is not a column of `obs`; available: {list(table.obs.columns)}.")
        groups = table.obs[by].astype(str).to_numpy()
    rows, per_gene = [], []
    for g in dict.fromkeys(groups):
        m = groups == g
        summary, pg = expression_metrics(pred[m], obs[m], gene_names=names, n_heg=n_heg)
        rows.append({by or "group": g, **summary})
        pg.insert(0, by or "group", g)
        per_gene.append(pg)
    df = pd.DataFrame(rows)
    return (df, pd.concat(per_gene, ignore_index=True)) if return_per_gene else df


def _reclose(pred: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """Log1p CP10k predictions of the whole panel, put on the scale of an observation of ``genes`` only.

    The observed layer of a query that measured part of the panel is normalised over the genes
    it measured (the other genes' counts are unknown), so each spot's library is smaller than the
    panel's by the share of the unmeasured genes. Each spot's prediction is divided by the share
    that the *prediction itself* gives the measured genes: an exact predictor then scores MSE 0.
    Closing to 1e4 instead would be wrong for every averaging predictor (retrieval, kNN, an
    ensemble): a mean of log values does not sum to 1e4 in linear space, and that gap, which
    varies from spot to spot, would be added to every gene (it drove her2st ACG from 0.21 to 0).
    """
    cp = np.clip(np.expm1(pred), 0.0, None)
    sub = cp[:, genes]
    measured, whole = sub.sum(axis=1, keepdims=True), cp.sum(axis=1, keepdims=True)
    scale = np.ones_like(measured)
    np.divide(whole, measured, out=scale, where=measured > 0)
    return np.log1p(sub * scale)


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
