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
from sq_spade._serialize import storable, to_jsonable
from sq_spade._settings import settings
from sq_spade._validation import check_choice, check_positive, get_table, is_spatialdata
from sq_spade._version import __version__
from sq_spade.models._mclstexp import MclSTExp
from sq_spade.pp._genes import panel_expression
from sq_spade.pp._patches import patches as make_patches
from sq_spade.pp._positions import spot_positions, tile_ids
from sq_spade.tl._baselines import train_baseline
from sq_spade.tl._common import (
    comparable_provenance,
    features_provenance,
    model_feature_provenance,
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
              batch_size: int = 4096) -> np.ndarray:
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
    return model.embed_spots(gin, pos, ctx, batch_size=batch_size)


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
    epochs: int = 90,
    batch_size: int = 128,
    lr: float = 1e-4,
    weight_decay: float = 1e-3,
    temperature: float = 1.0,
    loss: K.Loss = "clip",
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
    seed: int = 0,
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
    epochs, batch_size, lr, weight_decay
        mclSTExp: 90, 128, 1e-4, 1e-3 (Adam).
    temperature, loss
        Contrastive loss: ``"clip"`` (identity targets, mclSTExp) or ``"bleep"``; temperature 1.
    position
        ``"grid"``, ``"pixel"`` or ``None`` (see above).
    context
        ``"self"``, ``"batch"`` or ``"tile"`` (see above).
    tile_size
        Side of a tile in array-grid units (``context="tile"``).
    gene_input
        Spot-encoder input: ``"log1p_cp10k"`` or ``"raw"`` counts of the panel genes.
    out_dim, dropout, depth, heads, dim_head, mlp_dim
        Latent size, head dropout and spot-encoder transformer (2 blocks, 8 heads of 64, MLP
        width = number of genes).
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
        Patch side in native pixels when fine-tuning.
    %(checkpoints)s
    distributed
        mclSTExp under ``torchrun --nproc_per_node=N``: ``"auto"`` trains with
        DistributedDataParallel (each process encodes its part of every batch; the same weights
        as one process, see :func:`sq_spade.train.fit_contrastive`), ``False`` trains alone in
        every process. Every process returns the same model and fills its own table; only
        rank 0 writes files (:meth:`~sq_spade.models.MclSTExp.save`, the feature cache).

    Returns
    -------
    The :class:`~sq_spade.models.MclSTExp` (the deprecated methods: a
    :class:`~sq_spade.models.RidgeModel` or :class:`~sq_spade.models.KNNModel`). The table gains
    ``obsm[key_added]`` (image embeddings, ``out_dim``-d) and ``uns['mclstexp']`` (parameters,
    history, backbone and weights hash, sections), written only once everything succeeded.
    Frozen features missing from ``obsm`` are computed into it first (as
    :func:`sq_spade.pp.compute_features` does).

    Examples
    --------
    >>> sd = sqs.io.combine_sections([sqs.datasets.her2st(s) for s in ("C2", "C3", "C4")])  # doctest: +SKIP
    >>> model = sqs.tl.train_contrastive(sd, train_sections=["C2", "C3"], validation_sections=["C4"])  # doctest: +SKIP
    """
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
    if finetune == "none":
        fkey, feats = resolve_features(sdata, table, features_key=features_key, backbone=backbone, weights=weights,
                                       device=device, table_key=table_key)
        prov = features_provenance(table, fkey)
        if va.any():
            val_kw["val_features"] = feats[va]
        fit = fit_contrastive(feats[tr], gin[tr], None if pos is None else pos[tr], ctx_tr, **val_kw, **common)
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
    hist = to_jsonable(dict(fit.history), nonfinite="null")
    n_x, n_y = fit.history.get("n_x"), fit.history.get("n_y")
    config = {
        "backbone": prov.get("backbone", backbone), "weights_sha256": prov.get("weights_sha256"),
        "feature_dim": feature_dim, "panel": list(genes_list), "gene_input": gene_input,
        "position": position, "n_x": None if n_x is None else int(n_x), "n_y": None if n_y is None else int(n_y),
        "position_bin_um": bin_um, "context": context, "tile_size": int(tile_size), "out_dim": int(out_dim),
        "dropout": float(dropout), "spot_encoder": fit.spot_encoder.config(), "finetune": finetune,
        "patch_px": int(patch_px) if finetune != "none" else None, "input_size": input_size,
        "train_sections": train, "validation_sections": val, "history": hist,
        "params": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "loss": loss,
                   "temperature": temperature, "seed": seed, "patience": patience, "schedule": schedule,
                   "features_key": fkey, "n_top": n_top, "augment": bool(augment) if finetune != "none" else None,
                   "finetuned_parameters": (trained if isinstance(trained, list) else finetune)
                   if finetune != "none" else None,
                   K.FEATURE_PROVENANCE_PARAM: comparable_provenance(prov or None) if finetune == "none" else None},
    }
    model = MclSTExp(fit.image_head, fit.spot_encoder, config, image_encoder=fit.image_encoder)
    if finetune == "none":
        emb = model.embed_images(feats)
    else:
        emb = np.full((table.n_obs, int(out_dim)), np.nan, np.float32)
        emb[patch_src.rows] = model.embed_patches(patch_src, device=device, num_workers=num_workers)
    # write results only once everything has succeeded
    table.obsm[key_added] = emb
    table.uns[K.UNS.MCLSTEXP] = storable({k: v for k, v in model.config.items() if k not in ("panel",)} | {
        "n_panel_genes": len(genes_list), "embedding_key": key_added, "sq_spade_version": __version__})
    return model


# --- prediction (tl.predict_expression dispatches MclSTExp models here) ------------------------------------
def predict_mclstexp(query: Any, q_table: Any, reference: Any, r_table: Any, *, model: MclSTExp, k: int,
                     weighting: str, temperature: float, features_key: str | None, device: str | None,
                     table_key: str, reference_table_key: str, **_: Any,
                     ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """MclSTExp's expression prediction: query image embeddings retrieve reference spots by their keys.

    The keys are the reference spots' spot-encoder embeddings (:func:`spot_keys`); a fine-tuned
    model embeds the query's patches, a frozen one its backbone features.
    """
    from sq_spade.nn.retrieval import retrieve_predict

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
    else:
        _, fq = resolve_features(query, q_table, features_key=features_key, backbone=model.backbone,
                                 expected=model_feature_provenance(model),
                                 weights_sha256=model.weights_sha256, device=device, table_key=table_key)
        q = model.embed_images(fq)
    keys = spot_keys(reference, model, table_key=reference_table_key)
    values, _ = panel_expression(r_table, model.panel, gene_input="log1p_cp10k")
    if k > len(keys):
        raise ValueError(f"`k={k}` exceeds the {len(keys)} reference spots.")
    pred = retrieve_predict(q, keys, values, k=k, weighting=weighting, temperature=temperature)
    info = {"n_reference": int(len(keys)), "context": model.context, "key_context":
            "tile" if model.context == "tile" else "self", "finetune": model.config.finetune}
    return pred, {K.OBSM.MCLSTEXP: q}, info
