"""Plumbing shared by the ``tl`` functions: features, panel expression, section splits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sq_spade import _constants as K
from sq_spade._validation import (
    check_obsm,
    check_sections,
    is_spatialdata,
    section_ids,
    section_labels,
)


def resolve_features(data: Any, table: Any, *, features_key: str | None, backbone: str,
                     weights_sha256: str | None = None, weights: str | None = None,
                     device: str | None = None, table_key: str = K.TABLE_KEY) -> tuple[str, np.ndarray]:
    """Features of every row: ``obsm[features_key]``, computed with ``backbone`` when absent."""
    from sq_spade.pp._features import check_features_backbone, compute_features

    key = features_key or K.features_key(backbone)
    if key not in table.obsm:
        if features_key is not None:
            raise KeyError(f"`features_key={features_key!r}` is not in `obsm`; available: {sorted(table.obsm)}.")
        if not is_spatialdata(data):
            raise KeyError(f"`obsm[{key!r}]` is missing and an AnnData has no image to compute it from; "
                           "pass a SpatialData or run sqs.pp.compute_features first.")
        compute_features(data, backbone=backbone, weights=weights, device=device, table_key=table_key, key_added=key)
    check_features_backbone(table, key, backbone, weights_sha256)
    return key, check_obsm(table, key, arg="features_key")


def panel_expression(table: Any, panel: Sequence[str], *, gene_input: str = "log1p_cp10k",
                     counts_layer: str | None = None, allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Expression of ``panel`` genes ``(N, G)`` float32 and a mask of the genes present.

    ``log1p_cp10k`` normalises each spot's library over the panel genes present.
    """
    from sq_spade.pp._genes import _counts, log1p_cp10k

    if gene_input not in ("log1p_cp10k", "raw"):
        raise ValueError(f"`gene_input` must be 'log1p_cp10k' or 'raw', got {gene_input!r}.")
    cols = table.var_names.get_indexer(list(panel))
    present = cols >= 0
    if not present.all() and not allow_missing:
        missing = [g for g, ok in zip(panel, present, strict=True) if not ok]
        raise KeyError(f"{len(missing)} panel genes are absent from the table (e.g. {missing[:5]}).")
    X = _counts(table, counts_layer)[:, cols[present]]
    Y = log1p_cp10k(X) if gene_input == "log1p_cp10k" else X
    out = np.zeros((table.n_obs, len(panel)), np.float32)
    out[:, present] = Y.toarray()
    return out, present


def split_sections(table: Any, train_sections: Sequence[str] | str | None,
                   validation_sections: Sequence[str] | str | None) -> tuple[list[str], list[str]]:
    """Training and validation sections: disjoint, validation optional, training non-empty."""
    all_secs = list(section_ids(table))
    val = [] if validation_sections is None else check_sections(table, validation_sections, arg="validation_sections")
    train = ([s for s in all_secs if s not in val] if train_sections is None
             else check_sections(table, train_sections, arg="train_sections"))
    overlap = sorted(set(train) & set(val))
    if overlap:
        raise ValueError(f"`train_sections` and `validation_sections` overlap on {overlap}.")
    if not train:
        raise ValueError("No training section left: `validation_sections` names every section.")
    return train, val


def rows_of(table: Any, sections: Sequence[str]) -> np.ndarray:
    """Boolean mask of the rows of ``sections``."""
    return np.isin(section_labels(table), list(sections))


def storable(obj: Any) -> Any:
    """A copy of a JSON-like dict that h5ad and zarr can write: no ``None``, lists as arrays.

    ``None`` entries are dropped, numeric lists (with ``None`` for NaN) become float arrays,
    other lists string arrays (an empty list an empty string array).
    """
    if isinstance(obj, Mapping):
        return {str(k): storable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        flat = list(obj)
        if any(isinstance(v, (list, tuple, Mapping)) for v in flat):
            return {str(i): storable(v) for i, v in enumerate(flat) if v is not None}
        if flat and all(v is None or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool))
                        for v in flat):
            return np.array([np.nan if v is None else v for v in flat], dtype=np.float64)
        return np.array([str(v) for v in flat], dtype=str)
    return obj
