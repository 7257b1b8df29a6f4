"""Plumbing shared by the ``tl`` trainers and predictors: features, gene panels, section splits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sq_spade import _constants as K
from sq_spade._validation import (
    check_obsm,
    check_sections,
    feature_recipe,
    is_spatialdata,
    section_ids,
    section_labels,
)
from sq_spade.pp._features import (
    check_features_backbone,
    comparable_provenance,
    compute_features,
    feature_provenance,
    provenance_differences,
)
from sq_spade.pp._genes import check_panel_measured, panel_genes, select_genes


def resolve_features(data: Any, table: Any, *, features_key: str | None, backbone: str,
                     weights_sha256: str | None = None, weights: str | None = None,
                     device: str | None = None, table_key: str = K.TABLES.DEFAULT,
                     recipe: Any = None, expected: Any = None,
                     expected_from: str = "the model") -> tuple[str, np.ndarray]:
    """Features of every row: ``obsm[features_key]``, computed with ``backbone`` when absent.

    ``recipe`` (a model's :attr:`~sq_spade.models.Model.feature_recipe`: layers, TTA, z-score)
    says how to compute them and is checked against the provenance of existing ones; ``None``
    (training) computes them with :func:`~sq_spade.pp.compute_features`'s defaults.
    ``expected``: the provenance record the features must match in full (the model's, or the
    other side's); see :func:`~sq_spade.pp._features.check_features_backbone`.
    """
    key = features_key or K.features_key(backbone)
    if key not in table.obsm:
        if features_key is not None:
            raise KeyError(f"`features_key={features_key!r}` is not in `obsm`; available: {sorted(table.obsm)}.")
        if not is_spatialdata(data):
            raise KeyError(f"`obsm[{key!r}]` is missing and an AnnData has no image to compute it from; "
                           "pass a SpatialData or run sqs.pp.compute_features first.")
        # made as the expected ones were (the model's training features), so they compare equal
        how = {} if recipe is None else feature_recipe(recipe)
        geo = (expected or {}).get("patch_geometry") or {}
        if geo.get("mode") == "native":
            how["patch_px"] = geo.get("patch_px")
        elif geo.get("patch_size_um") is not None:
            how.update(patch_size_um=geo["patch_size_um"], microns_per_pixel=geo.get("mpp"))
        if recipe is None and expected is not None:
            how["tta"] = bool(expected.get("tta", False))
        compute_features(data, backbone=backbone, weights=weights, device=device, table_key=table_key, key_added=key,
                         **how)
    check_features_backbone(table, key, backbone, weights_sha256, recipe=recipe, expected=expected,
                            expected_from=expected_from)
    return key, check_obsm(table, key, arg="features_key")


def model_feature_provenance(model: Any) -> dict[str, Any] | None:
    """The provenance of the features a model was trained on (``None``: unknown, e.g. a 0.1 model)."""
    return comparable_provenance((model.config.get("params") or {}).get(K.FEATURE_PROVENANCE_PARAM))


def check_same_provenance(q_table: Any, q_key: str, r_table: Any, r_key: str) -> None:
    """Refuse query and reference features made differently (or one of them without a record)."""
    diffs = provenance_differences(feature_provenance(q_table, q_key), feature_provenance(r_table, r_key))
    if diffs:
        raise ValueError(
            f"`reference_features_key`: the reference's obsm[{r_key!r}] and the query's obsm[{q_key!r}] "
            f"(`features_key`) were not made the same way ({'; '.join(diffs)}; query first; a missing "
            f"record means uns[{K.UNS.FEATURES!r}] was dropped, e.g. by anndata.concat). Retrieval compares "
            f"them directly: compute both with the same backbone, weights, patch geometry and TTA.")


def features_provenance(table: Any, key: str | None) -> dict[str, Any]:
    """What computed ``obsm[key]`` (backbone, weights sha256...), ``{}`` when unknown."""
    return dict(table.uns.get(K.UNS.FEATURES, {}).get(key, {})) if key is not None else {}


def recipe_of(table: Any, key: str | None) -> dict[str, Any] | None:
    """The recipe (layers, TTA, z-score) of ``obsm[key]`` for a model's config; ``None`` without provenance."""
    prov = features_provenance(table, key)
    return feature_recipe(prov) if prov else None


def resolve_panel(table: Any, panel: str | Sequence[str] | None, n_top: int, train: list[str]) -> list[str]:
    """The genes a trainer uses: a list, a boolean ``var`` column, or chosen on ``train`` sections.

    ``None``: the table's panel (``var['sq_spade_panel']``) when it was chosen on training
    sections only, else ``"spade"``; ``"spade"`` / ``"heg"``: chosen on ``train`` with ``n_top``.
    """
    if panel is None:
        panel = K.VAR.PANEL if K.VAR.PANEL in table.var else "spade"
        if panel == K.VAR.PANEL:
            chosen_on = table.uns.get(K.UNS.PANEL, {}).get("train_sections")
            if chosen_on is not None and set(chosen_on) - set(train):
                raise ValueError(f"The table's panel was chosen on sections {list(chosen_on)}, which include sections "
                                 f"outside training {train}: that would leak. Pass `panel=` explicitly.")
            return check_panel_measured(table, panel_genes(table, K.VAR.PANEL), train)
    if isinstance(panel, str) and panel in K.PANEL_METHODS:
        return select_genes(table, panel, n_top=n_top, train_sections=train, inplace=False)
    return check_panel_measured(table, panel_genes(table, panel), train)


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


def held_out_sections(train: Sequence[str], n_seeds: int) -> list[str]:
    """The training section each seed holds out with ``refit``: seed ``i`` holds out ``train[-(1 + i % n)]``.

    The held-out section rotates from the last training section backwards, so that with at
    least as many seeds as training sections every section is held out once (one seed: the
    last section). With fewer seeds, only the last ``n_seeds`` sections are held out. Shared
    by mclSTExp's and SPADE's small-data recipes.

    Examples
    --------
    >>> held_out_sections(["a", "b", "c"], 4)
    ['c', 'b', 'a', 'c']
    """
    n = len(train)
    return [train[-(1 + i % n)] for i in range(n_seeds)]
