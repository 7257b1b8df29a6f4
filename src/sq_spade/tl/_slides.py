"""One vector per slide from its tile embeddings, and per-slide bags for MIL tooling.

SPADE's downstream slide-level tasks (few-shot, multiple-instance learning) consume a slide as
a bag of tile embeddings. :func:`slide_embedding` pools a table's per-tile ``obsm`` key into one
vector per section (mean, optionally with quantiles) and, with ``bags_dir``, writes each
section's bag as an HDF5 file in the layout CLAM's feature-extraction step writes and its MIL
datasets read: dataset ``features`` ``(n_tiles, dim)`` float32 and dataset ``coords``
``(n_tiles, 2)`` int64 (x, y of each tile's top-left corner in level-0 pixels).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sq_spade import _constants as K
from sq_spade._utils import atomic_path
from sq_spade._validation import check_choice, get_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def export_bag(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray, *,
               attrs: dict | None = None) -> Path:
    """Write one bag: HDF5 datasets ``features`` (float32) and ``coords`` (int64), CLAM's layout."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.asarray(features, dtype=np.float32))
        dset = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for k, v in (attrs or {}).items():
            dset.attrs[k] = v
    return path


def slide_embedding(
    sdata: SpatialData | AnnData,
    *,
    key: str,
    pooling: K.Pooling = "mean",
    quantiles: Sequence[float] = (0.25, 0.5, 0.75),
    bags_dir: str | os.PathLike | None = None,
    tiles_key: str = K.TABLES.TILES,
) -> pd.DataFrame:
    """Pool the per-tile embeddings ``obsm[key]`` into one vector per section.

    Parameters
    ----------
    sdata
        A SpatialData (its table ``tiles_key``, by default the tiles of
        :func:`sq_spade.pp.tile_tissue`) or an AnnData, with ``obs['section']``.
    key
        ``obsm`` key of the tile embeddings (e.g. ``"X_spade"`` from :func:`embed`, or
        ``"X_efficientnet_lite0"`` from :func:`sq_spade.pp.compute_features`).
    pooling
        ``"mean"``; ``"quantiles"`` (the mean, then each of ``quantiles``, concatenated); or
        ``"attention-ready"``: the mean, and each section's bag of tile embeddings written to
        ``bags_dir`` for attention-based MIL (ABMIL, CLAM).
    quantiles
        Quantiles of ``pooling="quantiles"``.
    bags_dir
        Folder of the per-section bags ``f"{section}.h5"`` (required by
        ``"attention-ready"``, optional otherwise).
    tiles_key
        Table of the tiles in ``sdata`` when it is a SpatialData (default ``"tiles"``, the one
        :func:`sq_spade.pp.tile_tissue` writes; ``"table"`` for spots).

    Returns
    -------
    A DataFrame, sections x pooled dimensions. It is also stored in
    ``uns['sq_spade_slides'][key]`` (``sections``, ``vectors``, ``pooling``, ``n_tiles`` and the
    bag paths): where a slide-level task finds it next to the tiles.

    Examples
    --------
    >>> sd = sqs.datasets.synthetic_section()
    >>> sd.tables["table"].obsm["X_demo"] = np.random.default_rng(0).normal(size=(64, 4))
    >>> sqs.tl.slide_embedding(sd, key="X_demo", tiles_key="table").shape
    (1, 4)
    """
    adata = get_table(sdata, tiles_key, arg="sdata")
    check_choice(pooling, "pooling", K.POOLINGS)
    if key not in adata.obsm:
        raise KeyError(f"`key={key!r}` is not in `obsm` of table {tiles_key!r}; expected one of {list(adata.obsm)}.")
    if K.OBS.SECTION not in adata.obs:
        raise ValueError(f"Table {tiles_key!r} has no `obs[{K.OBS.SECTION!r}]`: sections are unknown.")
    q = [float(v) for v in quantiles]
    if pooling == "quantiles" and (not q or any(not 0.0 <= v <= 1.0 for v in q)):
        raise ValueError(f"`quantiles` must be numbers in [0, 1], got {list(quantiles)!r}.")
    if pooling == "attention-ready" and bags_dir is None:
        raise ValueError("`pooling='attention-ready'` writes the bags: pass `bags_dir`.")
    x = np.asarray(adata.obsm[key], dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"`obsm[{key!r}]` must be a finite (n_obs, dim) array, got shape {x.shape}.")
    sections = adata.obs[K.OBS.SECTION].astype(str).to_numpy()
    names = list(dict.fromkeys(sections))
    dim = x.shape[1]
    cols = [f"mean_{j}" for j in range(dim)]
    if pooling == "quantiles":
        cols += [f"q{v:g}_{j}" for v in q for j in range(dim)]
    vectors, n_tiles = [], []
    for s in names:
        xs = x[sections == s]
        parts = [xs.mean(0)]
        if pooling == "quantiles":
            parts += list(np.quantile(xs, q, axis=0))
        vectors.append(np.concatenate(parts))
        n_tiles.append(len(xs))
    bags = {}
    if bags_dir is not None:
        xy = np.asarray(adata.obsm[K.OBSM.SPATIAL], dtype=np.float64) if K.OBSM.SPATIAL in adata.obsm else None
        if xy is None:
            raise ValueError(f"Bags record each tile's position: table {tiles_key!r} has no `obsm['spatial']`.")
        meta = adata.uns.get(K.UNS.SECTIONS, {})
        tile_um = adata.uns.get(K.UNS.TILES, {}).get("tile_um")
        for s in names:
            sel = sections == s
            attrs = {"section": s}
            side_px = 0.0
            if tile_um is not None and s in meta:
                side_px = float(tile_um) / float(meta[s]["microns_per_pixel"])
                attrs.update(patch_size=int(round(side_px)), patch_level=0, tile_um=float(tile_um))
            corners = np.floor(xy[sel] - side_px / 2)
            bags[s] = str(export_bag(Path(bags_dir) / f"{s}.h5", x[sel].astype(np.float32), corners, attrs=attrs))
    df = pd.DataFrame(np.vstack(vectors), index=pd.Index(names, name=K.OBS.SECTION), columns=cols)
    adata.uns.setdefault(K.UNS.SLIDES, {})[key] = {
        "sections": names, "vectors": df.to_numpy(), "columns": cols, "pooling": pooling,
        "n_tiles": n_tiles, "bags": bags}
    return df
