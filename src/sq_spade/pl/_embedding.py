"""2-D views (UMAP) of spot embeddings, coloured by ``obs`` columns or genes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sq_spade import _constants as K
from sq_spade._deprecate import renamed_arguments
from sq_spade._docs import inject_docs
from sq_spade._logging import debug as log_debug
from sq_spade._logging import info as log_info
from sq_spade._serialize import storable
from sq_spade._settings import settings
from sq_spade._validation import check_obsm, check_positive, get_table
from sq_spade.pl._utils import (
    add_legend,
    categorical_colors,
    check_ax,
    check_fraction,
    finish,
    get_cmap,
    grid,
    natural_categories,
    new_figure,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from spatialdata import SpatialData


def _stored_umap(adata: AnnData, basis: str, params: dict[str, Any]) -> np.ndarray | None:
    """A UMAP of ``basis`` already in the table: ours (``X_umap_<basis>``, same parameters) or scanpy's."""
    key = K.umap_key(basis)
    ours = adata.uns.get(K.UNS.UMAP, {}).get(key) if isinstance(adata.uns.get(K.UNS.UMAP), Mapping) else None
    if key in adata.obsm and ours is not None and {k: ours.get(k) for k in params} == params:
        return np.asarray(adata.obsm[key], dtype=np.float64)
    # scanpy's X_umap, when its neighbours were computed on this basis with default parameters
    nb = adata.uns.get("neighbors", {})
    nb_params = nb.get("params", {}) if isinstance(nb, Mapping) else {}
    if ("X_umap" in adata.obsm and nb_params.get("use_rep") == basis and not params.get("neighbors_kwargs")
            and not params.get("umap_kwargs")):
        return np.asarray(adata.obsm["X_umap"], dtype=np.float64)
    return None


def umap_coordinates(adata: AnnData, basis: str, *, n_neighbors: int = 15, seed: int | None = None,
                     neighbors_kwargs: Mapping[str, Any] | None = None,
                     umap_kwargs: Mapping[str, Any] | None = None, store: bool = True) -> np.ndarray:
    """``(n, 2)`` UMAP of ``obsm[basis]``: reused when stored, else computed and stored.

    A ``basis`` that is already 2-D (e.g. ``"X_umap"``) is returned as is. A UMAP stored in
    ``obsm["X_umap_<basis>"]`` with the same parameters (``uns['sq_spade_umap']``), or scanpy's
    ``X_umap`` of neighbours on ``basis``, is reused. Otherwise neighbours and UMAP are computed
    by scanpy on a throw-away AnnData (the table's ``obsp`` and ``uns['neighbors']`` stay as they
    are) and, with ``store``, the UMAP is written to ``obsm["X_umap_<basis>"]``.
    """
    x = check_obsm(adata, basis, arg="basis")
    if x.shape[1] == 2:
        return x.astype(np.float64)
    seed = settings.resolve_seed(seed)
    params = {"basis": basis, "n_neighbors": int(n_neighbors), "seed": int(seed),
              "neighbors_kwargs": dict(neighbors_kwargs or {}), "umap_kwargs": dict(umap_kwargs or {})}
    stored = _stored_umap(adata, basis, params)
    if stored is not None and stored.shape == (adata.n_obs, 2):
        log_debug("reused the stored UMAP of obsm[%r]", basis)
        return stored
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"A UMAP needs at least 3 spots, `obsm[{basis!r}]` has {n}.")
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(n).astype(str)), obsm={basis: x.copy()})
    sc.pp.neighbors(tmp, use_rep=basis, n_neighbors=min(int(n_neighbors), n - 1), random_state=seed,
                    **dict(neighbors_kwargs or {}))
    sc.tl.umap(tmp, random_state=seed, **dict(umap_kwargs or {}))
    xy = np.asarray(tmp.obsm["X_umap"], dtype=np.float64)
    if store:
        key = K.umap_key(basis)
        adata.obsm[key] = xy.astype(np.float32)
        if not isinstance(adata.uns.get(K.UNS.UMAP), Mapping):
            adata.uns[K.UNS.UMAP] = {}
        adata.uns[K.UNS.UMAP][key] = storable(params)
        log_info("computed a UMAP of obsm[%r]: obsm[%r] (reused by the next pl.embedding call)", basis, key)
    return xy


def _color_values(adata: AnnData, name: str, layer: str | None) -> tuple[np.ndarray | pd.Series, bool]:
    """Values of an ``obs`` column or a gene, and whether they are categorical."""
    if name in adata.obs:
        col = adata.obs[name]
        numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
        return (col.to_numpy(dtype=np.float64) if numeric else col), not numeric
    if name in adata.var_names:
        import scipy.sparse as sp

        X = adata.X if layer is None else adata.layers[layer]
        if X is None:
            raise KeyError(f"`color={name!r}` is a gene but the table has no X; pass `layer=`.")
        v = X[:, adata.var_names.get_loc(name)]
        v = v.toarray() if sp.issparse(v) else np.asarray(v)
        return np.asarray(v, dtype=np.float64).ravel(), False
    raise KeyError(f"`color={name!r}` is neither a column of `obs` ({list(adata.obs.columns)}) nor a gene.")


@renamed_arguments(random_state="seed")
@inject_docs
def embedding(
    sdata: SpatialData | AnnData,
    *,
    basis: str = K.OBSM.SPADE,
    color: str | Sequence[str] | None = (K.OBS.SECTION,),
    table_key: str = K.TABLES.DEFAULT,
    layer: str | None = None,
    n_neighbors: int = 15,
    seed: int | None = None,
    neighbors_kwargs: Mapping[str, Any] | None = None,
    umap_kwargs: Mapping[str, Any] | None = None,
    ncols: int = 3,
    palette: Any = None,
    cmap: str | Colormap = "viridis",
    size: float | None = None,
    alpha: float = 0.9,
    legend_loc: str | None = "right margin",
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    ax: Axes | None = None,
    save: str | Path | None = None,
    dpi: float | None = None,
) -> Figure | None:
    """UMAP of a spot embedding (e.g. SPADE's ``X_spade``), one panel per colour.

    The UMAP is computed once and stored: the first call runs ``sc.pp.neighbors(use_rep=basis)``
    and ``sc.tl.umap`` on a throw-away AnnData (the table's ``obsp`` and ``uns['neighbors']``
    are untouched) and writes the layout to ``obsm["X_umap_<basis>"]`` (``"X_umap_spade"`` for
    ``"X_spade"``, parameters in ``uns['sq_spade_umap']``); later calls with the same parameters
    reuse it, as they reuse scanpy's ``X_umap`` when its neighbours were computed on ``basis``.
    A 2-D ``basis`` (``"X_umap"``) is drawn directly.

    Parameters
    ----------
    sdata
        SpatialData (its table ``table_key``) or AnnData.
    basis
        ``obsm`` key of the embedding.
    color
        ``obs`` columns (categorical: legend; numeric: colourbar) or genes; ``None``: no colour.
    %(table_key)s
    layer
        Layer for gene colours (default X).
    n_neighbors
        Neighbours of the kNN graph.
    seed
        Seed of neighbours and UMAP (deterministic layout; ``None``: ``sqs.settings.seed``).
    neighbors_kwargs, umap_kwargs
        Extra arguments of ``sc.pp.neighbors`` and ``sc.tl.umap``.
    ncols
        Panels per row.
    palette
        Category colours (dict, list or colormap name; default ``uns[f"{col}_colors"]`` when it
        fits, else tab10 / tab20).
    cmap
        Colormap of numeric colours.
    size
        Marker size in points^2 (default scales with the number of spots, like scanpy).
    alpha
        Marker opacity.
    legend_loc
        ``"right margin"``, a matplotlib legend location, or ``None``.
    figsize
        Figure size in inches.
    show, return_fig, ax, save, dpi
        As in :func:`sq_spade.pl.spatial`.

    Returns
    -------
    The Figure when ``return_fig=True``, else ``None``.

    Examples
    --------
    >>> sqs.pl.embedding(sdata, basis="X_spade", color=["section", "spade_expert"])  # doctest: +SKIP
    """
    adata = get_table(sdata, table_key, arg="sdata")
    check_positive(ncols, "ncols", integer=True)
    check_positive(n_neighbors, "n_neighbors", integer=True)
    alpha = check_fraction(alpha, "alpha")
    if size is not None:
        check_positive(size, "size")
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"`layer={layer!r}` is not a layer of the table; available: {sorted(adata.layers)}.")
    colors = [None] if color is None else [color] if isinstance(color, str) else list(color)
    if not colors:
        colors = [None]
    resolved = [None if c is None else _color_values(adata, c, layer) for c in colors]  # fail before the UMAP
    check_ax(ax, len(colors))
    xy = umap_coordinates(adata, basis, n_neighbors=n_neighbors, seed=seed,
                          neighbors_kwargs=neighbors_kwargs, umap_kwargs=umap_kwargs)
    two_d = adata.obsm[basis].shape[1] == 2
    axis_name = basis.removeprefix("X_").upper() if two_d else "UMAP"
    s = size if size is not None else float(np.clip(120000 / max(adata.n_obs, 1), 3, 200))

    if ax is None:
        nrows, nc = grid(len(colors), ncols)
        fig = new_figure(figsize or (nc * 4.6, nrows * 3.8), dpi=dpi)
        axes = list(fig.subplots(nrows, nc, squeeze=False).ravel())
        for a in axes[len(colors):]:
            a.remove()
        owns = True
    else:
        fig, axes, owns = ax.figure, [ax], False
    for a, name, res in zip(axes, colors, resolved, strict=False):
        _scatter(a, fig, xy, name, res, adata=adata, palette=palette, cmap=cmap, s=s, alpha=alpha,
                 legend_loc=legend_loc)
        a.set_xlabel(f"{axis_name}1")
        a.set_ylabel(f"{axis_name}2")
        a.set_xticks([])
        a.set_yticks([])
        a.set_title(name if name is not None else basis)
    return finish(fig, show=show, save=save, return_fig=return_fig, dpi=dpi, owns_figure=owns)


def _scatter(ax: Axes, fig: Figure, xy: np.ndarray, name: str | None, res: Any, *, adata: AnnData,
             palette: Any, cmap: Any, s: float, alpha: float, legend_loc: str | None) -> None:
    if res is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=s, c="0.4", alpha=alpha, linewidths=0)
        return
    values, categorical = res
    if categorical:
        cats = natural_categories(values)
        cols = categorical_colors(cats, palette, uns_colors=adata.uns.get(f"{name}_colors"))
        strs = pd.Series(values).astype(object)
        face = np.array([cols.get(str(v), (0.8, 0.8, 0.8, 1.0)) if pd.notna(v) else (0.8, 0.8, 0.8, 1.0)
                         for v in strs])
        ax.scatter(xy[:, 0], xy[:, 1], s=s, c=face, alpha=alpha, linewidths=0, plotnonfinite=True)
        add_legend(ax, cols, title=None, loc=legend_loc)
        return
    # high values on top, as in scanpy, so small hot spots stay visible
    order = np.argsort(np.where(np.isfinite(values), values, -np.inf), kind="stable")
    cm = get_cmap(cmap, bad=(0.8, 0.8, 0.8, 1.0))
    sc = ax.scatter(xy[order, 0], xy[order, 1], s=s, c=values[order], cmap=cm, alpha=alpha, linewidths=0,
                    plotnonfinite=True)
    fig.colorbar(sc, ax=ax, shrink=0.8, aspect=25)
