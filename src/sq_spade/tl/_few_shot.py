"""Few-shot linear probes of spot embeddings (SPADE's claim, at spot level)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sq_spade import _constants as K
from sq_spade._deprecate import renamed_arguments
from sq_spade._docs import inject_docs
from sq_spade._settings import settings
from sq_spade._validation import check_choice, check_obs_column, check_obsm, get_table
from sq_spade.tl._probes import few_shot_probe, summarize_few_shot

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


@renamed_arguments(data="sdata")
@inject_docs
def few_shot(
    sdata: SpatialData | AnnData,
    *,
    label_key: str,
    embedding_keys: Sequence[str],
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    n_repeats: int = 20,
    classifier: K.Classifier = "logistic",
    seed: int | None = None,
    table_key: str = K.TABLES.DEFAULT,
    summarize: bool = True,
) -> pd.DataFrame:
    """Compare embeddings by k-shot probes on spot labels (e.g. pathologist regions).

    For each repeat and shot count ``k``, ``k`` labelled spots per class are drawn (the same
    spots for every embedding, so comparisons are paired), a classifier is fitted on them and
    tested on all other labelled spots. Classes with too few spots for ``k`` are left out of
    that ``k`` (listed in ``df.attrs['dropped_classes']``). Spots whose label is missing are
    ignored.

    Parameters
    ----------
    sdata
        SpatialData or AnnData.
    label_key
        ``obs`` column of labels.
    embedding_keys
        ``obsm`` keys to compare (e.g. ``["X_spade", "X_efficientnet_lite0", "X_mclstexp"]``).
    shots
        Labelled spots per class.
    n_repeats
        Draws per shot count.
    classifier
        ``"logistic"`` (standardised features, C = 1), ``"knn"`` or ``"prototype"``.
    seed
        Seed of the draws (``None``: ``sqs.settings.seed``).
    %(table_key)s
    summarize
        Return mean and standard deviation over repeats (else one row per repeat).

    Returns
    -------
    With ``summarize``: one row per embedding and shot count with ``balanced_accuracy_mean``,
    ``balanced_accuracy_std``, ``auc_macro_ovr_mean``, ``auc_macro_ovr_std``, ``n_repeats``.

    Examples
    --------
    >>> sqs.tl.few_shot(sdata_a1, label_key="label", embedding_keys=["X_spade", "X_efficientnet_lite0"])  # doctest: +SKIP
    """
    seed = settings.resolve_seed(seed)
    table = get_table(sdata, table_key)
    check_choice(classifier, "classifier", K.CLASSIFIERS)
    if isinstance(embedding_keys, str) or not len(embedding_keys):
        raise ValueError(f"`embedding_keys` must be a non-empty list of obsm keys, got {embedding_keys!r}.")
    labels = check_obs_column(table, label_key, arg="label_key")
    emb = {k: check_obsm(table, k, arg="embedding_keys") for k in embedding_keys}
    lab = labels.astype(object).where(labels.notna(), None).to_numpy()
    if pd.Series(lab).dropna().nunique() < 2:
        raise ValueError(f"`label_key={label_key!r}` needs at least two labelled classes.")
    df = few_shot_probe(emb, np.asarray(lab, dtype=object), shots=tuple(shots), n_repeats=n_repeats,
                        classifier=classifier, seed=seed)
    if not summarize:
        return df
    out = summarize_few_shot(df)
    out.attrs.update(df.attrs)
    return out
