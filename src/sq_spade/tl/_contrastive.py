"""mclSTExp in the ``tl`` API: ``train_contrastive``, reference keys (``spot_keys``) and its predictor.

``train_contrastive(method="ridge" | "knn")`` still trains the baselines, with a FutureWarning:
they live in :func:`sq_spade.tl.train_baseline` (:mod:`sq_spade.tl._baselines`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sq_spade import _constants as K
from sq_spade._docs import inject_docs
from sq_spade._logging import info as log_info
from sq_spade._serialize import storable, to_jsonable
from sq_spade._settings import settings
from sq_spade._validation import check_choice, check_positive, get_table, is_spatialdata
from sq_spade._version import __version__
from sq_spade.models._mclstexp import MclSTExp
from sq_spade.pp._genes import check_panel_measured, panel_expression
from sq_spade.pp._patches import patches as make_patches
from sq_spade.pp._positions import spot_positions, tile_ids
from sq_spade.tl._baselines import train_baseline
from sq_spade.tl._common import (
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

    from sq_spade.models import KNNModel, RidgeModel
    from sq_spade.train import FitOptions


def _fit_options(**options: Any) -> FitOptions:
    """The training options of mclSTExp, checked."""
    from sq_spade.train import FitOptions

    return FitOptions.contrastive(**options)


def _clip_positions(pos: np.ndarray, model: MclSTExp) -> np.ndarray:
    n_x, n_y = int(model.config.n_x), int(model.config.n_y)
    over = (pos[:, 0] >= n_x) | (pos[:, 1] >= n_y)
    if over.any():
        warnings.warn(f"{int(over.sum())} reference spots lie beyond the position tables the model learnt "
                      f"({n_x} x {n_y}); they take the last row of each table.", UserWarning, stacklevel=3)
        pos = np.column_stack([np.minimum(pos[:, 0], n_x - 1), np.minimum(pos[:, 1], n_y - 1)])
    return pos


def spot_keys(data: Any, model: MclSTExp, *, table_key: str = K.TABLES.DEFAULT,
              batch_size: int = 4096, member: int = 0) -> np.ndarray:
    """Spot-encoder embeddings of every spot of ``data`` under the model's inference context.

    Deterministic and independent of ``batch_size``: context ``"self"`` and ``"batch"`` embed
    each spot alone; ``"tile"`` lets the spots of one tile attend to each other, a tile being
    embedded whole whatever the batching.

    Examples
    --------
    >>> keys = spot_keys(sdata_train, model)  # doctest: +SKIP
    """
    table = get_table(data, table_key)
    gin, _ = panel_expression(table, model.panel, gene_input=model.config.gene_input)
    pos, _ = spot_positions(data, table, model.position, bin_um=model.config.position_bin_um, table_key=table_key)
    if pos is not None:
        pos = _clip_positions(pos, model)
    ctx = tile_ids(table, int(model.config.tile_size or 4)) if model.context == "tile" else "self"
    return model.embed_spots(gin, pos, ctx, batch_size=batch_size, member=member)


class _RowPatches:
    """Patches of the given table rows, item ``i`` = patch of ``rows[i]``."""

    def __init__(self, patches: Any, rows: np.ndarray):
        where = np.full(int(max(patches.rows.max(initial=-1), rows.max(initial=-1))) + 1, -1, np.int64)
        where[patches.rows] = np.arange(len(patches.rows))
        idx = where[rows]
        if (idx < 0).any():
            raise ValueError(f"{int((idx < 0).sum())} spots have no patch (no image covers their section).")
        self.patches, self.idx = patches, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.patches[int(self.idx[i])]


@inject_docs
def train_contrastive(
    sdata: SpatialData | AnnData,
    *,
    method: K.ContrastiveMethod = "mclstexp",
    features_key: str | None = None,
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    panel: str | Sequence[str] | None = None,
    n_top: int = 50,
    finetune: K.Finetune = "none",
    recipe: K.Recipe = "small_data",
    epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-4,
    weight_decay: float = 1e-3,
    temperature: float | None = None,
    loss: K.Loss = "clip",
    n_seeds: int | None = None,
    refit: bool | None = None,
    select: K.Select | None = None,
    keys: K.Keys | None = None,
    views: bool | None = None,
    coverage: float | None = 0.9,
    position: K.Position | None = "grid",
    context: K.Context = "self",
    tile_size: int = 4,
    gene_input: K.GeneInput = "log1p_cp10k",
    out_dim: int = 256,
    dropout: float = 0.1,
    depth: int = 2,
    heads: int = 8,
    dim_head: int = 64,
    mlp_dim: int | None = None,
    schedule: K.Schedule = "constant",
    augment: bool = True,
    num_workers: int = 0,
    regressor_kwargs: Mapping[str, Any] | None = None,
    train_sections: Sequence[str] | str | None = None,
    validation_sections: Sequence[str] | str | None = None,
    patience: int | None = 10,
    seed: int | None = None,
    device: str | None = None,
    table_key: str = K.TABLES.DEFAULT,
    key_added: str = K.OBSM.MCLSTEXP,
    patch_px: int = 224,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool | str | os.PathLike = False,
    distributed: bool | str = "auto",
) -> MclSTExp | RidgeModel | KNNModel:
    """Train mclSTExp: contrastive image and spot encoders, for prediction by retrieval.

    An image projection head (and, with ``finetune``, the image encoder) and a spot encoder
    (panel expression + learned position embeddings + a transformer over a set of spots) are
    trained with a contrastive loss so that a spot's image and expression embed close together;
    expression of new spots is then predicted by retrieval (:func:`sq_spade.tl.predict_expression`
    with a ``reference``). ``method="ridge"`` or ``"knn"`` still trains a baseline, but is
    deprecated (a FutureWarning): use :func:`sq_spade.tl.train_baseline`.

    Targets and values are log1p CP10k over the panel genes. The gene panel is chosen on the
    training sections only.

    Training recipe (``recipe``, frozen features). ``"small_data"`` (default) is fitted to a
    few hundred to a few thousand training spots (measured on her2st LOSO, see the results
    page):

    - the loss temperature is 32 (the logits of raw dot products divided by 32; at 1 the ~500
      training pairs are memorised within a few dozen epochs);
    - the epoch count is chosen on a validation section by validation ACG (``select="acg"``:
      retrieval of the validation spots from the training spots), at most ``epochs`` = 40 with
      ``patience``; with ``refit`` (default when no ``validation_sections`` are given and there
      are at least 2 training sections) the held-out section rotates over the seeds: seed ``i``
      of ``n`` training sections holds out ``train[-(1 + i % n)]`` (the last section, then the
      one before...) and trains on the others, so that with ``n_seeds >= n`` every training
      section validates once (with fewer seeds, only the last ``n_seeds`` sections). Every seed
      is then retrained on all training sections for the median of the seeds' best epochs.
      ``history["selection"]`` records the section each seed held out
      (``held_out_sections``). Given ``validation_sections`` validate every seed, without
      rotation. Without any validation section the model trains 12 epochs;
    - ``n_seeds`` = 5 seeds are trained and saved together; predictions average over them;
    - retrieval keys from both sides (``keys="both"``: the reference spots' spot-encoder and
      image embeddings, the mean of the two cosine similarities);
    - with ``obsm[features_key + "_views"]`` (``(N, V, D)`` views of each patch, e.g. the 8
      dihedral views of :func:`sq_spade.pp.compute_features`), each batch takes a random view
      of each spot (``views``); prediction uses ``obsm[features_key]`` (their mean);
    - ``coverage``: the held-out sections calibrate split-conformal intervals (the score of
      :func:`calibrate_conformal`): each is predicted, by retrieval from the other training
      sections, by the ensemble of the selection runs that held it out (and so never saw it),
      and the normalised residuals of all held-out spots are pooled into one quantile per gene
      (cross-conformal over the training sections; a section weighs by its number of spots).
      ``config["conformal"]`` records the sections, the spots of each and the section each
      seed held out. With ``validation_sections`` given, those sections calibrate, predicted by
      every seed's run. :func:`sq_spade.tl.predict_expression` then writes ``predicted_lower``
      / ``predicted_upper`` beside ``predicted`` and ``predicted_sd``.

    ``"published"`` is mclSTExp's own setting: temperature 1, 90 epochs with early stopping on
    the validation loss, one seed, spot keys, no refit, no views, no calibration. Every
    argument given explicitly overrides the recipe.

    Positions (``position``, mclSTExp only):

    - ``"grid"``: ``obs`` ``array_col`` (x) and ``array_row`` (y), minus each section's minimum;
    - ``"pixel"``: spot centres in micrometres, minus each section's minimum, divided by the
      spot pitch (the median distance between neighbouring spots of the training sections,
      stored as ``config['position_bin_um']``) and rounded: centres binned to the spot pitch,
      the physical counterpart of the original's raw pixel coordinates;
    - ``None``: no position embeddings.

    The tables are sized from the data (one more than the largest training or validation
    position; the original allocates 65,536 rows each). Reference spots beyond them at
    prediction take the last row (with a warning).

    Attention context of the spot encoder (``context``): the original lets the spots of a random
    training batch attend to each other and computes reference keys in batches of 32, so a
    key depends on its batch-mates. Here:

    - ``"self"`` (default): each spot attends only to itself, in training and for keys: a key
      depends on its spot alone;
    - ``"batch"``: the original's training (the whole random batch attends together); reference
      keys are then computed with each spot alone (``"self"``), the one context that needs no
      choice of neighbours and does not depend on which other spots the reference holds;
    - ``"tile"``: the spots of one spatial tile (same section, same ``floor(array_col /
      tile_size)`` and ``floor(array_row / tile_size)``) attend to each other. Training batches
      stay random (as in :func:`sq_spade.train.fit_contrastive`), so a spot attends to the
      tile-mates that share its batch; reference keys attend to the whole tile, computed tile by
      tile, so they do not depend on the batching.

    Fine-tuning (``finetune="last"`` or ``"all"``, the GPU path): the image encoder
    ``get_backbone(backbone, weights=weights)`` trains too, on ``patch_px`` patches at the
    image's native resolution (mclSTExp) from :func:`sq_spade.pp.patches`, with colour jitter,
    flips and 90-degree rotations; patches are resized to the backbone's input size if they
    differ. Needs a SpatialData.

    Parameters
    ----------
    sdata
        SpatialData, or AnnData with the features in ``obsm`` (frozen backbone).
    method
        ``"mclstexp"``; ``"ridge"`` or ``"knn"`` (deprecated) forward to
        :func:`sq_spade.tl.train_baseline`.
    %(features_key)s
    backbone, weights
        Backbone of the features, or the image encoder to fine-tune, and its weights file.
    panel
        Gene list, boolean ``var`` column, ``"spade"`` / ``"heg"`` (chosen on the training
        sections with ``n_top``), or ``None``: the table's panel if chosen on training sections
        only, else ``"spade"``.
    n_top
        Genes per section (``"spade"``) or in total (``"heg"``).
    finetune
        ``"none"`` (frozen features, the CPU path), ``"last"`` (the encoder's last block) or
        ``"all"`` (the whole encoder, as mclSTExp).
    recipe
        ``"small_data"`` or ``"published"`` (see above): the defaults of ``epochs``,
        ``temperature``, ``n_seeds``, ``refit``, ``select``, ``keys``, ``views`` and
        ``coverage``. Fine-tuning follows ``"published"``.
    epochs, batch_size, lr, weight_decay
        Epochs (``None``: 40 at most, chosen by validation, in ``"small_data"``; 90 in
        ``"published"``), 128, 1e-4, 1e-3 (Adam).
    temperature, loss
        Contrastive loss: ``"clip"`` (identity targets, mclSTExp) or ``"bleep"``; temperature
        (``None``: 32 in ``"small_data"``, 1 in ``"published"``).
    n_seeds
        Seeds trained (``seed``, ``seed + 1``...) and averaged at prediction (``None``: 5 in
        ``"small_data"`` with frozen features, else 1).
    refit
        Choose the epoch count on held-out training sections (rotated over the seeds, see
        above), then retrain on all training sections (``None``: in ``"small_data"``, when no
        ``validation_sections`` are given and there are at least 2 training sections).
    select
        What picks the best epoch on validation: ``"acg"`` (``"small_data"``) or ``"loss"``.
    keys
        Retrieval keys: ``"both"`` (``"small_data"``), ``"spot"`` (mclSTExp) or ``"image"``.
    views
        Train on random views from ``obsm[features_key + "_views"]`` when present (``None``:
        in ``"small_data"``).
    coverage
        Nominal coverage of the conformal intervals calibrated on the held-out or validation
        sections (``None``: none; ``"published"``: none).
    position
        ``"grid"``, ``"pixel"`` or ``None`` (see above).
    context
        ``"self"``, ``"batch"`` or ``"tile"`` (see above).
    tile_size
        Side of a tile in array-grid units (``context="tile"``).
    gene_input
        Spot-encoder input: ``"log1p_cp10k"`` or ``"raw"`` counts of the panel genes.
    out_dim, dropout, depth, heads, dim_head, mlp_dim
        Latent size, head dropout (0.1 here; the original mclSTExp's heads have none) and
        spot-encoder transformer (2 blocks, 8 heads of 64, MLP width = number of genes).
    schedule
        ``"constant"`` learning rate (mclSTExp) or ``"cosine"``.
    augment
        Augment patches when fine-tuning.
    num_workers
        DataLoader workers reading patches when fine-tuning.
    regressor_kwargs
        Deprecated with ``method="ridge"`` / ``"knn"``: see :func:`sq_spade.tl.train_baseline`.
    train_sections, validation_sections
        Sections to train on (default: all but validation) and to validate on (early stopping).
    patience
        Early-stopping patience in epochs (with validation sections); the best epoch is kept.
    %(seed)s
    %(device)s
    %(table_key)s
    %(key_added)s
    patch_px
        Patch side in native pixels when fine-tuning. This is mclSTExp's geometry (224 native
        pixels, whatever the scan's resolution: 155 um on her2st at 0.69 um/px), kept so the
        fine-tuning path reproduces the original; it is *not* the frozen-feature geometry of
        :func:`sq_spade.pp.compute_features` (112 um at 0.5 um/px, the same tissue area on every
        scanner). A fine-tuned model records ``patch_px`` and embeds query patches with it, so
        training and prediction agree; features from ``finetune="none"`` and from fine-tuning
        are not interchangeable.
    %(checkpoints)s
    distributed
        mclSTExp under ``torchrun --nproc_per_node=N``: ``"auto"`` trains with
        DistributedDataParallel (each process encodes its part of every batch; the same weights
        as one process, see :func:`sq_spade.train.fit_contrastive`), ``False`` trains alone in
        every process. Every process returns the same model and fills its own table; only
        rank 0 writes files (:meth:`~sq_spade.models.MclSTExp.save`, the feature cache).

    Returns
    -------
    The :class:`~sq_spade.models.MclSTExp`, an ensemble of ``n_seeds`` members (the deprecated methods: a
    :class:`~sq_spade.models.RidgeModel` or :class:`~sq_spade.models.KNNModel`). The table gains
    ``obsm[key_added]`` (image embeddings, ``out_dim``-d) and ``uns['mclstexp']`` (parameters,
    history, backbone and weights hash, sections), written only once everything succeeded.
    Frozen features missing from ``obsm`` are computed into it first (as
    :func:`sq_spade.pp.compute_features` does).

    Examples
    --------
    >>> sd = sqs.io.combine_sections([sqs.datasets.her2st(s) for s in ("C2", "C3", "C4")])  # doctest: +SKIP
    >>> model = sqs.tl.train_contrastive(sd, train_sections=["C2", "C3"], validation_sections=["C4"])  # doctest: +SKIP
    >>> model = sqs.tl.train_contrastive(sd)  # small-data recipe: C4, C3, C2 validate in turn, then refit  # doctest: +SKIP
    >>> published = sqs.tl.train_contrastive(sd, recipe="published", validation_sections=["C4"])  # doctest: +SKIP
    """
    seed = settings.resolve_seed(seed)
    table = get_table(sdata, table_key)
    check_choice(method, "method", K.CONTRASTIVE_METHODS)
    check_choice(finetune, "finetune", K.FINETUNES)
    check_choice(position, "position", (*K.POSITIONS, None))
    check_choice(context, "context", K.CONTEXTS)
    check_choice(gene_input, "gene_input", K.GENE_INPUTS)
    check_choice(schedule, "schedule", K.SCHEDULES)
    for name, v in (("n_top", n_top), ("out_dim", out_dim), ("tile_size", tile_size), ("patch_px", patch_px)):
        check_positive(v, name, integer=True)
    if method != "mclstexp" and finetune != "none":
        raise ValueError(f"`finetune={finetune!r}` applies to method='mclstexp' only; {method!r} uses frozen features.")
    if finetune != "none" and not is_spatialdata(sdata):
        raise TypeError(f"`finetune={finetune!r}` trains the image encoder on patches: `sdata` must be a SpatialData "
                        f"with images, got {type(sdata).__name__}.")
    if regressor_kwargs is not None and method == "mclstexp":
        raise ValueError("`regressor_kwargs` applies to method='ridge' or 'knn' only.")
    if method != "mclstexp" and (checkpoint_dir is not None or resume is not False):
        raise ValueError(f"`checkpoint_dir` and `resume` apply to method='mclstexp' only; {method!r} has no "
                         f"training epochs.")
    rc = _recipe(recipe, finetune=finetune, epochs=epochs, temperature=temperature, n_seeds=n_seeds, refit=refit,
                 select=select, keys=keys, views=views, coverage=coverage)
    epochs, temperature = rc["epochs"], rc["temperature"]
    # the training options, checked once here (before any feature is computed)
    opts = _fit_options(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, loss=loss,
                        temperature=temperature, patience=patience, seed=seed, device=device or settings.device,
                        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume)
    if method != "mclstexp":
        warnings.warn(f"`sqs.tl.train_contrastive(method={method!r})` is deprecated: train the baselines with "
                      f"`sqs.tl.train_baseline(sdata, method={method!r}, ...)`.", FutureWarning, stacklevel=2)
        return train_baseline(sdata, method=method, features_key=features_key, backbone=backbone, weights=weights,
                              panel=panel, n_top=n_top, regressor_kwargs=regressor_kwargs,
                              train_sections=train_sections, validation_sections=validation_sections, seed=seed,
                              device=device, table_key=table_key)

    from sq_spade.nn.inference import resize_preprocess
    from sq_spade.train import fit_contrastive
    from sq_spade.train._finetune import finetune_prefixes

    train, val = split_sections(table, train_sections, validation_sections)
    genes_list = resolve_panel(table, panel, n_top, train)
    do_refit = rc["refit"] if rc["refit"] is not None else (recipe == "small_data" and not val and len(train) >= 2)
    if do_refit:
        if val:
            raise ValueError("`refit=True` chooses the epoch count on held-out training sections: leave "
                             "`validation_sections` empty.")
        if len(train) < 2:
            raise ValueError(f"`refit=True` needs at least 2 training sections, got {train}.")
        if finetune != "none":
            raise ValueError("`refit` applies to frozen features (finetune='none').")
    if (rc["n_seeds"] > 1 or do_refit) and (checkpoint_dir is not None or resume is not False):
        raise ValueError(f"`checkpoint_dir` and `resume` checkpoint one training run: pass `n_seeds=1` and "
                         f"`refit=False` (or recipe='published'); got n_seeds={rc['n_seeds']}, refit={do_refit}.")
    tr, va = rows_of(table, train), rows_of(table, val)
    if tr.sum() < 2:
        raise ValueError(f"Training sections {train} have {int(tr.sum())} spots; at least 2 are needed.")
    values, _ = panel_expression(table, genes_list, gene_input="log1p_cp10k")
    gin = values if gene_input == "log1p_cp10k" else panel_expression(table, genes_list, gene_input="raw")[0]
    pos, bin_um = spot_positions(sdata, table, position, rows=tr, table_key=table_key)
    if context == "tile":
        groups = tile_ids(table, tile_size)
        ctx_tr, ctx_va = groups[tr], groups[va]
    else:
        ctx_tr = ctx_va = "self" if context == "self" else None
    common = dict(out_dim=out_dim, dropout=dropout, depth=depth, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim,
                  schedule=schedule, distributed=distributed, options=opts)
    val_kw: dict[str, Any] = {}
    if va.any():
        val_kw = dict(val_expr=gin[va], val_pos=None if pos is None else pos[va],
                      val_context=ctx_va if context == "tile" else None)
    fkey, feats, prov, encoder, patch_src, trained = None, None, {}, None, None, None
    extra_members: list[Any] = []
    selection: dict[str, Any] = {}
    conformal = None
    if finetune == "none":
        fkey, feats = resolve_features(sdata, table, features_key=features_key, backbone=backbone, weights=weights,
                                       device=device, table_key=table_key)
        prov = features_provenance(table, fkey)
        views_key = f"{fkey}_views"
        train_feats = feats
        if rc["views"] is not False and views_key in table.obsm:
            train_feats = np.asarray(table.obsm[views_key], dtype=np.float32)
            if train_feats.ndim != 3 or train_feats.shape[0] != table.n_obs or train_feats.shape[2] != feats.shape[1]:
                raise ValueError(f"`obsm[{views_key!r}]` must be (n_spots, n_views, {feats.shape[1]}), "
                                 f"got {train_feats.shape}.")
        elif rc["views"] is True:
            raise KeyError(f"`views=True` needs `obsm[{views_key!r}]` (views of each patch); available: "
                           f"{sorted(table.obsm)}.")
        fits, selection, conformal = _fit_recipe(
            train_feats=train_feats, feats=feats, gin=gin, values=values, pos=pos, context=context,
            table=table, train=train, val=val, refit=do_refit, rc=rc, common=common, opts=opts,
            tile_size=tile_size, ctx_tr=ctx_tr, ctx_va=ctx_va)
        fit, extra_members = fits[0], [(f.image_head, f.spot_encoder) for f in fits[1:]]
        feature_dim = int(feats.shape[1])
        input_size = None
    else:
        from sq_spade.nn.backbones import get_backbone

        encoder = get_backbone(backbone, weights=weights)
        patch_src = make_patches(sdata, table_key=table_key, patch_px=patch_px)
        if va.any():
            val_kw["val_images"] = _RowPatches(patch_src, np.flatnonzero(va))
        prov = {"backbone": encoder.name, "weights_sha256": encoder.weights_sha256}
        feature_dim, input_size = int(encoder.dim), int(encoder.input_size)
        # "last" spelt out as the parameter prefixes it trains (recorded in the config)
        trained = finetune_prefixes(encoder, finetune)
        fit = fit_contrastive(None, gin[tr], None if pos is None else pos[tr], ctx_tr,
                              images=_RowPatches(patch_src, np.flatnonzero(tr)), image_encoder=encoder,
                              finetune=trained, augment=augment, preprocess=resize_preprocess(input_size, patch_px),
                              num_workers=num_workers, **val_kw, **common)
    public_sel = {k: v for k, v in selection.items() if not k.startswith("_")}
    hist = to_jsonable(dict(fit.history) | ({"selection": public_sel} if public_sel else {}), nonfinite="null")
    n_x, n_y = fit.history.get("n_x"), fit.history.get("n_y")
    config = {
        "backbone": prov.get("backbone", backbone), "weights_sha256": prov.get("weights_sha256"),
        "feature_dim": feature_dim, "panel": list(genes_list), "gene_input": gene_input,
        "position": position, "n_x": None if n_x is None else int(n_x), "n_y": None if n_y is None else int(n_y),
        "position_bin_um": bin_um, "context": context, "tile_size": int(tile_size), "out_dim": int(out_dim),
        "dropout": float(dropout), "spot_encoder": fit.spot_encoder.config(), "finetune": finetune,
        "patch_px": int(patch_px) if finetune != "none" else None, "input_size": input_size,
        "train_sections": train, "validation_sections": val, "history": hist,
        "keys": rc["keys"], "n_members": 1 + len(extra_members), "conformal": conformal,
        "params": {"recipe": recipe, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                   "weight_decay": weight_decay, "loss": loss, "temperature": temperature, "seed": seed,
                   "n_seeds": rc["n_seeds"], "refit": do_refit, "select": rc["select"],
                   "views": bool(finetune == "none" and train_feats.ndim == 3), "coverage": rc["coverage"],
                   "patience": patience, "schedule": schedule,
                   "features_key": fkey, "feature_recipe": recipe_of(table, fkey) if finetune == "none" else None,
                   "n_top": n_top, "augment": bool(augment) if finetune != "none" else None,
                   "finetuned_parameters": (trained if isinstance(trained, list) else finetune)
                   if finetune != "none" else None,
                   K.FEATURE_PROVENANCE_PARAM: comparable_provenance(prov or None) if finetune == "none" else None},
    }
    model = MclSTExp(fit.image_head, fit.spot_encoder, config, image_encoder=fit.image_encoder,
                     members=extra_members)
    if finetune == "none" and rc["coverage"] is not None and selection:
        model.config["conformal"] = _cross_conformal(selection["_groups"], config, feats=feats, gin=gin, pos=pos,
                                                     values=values, table=table, context=context,
                                                     tile_size=tile_size, coverage=rc["coverage"],
                                                     held_out=selection.get("held_out_sections"))
    for key in [k for k in selection if k.startswith("_")]:
        del selection[key]
    if finetune == "none":
        emb = model.embed_images(feats)
    else:
        emb = np.full((table.n_obs, int(out_dim)), np.nan, np.float32)
        emb[patch_src.rows] = model.embed_patches(patch_src, device=device, num_workers=num_workers)
    # write results only once everything has succeeded
    table.obsm[key_added] = emb
    table.uns[K.UNS.MCLSTEXP] = storable({k: v for k, v in model.config.items() if k not in ("panel",)} | {
        "n_panel_genes": len(genes_list), "embedding_key": key_added, "sq_spade_version": __version__})
    log_info("trained mclSTExp (%d panel genes): obsm[%r] and uns[%r] of table %r", len(genes_list), key_added,
             K.UNS.MCLSTEXP, table_key)
    return model


# --- the training recipe -------------------------------------------------------------------------------------
#: The recipes' defaults: (epochs, epochs without validation, temperature, n_seeds, select, keys, views, coverage).
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "small_data": {"epochs": 40, "fixed_epochs": 12, "temperature": 32.0, "n_seeds": 5, "select": "acg",
                   "keys": "both", "views": None, "coverage": 0.9},
    "published": {"epochs": 90, "fixed_epochs": 90, "temperature": 1.0, "n_seeds": 1, "select": "loss",
                  "keys": "spot", "views": False, "coverage": None},
}


def _recipe(recipe: str, *, finetune: str, epochs: int | None, temperature: float | None, n_seeds: int | None,
            refit: bool | None, select: str | None, keys: str | None, views: bool | None,
            coverage: float | None) -> dict[str, Any]:
    """The recipe's defaults with the arguments given explicitly, checked."""
    check_choice(recipe, "recipe", K.RECIPES)
    frozen = finetune == "none"
    # fine-tuning: the published settings (the small-data recipe is measured on frozen features)
    d = RECIPE_DEFAULTS[recipe if frozen else "published"]
    out = {
        "epochs": d["epochs"] if epochs is None else epochs,
        "fixed_epochs": d["fixed_epochs"] if epochs is None else epochs,
        "temperature": d["temperature"] if temperature is None else temperature,
        "n_seeds": (d["n_seeds"] if frozen else 1) if n_seeds is None else n_seeds,
        "refit": refit,
        "select": (d["select"] if frozen else "loss") if select is None else select,
        "keys": (d["keys"] if frozen else "spot") if keys is None else keys,
        "views": d["views"] if views is None else views,
        "coverage": coverage if (recipe == "small_data" and frozen) else None,
    }
    check_positive(out["n_seeds"], "n_seeds", integer=True)
    check_choice(out["select"], "select", K.SELECTS)
    check_choice(out["keys"], "keys", K.KEYS)
    if refit is not None and not isinstance(refit, bool):
        raise TypeError(f"`refit` must be None, True or False, got {refit!r}.")
    if views is not None and not isinstance(views, bool):
        raise TypeError(f"`views` must be None, True or False, got {views!r}.")
    if coverage is not None and not (isinstance(coverage, float | int) and 0 < coverage < 1):
        raise ValueError(f"`coverage` must be None or a fraction in (0, 1), got {coverage!r}.")
    if not frozen and (out["n_seeds"] != 1 or out["keys"] != "spot" or out["select"] != "loss" or views):
        raise ValueError("A fine-tuned model trains one seed, retrieves with spot keys and selects by loss: "
                         "`n_seeds`, `keys`, `select` and `views` apply to finetune='none'.")
    return out


def _fit_recipe(*, train_feats: np.ndarray, feats: np.ndarray, gin: np.ndarray, values: np.ndarray,
                pos: np.ndarray | None, context: str, table: Any, train: list[str], val: list[str], refit: bool,
                rc: dict[str, Any], common: dict[str, Any], opts: Any, tile_size: int, ctx_tr: Any, ctx_va: Any,
                ) -> tuple[list[Any], dict[str, Any], None]:
    """Train the recipe's seeds: epoch count chosen on validation, then (``refit``) retrained on all sections.

    With ``refit`` the held-out section rotates over the seeds (:func:`held_out_sections`); each
    selection run trains on the other training sections. ``selection["_groups"]`` holds, per
    held-out section, the selection runs that never saw it and their training / held-out rows
    (for the conformal calibration).
    """
    from sq_spade.train import fit_contrastive

    tr_all, va_all = rows_of(table, train), rows_of(table, val)
    seeds = [opts.seed + i for i in range(rc["n_seeds"])]
    if refit:
        held = held_out_sections(train, len(seeds))
        splits = [(rows_of(table, [s for s in train if s != h]), rows_of(table, [h])) for h in held]
    else:
        held = None
        splits = [(tr_all, va_all)] * len(seeds)
    groups = tile_ids(table, tile_size) if context == "tile" else None
    used = tr_all | va_all
    # one position table for every member (they are saved under one config)
    n_xy = {} if pos is None else {"n_x": int(pos[used, 0].max()) + 1, "n_y": int(pos[used, 1].max()) + 1}

    def ctx(rows: np.ndarray) -> Any:
        return groups[rows] if groups is not None else ("self" if context == "self" else None)

    def run(rows_tr: np.ndarray, rows_va: np.ndarray | None, seed: int, epochs: int) -> Any:
        kw = dict(common)
        kw["options"] = opts.replace(seed=seed, epochs=epochs)
        if rows_va is not None:
            kw.update(val_features=feats[rows_va], val_expr=gin[rows_va],
                      val_pos=None if pos is None else pos[rows_va],
                      val_context=groups[rows_va] if groups is not None else None,
                      select=rc["select"], keys=rc["keys"], values=values[rows_tr], val_values=values[rows_va])
        return fit_contrastive(train_feats[rows_tr], gin[rows_tr], None if pos is None else pos[rows_tr],
                               ctx(rows_tr), **n_xy, **kw)

    selection: dict[str, Any] = {}
    if splits[0][1].any():
        sel_fits = [run(rtr, rva, s, opts.epochs) for (rtr, rva), s in zip(splits, seeds, strict=True)]
        best = [int(f.history["best_epoch"]) + 1 for f in sel_fits]
        # per validation set (a rotated held-out section, or the given validation sections): the
        # selection runs that never saw it
        vsets = held if held is not None else [tuple(val)] * len(seeds)
        by_set: dict[Any, list[int]] = {}
        for i, v in enumerate(vsets):
            by_set.setdefault(v, []).append(i)
        cal_groups = [([vsets[ix[0]]] if held is not None else list(val), [sel_fits[i] for i in ix], *splits[ix[0]])
                      for ix in by_set.values()]
        selection = {"validation_sections": list(dict.fromkeys(held)) if held is not None else list(val),
                     "select": rc["select"], "best_epochs": best, "_fits": sel_fits, "_groups": cal_groups}
        if held is not None:
            selection["held_out_sections"] = list(held)  # seed by seed
        if rc["select"] == "acg":
            selection["best_val_acg"] = [float(np.nanmax(f.history["val_acg"])) for f in sel_fits]
        if refit:
            n_ep = max(1, int(np.round(np.median(best))))
            selection["refit_epochs"] = n_ep
            fits = [run(tr_all, None, s, n_ep) for s in seeds]
        else:
            fits = sel_fits
    else:
        fits = [run(tr_all, None, s, rc["fixed_epochs"]) for s in seeds]
    return fits, selection, None


def _retrieve(model: MclSTExp, fq: np.ndarray | None, ref_gin: np.ndarray, ref_pos: np.ndarray | None, ref_ctx: Any,
              ref_feats: np.ndarray | None, values: np.ndarray, *, k: int, weighting: str, temperature: float,
              queries: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble retrieval: the mean of the members' predictions and the predictive standard deviation.

    Each member retrieves with its own query embeddings (of ``fq``, or ``queries``) and keys;
    the variance is the mean retrieval spread (weighted variance of the neighbours' values)
    plus the spread of the members' predictions (the law of total variance).
    """
    from sq_spade.nn.retrieval import (
        combine_keys,
        ensemble_prediction,
        neighbor_variance,
        retrieve_predict,
    )

    keys = model.config.keys
    preds, spreads = [], []
    for m in range(model.n_members):
        q = queries[m] if queries is not None else model.embed_images(fq, member=m)
        sk = model.embed_spots(ref_gin, ref_pos, ref_ctx, member=m) if keys != "image" else None
        ik = model.embed_images(ref_feats, member=m) if keys != "spot" else None
        qq, kk = combine_keys(q, spot_keys=sk, image_keys=ik, keys=keys)
        p, idx, w = retrieve_predict(qq, kk, values, k=k, weighting=weighting, temperature=temperature,
                                     return_neighbors=True)
        preds.append(p)
        spreads.append(neighbor_variance(values, idx, w, p))
    return ensemble_prediction(preds, spreads)


# --- conformal intervals ------------------------------------------------------------------------------------
#: Floor of the standard deviation in the conformal scores, as a fraction of each gene's mean ``sd``.
SD_FLOOR = 0.1


def conformal_calibration(observed: np.ndarray, predicted: np.ndarray, sd: np.ndarray, *, coverage: float,
                          sections: list[str] | None = None) -> dict[str, Any]:
    """Per-gene split-conformal quantiles of the normalised residuals ``|y - pred| / (sd + floor)``.

    ``floor`` is :data:`SD_FLOOR` times the gene's mean ``sd`` on the calibration spots; the
    quantile of level ``ceil((n + 1) coverage) / n`` (capped at 1) makes ``pred +- q (sd +
    floor)`` cover each gene with probability at least ``coverage`` on spots exchangeable with
    the calibration spots.
    """
    y, p, s = (np.asarray(a, dtype=np.float64) for a in (observed, predicted, sd))
    n = y.shape[0]
    if n < 1:
        raise ValueError("The calibration section has no spots.")
    floor = SD_FLOOR * s.mean(axis=0) + 1e-6
    scores = np.abs(y - p) / (s + floor)
    level = min(1.0, np.ceil((n + 1) * coverage) / n)
    q = np.quantile(scores, level, axis=0, method="higher")
    return {"coverage": float(coverage), "q": [float(v) for v in q], "sd_floor": [float(v) for v in floor],
            "n_spots": int(n), "sections": sections, "score": "abs_residual / (sd + floor), per gene"}


def conformal_interval(predicted: np.ndarray, sd: np.ndarray, conformal: Mapping[str, Any],
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper ends ``pred -+ q (sd + floor)`` of the calibrated intervals."""
    q = np.asarray(conformal["q"], dtype=np.float32)
    floor = np.asarray(conformal["sd_floor"], dtype=np.float32)
    half = q * (np.asarray(sd, dtype=np.float32) + floor)
    return (predicted - half).astype(np.float32), (predicted + half).astype(np.float32)


def _cross_conformal(cal_groups: list[Any], config: dict[str, Any], *, feats: np.ndarray, gin: np.ndarray,
                     pos: np.ndarray | None, values: np.ndarray, table: Any, context: str, tile_size: int,
                     coverage: float, held_out: list[str] | None) -> dict[str, Any]:
    """Conformal calibration on the selection runs' held-out sections, pooled.

    Each held-out section is predicted, by retrieval from the training sections of its
    selection runs, by the ensemble of the runs that never saw it; the normalised residuals of
    every held-out spot are pooled into one per-gene quantile (:func:`conformal_calibration`).
    Pooling spots weighs each section by its number of spots.
    """
    obs, preds, sds, n_per = [], [], [], {}
    tiles = tile_ids(table, tile_size) if context == "tile" else None
    for secs, fits, rows_tr, rows_va in cal_groups:
        ens = MclSTExp(fits[0].image_head, fits[0].spot_encoder, {**config, "n_members": len(fits)},
                       members=[(f.image_head, f.spot_encoder) for f in fits[1:]])
        ref_ctx = tiles[rows_tr] if tiles is not None else "self"
        pred, sd = _retrieve(ens, feats[rows_va], gin[rows_tr], None if pos is None else pos[rows_tr], ref_ctx,
                             feats[rows_tr], values[rows_tr], k=min(200, int(rows_tr.sum())),
                             weighting="inverse_sq_l2", temperature=1.0)
        obs.append(values[rows_va])
        preds.append(pred)
        sds.append(sd)
        n_per[secs[0]] = int(rows_va.sum())
    sections = [s for secs, *_ in cal_groups for s in secs]
    out = conformal_calibration(np.concatenate(obs), np.concatenate(preds), np.concatenate(sds),
                                coverage=coverage, sections=sections)
    if held_out is not None:
        out["n_spots_per_section"] = n_per
        out["held_out_sections"] = list(held_out)  # seed by seed: the selection run that predicted each section
        out["pooling"] = "spots of every held-out section (a section weighs by its number of spots)"
    return out


@inject_docs
def calibrate_conformal(
    sdata: SpatialData | AnnData,
    model: MclSTExp,
    *,
    calibration_sections: Sequence[str] | str,
    reference_sections: Sequence[str] | str | None = None,
    coverage: float = 0.9,
    k: int = 200,
    weighting: K.Weighting = "inverse_sq_l2",
    features_key: str | None = None,
    device: str | None = None,
    table_key: str = K.TABLES.DEFAULT,
) -> dict[str, Any]:
    """Split-conformal calibration of an mclSTExp model on sections it was not trained on.

    The ``calibration_sections`` are predicted by retrieval from the ``reference_sections``
    (default: every other section of the table); for each gene, the ``coverage`` quantile of
    the normalised residuals ``|observed - predicted| / (predicted_sd + floor)`` is stored in
    ``model.config["conformal"]``. :func:`sq_spade.tl.predict_expression` then writes the
    intervals ``predicted -+ q (predicted_sd + floor)`` as ``<key_added>_lower`` /
    ``_upper``. The guarantee holds for spots exchangeable with the calibration spots: a
    calibration section the model was trained on gives intervals that are too narrow, and a new
    section differs from the calibration one (the realised coverage per held-out section is on
    the results page). :func:`~sq_spade.tl.train_contrastive` calibrates by itself
    (``coverage``), on the training sections its selection runs held out in turn, pooled.

    Parameters
    ----------
    sdata
        SpatialData or AnnData holding the calibration and reference sections, with counts.
    model
        A frozen-feature :class:`~sq_spade.models.MclSTExp`.
    calibration_sections, reference_sections
        Sections predicted, and sections retrieved from.
    coverage
        Nominal coverage of the intervals, in (0, 1).
    k, weighting
        Retrieval, as in :func:`~sq_spade.tl.predict_expression`.
    %(features_key)s
    %(device)s
    %(table_key)s

    Returns
    -------
    The calibration (also stored in ``model.config["conformal"]``): ``coverage``, per-gene ``q``
    and ``sd_floor``, ``n_spots``, ``sections``.

    Examples
    --------
    >>> model = sqs.tl.train_contrastive(sd, train_sections=["C2", "C3"], coverage=None)  # doctest: +SKIP
    >>> sqs.tl.calibrate_conformal(sd, model, calibration_sections="C4")  # doctest: +SKIP
    """
    if not isinstance(model, MclSTExp):
        raise TypeError(f"`model` must be an MclSTExp, got {type(model).__name__}.")
    if model.finetuned:
        raise ValueError("`model` fine-tuned its image encoder; conformal calibration takes frozen-feature models.")
    if not (isinstance(coverage, float | int) and 0 < coverage < 1):
        raise ValueError(f"`coverage` must be a fraction in (0, 1), got {coverage!r}.")
    check_choice(weighting, "weighting", K.WEIGHTINGS)
    check_positive(k, "k", integer=True)
    table = get_table(sdata, table_key)
    cal = [calibration_sections] if isinstance(calibration_sections, str) else list(calibration_sections)
    sections = list(dict.fromkeys(table.obs[K.OBS.SECTION].astype(str))) if K.OBS.SECTION in table.obs else []
    ref = ([reference_sections] if isinstance(reference_sections, str) else list(reference_sections)
           if reference_sections is not None else [s for s in sections if s not in cal])
    for arg, secs in (("calibration_sections", cal), ("reference_sections", ref)):
        missing = [s for s in secs if s not in sections]
        if missing or not secs:
            raise ValueError(f"`{arg}` must name sections of the table {sections}, got {secs}.")
    if set(cal) & set(ref):
        raise ValueError(f"`calibration_sections` and `reference_sections` overlap: {sorted(set(cal) & set(ref))}.")
    ca, re_ = rows_of(table, cal), rows_of(table, ref)
    _, feats = resolve_features(sdata, table, features_key=features_key, backbone=model.backbone,
                                weights_sha256=model.weights_sha256, device=device, table_key=table_key,
                                recipe=model.feature_recipe)
    gin, ctx, pos, values = _reference_arrays(sdata, table, model, table_key)
    if k > int(re_.sum()):
        raise ValueError(f"`k={k}` exceeds the {int(re_.sum())} reference spots.")
    pred, sd = _retrieve(model, feats[ca], gin[re_], None if pos is None else pos[re_],
                         ctx if isinstance(ctx, str) else ctx[re_], feats[re_], values[re_], k=k,
                         weighting=weighting, temperature=1.0)
    out = conformal_calibration(values[ca], pred, sd, coverage=float(coverage), sections=cal)
    model.config["conformal"] = out
    return out


def _reference_arrays(data: Any, table: Any, model: MclSTExp, table_key: str,
                      ) -> tuple[np.ndarray, Any, np.ndarray | None, np.ndarray]:
    """Spot-encoder input, key context, positions and log1p CP10k values of every spot of ``table``."""
    check_panel_measured(table, model.panel, arg="reference")  # zero-filled genes are not measured zeros
    gin, _ = panel_expression(table, model.panel, gene_input=model.config.gene_input)
    values, _ = panel_expression(table, model.panel, gene_input="log1p_cp10k")
    pos, _ = spot_positions(data, table, model.position, bin_um=model.config.position_bin_um, table_key=table_key)
    if pos is not None:
        pos = _clip_positions(pos, model)
    ctx = tile_ids(table, int(model.config.tile_size or 4)) if model.context == "tile" else "self"
    return gin, ctx, pos, values


# --- prediction (tl.predict_expression dispatches MclSTExp models here) ------------------------------------
def predict_mclstexp(query: Any, q_table: Any, reference: Any, r_table: Any, *, model: MclSTExp, k: int,
                     weighting: str, temperature: float, features_key: str | None, device: str | None,
                     table_key: str, reference_table_key: str, reference_features_key: str | None = None,
                     **_: Any,
                     ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]]:
    """MclSTExp's expression prediction: query image embeddings retrieve reference spots by their keys.

    The keys are the reference spots' spot-encoder embeddings (:func:`spot_keys`), their image
    embeddings, or both (``config["keys"]``); a fine-tuned model embeds the query's patches, a
    frozen one its backbone features. Every member of an ensemble retrieves; the prediction is
    their mean, ``"sd"`` the predictive standard deviation, and ``"lower"`` / ``"upper"`` the
    conformal interval of a calibrated model.
    """
    if reference is None:
        raise ValueError("`reference` is required for mclSTExp retrieval: the annotated spots (e.g. the training "
                         "SpatialData) whose expression is retrieved.")
    if model.finetuned:
        if not is_spatialdata(query):
            raise TypeError("`query` must be a SpatialData with images: this mclSTExp model fine-tuned its image "
                            f"encoder and embeds patches, got {type(query).__name__}.")
        src = make_patches(query, table_key=table_key, patch_px=int(model.config.patch_px))
        if len(src) != q_table.n_obs:
            raise ValueError(f"Only {len(src)} of the {q_table.n_obs} query spots have a patch.")
        q = np.empty((q_table.n_obs, int(model.config.out_dim)), np.float32)
        q[src.rows] = model.embed_patches(src, device=device)
        fq, queries = None, [q]
    else:
        _, fq = resolve_features(query, q_table, features_key=features_key, backbone=model.backbone,
                                 weights_sha256=model.weights_sha256, device=device, table_key=table_key,
                                 recipe=model.feature_recipe, expected=model_feature_provenance(model))
        queries = [model.embed_images(fq, member=m) for m in range(model.n_members)]
    gin, ctx, pos, values = _reference_arrays(reference, r_table, model, reference_table_key)
    if k > len(gin):
        raise ValueError(f"`k={k}` exceeds the {len(gin)} reference spots.")
    ref_feats = None
    if model.config.keys != "spot":
        _, ref_feats = resolve_features(reference, r_table, features_key=reference_features_key,
                                        backbone=model.backbone, weights_sha256=model.weights_sha256,
                                        device=device, table_key=reference_table_key,
                                        recipe=model.feature_recipe, expected=model_feature_provenance(model))
    pred, sd = _retrieve(model, fq, gin, pos, ctx, ref_feats, values, k=k, weighting=weighting,
                         temperature=temperature, queries=queries)
    info = {"n_reference": int(len(gin)), "context": model.context, "key_context":
            "tile" if model.context == "tile" else "self", "finetune": model.config.finetune,
            "keys": model.config.keys, "n_members": model.n_members}
    layers = {"sd": sd}
    if model.config.conformal:
        layers["lower"], layers["upper"] = conformal_interval(pred, sd, model.config.conformal)
        info["conformal_coverage"] = float(model.config.conformal["coverage"])
    return pred, {K.OBSM.MCLSTEXP: queries[0]}, info, layers
