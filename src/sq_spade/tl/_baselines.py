"""The baselines in the ``tl`` API: ``train_baseline`` (ridge, k-NN on frozen features) and their predictor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sq_spade import _constants as K
from sq_spade._docs import inject_docs
from sq_spade._logging import info as log_info
from sq_spade._metrics import expression_metrics
from sq_spade._serialize import to_jsonable
from sq_spade._settings import settings
from sq_spade._validation import check_choice, check_positive, get_table, section_labels
from sq_spade.models._baselines import KNNModel, RidgeModel, _BaselineModel
from sq_spade.models._regressors import KNNRegressor, RidgeRegressor
from sq_spade.pp._genes import panel_expression
from sq_spade.tl._common import (
    comparable_provenance,
    features_provenance,
    model_feature_provenance,
    recipe_of,
    resolve_features,
    resolve_panel,
    rows_of,
    split_sections,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

#: method -> (regressor, model) classes.
BASELINES: dict[str, tuple[type, type[_BaselineModel]]] = {
    "ridge": (RidgeRegressor, RidgeModel),
    "knn": (KNNRegressor, KNNModel),
}


@inject_docs
def train_baseline(
    sdata: SpatialData | AnnData,
    *,
    method: K.BaselineMethod = "ridge",
    features_key: str | None = None,
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    panel: str | Sequence[str] | None = None,
    n_top: int = 50,
    regressor_kwargs: Mapping[str, Any] | None = None,
    train_sections: Sequence[str] | str | None = None,
    validation_sections: Sequence[str] | str | None = None,
    seed: int | None = None,
    device: str | None = None,
    table_key: str = K.TABLES.DEFAULT,
) -> RidgeModel | KNNModel:
    """Train a baseline regressor from frozen image features to the gene panel's expression.

    ``method="ridge"``: PCA + ridge regression on frozen features (HEST-Benchmark's baseline),
    the penalty chosen by leave-one-section-out cross-validation over the training sections;
    ``"knn"``: the mean expression of the most similar training spots in the frozen feature
    space (BLEEP's inference without training), ``k`` chosen the same way. Targets are log1p
    CP10k over the panel genes; the gene panel is chosen on the training sections only.

    Parameters
    ----------
    sdata
        SpatialData, or AnnData with the features in ``obsm``.
    method
        ``"ridge"`` or ``"knn"``.
    %(features_key)s
    backbone, weights
        Backbone of the features and its weights file.
    panel
        Gene list, boolean ``var`` column, ``"spade"`` / ``"heg"`` (chosen on the training
        sections with ``n_top``), or ``None``: the table's panel if chosen on training sections
        only, else ``"spade"``.
    n_top
        Genes per section (``"spade"``) or in total (``"heg"``).
    regressor_kwargs
        Parameters of :class:`~sq_spade.models._regressors.RidgeRegressor` (``n_components``,
        ``alphas``...) or :class:`~sq_spade.models._regressors.KNNRegressor` (``k``,
        ``k_grid``...).
    train_sections, validation_sections
        Sections to train on (default: all but validation) and to score the fitted model on
        (recorded in ``config['params']['validation']``).
    seed
        Recorded with the parameters (both regressors are deterministic; ``None``:
        ``sqs.settings.seed``).
    %(device)s
    %(table_key)s

    Returns
    -------
    :class:`~sq_spade.models.RidgeModel` or :class:`~sq_spade.models.KNNModel`; predict with
    :func:`sq_spade.tl.predict_expression` (no reference needed). The table is left as it is,
    except that frozen features missing from ``obsm`` are computed into it first (as
    :func:`sq_spade.pp.compute_features` does).

    Examples
    --------
    >>> sd = sqs.io.combine_sections([sqs.datasets.her2st(s) for s in ("C2", "C3", "C4")])  # doctest: +SKIP
    >>> ridge = sqs.tl.train_baseline(sd, method="ridge", train_sections=["C2", "C3"])  # doctest: +SKIP
    """
    seed = settings.resolve_seed(seed)
    table = get_table(sdata, table_key)
    check_choice(method, "method", K.BASELINE_METHODS)
    check_positive(n_top, "n_top", integer=True)
    train, val = split_sections(table, train_sections, validation_sections)
    panel = resolve_panel(table, panel, n_top, train)
    tr, va = rows_of(table, train), rows_of(table, val)
    if tr.sum() < 2:
        raise ValueError(f"Training sections {train} have {int(tr.sum())} spots; at least 2 are needed.")
    values, _ = panel_expression(table, panel, gene_input="log1p_cp10k")
    reg_cls, model_cls = BASELINES[method]
    kw = dict(regressor_kwargs or {})
    try:
        reg = reg_cls(**kw)
    except TypeError as e:
        raise TypeError(f"`regressor_kwargs` does not fit {reg_cls.__name__}: {e}") from e
    fkey, feats = resolve_features(sdata, table, features_key=features_key, backbone=backbone, weights=weights,
                                   device=device, table_key=table_key)
    prov = features_provenance(table, fkey)
    reg.fit(feats[tr], values[tr], groups=section_labels(table)[tr])
    params: dict[str, Any] = {"method": method, "features_key": fkey, "seed": seed, "n_top": n_top,
                              "regressor_kwargs": to_jsonable(kw), "feature_recipe": recipe_of(table, fkey),
                              K.FEATURE_PROVENANCE_PARAM: comparable_provenance(prov or None)}
    config = {"backbone": prov.get("backbone", backbone), "weights_sha256": prov.get("weights_sha256"),
              "feature_dim": int(feats.shape[1]), "panel": list(panel), "regressor": reg.to_state()[1],
              "train_sections": train, "validation_sections": val, "params": params}
    model = model_cls(reg, config)
    if va.any():
        summary, _ = expression_metrics(model.predict(feats[va]), values[va])
        model.config.params["validation"] = to_jsonable(summary, nonfinite="null")
    log_info("trained the %s baseline on %d spots (%d panel genes); the table is unchanged", method, int(tr.sum()),
             len(panel))
    return model


# --- prediction (tl.predict_expression dispatches RidgeModel and KNNModel here) ----------------
def predict_baseline(query: Any, q_table: Any, reference: Any, r_table: Any, *, model: _BaselineModel,
                     features_key: str | None, device: str | None, table_key: str, **_: Any,
                     ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """A baseline's prediction from the query's frozen features alone (a reference is not used)."""
    _, fq = resolve_features(query, q_table, features_key=features_key, backbone=model.backbone,
                             weights_sha256=model.weights_sha256, device=device, table_key=table_key,
                             recipe=model.feature_recipe, expected=model_feature_provenance(model))
    return model.predict(fq), {}, {"reference_used": False}
