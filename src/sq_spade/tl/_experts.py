"""SPADE in the ``tl`` API: ``train_experts``, ``train_experts_from_store``, ``embed`` and its predictor."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from sq_spade import _constants as K
from sq_spade._docs import inject_docs
from sq_spade._logging import info as log_info
from sq_spade._metrics import expression_metrics
from sq_spade._serialize import storable, to_jsonable
from sq_spade._settings import settings
from sq_spade._utils import copy_data, progress
from sq_spade._validation import (
    check_choice,
    check_positive,
    feature_recipe,
    get_table,
    section_labels,
)
from sq_spade.models._clustering import fine_centroids, pool_centroids, two_stage_clustering
from sq_spade.models._spade import Spade
from sq_spade.pp._genes import check_panel_measured, panel_expression
from sq_spade.pp._store import FeatureStore
from sq_spade.tl._common import (
    check_same_provenance,
    comparable_provenance,
    features_provenance,
    held_out_sections,
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

    from sq_spade.train import FitOptions


#: The ``n_experts="auto"`` rule: one expert per this many training spots (1 to 16 experts). A
#: head maps 1,280 features to 256 dimensions (about 400k parameters); measured on her2st and
#: MOB leave-one-section-out (docs/methods.md), fewer, larger experts predict better.
SPOTS_PER_EXPERT = 2000
#: The reference side of ``reference_side="auto"`` without validation sections: on her2st
#: leave-one-section-out (B4, C2, C3; one expert, k=200) the image side gave ACG 0.206, 0.157,
#: 0.164 against 0.135, 0.142, 0.161 for the gene side.
NO_VALIDATION_SIDE = "images"
#: The published number of experts, the most ``"auto"`` chooses.
MAX_AUTO_EXPERTS = 16


def choose_n_experts(n_experts: int | str, n_train: int) -> tuple[int, dict[str, Any]]:
    """The number of experts to cluster into and what was chosen how (``config["selection"]``).

    Examples
    --------
    >>> choose_n_experts("auto", 4500)
    (2, {'n_experts': 2, 'n_experts_rule': 'auto: 1 per 2000 training spots, 1 to 16', 'n_train_spots': 4500})
    """
    if n_experts == "auto":
        n = int(min(MAX_AUTO_EXPERTS, max(1, n_train // SPOTS_PER_EXPERT)))
        rule = f"auto: 1 per {SPOTS_PER_EXPERT} training spots, 1 to {MAX_AUTO_EXPERTS}"
    else:
        if isinstance(n_experts, str):
            raise ValueError(f"`n_experts` must be a positive integer or 'auto', got {n_experts!r}.")
        n = int(check_positive(n_experts, "n_experts", integer=True))
        rule = "given"
    return n, {"n_experts": n, "n_experts_rule": rule, "n_train_spots": int(n_train)}


def _warn_small_experts(expert: np.ndarray, n_experts: int) -> None:
    counts = np.bincount(np.asarray(expert), minlength=n_experts)
    small = np.flatnonzero(counts < SPOTS_PER_EXPERT)
    if n_experts > 1 and len(small):
        warnings.warn(f"experts {small.tolist()} train on fewer than {SPOTS_PER_EXPERT} spots each "
                      f"({counts[small].tolist()}): small experts fit their heads poorly; n_experts='auto' sizes "
                      f"the mixture to the data.", UserWarning, stacklevel=3)


def _fit_options(**options: Any) -> FitOptions:
    """SPADE's training options, checked (before any feature is computed)."""
    from sq_spade.train import FitOptions

    return FitOptions.experts(**options)


@inject_docs
def train_experts(
    sdata: SpatialData | AnnData,
    *,
    features_key: str | None = None,
    backbone: str = "efficientnet_lite0",
    panel: str | Sequence[str] | None = None,
    n_top: int = 50,
    group_key: str | None = None,
    n_fine: int = 16,
    n_experts: int | Literal["auto"] = "auto",
    recipe: K.Recipe = "small_data",
    epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    loss: K.Loss = "bleep",
    temperature: float | None = None,
    n_seeds: int | None = None,
    refit: bool | None = None,
    gene_input: K.GeneInput = "log1p_cp10k",
    dropout: float = 0.1,
    routing_temperature: float = 0.1,
    train_sections: Sequence[str] | str | None = None,
    validation_sections: Sequence[str] | str | None = None,
    patience: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    table_key: str = K.TABLES.DEFAULT,
    key_added: str = K.OBSM.SPADE,
    reference_side: K.ReferenceSideChoice = "auto",
    alignment: K.Alignment = "shared_genes",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool | str | os.PathLike = False,
) -> Spade:
    """Train SPADE's mixture of data experts on frozen image features and expression.

    Steps: frozen backbone features (computed with :func:`sq_spade.pp.compute_features` when
    ``obsm`` lacks them); the gene panel from the training sections; two-stage k-means of the
    training spots' features (per ``group_key`` group, ``n_fine`` centroids; then ``n_experts``
    clusters over all fine centroids; each spot's expert is its fine centroid's); one image head
    (D -> 256) and one gene head (panel -> 256) per expert, trained on its spots only with the
    BLEEP soft-target loss, AdamW and a cosine schedule.

    Training recipe (``recipe``). ``"small_data"`` (default) is fitted to a few hundred to a
    few thousand training spots (her2st and MOB leave-one-section-out, docs/methods.md):

    - the loss temperature is 32 (at 1 the heads memorise the few training pairs: 100 epochs
      at temperature 1 gave her2st ACG 0.180, 15 epochs at 32 gave 0.186);
    - ``n_seeds`` = 5 sets of heads are trained on the same experts (one clustering, with
      ``seed``; seed ``i`` initialises and batches with ``seed + i``) and saved together
      (:attr:`~sq_spade.models.Spade.members`); predictions average the members' retrievals
      (her2st 0.1925 with 5 seeds);
    - the epoch count is chosen by validation ACG: after each epoch the held-out spots are
      predicted by the mixture's expert-consistent retrieval from the training spots (image
      side, ``k = min(200, n_train)``), and all experts keep the epoch of the best ACG (up to
      ``epochs`` = 40, with ``patience``). With ``refit`` (default when no
      ``validation_sections`` are given and there are at least 2 training sections) the
      held-out section rotates over the seeds as for mclSTExp: seed ``i`` of ``n`` training
      sections holds out ``train[-(1 + i % n)]``, clusters its own training spots and trains
      on them; every seed is then retrained on all training sections (on the one clustering)
      for the median of the seeds' best epochs. Given ``validation_sections`` validate every
      seed, without refit. With neither (one training section) the heads train 15 epochs.
      ``config["selection"]`` records the held-out sections, the best epochs, the validation
      ACG per epoch and the refit epoch count.

    ``"published"`` is SPADE's own setting and the behaviour of sq_spade before the recipe:
    temperature 1, 100 epochs, one seed, each expert keeping its best-validation-loss epoch when
    there are ``validation_sections``, no refit. Every argument given explicitly (``epochs``,
    ``temperature``, ``n_seeds``, ``refit``) overrides the recipe.

    Parameters
    ----------
    sdata
        SpatialData (features can be computed) or AnnData with the features in ``obsm``.
    %(features_key)s
    backbone
        Backbone of the features.
    panel
        Gene list, a boolean ``var`` column, ``"spade"`` / ``"heg"`` (chosen on the training
        sections with ``n_top``), or ``None``: the table's panel if it was chosen on training
        sections only, else ``"spade"``.
    n_top
        Genes per section for ``"spade"`` panels (50, as in SPADE).
    group_key
        ``obs`` column grouping spots for the first clustering stage (organ, tissue); ``None``:
        one group.
    %(spade_training)s
    n_seeds
        Sets of heads trained on the same experts and averaged at prediction (``None``: 5 in
        ``"small_data"``, 1 in ``"published"``).
    refit
        Choose the epoch count on held-out training sections (rotated over the seeds), then
        retrain every seed on all training sections (``None``: in ``"small_data"``, when no
        ``validation_sections`` are given and there are at least 2 training sections).
    gene_input
        ``"log1p_cp10k"`` (library size over the panel, 1e4, log1p) or ``"raw"`` counts (the
        original code's choice).
    train_sections, validation_sections
        Sections to train on (default: all but validation) and to validate on.
    %(seed)s
    %(device)s
    %(table_key)s
    %(key_added)s
    reference_side
        What :func:`sq_spade.tl.predict_expression` retrieves against on the reference side:
        the reference spots' gene-head embeddings (``"genes"``), their image embeddings
        (``"images"``), both (``"both"``), or ``"auto"``: the best by validation ACG, and
        ``"images"`` without validation sections (measured better than the gene side on her2st
        leave-one-section-out: docs/methods.md).
    alignment
        How the experts share one embedding space (so that the routed embedding, probes on it
        and retrieval across experts mean something): ``"shared_genes"`` (default) trains one
        gene head shared by all experts and one image head per expert against it;
        ``"procrustes"`` trains independent experts (as published) and then rotates each onto a
        common anchor (generalised orthogonal Procrustes on the training spots' image
        embeddings); ``"none"``: the published independent experts, each in its own space.
        Prediction retrieves within each expert's space whichever is chosen.
    %(checkpoints)s

    Returns
    -------
    The trained :class:`sq_spade.models.Spade`, an ensemble of ``n_seeds`` members. The table
    gains ``obsm[key_added]`` (256-d, member 0's embedding), ``obs['spade_expert']`` and
    ``uns['spade']`` (parameters, backbone and weights hash, clustering provenance, member 0's
    loss history, ``selection``).

    Examples
    --------
    >>> sd = sqs.io.combine_sections([sqs.datasets.her2st(s) for s in ("C2", "C3", "C4")])  # doctest: +SKIP
    >>> model = sqs.tl.train_experts(sd)  # small-data recipe: 5 seeds at temperature 32  # doctest: +SKIP
    >>> model.n_members  # doctest: +SKIP
    5
    >>> published = sqs.tl.train_experts(sd, recipe="published", validation_sections=["C4"])  # doctest: +SKIP
    """
    seed = settings.resolve_seed(seed)
    import torch

    table = get_table(sdata, table_key)
    rc = _recipe(recipe, epochs=epochs, temperature=temperature, n_seeds=n_seeds, refit=refit)
    opts = _fit_options(epochs=rc["epochs"], batch_size=batch_size, lr=lr, weight_decay=weight_decay, loss=loss,
                        temperature=rc["temperature"], patience=patience, seed=seed,
                        device=device or settings.device, checkpoint_dir=checkpoint_dir,
                        checkpoint_every=checkpoint_every, resume=resume)
    check_choice(gene_input, "gene_input", K.GENE_INPUTS)
    check_choice(reference_side, "reference_side", K.REFERENCE_SIDE_CHOICES)
    check_choice(alignment, "alignment", K.ALIGNMENTS)
    check_positive(n_fine, "n_fine", integer=True)
    choose_n_experts(n_experts, 0)  # checks the argument before any feature is computed
    check_positive(routing_temperature, "routing_temperature")
    train, val = split_sections(table, train_sections, validation_sections)
    do_refit = rc["refit"] if rc["refit"] is not None else (recipe == "small_data" and not val and len(train) >= 2)
    if do_refit and val:
        raise ValueError("`refit=True` chooses the epoch count on held-out training sections: leave "
                         "`validation_sections` empty.")
    if do_refit and len(train) < 2:
        raise ValueError(f"`refit=True` needs at least 2 training sections, got {train}.")
    if (rc["n_seeds"] > 1 or do_refit or (val and rc["select"] == "acg")) and (
            checkpoint_dir is not None or resume is not False):
        raise ValueError(f"`checkpoint_dir` and `resume` checkpoint one training run selected by validation loss: "
                         f"pass recipe='published' (or n_seeds=1, refit=False and no validation_sections); got "
                         f"n_seeds={rc['n_seeds']}, refit={do_refit}, select={rc['select']!r}.")
    genes_list = resolve_panel(table, panel, n_top, train)  # cheap checks before any feature is computed
    expr, _ = panel_expression(table, genes_list, gene_input=gene_input)
    values = expr if gene_input == "log1p_cp10k" else panel_expression(table, genes_list, gene_input="log1p_cp10k")[0]
    fkey, feats = resolve_features(sdata, table, features_key=features_key, backbone=backbone,
                                   device=device, table_key=table_key)
    prov = features_provenance(table, fkey)
    tr, va = rows_of(table, train), rows_of(table, val)
    if tr.sum() < 2:
        raise ValueError(f"Training sections {train} have {int(tr.sum())} spots; at least 2 are needed.")
    if group_key is not None and group_key not in table.obs:
        raise KeyError(f"`group_key={group_key!r}` is not a column of `obs`; available: {list(table.obs.columns)}.")

    def cluster(rows: np.ndarray) -> Any:
        groups = None if group_key is None else table.obs[group_key].astype(str).to_numpy()[rows]
        n_exp, _ = choose_n_experts(n_experts, int(rows.sum()))
        return two_stage_clustering(feats[rows], groups, n_fine=n_fine, n_experts=n_exp, seed=seed)

    _, selection = choose_n_experts(n_experts, int(tr.sum()))
    clus = cluster(tr)
    _warn_small_experts(clus.expert, clus.n_experts)
    centroids = torch.as_tensor(clus.centroids)
    f2e = torch.as_tensor(clus.fine_to_expert)
    val_expert = None
    if va.any():
        d = torch.cdist(torch.as_tensor(feats[va]), centroids)
        val_expert = clus.fine_to_expert[d.argmin(1).numpy()]
    fits, selection = _fit_recipe(
        feats, expr, values, tr, va, clus, val_expert, rc=rc, opts=opts, table=table, train=train, val=val,
        refit=do_refit, cluster=cluster, routing_temperature=routing_temperature, selection=selection,
        fit_kw=dict(dropout=dropout, shared_gene_head=alignment == "shared_genes"))
    members = [(img, gene, _procrustes(img, feats[tr], seed) if alignment == "procrustes" else None)
               for img, gene, _ in fits]
    (img_heads, gene_heads, rotation), history = members[0], fits[0][2]
    model = _assemble(img_heads, gene_heads, centroids, f2e, history, backbone=prov.get("backbone", backbone),
                      weights_sha256=prov.get("weights_sha256"), feature_recipe=recipe_of(table, fkey),
                      panel=genes_list, gene_input=gene_input,
                      n_fine=n_fine, dropout=dropout, routing_temperature=routing_temperature,
                      reference_side=NO_VALIDATION_SIDE if reference_side == "auto" else reference_side,
                      centroid_groups=clus.centroid_group, train=train, val=val, alignment=alignment,
                      rotation=rotation, members=members[1:],
                      params={"recipe": recipe, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                              "weight_decay": weight_decay, "loss": loss, "temperature": rc["temperature"],
                              "n_seeds": rc["n_seeds"], "refit": do_refit, "select": rc["select"], "seed": seed,
                              "n_experts_requested": n_experts, "group_key": group_key, "features_key": fkey,
                              "patience": patience, K.FEATURE_PROVENANCE_PARAM: comparable_provenance(prov or None)})
    if reference_side == "auto" and va.any():
        model.config["reference_side"], scores = _choose_reference_side(model, feats[tr], expr[tr], values[tr],
                                                                        feats[va], values[va])
        selection.update(scores)
    model.config["selection"] = to_jsonable(selection, nonfinite="null")
    # write results only once everything has succeeded
    emb = model.embed_images(feats)
    table.obsm[key_added] = emb
    table.obs[K.OBS.SPADE_EXPERT] = pd.Categorical(model.assign(feats).astype(str))
    table.uns[K.UNS.SPADE] = storable({k: v for k, v in model.config.items() if k not in ("panel",)} | {
        "n_panel_genes": len(genes_list), "embedding_key": key_added})
    log_info("trained SPADE (%d experts, %d panel genes) on %d spots of %s: obsm[%r], obs[%r] and uns[%r] of "
             "table %r", model.n_experts, len(genes_list), int(tr.sum()), list(train), key_added,
             K.OBS.SPADE_EXPERT, K.UNS.SPADE, table_key)
    return model


def _assemble(img_heads: Any, gene_heads: Any, centroids: Any, f2e: Any, history: dict, *, backbone: str,
              weights_sha256: str | None, panel: Sequence[str], gene_input: str, n_fine: int, dropout: float,
              routing_temperature: float, reference_side: str, centroid_groups: Any, train: list[str],
              val: list[str], params: dict, alignment: str = "none", rotation: Any = None,
              feature_recipe: dict[str, Any] | None = None, members: Sequence[tuple[Any, Any, Any]] = ()) -> Spade:
    """The Spade model (module and config) from trained heads and the clustering.

    ``members``: ``(image_heads, gene_heads, rotation)`` of the ensemble's other seeds.
    """
    from sq_spade.nn.experts import MixtureOfExperts

    def mixture(img: Any, gene: Any, rot: Any) -> Any:
        return MixtureOfExperts(img.cpu(), gene.cpu(), centroids, f2e, temperature=routing_temperature,
                                rotation=rot).eval()

    module = mixture(img_heads, gene_heads, rotation)
    extra = [mixture(*m) for m in members]
    config = {
        "backbone": backbone, "weights_sha256": weights_sha256, "feature_dim": int(centroids.shape[1]),
        "panel": list(panel), "gene_input": gene_input, "n_experts": int(img_heads.n_experts),
        "n_fine": int(n_fine), "out_dim": int(img_heads.out_dim), "dropout": float(dropout),
        "routing_temperature": float(routing_temperature), "reference_side": reference_side,
        "centroid_groups": [str(g) for g in centroid_groups], "train_sections": list(train),
        "validation_sections": list(val), "history": to_jsonable(dict(history), nonfinite="null"),
        "params": {**params, "feature_recipe": feature_recipe}, "alignment": alignment,
        "n_members": 1 + len(extra),
    }
    return Spade(module, config, members=extra)


# --- the training recipe -------------------------------------------------------------------------------------
#: The recipes' defaults: epochs (the most, with selection), epochs without any way to select,
#: loss temperature, seeds, what selects the epoch. ``"small_data"`` measured on her2st and MOB
#: leave-one-section-out (docs/methods.md); ``"published"``: SPADE's own.
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "small_data": {"epochs": 40, "fixed_epochs": 15, "temperature": 32.0, "n_seeds": 5, "select": "acg"},
    "published": {"epochs": 100, "fixed_epochs": 100, "temperature": 1.0, "n_seeds": 1, "select": "loss"},
}
#: Neighbours of the validation ACG that selects the epoch (at most the training spots).
SELECT_K = 200


def _recipe(recipe: str, *, epochs: int | None, temperature: float | None, n_seeds: int | None,
            refit: bool | None = None) -> dict[str, Any]:
    """The recipe's defaults with the arguments given explicitly, checked."""
    check_choice(recipe, "recipe", K.RECIPES)
    d = RECIPE_DEFAULTS[recipe]
    out = {
        "epochs": d["epochs"] if epochs is None else epochs,
        "fixed_epochs": d["fixed_epochs"] if epochs is None else epochs,
        "temperature": d["temperature"] if temperature is None else temperature,
        "n_seeds": d["n_seeds"] if n_seeds is None else n_seeds,
        "refit": refit,
        "select": d["select"],
    }
    check_positive(out["n_seeds"], "n_seeds", integer=True)
    if refit is not None and not isinstance(refit, bool):
        raise TypeError(f"`refit` must be None, True or False, got {refit!r}.")
    return out


def acg_score(f_ref: np.ndarray, v_ref: np.ndarray, f_val: np.ndarray, v_val: np.ndarray, centroids: np.ndarray,
              fine_to_expert: np.ndarray, *, routing_temperature: float = 0.1, k: int = SELECT_K) -> Any:
    """An ``epoch_score`` for :func:`sq_spade.train.fit_experts`: validation ACG of the mixture's retrieval.

    The validation spots ``f_val`` are routed (soft, ``routing_temperature``) over the experts
    of the clustering (``centroids``, ``fine_to_expert``) and predicted by expert-consistent
    retrieval from the reference spots ``f_ref`` (values ``v_ref``), image side (each expert's
    image head embeds queries and keys; a rotation would change no similarity), with
    ``k = min(k, n_ref)``: what :func:`spade_retrieve` does at prediction. The score is the
    ACG of the predictions against ``v_val``.

    Examples
    --------
    >>> score = acg_score(f_tr, v_tr, f_va, v_va, clus.centroids, clus.fine_to_expert)  # doctest: +SKIP
    >>> fit_experts(f_tr, g_tr, clus.expert, n_experts=clus.n_experts, epoch_score=score)  # doctest: +SKIP
    """
    import torch

    from sq_spade.nn.experts import route
    from sq_spade.nn.retrieval import mixture_retrieve_predict

    c = torch.as_tensor(np.asarray(centroids, dtype=np.float32))
    f2e = torch.as_tensor(np.asarray(fine_to_expert)).long()
    n_exp = int(f2e.max()) + 1
    fr, fv = (np.ascontiguousarray(f, dtype=np.float32) for f in (f_ref, f_val))
    with torch.no_grad():
        weights = route(torch.as_tensor(fv), c, f2e, n_exp, routing_temperature).numpy()
        key_expert = f2e[torch.cdist(torch.as_tensor(fr), c).argmin(1)].numpy()
    kk = min(int(k), len(fr))

    def score(img_heads: Any, gene_heads: Any) -> float:
        dev = next(img_heads.parameters()).device

        def embed(x: np.ndarray) -> Any:
            return lambda e, rows: img_heads.forward_one(torch.as_tensor(x[rows]).to(dev), e).cpu().numpy()

        with torch.no_grad():
            pred, _ = mixture_retrieve_predict(embed(fv), weights, key_expert, embed(fr), v_ref, k=kk)
        return float(expression_metrics(pred, v_val)[0]["ACG"])

    return score


def _fit_recipe(feats: np.ndarray, expr: np.ndarray, values: np.ndarray, tr: np.ndarray, va: np.ndarray, clus: Any,
                val_expert: np.ndarray | None, *, rc: dict[str, Any], opts: Any, table: Any, train: list[str],
                val: list[str], refit: bool, cluster: Any, routing_temperature: float, fit_kw: dict[str, Any],
                selection: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Train the recipe's seeds; with ``refit``, choose the epoch count on rotated held-out sections first.

    Returns ``[(image_heads, gene_heads, history), ...]``, one per seed (all on the experts of
    ``clus``, the clustering of the training rows ``tr``), and ``selection`` updated with what
    was chosen how. ``cluster(rows)`` clusters other training rows (a selection run's).
    """
    from sq_spade.train import fit_experts

    seeds = [opts.seed + i for i in range(rc["n_seeds"])]
    selection = {**selection, "seeds": seeds}

    def fit(rows: np.ndarray, c: Any, seed: int, epochs: int, rows_va: np.ndarray | None = None,
            val_kw: dict[str, Any] | None = None) -> Any:
        score = None if rows_va is None else acg_score(
            feats[rows], values[rows], feats[rows_va], values[rows_va], c.centroids, c.fine_to_expert,
            routing_temperature=routing_temperature)
        return fit_experts(feats[rows], expr[rows], c.expert, n_experts=c.n_experts, epoch_score=score,
                           options=opts.replace(seed=seed, epochs=epochs), **fit_kw, **(val_kw or {}))

    def record(runs: list[Any]) -> None:
        selection.update({"select": "acg", "best_epochs": [int(f[2]["best_epoch"][0]) + 1 for f in runs],
                          "best_val_acg": [float(f[2]["best_val_score"]) for f in runs],
                          "val_acg": [[float(v) for v in f[2]["val_score"]] for f in runs]})

    if va.any() and rc["select"] == "loss":  # each expert of each seed keeps its best validation-loss epoch
        fits = [fit_experts(feats[tr], expr[tr], clus.expert, n_experts=clus.n_experts, val_features=feats[va],
                            val_genes=expr[va], val_expert=val_expert, options=opts.replace(seed=s), **fit_kw)
                for s in seeds]
        selection.update({"validation_sections": list(val), "select": "loss",
                          "best_epochs": [[int(b) + 1 for b in f[2]["best_epoch"]] for f in fits]})
    elif va.any():  # every seed selects its epoch by validation ACG on the given sections
        # (the validation loss is recorded too, in the history)
        val_kw = dict(val_features=feats[va], val_genes=expr[va], val_expert=val_expert)
        fits = [fit(tr, clus, s, rc["epochs"], va, val_kw) for s in seeds]
        selection["validation_sections"] = list(val)
        record(fits)
    elif refit:  # rotated held-out sections choose the epoch count, then every seed trains on all
        held = held_out_sections(train, len(seeds))
        clusterings: dict[str, Any] = {}
        runs = []
        for h, s in zip(held, seeds, strict=True):
            rows = tr & ~rows_of(table, [h])
            if h not in clusterings:
                clusterings[h] = cluster(rows)
            runs.append(fit(rows, clusterings[h], s, rc["epochs"], rows_of(table, [h])))
        record(runs)
        n_ep = max(1, int(np.round(np.median(selection["best_epochs"]))))
        selection.update({"held_out_sections": list(held), "validation_sections": list(dict.fromkeys(held)),
                          "refit_epochs": n_ep})
        fits = [fit(tr, clus, s, n_ep) for s in seeds]
    else:
        n_ep = rc["fixed_epochs"]
        fits = [fit(tr, clus, s, n_ep) for s in seeds]
        selection["fixed_epochs"] = n_ep
    return fits, selection


@inject_docs
def train_experts_from_store(
    store: Any,
    *,
    train_sections: Sequence[str] | None = None,
    validation_sections: Sequence[str] | str | None = None,
    n_fine: int = 16,
    n_experts: int | Literal["auto"] = "auto",
    recipe: K.Recipe = "small_data",
    epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    loss: K.Loss = "bleep",
    temperature: float | None = None,
    n_seeds: int = 1,
    dropout: float = 0.1,
    routing_temperature: float = 0.1,
    alignment: K.Alignment = "shared_genes",
    patience: int | None = None,
    memory_budget_bytes: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool | str | os.PathLike = False,
) -> Spade:
    """Train SPADE from a per-section feature store on disk, never holding every section in memory.

    For HEST-1k-sized training (hundreds of slides, about a million spots): the features and
    panel expression come from a :class:`sq_spade.pp.FeatureStore` written by
    :func:`sq_spade.pp.write_feature_store`. Stage one of the clustering runs per section (one
    section in memory at a time, ``n_fine`` centroids each: sections are the groups), stage
    two pools all fine centroids into ``n_experts``; the experts then train from windows of whole
    sections under ``memory_budget_bytes`` (see :class:`sq_spade.train.TrainingWindows`: each
    epoch visits the windows in a shuffled order, batches mix spots of one window). Validation
    sections are loaded whole (keep them few). Otherwise as :func:`train_experts`; the reference
    side is ``"genes"``.

    The recipe sets the loss temperature and the epochs as in :func:`train_experts` (32 and 15
    epochs without validation, 40 with, in ``"small_data"``), but one seed by default: each
    further seed reads the whole store again, so ``n_seeds`` is left to the caller at this scale.

    Parameters
    ----------
    store
        A :class:`sq_spade.pp.FeatureStore` or the path of one.
    train_sections, validation_sections
        Sections of the store to train on (default: all but validation) and to validate on.
    %(spade_training)s
    n_seeds
        Sets of heads trained on the same experts (seeds ``seed``, ``seed + 1``...) and averaged
        at prediction (default 1).
    alignment
        How the experts share one space (see :func:`train_experts`; default ``"shared_genes"``).
    memory_budget_bytes
        Most bytes of training windows in memory (default ``settings.memory_budget_bytes``).
    %(seed)s
    %(device)s
    %(checkpoints)s

    Returns
    -------
    The trained :class:`sq_spade.models.Spade` (the panel is the store's genes).

    Examples
    --------
    >>> sqs.pp.write_feature_store(sdata, "features.zarr", panel=panel)  # doctest: +SKIP
    >>> model = sqs.tl.train_experts_from_store("features.zarr", validation_sections=["C4"])  # doctest: +SKIP
    """
    seed = settings.resolve_seed(seed)
    import torch

    from sq_spade.train import TrainingWindows, fit_experts

    fs = store if isinstance(store, FeatureStore) else FeatureStore(store)
    rc = _recipe(recipe, epochs=epochs, temperature=temperature, n_seeds=n_seeds)
    opts = _fit_options(epochs=rc["epochs"], batch_size=batch_size, lr=lr, weight_decay=weight_decay, loss=loss,
                        temperature=rc["temperature"], patience=patience, seed=seed,
                        device=device or settings.device, checkpoint_dir=checkpoint_dir,
                        checkpoint_every=checkpoint_every, resume=resume)
    if rc["n_seeds"] > 1 and (checkpoint_dir is not None or resume is not False):
        raise ValueError(f"`checkpoint_dir` and `resume` checkpoint one training run: pass `n_seeds=1`; got "
                         f"n_seeds={rc['n_seeds']}.")
    check_positive(n_fine, "n_fine", integer=True)
    choose_n_experts(n_experts, 0)
    check_positive(routing_temperature, "routing_temperature")
    check_choice(alignment, "alignment", K.ALIGNMENTS)
    val = [validation_sections] if isinstance(validation_sections, str) else list(validation_sections or [])
    train = list(train_sections) if train_sections is not None else [s for s in fs.sections if s not in val]
    for arg, names in (("train_sections", train), ("validation_sections", val)):
        missing = [s for s in names if s not in fs]
        if missing:
            raise ValueError(f"`{arg}` names sections not in the store: {missing[:5]}; it has {fs.sections[:10]}...")
    if not train:
        raise ValueError("`train_sections`: no section left to train on.")
    if set(train) & set(val):
        raise ValueError(f"Sections {sorted(set(train) & set(val))} are both training and validation sections.")

    cents, groups, labels = [], [], {}
    for s in progress(train, total=len(train), desc="clustering sections"):
        c, lab = fine_centroids(fs[s].load().features, n_fine, seed=seed)
        labels[s] = lab + sum(len(x) for x in cents)
        cents.append(c)
        groups.extend([s] * len(c))
    centroids = np.vstack(cents)
    n_exp, selection = choose_n_experts(n_experts, sum(fs.n_spots(train).values()))
    f2e, n_eff = pool_centroids(centroids, n_exp, seed=seed)
    experts = {s: f2e[lab] for s, lab in labels.items()}
    _warn_small_experts(np.concatenate(list(experts.values())), n_eff)
    windows = TrainingWindows(**fs.training_windows(experts, n_experts=n_eff, memory_budget_bytes=memory_budget_bytes,
                                                    sections=train))
    val_kw: dict[str, Any] = {}
    if val:
        parts = [fs[s].load() for s in val]
        vf = np.concatenate([w.features for w in parts])
        d = torch.cdist(torch.as_tensor(vf), torch.as_tensor(centroids))
        val_kw = {"val_features": vf, "val_genes": np.concatenate([w.expression for w in parts]),
                  "val_expert": f2e[d.argmin(1).numpy()]}
    n_ep = rc["epochs"] if val else rc["fixed_epochs"]
    fits = [fit_experts(windows, None, None, n_experts=n_eff, dropout=dropout,
                        options=opts.replace(seed=seed + i, epochs=n_ep),
                        shared_gene_head=alignment == "shared_genes", **val_kw) for i in range(rc["n_seeds"])]
    sample = None
    if alignment == "procrustes":  # anchored on (up to 4,000) spots of the first training sections
        sample, n = [], 0
        for s in train:
            sample.append(fs[s].load(0, 4000 - n).features)
            n += len(sample[-1])
            if n >= 4000:
                break
        sample = np.concatenate(sample)
    members = [(img, gene, None if sample is None else _procrustes(img, sample, seed)) for img, gene, _ in fits]
    (img_heads, gene_heads, rotation), history = members[0], fits[0][2]
    model = _assemble(img_heads, gene_heads, torch.as_tensor(centroids), torch.as_tensor(f2e), history,
                     backbone=fs.backbone, weights_sha256=fs.weights_sha256, panel=fs.genes,
                     feature_recipe=_store_recipe(fs, train),
                     gene_input=fs.attrs.get("gene_input", "log1p_cp10k"), n_fine=n_fine, dropout=dropout,
                     routing_temperature=routing_temperature, reference_side="genes",
                     centroid_groups=np.asarray(groups, dtype=object), train=train, val=val, alignment=alignment,
                     rotation=rotation, members=members[1:],
                     params={"recipe": recipe, "epochs": n_ep, "batch_size": batch_size, "lr": lr,
                             "weight_decay": weight_decay, "loss": loss, "temperature": rc["temperature"],
                             "n_seeds": rc["n_seeds"], "seed": seed,
                             "n_experts_requested": n_experts, "group_key": K.OBS.SECTION, "features_key": None,
                             "patience": patience, "store": str(fs.path)})
    model.config["selection"] = selection
    return model


def _store_recipe(fs: Any, sections: Sequence[str]) -> dict[str, Any] | None:
    """The feature recipe recorded with a store's sections (``None`` when it did not record features)."""
    prov = fs[sections[0]].provenance.get("features") if sections else None
    return feature_recipe(prov) if prov else None


def _procrustes(img_heads: Any, features: np.ndarray, seed: int, n_max: int = 4000) -> Any:
    """Rotations of each expert onto a common anchor, from every expert's embedding of (up to ``n_max``) training spots."""
    import torch

    from sq_spade.nn.experts import procrustes_rotations

    rows = np.sort(np.random.default_rng(seed).permutation(len(features))[:n_max])
    x = torch.as_tensor(np.ascontiguousarray(features[rows], dtype=np.float32))
    with torch.inference_mode():
        z = torch.stack([img_heads.forward_one(x, e) for e in range(img_heads.n_experts)])
    return procrustes_rotations(z)


def _choose_reference_side(model: Spade, f_ref: np.ndarray, g_ref: np.ndarray, v_ref: np.ndarray,
                           f_val: np.ndarray, v_val: np.ndarray, k: int = 50) -> tuple[str, dict[str, float]]:
    """Pick gene-head or image-head reference embeddings by expert-consistent retrieval ACG on validation spots."""
    scores = {}
    for side in K.REFERENCE_SIDES:
        pred, _ = spade_retrieve(model, f_val, f_ref, v_ref, reference_genes=g_ref, side=side, k=min(k, len(v_ref)))
        scores[side] = float(expression_metrics(pred, v_val)[0]["ACG"])
    best = max(scores, key=lambda s: (np.nan_to_num(scores[s], nan=-np.inf), s == "genes"))
    return best, {f"validation_acg_{s}": v for s, v in scores.items()}


@inject_docs
def embed(
    sdata: SpatialData | AnnData,
    model: Spade,
    *,
    routing: K.Routing = "soft",
    temperature: float | None = None,
    space: K.Space = "aligned",
    features_key: str | None = None,
    key_added: str = K.OBSM.SPADE,
    weights_key: str | None = None,
    table_key: str = K.TABLES.DEFAULT,
    device: str | None = None,
    copy: bool = False,
) -> SpatialData | AnnData | None:
    """Embed any slide into the SPADE space: ``obsm[key_added]`` (and the routing).

    Distances of each spot's frozen features to every fine centroid, ``softmax(-d / T)``, weights
    summed per expert, and the weighted sum of the experts' image heads (``routing="hard"``: the
    nearest fine centroid's expert only). Features are computed with the model's backbone when
    ``obsm`` lacks them; features of another backbone are refused. An ensemble
    (``model.n_members > 1``) embeds with member 0: each member lives in its own space, so
    their embeddings are not averaged (:meth:`~sq_spade.models.Spade.embed_images` takes
    ``member=`` for the others).

    Parameters
    ----------
    sdata
        SpatialData or AnnData.
    model
        A trained :class:`sq_spade.models.Spade`.
    routing
        ``"soft"`` or ``"hard"``.
    temperature
        Soft-routing temperature (default: the model's, 0.1).
    space
        ``"aligned"`` (default): the routed sum in the experts' common space (model trained with
        ``alignment="shared_genes"`` or ``"procrustes"``); ``"published"``: the routed sum of the
        experts' unaligned image heads, as the published code computes it. For a model trained
        with ``alignment="none"`` (or imported with :meth:`~sq_spade.models.Spade.from_original`)
        there is no common space and both give the published sum.
    %(features_key)s
    %(key_added)s
    weights_key
        Also write the routing weights ``(n, n_experts)`` to ``obsm[weights_key]``.
    %(table_key)s
    %(device)s
    copy
        Embed into a copy of ``sdata`` (tables copied, images shared) and return the copy.

    Returns
    -------
    The copy when ``copy=True``, else ``None``.

    Examples
    --------
    >>> sqs.tl.embed(sdata_new, model)  # doctest: +SKIP
    >>> sdata_new.tables["table"].obsm["X_spade"].shape  # doctest: +SKIP
    (184, 256)
    """
    if not isinstance(model, Spade):
        raise TypeError(f"`model` must be a sq_spade.models.Spade, got {type(model).__name__}.")
    check_choice(routing, "routing", K.ROUTINGS)
    check_choice(space, "space", K.SPACES)
    if copy:
        sdata = copy_data(sdata)
    table = get_table(sdata, table_key)
    _, feats = resolve_features(sdata, table, features_key=features_key, backbone=model.backbone,
                                weights_sha256=model.weights_sha256, device=device, table_key=table_key,
                                recipe=model.feature_recipe, expected=model_feature_provenance(model))
    if feats.shape[1] != model.config.feature_dim:
        raise ValueError(f"Features have {feats.shape[1]} dimensions; the model expects {model.config.feature_dim}.")
    emb = model.embed_images(feats, routing=routing, temperature=temperature, space=space)
    weights = model.routing_weights(feats, temperature=temperature) if weights_key else None
    experts = model.assign(feats)
    table.obsm[key_added] = emb
    if weights is not None:
        table.obsm[weights_key] = weights
    table.obs[K.OBS.SPADE_EXPERT] = pd.Categorical(experts.astype(str))
    table.uns.setdefault(K.UNS.SPADE, {})["embedding"] = storable({
        "key": key_added, "routing": routing, "space": space, "alignment": model.config.alignment,
        "temperature": float(model.config.routing_temperature if temperature is None else temperature),
        "backbone": model.backbone, "sections": sorted(set(section_labels(table)))})
    log_info("embedded %d spots with SPADE (%s routing): obsm[%r]%s and obs[%r] of table %r", table.n_obs, routing,
             key_added, f", obsm[{weights_key!r}]" if weights_key else "", K.OBS.SPADE_EXPERT, table_key)
    return sdata if copy else None


# --- prediction (tl.predict_expression dispatches Spade models here) -------------------------------------------
def predict_spade(query: Any, q_table: Any, reference: Any, r_table: Any, *, model: Spade, k: int, weighting: str,
                  temperature: float, features_key: str | None, reference_features_key: str | None,
                  device: str | None, table_key: str, reference_table_key: str, routing: K.Routing = "soft",
                  ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]]:
    """SPADE's expression prediction: expert-consistent retrieval (see :func:`spade_retrieve`).

    Every member of an ensemble retrieves; the prediction is their mean and ``"sd"`` the
    predictive standard deviation (as for mclSTExp). The query embeddings are member 0's.
    """
    if reference is None:
        raise ValueError("`reference` is required for SPADE retrieval: the annotated spots (e.g. the training "
                         "SpatialData) whose expression is retrieved.")
    check_choice(routing, "routing", K.ROUTINGS)
    sha = model.weights_sha256
    expected = model_feature_provenance(model)
    qkey, fq = resolve_features(query, q_table, features_key=features_key, backbone=model.backbone,
                                weights_sha256=sha, device=device, table_key=table_key, recipe=model.feature_recipe,
                                expected=expected)
    rkey, fr = resolve_features(reference, r_table, features_key=reference_features_key, backbone=model.backbone,
                                weights_sha256=sha, device=device, table_key=reference_table_key,
                                recipe=model.feature_recipe, expected=expected)
    check_same_provenance(q_table, qkey, r_table, rkey)
    check_panel_measured(r_table, model.panel, arg="reference")  # every reference spot measured the panel
    values, _ = panel_expression(r_table, model.panel, gene_input="log1p_cp10k")
    gin = None
    if model.config.reference_side != "images":
        gin, _ = panel_expression(r_table, model.panel, gene_input=model.config.gene_input)
    if k > len(values):
        raise ValueError(f"`k={k}` exceeds the {len(values)} reference spots.")
    pred, info, sd = spade_retrieve(model, fq, fr, values, reference_genes=gin, k=k, weighting=weighting,
                                    temperature=temperature, routing=routing, return_sd=True)
    return pred, {K.OBSM.SPADE: model.embed_images(fq)}, info, {"sd": sd}


def spade_retrieve(model: Spade, query_features: np.ndarray, reference_features: np.ndarray, values: np.ndarray,
                   *, reference_genes: np.ndarray | None = None, side: str | None = None, k: int = 200,
                   weighting: K.Weighting = "inverse_sq_l2", temperature: float = 1.0,
                   routing: K.Routing = "soft", return_sd: bool = False,
                   ) -> tuple[np.ndarray, dict[str, Any]] | tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """Expert-consistent retrieval of a SPADE model, arrays in and out.

    ``prediction(q) = sum_e a_e(q) * retrieval_e(q)``: the query is embedded by expert ``e``'s
    image head and compared only with the reference spots whose expert is ``e``, embedded by
    expert ``e``'s gene head (``side="genes"``, from ``reference_genes``, the model's
    ``gene_input``) or image head (``side="images"``). ``routing="soft"`` weighs the experts by the
    query's routing weights (those at or below 1e-3 dropped), ``"hard"`` uses only the query's
    expert (nearest fine centroid). An expert with fewer than ``k`` reference spots retrieves all
    of them; an expert with none retrieves from all reference spots, embedded by its own heads.
    See :func:`sq_spade.nn.retrieval.mixture_retrieve_predict`.

    An ensemble (``model.n_members > 1``): every member retrieves so, with its own heads (the
    routing is shared); the prediction is the mean of the members' predictions, and the
    predictive standard deviation (``return_sd``) is ``sqrt(mean retrieval spread + variance
    of the members' predictions)`` (the law of total variance, as for mclSTExp), the
    retrieval spread of a member being the variance of its mixture of weighted neighbour
    values.

    Parameters
    ----------
    model
        A trained :class:`~sq_spade.models.Spade`.
    query_features, reference_features
        Frozen backbone features of the query and reference spots.
    values
        What is retrieved: the reference spots' log1p CP10k over the model's panel.
    reference_genes
        The reference spots' gene-head inputs (``side="genes"`` only).
    side
        ``"genes"``, ``"images"`` or ``"both"`` (default: the model's ``reference_side``).
    k, weighting, temperature
        As :func:`sq_spade.tl.predict_expression`.
    routing
        ``"soft"`` or ``"hard"``.
    return_sd
        Also return the predictive standard deviation ``(n_query, n_genes)``.

    Returns
    -------
    ``(predictions, info)`` (with ``return_sd``: ``(predictions, info, sd)``); ``info`` holds
    the side, the routing, ``n_members`` and, per expert, the numbers of reference spots and
    queries (``fallback``: experts without reference spots).

    Examples
    --------
    >>> pred, info = spade_retrieve(model, f_query, f_ref, expr_ref, side="images", k=50)  # doctest: +SKIP
    """
    from sq_spade.nn.retrieval import ensemble_prediction, mixture_retrieve_predict

    side = model.config.reference_side if side is None else side
    check_choice(side, "side", K.REFERENCE_SIDES)
    check_choice(routing, "routing", K.ROUTINGS)
    fq, fr = model._check_features(query_features), model._check_features(reference_features)
    if side != "images" and reference_genes is None:
        raise ValueError(f"`reference_genes` is required with side={side!r} (the reference spots' gene-head inputs).")
    weights = (model.routing_weights(fq) if routing == "soft"
               else np.eye(model.n_experts, dtype=np.float32)[model.assign(fq)])
    key_expert = model.assign(fr)
    n_ref = len(fr)
    g = None if side == "images" else np.asarray(reference_genes, dtype=np.float32)

    def member_retrieve(m: int) -> Any:
        def embed_keys(e: int, rows: np.ndarray) -> np.ndarray:
            # rows < n_ref: the gene side (or the image side with side="images"); rows >= n_ref: the
            # image side of side="both" (each reference spot twice, once per side)
            gene_rows, img_rows = (rows[rows < n_ref], rows[rows >= n_ref] - n_ref) if side == "both" else (
                (rows, rows[:0]) if side == "genes" else (rows[:0], rows))
            parts = [model.embed_genes(g[gene_rows], np.full(len(gene_rows), e), member=m)] if len(gene_rows) else []
            if len(img_rows):
                parts.append(model.embed_images_by(fr[img_rows], e, member=m))
            return np.concatenate(parts)

        return mixture_retrieve_predict(lambda e, rows: model.embed_images_by(fq[rows], e, member=m), weights,
                                        key_expert, embed_keys, vals, k=k, weighting=weighting,
                                        temperature=temperature, return_variance=return_sd)

    vals = values
    if side == "both":
        key_expert, vals = np.concatenate([key_expert, key_expert]), np.concatenate([values, values])
    runs = [member_retrieve(m) for m in range(model.n_members)]
    info = {"reference_side": side, "routing": routing, "n_reference": int(len(vals)),
            "n_members": model.n_members, **runs[0][1]}
    if not return_sd:
        preds = [r[0] for r in runs]  # the mean as ensemble_prediction takes it (float64)
        return (preds[0] if len(preds) == 1 else np.mean(preds, axis=0, dtype=np.float64).astype(np.float32)), info
    pred, sd = ensemble_prediction([r[0] for r in runs], [r[2] for r in runs])
    return pred, info, sd
