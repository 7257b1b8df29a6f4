"""Expression prediction into ``layers`` for every model type, and its evaluation."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sq_spade import _constants as K
from sq_spade._validation import (
    check_choice,
    check_positive,
    get_table,
    is_spatialdata,
    section_labels,
)
from sq_spade.tl._common import panel_expression, resolve_features, storable

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

#: model class name -> function(query, q_table, reference, r_table, **kw) -> (pred, obsm dict, info)
PREDICTORS: dict[str, Callable[..., tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]]] = {}


def register_predictor(class_name: str) -> Callable:
    """Register how :func:`predict_expression` handles a model class (by class name)."""

    def deco(fn: Callable) -> Callable:
        PREDICTORS[class_name] = fn
        return fn

    return deco


@register_predictor("Spade")
def _predict_spade(query: Any, q_table: Any, reference: Any, r_table: Any, *, model: Any, k: int, weighting: str,
                   temperature: float, features_key: str | None, reference_features_key: str | None,
                   device: str | None, table_key: str, reference_table_key: str, **_: Any):
    from sq_spade.tl._retrieval import retrieve_predict

    if reference is None:
        raise ValueError("`reference` is required for SPADE retrieval: the annotated spots (e.g. the training "
                         "SpatialData) whose expression is retrieved.")
    sha = model.config.get("weights_sha256")
    _, fq = resolve_features(query, q_table, features_key=features_key, backbone=model.backbone,
                             weights_sha256=sha, device=device, table_key=table_key)
    _, fr = resolve_features(reference, r_table, features_key=reference_features_key, backbone=model.backbone,
                             weights_sha256=sha, device=device, table_key=reference_table_key)
    values, _ = panel_expression(r_table, model.panel, gene_input="log1p_cp10k")
    q = model.embed_images(fq)
    side = model.config["reference_side"]
    if side == "genes":
        gin, _ = panel_expression(r_table, model.panel, gene_input=model.config["gene_input"])
        keys = model.embed_genes(gin, model.assign(fr))
    else:
        keys = model.embed_images(fr)
    if k > len(keys):
        raise ValueError(f"`k={k}` exceeds the {len(keys)} reference spots.")
    pred = retrieve_predict(q, keys, values, k=k, weighting=weighting, temperature=temperature)
    info = {"reference_side": side, "n_reference": int(len(keys))}
    return pred, {K.SPADE_KEY: q}, info


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


def _store(query: Any, q_table: Any, pred: np.ndarray, panel: list[str], *, layer_added: str, table_added: str,
           obsm: dict[str, np.ndarray], uns: dict[str, Any], observed_layer: str) -> AnnData:
    import anndata as ad
    import scipy.sparse as sp

    obs_vals, mask = _observed(q_table, panel)
    existing = query.tables.get(table_added) if is_spatialdata(query) else None
    fits = (existing is not None and list(existing.var_names) == list(panel)
            and list(existing.obs_names) == list(q_table.obs_names))
    if existing is not None and not fits:
        warnings.warn(f"Table {table_added!r} exists with other spots or genes; it is replaced.", UserWarning, stacklevel=3)
    if fits:
        out = existing
    else:
        out = ad.AnnData(X=sp.csr_matrix(pred.shape, dtype=np.float32), obs=q_table.obs.copy(),
                         var=pd.DataFrame(index=pd.Index(panel, name=None)))
        out.var["observed"] = mask
        if "spatial" in q_table.obsm:
            out.obsm["spatial"] = np.asarray(q_table.obsm["spatial"])
    out.layers[layer_added] = pred.astype(np.float32)
    if obs_vals is not None and observed_layer not in out.layers:
        out.layers[observed_layer] = obs_vals
        out.var["observed"] = mask
    for key, val in obsm.items():
        out.obsm[key] = val
    out.uns.setdefault(K.PREDICTION_UNS, {})[layer_added] = storable(uns)
    if is_spatialdata(query) and not fits:
        from spatialdata.models import TableModel

        attrs = q_table.uns.get("spatialdata_attrs", {})
        out.uns.pop("spatialdata_attrs", None)
        out = TableModel.parse(out, region=attrs.get("region"), region_key=attrs.get("region_key"),
                               instance_key=attrs.get("instance_key"))
        query.tables[table_added] = out
    return out


def predict_expression(
    query: SpatialData | AnnData,
    model: Any,
    *,
    reference: SpatialData | AnnData | None = None,
    k: int = 200,
    weighting: str = "inverse_sq_l2",
    temperature: float = 1.0,
    layer_added: str = K.PREDICTED_LAYER,
    table_added: str = K.PREDICTED_TABLE,
    observed_layer: str = K.NORMALIZED_LAYER,
    table_key: str = K.TABLE_KEY,
    reference_table_key: str = K.TABLE_KEY,
    features_key: str | None = None,
    reference_features_key: str | None = None,
    device: str | None = None,
) -> AnnData:
    """Predict the model's gene panel for every spot of ``query`` from its H&E image alone.

    Retrieval models (SPADE, mclSTExp) embed the query spots' images, find the ``k`` most
    similar reference spots by cosine similarity, and average their normalised expression
    (log1p CP10k over the panel) with weights by ``weighting``. Regression models (ridge,
    knn) predict from the query's frozen features directly. The query needs an image and spot
    positions, no counts.

    Where predictions go: a table ``table_added`` (default ``"predicted"``) annotating the same
    spots as the query table (same region and instance columns), with ``var`` = the panel,
    ``layers[layer_added]`` = predictions, and, when the query has counts,
    ``layers[observed_layer]`` = the observed log1p CP10k of the panel genes it measured
    (``var['observed']`` flags them). Several models can write different ``layer_added`` into
    one predictions table. Query embeddings go to its ``obsm``, parameters and provenance to
    ``uns['sq_spade_prediction'][layer_added]``. For an AnnData query, the new table is returned
    without being attached anywhere.

    Parameters
    ----------
    query
        SpatialData (features computed when missing) or AnnData with features in ``obsm``.
    model
        :class:`~sq_spade.models.Spade`, :class:`~sq_spade.models.MclSTExp` or a reference
        model (:class:`~sq_spade.models.RidgeModel`, :class:`~sq_spade.models.KNNModel`).
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
    layer_added, table_added, observed_layer
        Where predictions and observations are written.
    table_key, reference_table_key
        Tables of the query and the reference.
    features_key, reference_features_key
        ``obsm`` keys of frozen features (default ``"X_<backbone>"``).
    device
        Device for feature computation.

    Returns
    -------
    The predictions table (AnnData).

    Examples
    --------
    >>> pred = sqs.tl.predict_expression(sdata_c4, model, reference=sdata_train)  # doctest: +SKIP
    >>> sqs.tl.evaluate_expression(sdata_c4)  # doctest: +SKIP
    """
    name = type(model).__name__
    if name not in PREDICTORS:
        raise TypeError(f"`model` must be one of {sorted(PREDICTORS)}, got {name}.")
    check_choice(weighting, "weighting", ["inverse_sq_l2", "softmax", "uniform"])
    check_positive(k, "k", integer=True)
    check_positive(temperature, "temperature")
    if layer_added == observed_layer:
        raise ValueError(f"`layer_added` and `observed_layer` must differ, both are {layer_added!r}.")
    q_table = get_table(query, table_key, arg="query")
    r_table = get_table(reference, reference_table_key, arg="reference") if reference is not None else None
    pred, obsm, info = PREDICTORS[name](
        query, q_table, reference, r_table, model=model, k=k, weighting=weighting, temperature=temperature,
        features_key=features_key, reference_features_key=reference_features_key, device=device,
        table_key=table_key, reference_table_key=reference_table_key)
    panel = list(model.panel)
    if pred.shape != (q_table.n_obs, len(panel)):
        raise RuntimeError(f"predictor returned {pred.shape}, expected {(q_table.n_obs, len(panel))}")
    import sq_spade

    uns = {"model": name, "backbone": getattr(model, "backbone", None), "k": int(k), "weighting": weighting,
           "temperature": float(temperature), "sections": sorted(set(section_labels(q_table))),
           "sq_spade_version": sq_spade.__version__, **info}
    for key, val in obsm.items():
        q_table.obsm[key] = val
    return _store(query, q_table, pred, panel, layer_added=layer_added, table_added=table_added, obsm=obsm,
                  uns=uns, observed_layer=observed_layer)


def evaluate_expression(
    data: SpatialData | AnnData,
    *,
    predicted_layer: str = K.PREDICTED_LAYER,
    observed_layer: str = K.NORMALIZED_LAYER,
    table_key: str = K.PREDICTED_TABLE,
    by: str | None = "section",
    n_heg: int = 50,
    return_per_gene: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Per-section ACG, HEG, MSE and MAE of predictions against observations.

    ACG is the mean over genes of the Pearson r across spots; HEG the same over the ``n_heg``
    genes with the highest observed mean in the section; genes constant in the prediction or
    the observation are skipped and counted (``n_skipped_constant``). Only genes the query
    measured (``var['observed']``) are scored.

    Parameters
    ----------
    data
        SpatialData (its table ``table_key``) or the predictions AnnData.
    predicted_layer, observed_layer
        Layers compared.
    table_key
        Predictions table (default ``"predicted"``).
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
    from sq_spade.tl._metrics import expression_metrics

    table = get_table(data, table_key, arg="data")
    for arg, layer in (("predicted_layer", predicted_layer), ("observed_layer", observed_layer)):
        if layer not in table.layers:
            raise KeyError(f"`{arg}={layer!r}` is not a layer of table {table_key!r}; available: {sorted(table.layers)}.")
    check_positive(n_heg, "n_heg", integer=True)
    genes = table.var["observed"].to_numpy(bool) if "observed" in table.var else np.ones(table.n_vars, bool)
    if not genes.any():
        raise ValueError("No predicted gene was observed in this table: nothing to evaluate.")
    pred = _dense(table.layers[predicted_layer])[:, genes]
    obs = _dense(table.layers[observed_layer])[:, genes]
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


def _dense(x: Any) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
