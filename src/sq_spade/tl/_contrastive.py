"""mclSTExp and the reference methods (ridge, k-NN) in the ``tl`` API: ``train_contrastive``.

Importing this module registers how :func:`sq_spade.tl.predict_expression` handles
:class:`~sq_spade.models.MclSTExp`, :class:`~sq_spade.models.RidgeModel` and
:class:`~sq_spade.models.KNNModel`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
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
from sq_spade.tl._common import (
    panel_expression,
    resolve_features,
    rows_of,
    split_sections,
    storable,
)
from sq_spade.tl._experts import _resolve_panel
from sq_spade.tl._predict import register_predictor

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from sq_spade.models import KNNModel, MclSTExp, RidgeModel

#: ``uns`` key of :func:`train_contrastive`'s provenance.
MCLSTEXP_UNS = "mclstexp"
METHODS = ("mclstexp", "ridge", "knn")


# --- positions and attention contexts -----------------------------------------------------------
def _array_coords(table: Any, what: str) -> np.ndarray:
    """``obs[['array_col', 'array_row']]`` as int64 ``(N, 2)`` (x, y)."""
    missing = [c for c in (K.ARRAY_COL, K.ARRAY_ROW) if c not in table.obs]
    if missing:
        raise KeyError(f"{what} needs the obs columns {K.ARRAY_COL!r} and {K.ARRAY_ROW!r} (array grid coordinates); "
                       f"missing {missing}. Available: {list(table.obs.columns)}.")
    xy = table.obs[[K.ARRAY_COL, K.ARRAY_ROW]].to_numpy(dtype=np.float64)
    if not np.isfinite(xy).all():
        raise ValueError(f"{what}: obs {K.ARRAY_COL!r}/{K.ARRAY_ROW!r} contain missing values.")
    return np.floor(xy).astype(np.int64)


def _centres_um(data: Any, table: Any, table_key: str) -> np.ndarray:
    """Spot centres (x, y) in micrometres, from the shapes (SpatialData) or ``obsm['spatial']``."""
    out = np.full((table.n_obs, 2), np.nan)
    if is_spatialdata(data):
        from sq_spade.io._sections import get_sections, spot_centers_um

        for sec in get_sections(data, table_key=table_key):
            out[sec.rows] = spot_centers_um(data, sec, table_key=table_key)[0]
    else:
        if "spatial" not in table.obsm:
            raise KeyError("`position='pixel'` needs spot centres: `obsm['spatial']` (pixels) is missing.")
        meta = table.uns.get("sq_spade_sections", {})
        labels = section_labels(table)
        xy = np.asarray(table.obsm["spatial"], dtype=np.float64)
        for s in dict.fromkeys(labels):
            mpp = meta.get(s, {}).get("microns_per_pixel")
            if mpp is None:
                raise KeyError(f"`position='pixel'`: the pixel size of section {s!r} is unknown "
                               "(`uns['sq_spade_sections'][section]['microns_per_pixel']`); pass the SpatialData.")
            out[labels == s] = xy[labels == s] * float(mpp)
    if not np.isfinite(out).all():
        raise ValueError("`position='pixel'`: some spots have no centre.")
    return out


def _spot_pitch_um(xy_um: np.ndarray, labels: np.ndarray) -> float:
    """Median distance from each spot to its nearest neighbour in the same section."""
    from scipy.spatial import cKDTree

    d = []
    for s in dict.fromkeys(labels):
        pts = xy_um[labels == s]
        if len(pts) >= 2:
            d.append(cKDTree(pts).query(pts, k=2)[0][:, 1])
    d = np.concatenate(d) if d else np.zeros(0)
    d = d[d > 0]
    if not len(d):
        raise ValueError("`position='pixel'` needs at least two distinct spot centres in a training section "
                         "to measure the spot pitch.")
    return float(np.median(d))


def spot_positions(data: Any, table: Any, mode: str | None, *, bin_um: float | None = None,
                   rows: np.ndarray | None = None, table_key: str = K.TABLE_KEY) -> tuple[np.ndarray | None, float | None]:
    """Integer positions ``(N, 2)`` of every spot for the spot encoder, and the pixel bin.

    ``"grid"``: ``obs`` array_col / array_row minus each section's minimum. ``"pixel"``: spot
    centres in micrometres minus each section's minimum, divided by ``bin_um`` and rounded
    (``bin_um=None``: the spot pitch, the median nearest-neighbour distance over ``rows``).
    ``None``: no positions.
    """
    if mode is None:
        return None, None
    labels = section_labels(table)
    if mode == "grid":
        xy = _array_coords(table, "`position='grid'`").astype(np.float64)
        step = 1.0
    else:
        xy = _centres_um(data, table, table_key)
        if bin_um is None:
            sel = np.ones(table.n_obs, bool) if rows is None else rows
            bin_um = _spot_pitch_um(xy[sel], labels[sel])
        step = float(bin_um)
    out = np.zeros(xy.shape, np.int64)
    for s in dict.fromkeys(labels):
        m = labels == s
        out[m] = np.floor((xy[m] - xy[m].min(0)) / step + 0.5).astype(np.int64)
    return out, (None if mode == "grid" else float(bin_um))


def tile_ids(table: Any, tile_size: int = 4) -> np.ndarray:
    """Tile id of every spot: section and ``floor(array coordinates / tile_size)``, as int64."""
    xy = _array_coords(table, "`context='tile'`") // int(tile_size)
    keys = pd.Series(section_labels(table)).astype(str) + "|" + pd.Series(xy[:, 0]).astype(str) + "|" + \
        pd.Series(xy[:, 1]).astype(str)
    return pd.factorize(keys)[0].astype(np.int64)


def _clip_positions(pos: np.ndarray, model: MclSTExp) -> np.ndarray:
    n_x, n_y = int(model.config["n_x"]), int(model.config["n_y"])
    over = (pos[:, 0] >= n_x) | (pos[:, 1] >= n_y)
    if over.any():
        warnings.warn(f"{int(over.sum())} reference spots lie beyond the position tables the model learnt "
                      f"({n_x} x {n_y}); they take the last row of each table.", UserWarning, stacklevel=3)
        pos = np.column_stack([np.minimum(pos[:, 0], n_x - 1), np.minimum(pos[:, 1], n_y - 1)])
    return pos


def spot_keys(data: Any, model: MclSTExp, *, table_key: str = K.TABLE_KEY,
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
    gin, _ = panel_expression(table, model.panel, gene_input=model.config["gene_input"])
    pos, _ = spot_positions(data, table, model.position, bin_um=model.config.get("position_bin_um"),
                            table_key=table_key)
    if pos is not None:
        pos = _clip_positions(pos, model)
    ctx = tile_ids(table, int(model.config.get("tile_size") or 4)) if model.context == "tile" else "self"
    return model.embed_spots(gin, pos, ctx, batch_size=batch_size)


# --- training -------------------------------------------------------------------------------------
def last_block_prefixes(encoder: Any) -> list[str]:
    """Parameter-name prefixes of an encoder's last block (what ``finetune="last"`` trains).

    Wrappers with a single child holding parameters are descended (a registry backbone wraps
    its network in ``.model``); at the first level with several, the last element of the last
    container of blocks (``Sequential`` / ``ModuleList`` / ``ModuleDict``) and every child with
    parameters after it are chosen: EfficientNet's last stage + ``conv_head`` + ``bn2``, ResNet's
    ``layer4[-1]``, DenseNet's last dense layer + ``norm5``, a ViT's last block + final norm.
    Without such a container, the last child with parameters.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.LayerNorm(4))
    >>> last_block_prefixes(net)
    ['1.1.', '2.']
    """
    from torch import nn

    def has_params(m: Any) -> bool:
        return any(True for _ in m.parameters())

    prefix, m = "", encoder
    while True:
        kids = [(n, c) for n, c in m.named_children() if has_params(c)]
        if len(kids) == 1 and not any(True for _ in m.parameters(recurse=False)):
            prefix, m = f"{prefix}{kids[0][0]}.", kids[0][1]
            continue
        break
    if not kids:
        return [prefix]
    containers = [i for i, (_, c) in enumerate(kids) if isinstance(c, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
                  and sum(has_params(g) for g in c.children()) >= 2]
    if not containers:
        return [f"{prefix}{kids[-1][0]}."]
    i = containers[-1]
    name, cont = kids[i]
    sub = [n for n, g in cont.named_children() if has_params(g)][-1]
    return [f"{prefix}{name}.{sub}."] + [f"{prefix}{n}." for n, _ in kids[i + 1:]]


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


def train_contrastive(
    sdata: SpatialData | AnnData,
    *,
    method: str = "mclstexp",
    features_key: str | None = None,
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    panel: str | Sequence[str] | None = None,
    n_top: int = 50,
    finetune: str = "none",
    epochs: int = 90,
    batch_size: int = 128,
    lr: float = 1e-4,
    weight_decay: float = 1e-3,
    temperature: float = 1.0,
    loss: str = "clip",
    position: str | None = "grid",
    context: str = "self",
    tile_size: int = 4,
    gene_input: str = "log1p_cp10k",
    out_dim: int = 256,
    dropout: float = 0.1,
    depth: int = 2,
    heads: int = 8,
    dim_head: int = 64,
    mlp_dim: int | None = None,
    schedule: str = "constant",
    augment: bool = True,
    num_workers: int = 0,
    regressor_kwargs: Mapping[str, Any] | None = None,
    train_sections: Sequence[str] | str | None = None,
    validation_sections: Sequence[str] | str | None = None,
    patience: int | None = 10,
    seed: int = 0,
    device: str | None = None,
    table_key: str = K.TABLE_KEY,
    key_added: str = K.MCLSTEXP_KEY,
    patch_px: int = 224,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool | str | os.PathLike = False,
    distributed: bool | str = "auto",
) -> MclSTExp | RidgeModel | KNNModel:
    """Train mclSTExp (contrastive image and spot encoders) or a reference regressor.

    ``method="mclstexp"``: an image projection head (and, with ``finetune``, the image encoder)
    and a spot encoder (panel expression + learned position embeddings + a transformer over a
    set of spots) trained with a contrastive loss so that a spot's image and expression embed
    close together; expression of new spots is then predicted by retrieval
    (:func:`sq_spade.tl.predict_expression` with a ``reference``). ``"ridge"``: PCA + ridge
    regression on frozen features (HEST-Benchmark's baseline); ``"knn"``: the mean expression
    of the most similar training spots in the frozen feature space (BLEEP's inference without
    training). Both choose their hyper-parameter by leave-one-section-out cross-validation over
    the training sections.

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
        ``"mclstexp"``, ``"ridge"`` or ``"knn"``.
    features_key
        ``obsm`` key of frozen features (default ``"X_<backbone>"``, computed when absent).
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
        Parameters of :class:`~sq_spade.tl._reference.RidgeRegressor` (``n_components``,
        ``alphas``...) or :class:`~sq_spade.tl._reference.KNNRegressor` (``k``, ``k_grid``...).
    train_sections, validation_sections
        Sections to train on (default: all but validation) and to validate on (early stopping
        for mclSTExp; scores recorded in ``params['validation']`` for ridge and k-NN).
    patience
        Early-stopping patience in epochs (with validation sections); the best epoch is kept.
    seed
        Seeds initialisation, batching and augmentation.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` (default ``settings.device``).
    table_key
        Table of a SpatialData.
    key_added
        ``obsm`` key of the mclSTExp image embeddings of every spot.
    patch_px
        Patch side in native pixels when fine-tuning.
    checkpoint_dir, checkpoint_every, resume
        mclSTExp only: checkpoints of the training every ``checkpoint_every`` epochs into the
        folder ``checkpoint_dir`` (with ``finetune``, the encoder's trained parameters too), and
        resuming from one (``resume=True``: from ``checkpoint_dir`` when it holds one, else a
        fresh start); see :func:`sq_spade.train.fit_contrastive`. On the same device, a resumed
        run gives exactly the model of an uninterrupted one; data, panel and arguments must be
        the same (a ValueError says what differs).
    distributed
        mclSTExp under ``torchrun --nproc_per_node=N``: ``"auto"`` trains with
        DistributedDataParallel (each process encodes its part of every batch; the same weights
        as one process, see :func:`sq_spade.train.fit_contrastive`), ``False`` trains alone in
        every process. Every process returns the same model and fills its own table; only
        rank 0 writes files (:meth:`~sq_spade.models.MclSTExp.save`, the feature cache).

    Returns
    -------
    :class:`~sq_spade.models.MclSTExp`, :class:`~sq_spade.models.RidgeModel` or
    :class:`~sq_spade.models.KNNModel`. For mclSTExp the table gains ``obsm[key_added]``
    (image embeddings, ``out_dim``-d) and ``uns['mclstexp']`` (parameters, history, backbone
    and weights hash, sections), written only once everything succeeded. Ridge and k-NN leave
    the table as it is. Frozen features missing from ``obsm`` are computed into it first
    (as :func:`sq_spade.pp.compute_features` does).

    Examples
    --------
    >>> sd = sqs.io.combine_sections([sqs.datasets.her2st(s) for s in ("C2", "C3", "C4")])  # doctest: +SKIP
    >>> model = sqs.tl.train_contrastive(sd, train_sections=["C2", "C3"], validation_sections=["C4"])  # doctest: +SKIP
    >>> ridge = sqs.tl.train_contrastive(sd, method="ridge", train_sections=["C2", "C3"])  # doctest: +SKIP
    """
    import sq_spade
    from sq_spade.train._common import history_to_json

    table = get_table(sdata, table_key)
    check_choice(method, "method", METHODS)
    check_choice(finetune, "finetune", ["none", "last", "all"])
    check_choice(loss, "loss", ["clip", "bleep"])
    check_choice(position, "position", ["grid", "pixel", None])
    check_choice(context, "context", ["self", "batch", "tile"])
    check_choice(gene_input, "gene_input", ["log1p_cp10k", "raw"])
    check_choice(schedule, "schedule", ["constant", "cosine"])
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("n_top", n_top), ("out_dim", out_dim),
                    ("tile_size", tile_size), ("patch_px", patch_px)):
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
    train, val = split_sections(table, train_sections, validation_sections)
    genes_list = _resolve_panel(table, panel, n_top, train)
    tr, va = rows_of(table, train), rows_of(table, val)
    if tr.sum() < 2:
        raise ValueError(f"Training sections {train} have {int(tr.sum())} spots; at least 2 are needed.")
    values, _ = panel_expression(table, genes_list, gene_input="log1p_cp10k")

    if method in ("ridge", "knn"):
        return _train_reference(sdata, table, method=method, features_key=features_key, backbone=backbone,
                                weights=weights, panel=genes_list, values=values, tr=tr, va=va, train=train,
                                val=val, regressor_kwargs=regressor_kwargs, seed=seed, device=device,
                                table_key=table_key, n_top=n_top)

    from sq_spade.models._mclstexp import MclSTExp, resize_preprocess
    from sq_spade.train._contrastive import fit_contrastive

    gin = values if gene_input == "log1p_cp10k" else panel_expression(table, genes_list, gene_input="raw")[0]
    pos, bin_um = spot_positions(sdata, table, position, rows=tr, table_key=table_key)
    if context == "tile":
        groups = tile_ids(table, tile_size)
        ctx_tr, ctx_va = groups[tr], groups[va]
    else:
        ctx_tr = ctx_va = "self" if context == "self" else None
    dev = device or sq_spade.settings.device
    common = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, loss=loss,
                  temperature=temperature, out_dim=out_dim, dropout=dropout, depth=depth, heads=heads,
                  dim_head=dim_head, mlp_dim=mlp_dim, schedule=schedule, patience=patience, seed=seed,
                  device=dev, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
                  distributed=distributed)
    val_kw: dict[str, Any] = {}
    if va.any():
        val_kw = dict(val_expr=gin[va], val_pos=None if pos is None else pos[va],
                      val_context=ctx_va if context == "tile" else None)
    fkey, feats, prov, encoder, patch_src, trained = None, None, {}, None, None, None
    if finetune == "none":
        fkey, feats = resolve_features(sdata, table, features_key=features_key, backbone=backbone, weights=weights,
                                       device=device, table_key=table_key)
        prov = table.uns.get(K.FEATURES_UNS, {}).get(fkey, {})
        if va.any():
            val_kw["val_features"] = feats[va]
        fit = fit_contrastive(feats[tr], gin[tr], None if pos is None else pos[tr], ctx_tr, **val_kw, **common)
        feature_dim = int(feats.shape[1])
        input_size = None
    else:
        from sq_spade.nn.backbones import get_backbone
        from sq_spade.pp._patches import patches as make_patches

        encoder = get_backbone(backbone, weights=weights)
        patch_src = make_patches(sdata, table_key=table_key, patch_px=patch_px)
        if va.any():
            val_kw["val_images"] = _RowPatches(patch_src, np.flatnonzero(va))
        prov = {"backbone": encoder.name, "weights_sha256": encoder.weights_sha256}
        feature_dim, input_size = int(encoder.dim), int(encoder.input_size)
        # fit_contrastive's own "last" is the last top-level child: for a registry backbone that is
        # the whole wrapped network, so the last block is named explicitly
        trained: Any = finetune
        if finetune == "last" and any(True for _ in encoder.parameters()):
            trained = last_block_prefixes(encoder)
        fit = fit_contrastive(None, gin[tr], None if pos is None else pos[tr], ctx_tr,
                              images=_RowPatches(patch_src, np.flatnonzero(tr)), image_encoder=encoder,
                              finetune=trained, augment=augment, preprocess=resize_preprocess(input_size, patch_px),
                              num_workers=num_workers, **val_kw, **common)
    hist = history_to_json(fit.history)
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
                   if finetune != "none" else None},
    }
    model = MclSTExp(fit.image_head, fit.spot_encoder, config, image_encoder=fit.image_encoder)
    if finetune == "none":
        emb = model.embed_images(feats)
    else:
        emb = np.full((table.n_obs, int(out_dim)), np.nan, np.float32)
        emb[patch_src.rows] = model.embed_patches(patch_src, device=device, num_workers=num_workers)
    # write results only once everything has succeeded
    table.obsm[key_added] = emb
    table.uns[MCLSTEXP_UNS] = storable({k: v for k, v in config.items() if k not in ("panel",)} | {
        "n_panel_genes": len(genes_list), "embedding_key": key_added, "sq_spade_version": sq_spade.__version__})
    return model


def _train_reference(sdata: Any, table: Any, *, method: str, features_key: str | None, backbone: str,
                     weights: str | None, panel: list[str], values: np.ndarray, tr: np.ndarray, va: np.ndarray,
                     train: list[str], val: list[str], regressor_kwargs: Mapping[str, Any] | None, seed: int,
                     device: str | None, table_key: str, n_top: int) -> RidgeModel | KNNModel:
    from sq_spade.models._reference import KNNModel, RidgeModel
    from sq_spade.tl._metrics import expression_metrics
    from sq_spade.tl._reference import KNNRegressor, RidgeRegressor

    fkey, feats = resolve_features(sdata, table, features_key=features_key, backbone=backbone, weights=weights,
                                   device=device, table_key=table_key)
    prov = table.uns.get(K.FEATURES_UNS, {}).get(fkey, {})
    kw = dict(regressor_kwargs or {})
    reg_cls, model_cls = (RidgeRegressor, RidgeModel) if method == "ridge" else (KNNRegressor, KNNModel)
    try:
        reg = reg_cls(**kw)
    except TypeError as e:
        raise TypeError(f"`regressor_kwargs` does not fit {reg_cls.__name__}: {e}") from e
    reg.fit(feats[tr], values[tr], groups=section_labels(table)[tr])
    params: dict[str, Any] = {"method": method, "features_key": fkey, "seed": seed, "n_top": n_top,
                              "regressor_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}}
    config = {"backbone": prov.get("backbone", backbone), "weights_sha256": prov.get("weights_sha256"),
              "feature_dim": int(feats.shape[1]), "panel": list(panel), "regressor": {},
              "train_sections": train, "validation_sections": val, "params": params}
    config["regressor"] = reg.to_state()[1]
    model = model_cls(reg, config)
    if va.any():
        summary, _ = expression_metrics(model.predict(feats[va]), values[va])
        params["validation"] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                                for k, v in summary.items()}
    return model


# --- prediction -------------------------------------------------------------------------------------
@register_predictor("MclSTExp")
def _predict_mclstexp(query: Any, q_table: Any, reference: Any, r_table: Any, *, model: Any, k: int, weighting: str,
                      temperature: float, features_key: str | None, reference_features_key: str | None,
                      device: str | None, table_key: str, reference_table_key: str, **_: Any):
    from sq_spade.tl._retrieval import retrieve_predict

    if reference is None:
        raise ValueError("`reference` is required for mclSTExp retrieval: the annotated spots (e.g. the training "
                         "SpatialData) whose expression is retrieved.")
    if model.finetuned:
        if not is_spatialdata(query):
            raise TypeError("`query` must be a SpatialData with images: this mclSTExp model fine-tuned its image "
                            f"encoder and embeds patches, got {type(query).__name__}.")
        from sq_spade.pp._patches import patches as make_patches

        src = make_patches(query, table_key=table_key, patch_px=int(model.config["patch_px"]))
        if len(src) != q_table.n_obs:
            raise ValueError(f"Only {len(src)} of the {q_table.n_obs} query spots have a patch.")
        q = np.empty((q_table.n_obs, int(model.config["out_dim"])), np.float32)
        q[src.rows] = model.embed_patches(src, device=device)
    else:
        _, fq = resolve_features(query, q_table, features_key=features_key, backbone=model.backbone,
                                 weights_sha256=model.config.get("weights_sha256"), device=device, table_key=table_key)
        q = model.embed_images(fq)
    keys = spot_keys(reference, model, table_key=reference_table_key)
    values, _ = panel_expression(r_table, model.panel, gene_input="log1p_cp10k")
    if k > len(keys):
        raise ValueError(f"`k={k}` exceeds the {len(keys)} reference spots.")
    pred = retrieve_predict(q, keys, values, k=k, weighting=weighting, temperature=temperature)
    info = {"n_reference": int(len(keys)), "context": model.context, "key_context":
            "tile" if model.context == "tile" else "self", "finetune": model.config["finetune"]}
    return pred, {K.MCLSTEXP_KEY: q}, info


def _predict_regressor(query: Any, q_table: Any, reference: Any, r_table: Any, *, model: Any, features_key: str | None,
                       device: str | None, table_key: str, **_: Any):
    # the regressors carry what they learnt: a reference, if given, is not used
    _, fq = resolve_features(query, q_table, features_key=features_key, backbone=model.backbone,
                             weights_sha256=model.weights_sha256, device=device, table_key=table_key)
    return model.predict(fq), {}, {"reference_used": False}


register_predictor("RidgeModel")(_predict_regressor)
register_predictor("KNNModel")(_predict_regressor)
