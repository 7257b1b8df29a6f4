"""Held-out evaluation of every method: leave-one-section-out and patient-disjoint folds."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sq_spade import _constants as K
from sq_spade._docs import inject_docs
from sq_spade._settings import settings
from sq_spade._utils import progress as _progress
from sq_spade._validation import (
    check_choice,
    check_positive,
    check_sections,
    get_table,
    is_spatialdata,
    section_labels,
)
from sq_spade.io._sections import get_sections
from sq_spade.tl._baselines import train_baseline
from sq_spade.tl._common import resolve_features, rows_of
from sq_spade.tl._contrastive import train_contrastive
from sq_spade.tl._experts import train_experts
from sq_spade.tl._predict import evaluate_expression, predict_expression

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

#: Arguments the folds set themselves.
_RESERVED = ("train_sections", "validation_sections", "method", "panel", "n_top", "features_key", "backbone",
             "table_key", "seed", "key_added")


def _folds(table: Any, sections: list[str], split: str) -> list[tuple[str, list[str]]]:
    """``(fold name, test sections)`` per fold."""
    if split == "leave_one_section_out":
        return [(s, [s]) for s in sections]
    if K.OBS.PATIENT not in table.obs:
        raise KeyError(f"`split='by_patient'` needs the obs column {K.OBS.PATIENT!r} (patient of each spot); "
                       f"available: {list(table.obs.columns)}.")
    labels = section_labels(table)
    patients = table.obs[K.OBS.PATIENT].astype(str).to_numpy()
    if table.obs[K.OBS.PATIENT].isna().any():
        raise ValueError(f"`obs[{K.OBS.PATIENT!r}]` has missing values: every spot needs a patient.")
    by_patient: dict[str, list[str]] = {}
    for s in sections:
        ps = sorted(set(patients[labels == s]))
        if len(ps) != 1:
            raise ValueError(f"Section {s!r} has spots of several patients {ps} in `obs[{K.OBS.PATIENT!r}]`.")
        by_patient.setdefault(ps[0], []).append(s)
    return list(by_patient.items())


def _working_table(table: Any, features_key: str | None) -> Any:
    """A lean copy of what training needs: counts, obs, var, genes present, coordinates, provenance."""
    import anndata as ad

    obsm = {k: np.asarray(table.obsm[k]) for k in ([features_key] if features_key else []) + [K.OBSM.SPATIAL]
            if k in table.obsm}
    uns = {k: table.uns[k] for k in (K.UNS.FEATURES, K.UNS.SECTIONS) if k in table.uns}
    work = ad.AnnData(X=table.X, obs=table.obs.copy(), var=table.var.copy(), obsm=obsm, uns=uns)
    if K.VARM.GENES_PRESENT in table.varm:
        work.varm[K.VARM.GENES_PRESENT] = table.varm[K.VARM.GENES_PRESENT]
    return work


def _fold_object(sdata: Any, work: Any, sections: list[str], table_key: str, as_spatialdata: bool) -> Any:
    """The rows of ``sections``: an AnnData copy, or a SpatialData sharing the user's images."""
    sub = work[rows_of(work, sections)].copy()
    if not as_spatialdata:
        return sub
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    attrs = get_table(sdata, table_key).uns.get(K.UNS.SPATIALDATA_ATTRS, {})
    secs = [s for s in get_sections(sdata, table_key=table_key) if s.section in sections]
    images = {s.image_key: sdata.images[s.image_key] for s in secs if s.image_key is not None}
    shapes = {s.shapes_key: sdata.shapes[s.shapes_key] for s in secs}
    region_key = attrs.get("region_key", K.OBS.REGION)
    sub.obs[region_key] = pd.Categorical(sub.obs[region_key].astype(str))
    table = TableModel.parse(sub, region=list(shapes), region_key=region_key,
                             instance_key=attrs.get("instance_key", K.OBS.INSTANCE))
    return SpatialData(images=images, shapes=shapes, tables={K.TABLES.DEFAULT: table})


@inject_docs
def cross_validate(
    sdata: SpatialData | AnnData,
    *,
    method: K.Method = "spade",
    split: K.Split = "leave_one_section_out",
    sections: Sequence[str] | None = None,
    panel: str | Sequence[str] = "spade",
    n_top: int = 50,
    validation: str | None = None,
    k: int = 200,
    weighting: K.Weighting = "inverse_sq_l2",
    features_key: str | None = None,
    backbone: str = "efficientnet_lite0",
    seed: int | None = None,
    device: str | None = None,
    table_key: str = K.TABLES.DEFAULT,
    progress: bool | None = None,
    return_per_gene: bool = False,
    **train_kwargs: Any,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Held-out expression prediction scores of a method, fold by fold.

    For each fold, its test sections are held out entirely: the gene panel (``"spade"`` or
    ``"heg"``) is chosen on the fold's training sections only, the model is trained on them
    (:func:`sq_spade.tl.train_experts` for SPADE, :func:`sq_spade.tl.train_contrastive` for
    mclSTExp, :func:`sq_spade.tl.train_baseline` for ridge and k-NN), the test sections'
    expression is predicted from their images alone
    (:func:`sq_spade.tl.predict_expression`; retrieval methods retrieve from all the fold's
    non-test sections) and scored against their measured expression
    (:func:`sq_spade.tl.evaluate_expression`).

    Each fold works on copies of the rows it uses: the user's object is not modified, except
    that frozen features missing from ``obsm`` are computed into it once, up front (as
    :func:`sq_spade.pp.compute_features` does).

    Parameters
    ----------
    sdata
        SpatialData, or AnnData with frozen features in ``obsm`` (not for fine-tuned mclSTExp,
        which needs the images).
    method
        ``"spade"``, ``"mclstexp"``, ``"ridge"`` or ``"knn"``.
    split
        ``"leave_one_section_out"`` (the field's habit; serial sections of one patient leak)
        or ``"by_patient"`` (one fold per patient of ``obs['patient']``: patient-disjoint).
    sections
        Sections taking part (default: all); the others are ignored.
    panel
        ``"spade"`` / ``"heg"`` (chosen per fold on its training sections, ``n_top``) or a gene
        list (the same in every fold).
    n_top
        Genes per section (``"spade"``) or in total (``"heg"``).
    validation
        ``None`` (default): every method trains on all the fold's training sections, as a user's
        call would; mclSTExp's and SPADE's small-data recipes then hold out training sections in
        turn to choose their epoch count and refit on all of them. ``"auto"``: with at least 3
        training sections in a fold, the last one validates (early stopping, SPADE's reference
        side) instead of training, for every method (ridge and kNN then train on one section
        fewer).
    k, weighting
        Retrieval settings of :func:`sq_spade.tl.predict_expression` (SPADE, mclSTExp); ``k``
        is capped at the number of reference spots of a fold (with a warning).
    features_key, backbone
        Frozen features (default ``"X_<backbone>"``), computed when missing.
    seed
        Seed of every fold's training (``None``: ``sqs.settings.seed``).
    %(device)s
    %(table_key)s
    progress
        Progress bar over folds (default ``settings.progress``).
    return_per_gene
        Also return the per-gene table (method, fold, section, gene, pearson_r, ...).
    **train_kwargs
        Passed to the trainer (e.g. ``epochs``, ``n_experts``, ``finetune``, ``context``,
        ``regressor_kwargs``). The fold sets ``train_sections`` and ``validation_sections``.

    Returns
    -------
    One row per (fold, test section), with the columns ``method``, ``split``, ``fold``,
    ``section``, ``n_spots``, ``n_genes``, ``ACG``, ``HEG``, ``MSE``, ``MAE``,
    ``n_skipped_constant``, ``k``, ``train_sections`` and ``validation_sections``;
    ``df.attrs["panels"]`` maps each fold to its genes. With ``return_per_gene``,
    ``(df, per_gene)``.

    Examples
    --------
    >>> sd = sqs.io.combine_sections([sqs.datasets.her2st(s) for s in ("A1", "B1", "C1", "D1")])  # doctest: +SKIP
    >>> res = sqs.tl.cross_validate(sd, method="ridge", split="by_patient")  # doctest: +SKIP
    >>> res[["fold", "section", "ACG", "HEG"]]  # doctest: +SKIP
    """
    seed = settings.resolve_seed(seed)
    table = get_table(sdata, table_key)
    check_choice(method, "method", K.METHODS)
    check_choice(split, "split", K.SPLITS)
    check_choice(validation, "validation", ["auto", None])
    check_choice(weighting, "weighting", K.WEIGHTINGS)
    check_positive(k, "k", integer=True)
    check_positive(n_top, "n_top", integer=True)
    if isinstance(panel, str):
        if panel not in K.PANEL_METHODS:
            raise ValueError(f"`panel` must be 'spade', 'heg' or a list of genes, got {panel!r}: a panel stored in "
                             "the table was chosen outside the folds and could leak the test sections.")
    else:
        panel = [str(g) for g in panel]
        if not panel:
            raise ValueError("`panel` is an empty gene list.")
        missing = [g for g in panel if g not in table.var_names]
        if missing:
            raise KeyError(f"`panel` genes absent from the table: {missing[:5]} ({len(missing)} in all).")
    reserved = sorted(set(train_kwargs) & set(_RESERVED))
    if reserved:
        raise ValueError(f"{reserved} are set by cross_validate (the folds choose training and validation "
                         "sections); pass `sections`, `validation`, `panel`, `features_key`... instead.")
    finetune = train_kwargs.get("finetune", "none")
    if method != "mclstexp" and "finetune" in train_kwargs:
        raise ValueError(f"`finetune` applies to method='mclstexp' only, not {method!r}.")
    as_sd = method == "mclstexp" and finetune != "none"
    if as_sd and not is_spatialdata(sdata):
        raise TypeError(f"`finetune={finetune!r}` needs the images: `sdata` must be a SpatialData, "
                        f"got {type(sdata).__name__}.")
    sections = check_sections(table, sections, arg="sections")
    folds = _folds(table, sections, split)
    if len(folds) < 2:
        raise ValueError(f"`split={split!r}` gives {len(folds)} fold over sections {sections}: at least 2 are needed.")

    fkey = None
    if not as_sd:
        fkey, _ = resolve_features(sdata, table, features_key=features_key, backbone=backbone, device=device,
                                   table_key=table_key)
    work = _working_table(table, fkey)
    retrieval = method in ("spade", "mclstexp")  # the methods that retrieve from a reference
    rows, per_gene, panels = [], [], {}
    for fold, test in _progress(folds, total=len(folds), desc=f"cross-validating {method}", enabled=progress):
        rest = [s for s in sections if s not in test]
        train, val = list(rest), []
        if validation == "auto" and len(rest) >= 3:
            train, val = rest[:-1], rest[-1:]
        fold_train = _fold_object(sdata, work, rest, table_key, as_sd)
        common = dict(features_key=fkey, backbone=backbone, panel=panel, n_top=n_top, train_sections=train,
                      validation_sections=val or None, seed=seed, device=device)
        if method == "spade":
            model = train_experts(fold_train, **common, **train_kwargs)
        elif method == "mclstexp":
            model = train_contrastive(fold_train, **common, **train_kwargs)
        else:
            model = train_baseline(fold_train, method=method, **common, **train_kwargs)
        panels[str(fold)] = list(model.panel)
        query = _fold_object(sdata, work, test, table_key, as_sd)
        k_used = int(k)
        if retrieval:
            n_ref = get_table(fold_train, K.TABLES.DEFAULT).n_obs
            if k > n_ref:
                warnings.warn(f"Fold {fold!r}: `k={k}` exceeds its {n_ref} reference spots; using k={n_ref}.",
                              UserWarning, stacklevel=2)
                k_used = n_ref
        pred = predict_expression(query, model, reference=fold_train if retrieval else None, k=k_used,
                                  weighting=weighting, features_key=fkey, reference_features_key=fkey,
                                  device=device)
        res, pg = evaluate_expression(pred, by=K.OBS.SECTION, return_per_gene=True)
        for r in res.to_dict("records"):
            rows.append({"method": method, "split": split, "fold": str(fold), **r, "k": k_used if retrieval else None,
                         "train_sections": ",".join(train), "validation_sections": ",".join(val)})
        pg.insert(0, "fold", str(fold))
        pg.insert(0, "method", method)
        per_gene.append(pg)
    df = pd.DataFrame(rows)
    front = ["method", "split", "fold", K.OBS.SECTION, "n_spots", "n_genes", "ACG", "HEG", "MSE", "MAE",
             "n_skipped_constant"]
    df = df[front + [c for c in df.columns if c not in front]]
    df.attrs["panels"] = panels
    if return_per_gene:
        return df, pd.concat(per_gene, ignore_index=True)
    return df
