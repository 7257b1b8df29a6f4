"""Expression and experts on the H&E image, in the micrometre coordinates of one section."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sq_spade import _constants as K
from sq_spade._deprecate import renamed_arguments
from sq_spade._validation import check_choice, check_positive, get_table, is_spatialdata
from sq_spade.io._sections import Section, affine_to, get_sections, image_levels, spot_centers_um
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
    resolve_limit,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.collections import EllipseCollection
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

#: The coarsest pyramid level with at least this many pixels across the crop is drawn: sharp
#: enough for a figure panel, and a full-resolution level (often > 10,000 px) is never read.
_TARGET_PX = 1000
_PANEL_WIDTH = 3.2  # inches per panel
_BAD_COLOR = (0.75, 0.75, 0.75, 0.6)


# ----------------------------------------------------------------------------------------------
# the section's geometry and image


@dataclass
class _Canvas:
    """Everything a panel of one section needs, in micrometres."""

    sec: Section
    xy: np.ndarray  # (n, 2) spot centres, table row order of the section
    diameter: np.ndarray  # (n,) drawn spot diameters
    bounds: tuple[float, float, float, float]  # x0, x1, y0, y1 of the view
    image: np.ndarray | None = None  # (h, w, 3) or (h, w)
    extent: tuple[float, float, float, float] | None = None  # imshow extent (left, right, bottom, top)
    affine: np.ndarray | None = None  # level-0 px -> um, when the image is rotated or sheared
    level: int | None = None  # pyramid level read
    step: int = 1  # stride of that read

    @property
    def aspect(self) -> float:
        x0, x1, y0, y1 = self.bounds
        return (y1 - y0) / max(x1 - x0, 1e-9)


def _resolve_table_key(sdata: Any, table_key: str, predictions_key: str | None) -> str:
    """The predictions table when ``sdata`` has one, else the main table.

    Only the default predictions table may be absent; another ``predictions_key`` must exist.
    """
    if not is_spatialdata(sdata) or predictions_key is None:
        return table_key
    if predictions_key in sdata.tables:
        return predictions_key
    if predictions_key != K.TABLES.PREDICTED:
        raise KeyError(f"`predictions_key={predictions_key!r}` is not a table of `sdata`; expected one of "
                       f"{sorted(sdata.tables)} (None: draw `table_key`).")
    return table_key


def _pick_section(sdata: SpatialData, *, table_key: str, section: str | None,
                  image_key: str | None) -> Section:
    """The one section to draw, with its image (``image_key`` or the section's finest)."""
    if not is_spatialdata(sdata):
        raise TypeError(f"`sdata` must be a SpatialData with an image and spot shapes, got {type(sdata).__name__}.")
    secs = get_sections(sdata, table_key=table_key)
    names = [s.section for s in secs]
    if section is None:
        if len(secs) > 1:
            raise ValueError(f"`sdata` holds {len(secs)} sections; choose one with `section=`, one of {names}.")
        sec = secs[0]
    else:
        match = [s for s in secs if section in (s.section, s.shapes_key)]
        if not match:
            raise ValueError(f"`section={section!r}` is not a section of table {table_key!r}; expected one of {names}.")
        sec = match[0]
    if image_key is not None:
        # validates that the image exists and lives in this section's coordinate system
        sec = get_sections(sdata, table_key=table_key, image_key=image_key, shapes_key=sec.shapes_key)[0]
    return sec


def _fallback_radius(xy: np.ndarray) -> np.ndarray:
    """Half the median nearest-neighbour distance, for spots stored without a radius."""
    if len(xy) < 2:
        return np.full(len(xy), 1.0)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    return np.full(len(xy), max(float(np.median(d[:, 1])) / 2, 1e-6))


def _crop_bounds(xy: np.ndarray, radius: np.ndarray, image_box: tuple[float, ...] | None,
                 crop: bool) -> tuple[float, float, float, float]:
    """View box: the spots plus a margin (``crop``), or the whole image and all spots."""
    r = float(np.nanmax(radius)) if radius.size else 0.0
    x0, y0 = xy.min(0) - r
    x1, y1 = xy.max(0) + r
    if crop or image_box is None:
        margin = max(r, 0.05 * max(x1 - x0, y1 - y0))
        return x0 - margin, x1 + margin, y0 - margin, y1 + margin
    ix0, ix1, iy0, iy1 = image_box
    return min(x0, ix0), max(x1, ix1), min(y0, iy0), max(y1, iy1)


def _image_box_um(img_el: Any, cs: str) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Affine (level-0 px -> um) of an image and the bounding box of its extent in um."""
    a = affine_to(img_el, cs)
    h, w = image_levels(img_el)[0].shape[-2:]
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], dtype=np.float64) @ a.T
    return a, (corners[:, 0].min(), corners[:, 0].max(), corners[:, 1].min(), corners[:, 1].max())


def _to_display(arr: np.ndarray) -> np.ndarray:
    """(c, y, x) pixels to what ``imshow`` draws: RGB (alpha dropped) or one grey channel."""
    if arr.ndim == 2:
        arr = arr[None]
    c = arr.shape[0]
    arr = np.moveaxis(arr[:3] if c >= 3 else arr[:1], 0, -1)
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float32)
    hi = float(np.nanmax(arr)) if arr.size else 1.0
    return np.clip(arr / hi, 0, 1) if hi > 0 else arr


def _load_image(canvas: _Canvas, img_el: Any) -> None:
    """Read the crop of the coarsest adequate pyramid level into ``canvas``."""
    a, _ = _image_box_um(img_el, canvas.sec.coordinate_system)
    levels = image_levels(img_el)
    h0, w0 = levels[0].shape[-2:]
    x0, x1, y0, y1 = canvas.bounds
    inv = np.linalg.inv(a)
    c = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], dtype=np.float64) @ inv.T
    px0, px1 = np.clip([c[:, 0].min(), c[:, 0].max()], 0, w0)
    py0, py1 = np.clip([c[:, 1].min(), c[:, 1].max()], 0, h0)
    if px1 - px0 < 1 or py1 - py0 < 1:  # the spots lie outside the image
        return
    chosen = 0
    for k in range(len(levels) - 1, -1, -1):  # coarsest first
        hk, wk = levels[k].shape[-2:]
        if max((px1 - px0) * wk / w0, (py1 - py0) * hk / h0) >= _TARGET_PX:
            chosen = k
            break
    # A level that dask derives from a finer one on the fly (spatialdata's lazily built
    # pyramids) costs a full-resolution decode of the whole crop; a strided read of the
    # finest stored level gives the same number of pixels far faster (0.4 s vs 10 s, her2st).
    read = chosen
    while read > 0 and _is_derived(levels[read], levels[0]):
        read -= 1
    lev = levels[read]
    hk, wk = lev.shape[-2:]
    fx, fy = w0 / wk, h0 / hk
    ix0, ix1 = int(math.floor(px0 / fx)), int(math.ceil(px1 / fx))
    iy0, iy1 = int(math.floor(py0 / fy)), int(math.ceil(py1 / fy))
    step = max(1, int(max(ix1 - ix0, iy1 - iy0) // _TARGET_PX)) if read < chosen else 1
    data = getattr(lev, "data", lev)
    arr = np.asarray(data[..., iy0:iy1:step, ix0:ix1:step])
    canvas.image = _to_display(arr)
    canvas.level, canvas.step = read, step
    ix1 = ix0 + arr.shape[-1] * step  # each strided pixel stands for a step x step block
    iy1 = iy0 + arr.shape[-2] * step
    # extent in level-0 pixels; the affine maps it to micrometres
    box = (ix0 * fx, ix1 * fx, iy1 * fy, iy0 * fy)
    if a[0, 1] == 0 and a[1, 0] == 0:
        # axis-aligned (the usual case): a plain extent in um (flips handled by its order)
        canvas.extent = (a[0, 0] * box[0] + a[0, 2], a[0, 0] * box[1] + a[0, 2],
                         a[1, 1] * box[2] + a[1, 2], a[1, 1] * box[3] + a[1, 2])
    else:
        canvas.extent, canvas.affine = box, a


def _is_derived(level: Any, finest: Any) -> bool:
    """Whether a pyramid level is computed from the finest one by dask (not stored)."""
    a, b = getattr(level, "data", level), getattr(finest, "data", finest)
    if not (hasattr(a, "dask") and hasattr(b, "dask")):
        return False
    layers = getattr(a.dask, "layers", None)
    base = getattr(b.dask, "layers", None)
    if layers is None or base is None:
        return False
    # a stored level is read by a layer of its own; a derived one stacks coarsening layers
    # on top of the finest level's graph
    return len(layers) > len(base) and set(base) <= set(layers)


def _canvas(sdata: SpatialData, sec: Section, *, table_key: str, spot_size: float, crop: bool,
            with_image: bool) -> _Canvas:
    xy, radius = spot_centers_um(sdata, sec, table_key=table_key)
    if not np.isfinite(radius).all():
        radius = np.where(np.isfinite(radius), radius, _fallback_radius(xy))
    img_el = sdata.images[sec.image_key] if (with_image and sec.image_key is not None) else None
    box = _image_box_um(img_el, sec.coordinate_system)[1] if img_el is not None else None
    canvas = _Canvas(sec=sec, xy=xy, diameter=2 * radius * spot_size,
                     bounds=_crop_bounds(xy, radius, box, crop))
    if img_el is not None:
        _load_image(canvas, img_el)
    return canvas


def _nice_length(span: float) -> float:
    """A round scale-bar length (1, 2 or 5 x 10^k um) near a fifth of ``span``."""
    target = span / 5
    if target <= 0:
        return 1.0
    base = 10 ** math.floor(math.log10(target))
    return float(min((m * base for m in (1, 2, 5, 10)), key=lambda v: abs(v - target)))


def _draw_panel(ax: Axes, canvas: _Canvas, *, values: np.ndarray | None = None,
                facecolors: np.ndarray | None = None, cmap: Colormap | None = None,
                norm: Normalize | None = None, alpha: float, img_alpha: float, title: str | None,
                scalebar: bool) -> EllipseCollection:
    """Image, then one circle of true size per spot (data units), on one axes."""
    from matplotlib.collections import EllipseCollection
    from matplotlib.transforms import Affine2D

    if canvas.image is not None and img_alpha > 0:
        kw: dict[str, Any] = {"extent": canvas.extent, "origin": "upper", "alpha": img_alpha,
                              "interpolation": "antialiased", "zorder": 0}
        if canvas.image.ndim == 2:
            kw["cmap"] = "gray"
        im = ax.imshow(canvas.image, **kw)
        if canvas.affine is not None:
            im.set_transform(Affine2D(canvas.affine) + ax.transData)
    d = canvas.diameter
    coll = EllipseCollection(d, d, np.zeros_like(d), units="xy", offsets=canvas.xy,
                             offset_transform=ax.transData, linewidths=0, zorder=2)
    if values is not None:
        coll.set_array(np.ma.masked_invalid(values))
        coll.set_cmap(cmap)
        coll.set_norm(norm)
    else:
        coll.set_facecolor(facecolors)
    coll.set_alpha(alpha)
    ax.add_collection(coll)
    x0, x1, y0, y1 = canvas.bounds
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # image convention: y grows downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    if scalebar:
        from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

        length = _nice_length(x1 - x0)
        ax.add_artist(AnchoredSizeBar(ax.transData, length, f"{length:g} µm", "lower right",
                                      frameon=False, size_vertical=(y1 - y0) / 150, pad=0.3,
                                      borderpad=0.3, color="black"))
    return coll


def _figure_for(n_panels: int, ncols: int, aspect: float, *, figsize: tuple[float, float] | None,
                dpi: float | None, extra_width: float) -> tuple[Figure, list[Axes]]:
    """A grid of panels sized to the crop's aspect; unused cells are removed."""
    nrows, ncols = grid(n_panels, ncols)
    if figsize is None:
        ph = float(np.clip(_PANEL_WIDTH * aspect, 1.5, 2.5 * _PANEL_WIDTH))
        figsize = (ncols * _PANEL_WIDTH + extra_width, nrows * (ph + 0.45))
    fig = new_figure(figsize, dpi=dpi)
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, axes[:n_panels]


# ----------------------------------------------------------------------------------------------
# expression


def _dense_columns(table: Any, layer: str | None, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(len(rows), len(cols))`` float64 values of ``X`` or a layer."""
    import scipy.sparse as sp

    X = table.X if layer is None else table.layers[layer]
    sub = X[rows][:, cols]
    if sp.issparse(sub):
        sub = sub.toarray()
    elif hasattr(sub, "compute"):  # dask-backed layer
        sub = sub.compute()
    return np.asarray(sub, dtype=np.float64)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over spots finite in both; NaN when either is constant."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan")
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _check_layer(table: Any, layer: str | None, *, arg: str, table_key: str) -> None:
    if layer is not None and layer not in table.layers:
        raise KeyError(f"`{arg}={layer!r}` is not a layer of table {table_key!r}; available: "
                       f"{sorted(table.layers)} (or None for X).")


def _check_genes(table: Any, genes: str | Sequence[str], *, table_key: str, predictions: bool) -> list[str]:
    if isinstance(genes, str):
        genes = [genes]
    try:
        genes = list(dict.fromkeys(str(g) for g in genes))
    except TypeError:
        raise TypeError(f"`color` must be a gene name or a list of gene names, got {type(genes).__name__}.") from None
    if not genes:
        raise ValueError("`color` is empty: give at least one gene name.")
    names = table.var_names
    missing = [g for g in genes if g not in names]
    if missing:
        if predictions:
            raise KeyError(
                f"`color` names genes the model does not predict: {missing[:10]}. The predictions table "
                f"{table_key!r} holds the model's panel of {len(names)} genes: {list(names[:20])}"
                f"{' ...' if len(names) > 20 else ''}. To predict a gene, put it in the panel when training, "
                f"e.g. `sqs.tl.train_experts(sdata, panel=[*sqs.pp.select_genes(sdata, inplace=False), "
                f"{missing[0]!r}])`; to draw its observed expression, pass `layer='log1p_cp10k', "
                f"predictions_key=None`.")
        raise KeyError(f"`color` names genes not in table {table_key!r}: {missing[:10]}; available genes include "
                       f"{list(names[:8])} ({len(names)} in all).")
    return genes


_SCALE_LABEL = {
    "shared": lambda what: f"{what} (shared scale)",
    "zscore": lambda what: f"z-score of {what} (per panel)",
}


def _zscore(v: np.ndarray) -> np.ndarray:
    """Values centred and scaled over the finite spots (constant: all 0)."""
    ok = np.isfinite(v)
    if not ok.any():
        return v
    sd = float(np.std(v[ok]))
    return (v - float(np.mean(v[ok]))) / sd if sd > 0 else np.where(ok, 0.0, np.nan)


def _norm(v: np.ndarray, vmin: float | str | None, vmax: float | str | None, *, symmetric: bool = False) -> Normalize:
    from matplotlib.colors import Normalize

    lo = resolve_limit(vmin, v, arg="vmin", default="min")
    hi = resolve_limit(vmax, v, arg="vmax", default="max")
    if symmetric and vmin is None and vmax is None:
        m = max(abs(lo), abs(hi))
        lo, hi = -m, m
    return Normalize(vmin=lo, vmax=hi)


@renamed_arguments(genes="color")
def spatial(
    sdata: SpatialData,
    color: str | Sequence[str],
    *,
    layer: str | None = K.LAYERS.PREDICTED,
    observed_layer: str | None = K.LAYERS.NORMALIZED,
    compare: bool = True,
    scale: K.ColorScale = "panel",
    section: str | None = None,
    table_key: str = K.TABLES.DEFAULT,
    predictions_key: str | None = K.TABLES.PREDICTED,
    image_key: str | None = None,
    cmap: str | Colormap = "viridis",
    ncols: int = 4,
    spot_size: float = 1.0,
    alpha: float = 0.9,
    img_alpha: float = 1.0,
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    crop: bool = True,
    scalebar: bool = True,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    ax: Axes | None = None,
    save: str | Path | None = None,
    dpi: float | None = None,
) -> Figure | None:
    """Observed next to predicted expression of genes, as true-size spots on the H&E image.

    Each gene gets an observed and a predicted panel; the predicted panel's title gives the
    Pearson r between the two across the section's spots. By default each panel has its own
    colour scale (``scale="panel"``): predictions of retrieval models are averages, shrunk
    toward the mean, so on the observed scale a well-predicted pattern looks flat. The
    colourbar label says which scale is used.
    Without observations (a slide that was only predicted, or a gene the query did not
    measure) a gene gets its predicted panel alone. Everything is drawn in the micrometre
    coordinate system of the section (``<section>_um``); the image is read from the coarsest
    pyramid level that still has ~1,000 px across the view.

    Parameters
    ----------
    sdata
        SpatialData with the section's image, spot circles and the table.
    color
        A gene name or a list of them (``var_names`` of the table drawn); for predictions, genes
        of the model's panel (a KeyError lists them and says how to add one).
    layer
        Layer drawn (``"predicted"`` by :func:`sq_spade.tl.predict_expression`); ``None`` for X.
        The uncertainty of a prediction draws the same way: ``"predicted_sd"`` (predictive
        standard deviation) or ``"predicted_lower"`` / ``"predicted_upper"`` (conformal
        interval); those are not paired with ``observed_layer``.
    observed_layer
        Layer of observed values compared with ``layer``, in the same table.
    compare
        Draw ``observed_layer`` next to ``layer`` when the table has it.
    scale
        Colour scale of an observed / predicted pair: ``"panel"`` (each panel its own range and
        colourbar: the spatial pattern of each is visible), ``"shared"`` (one range over both:
        magnitudes comparable) or ``"zscore"`` (each panel z-scored over the section's spots,
        one symmetric scale).
    section
        Section to draw; required when the table spans several.
    table_key
        Table drawn when ``sdata`` has no predictions table (default ``"table"``), e.g. to
        draw observed genes with ``layer="log1p_cp10k", compare=False``.
    predictions_key
        Table of predictions written by :func:`sq_spade.tl.predict_expression` (default
        ``"predicted"``), drawn when ``sdata`` has it; ``None``: draw ``table_key``.
    image_key
        Image drawn under the spots (default: the section's finest image).
    cmap
        Colormap of the values.
    ncols
        Panels per row (an observed / predicted pair never splits across rows).
    spot_size
        Drawn diameter as a fraction of the spot's true diameter.
    alpha, img_alpha
        Opacity of the spots and of the image (0 skips reading the image).
    vmin, vmax
        Colour limits: numbers, percentiles such as ``"p99"`` (of each panel's values, or of
        both with ``scale="shared"``), or ``None`` for the min / max.
    crop
        View the spots' extent plus a margin; ``False`` shows the whole image.
    scalebar
        Draw a scale bar in micrometres.
    figsize
        Figure size in inches (default from the number of panels and the crop's aspect).
    show
        Show the figure; ``None`` shows on interactive backends only (never when given ``ax``).
    return_fig
        Return the Figure.
    ax
        Axes to draw into (a single panel only: one gene without comparison).
    save
        Path to save the figure to (extension sets the format).
    dpi
        Resolution of the figure and of the saved file.

    Returns
    -------
    The Figure when ``return_fig=True``, else ``None``.

    Examples
    --------
    >>> sqs.pl.spatial(sdata, ["ERBB2", "FASN"])  # doctest: +SKIP
    >>> sd = sqs.datasets.synthetic_section()
    >>> sqs.pp.normalize(sd)
    >>> fig = sqs.pl.spatial(sd, "gene0", layer="log1p_cp10k", compare=False, return_fig=True)
    >>> len(fig.axes)  # the panel and its colourbar
    2
    """
    check_positive(spot_size, "spot_size")
    check_positive(ncols, "ncols", integer=True)
    check_choice(scale, "scale", K.COLOR_SCALES)
    alpha = check_fraction(alpha, "alpha")
    img_alpha = check_fraction(img_alpha, "img_alpha")
    table_key = _resolve_table_key(sdata, table_key, predictions_key)
    table = get_table(sdata, table_key, arg="sdata")
    _check_layer(table, layer, arg="layer", table_key=table_key)
    genes = _check_genes(table, color, table_key=table_key, predictions=table_key == predictions_key)
    uncertainty = layer is not None and layer.endswith(tuple(f"_{s}" for s in K.UNCERTAINTY_SUFFIXES))
    pair = (bool(compare) and not uncertainty and observed_layer is not None and observed_layer in table.layers
            and observed_layer != layer)
    sec = _pick_section(sdata, table_key=table_key, section=section, image_key=image_key)
    cols = table.var_names.get_indexer(genes)
    values = _dense_columns(table, layer, sec.rows, cols)
    observed = _dense_columns(table, observed_layer, sec.rows, cols) if pair else None
    measured = np.ones(len(genes), bool)
    if pair and K.VAR.OBSERVED in table.var and table.var[K.VAR.OBSERVED].dtype == bool:
        measured = table.var[K.VAR.OBSERVED].to_numpy()[cols]  # predicted-only genes of the panel
    pair = pair and bool(measured.any())
    per_gene = 2 if pair else 1
    check_ax(ax, len(genes) * per_gene)
    cmap = get_cmap(cmap, bad=_BAD_COLOR)

    canvas = _canvas(sdata, sec, table_key=table_key, spot_size=spot_size, crop=crop, with_image=img_alpha > 0)
    if ax is None:
        genes_per_row = max(1, ncols // per_gene)
        n_cols = per_gene * min(genes_per_row, len(genes))
        bars_per_row = n_cols if (pair and scale == "panel") else min(genes_per_row, len(genes))
        fig, axes = _figure_for(len(genes) * per_gene, n_cols, canvas.aspect, figsize=figsize, dpi=dpi,
                                extra_width=0.9 * bars_per_row)
    else:
        fig, axes = ax.figure, [ax]

    label = layer if layer is not None else "X"
    obs_label = observed_layer or "X"
    for i, gene in enumerate(genes):
        pred = values[:, i]
        obs = observed[:, i] if (pair and measured[i]) else None
        kw = {"cmap": cmap, "alpha": alpha, "img_alpha": img_alpha, "scalebar": scalebar}
        if obs is not None:
            r = _pearson(pred, obs)
            rtxt = f"r = {r:.2f}" if np.isfinite(r) else "r = n/a"
            title = f"{gene} ({label}, {rtxt})"
        else:
            title = f"{gene} ({label})"
        if scale == "zscore":
            pred = _zscore(pred)
            obs = _zscore(obs) if obs is not None else None
        if pair:
            ax_obs, ax_pred = axes[2 * i], axes[2 * i + 1]
            if obs is None:
                ax_obs.set_axis_off()
                ax_obs.set_title(f"{gene} (observed)")
                ax_obs.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax_obs.transAxes)
            if scale == "panel" or obs is None:
                if obs is not None:
                    coll = _draw_panel(ax_obs, canvas, values=obs, title=f"{gene} (observed)",
                                       norm=_norm(obs, vmin, vmax), **kw)
                    fig.colorbar(coll, ax=ax_obs, shrink=0.8, aspect=25, label=f"{obs_label} (own scale)")
                coll = _draw_panel(ax_pred, canvas, values=pred, title=title, norm=_norm(pred, vmin, vmax), **kw)
                fig.colorbar(coll, ax=ax_pred, shrink=0.8, aspect=25,
                             label=f"{label} (own scale)" if scale == "panel" else _SCALE_LABEL[scale](label))
            else:
                both = np.concatenate([pred, obs])
                norm = _norm(both, vmin, vmax, symmetric=scale == "zscore")
                _draw_panel(ax_obs, canvas, values=obs, title=f"{gene} (observed)", norm=norm, **kw)
                coll = _draw_panel(ax_pred, canvas, values=pred, title=title, norm=norm, **kw)
                fig.colorbar(coll, ax=[ax_obs, ax_pred], shrink=0.8, aspect=25,
                             label=_SCALE_LABEL[scale](f"{obs_label} and {label}"))
        else:
            coll = _draw_panel(axes[i], canvas, values=pred, title=title,
                               norm=_norm(pred, vmin, vmax, symmetric=scale == "zscore"), **kw)
            fig.colorbar(coll, ax=axes[i], shrink=0.8, aspect=25,
                         label=_SCALE_LABEL["zscore"](label) if scale == "zscore" else label)
    return finish(fig, show=show, save=save, return_fig=return_fig, dpi=dpi, owns_figure=ax is None)


# ----------------------------------------------------------------------------------------------
# experts


@renamed_arguments(key="color")
def experts(
    sdata: SpatialData,
    *,
    color: str = K.OBS.SPADE_EXPERT,
    section: str | None = None,
    table_key: str = K.TABLES.DEFAULT,
    weights_key: str | None = None,
    expert: int | None = None,
    image_key: str | None = None,
    palette: Any = None,
    cmap: str | Colormap = "viridis",
    ncols: int = 4,
    spot_size: float = 1.0,
    alpha: float = 0.9,
    img_alpha: float = 1.0,
    crop: bool = True,
    scalebar: bool = True,
    legend_loc: str | None = "right margin",
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    ax: Axes | None = None,
    save: str | Path | None = None,
    dpi: float | None = None,
) -> Figure | None:
    """Each spot's SPADE expert on the tissue, or how strongly spots are routed to an expert.

    Without ``weights_key`` every spot is coloured by its expert (``obs[color]``, categorical
    colours, legend). With ``weights_key`` (``obsm`` routing weights ``(n, n_experts)`` written by
    :func:`sq_spade.tl.embed`) the weight of expert ``expert`` is drawn as a continuous colour;
    ``expert=None`` draws one panel per expert on one scale.

    Parameters
    ----------
    sdata
        SpatialData with the section's image, spots and table.
    color
        ``obs`` column of expert labels (default ``"spade_expert"``).
    section
        Section to draw; required when the table spans several.
    table_key
        Table holding ``color`` / ``weights_key``.
    weights_key
        ``obsm`` key of routing weights; switches to the continuous view.
    expert
        Expert whose weight is drawn (0-based column of ``weights_key``).
    image_key
        Image under the spots (default: the section's finest image).
    palette
        Category colours: a dict, a list or a colormap name (default ``uns[f"{color}_colors"]``
        when it fits, else tab10 / tab20).
    cmap
        Colormap of routing weights.
    ncols
        Panels per row when drawing all experts' weights.
    spot_size
        Drawn diameter as a fraction of the spot's true diameter.
    alpha, img_alpha
        Opacity of spots and image.
    crop
        View the spots' extent plus a margin; ``False`` shows the whole image.
    scalebar
        Draw a scale bar in micrometres.
    legend_loc
        ``"right margin"``, a matplotlib legend location, or ``None``.
    title
        Panel title (default: the section id, or the expert of a weights panel).
    figsize
        Figure size in inches.
    show, return_fig, ax, save, dpi
        As in :func:`spatial`.

    Returns
    -------
    The Figure when ``return_fig=True``, else ``None``.

    Examples
    --------
    >>> sqs.pl.experts(sdata, section="C4")  # doctest: +SKIP
    >>> sqs.pl.experts(sdata, weights_key="spade_weights", expert=2)  # doctest: +SKIP
    """
    check_positive(spot_size, "spot_size")
    check_positive(ncols, "ncols", integer=True)
    alpha = check_fraction(alpha, "alpha")
    img_alpha = check_fraction(img_alpha, "img_alpha")
    table = get_table(sdata, table_key, arg="sdata")
    if weights_key is None:
        if color not in table.obs:
            raise KeyError(f"`color={color!r}` is not a column of `obs` of table {table_key!r}; run "
                           f"sqs.tl.train_experts or sqs.tl.embed first. Available: {list(table.obs.columns)}.")
        n_panels = 1
    else:
        if weights_key not in table.obsm:
            raise KeyError(f"`weights_key={weights_key!r}` is not in `obsm` of table {table_key!r}; "
                           f"available: {sorted(table.obsm)}.")
        weights = np.asarray(table.obsm[weights_key], dtype=np.float64)
        if weights.ndim != 2 or weights.shape[0] != table.n_obs:
            raise ValueError(f"`obsm[{weights_key!r}]` must be (n_obs, n_experts), got {weights.shape}.")
        n_exp = weights.shape[1]
        if expert is not None and (isinstance(expert, bool) or not isinstance(expert, (int, np.integer))
                                   or not 0 <= expert < n_exp):
            raise ValueError(f"`expert` must be an integer in [0, {n_exp}) or None, got {expert!r}.")
        shown = list(range(n_exp)) if expert is None else [int(expert)]
        n_panels = len(shown)
    check_ax(ax, n_panels)
    sec = _pick_section(sdata, table_key=table_key, section=section, image_key=image_key)
    canvas = _canvas(sdata, sec, table_key=table_key, spot_size=spot_size, crop=crop, with_image=img_alpha > 0)
    kw = {"alpha": alpha, "img_alpha": img_alpha, "scalebar": scalebar}

    if weights_key is None:
        labels = table.obs[color].iloc[sec.rows]
        cats = natural_categories(labels)
        uns_colors = table.uns.get(f"{color}_colors")
        all_cats = natural_categories(table.obs[color])
        # colours from the categories of the whole table, so a section keeps each expert's colour
        colors = categorical_colors(all_cats, palette, uns_colors=uns_colors)
        strs = labels.astype(object).where(labels.notna(), None).to_numpy()
        face = np.array([colors.get(str(v), _BAD_COLOR) if v is not None else _BAD_COLOR for v in strs])
        if ax is None:
            fig, axes = _figure_for(1, 1, canvas.aspect, figsize=figsize, dpi=dpi, extra_width=1.2)
            ax = axes[0]
            owns = True
        else:
            fig, owns = ax.figure, False
        _draw_panel(ax, canvas, facecolors=face, title=title if title is not None else sec.section, **kw)
        add_legend(ax, {c: colors[c] for c in cats}, title="expert" if color == K.OBS.SPADE_EXPERT else color,
                   loc=legend_loc)
        return finish(fig, show=show, save=save, return_fig=return_fig, dpi=dpi, owns_figure=owns)

    from matplotlib.colors import Normalize

    w = weights[sec.rows][:, shown]
    finite = w[np.isfinite(w)]
    in_unit = finite.size > 0 and finite.min() >= 0 and finite.max() <= 1
    norm = Normalize(0.0, 1.0) if in_unit else Normalize(float(finite.min()), float(finite.max()))
    cm = get_cmap(cmap, bad=_BAD_COLOR)
    if ax is None:
        fig, axes = _figure_for(n_panels, ncols, canvas.aspect, figsize=figsize, dpi=dpi, extra_width=0.9)
        owns = True
    else:
        fig, axes, owns = ax.figure, [ax], False
    coll = None
    for j, e in enumerate(shown):
        t = title if (title is not None and n_panels == 1) else f"expert {e} weight"
        coll = _draw_panel(axes[j], canvas, values=w[:, j], cmap=cm, norm=norm, title=t, **kw)
    fig.colorbar(coll, ax=axes, shrink=0.8, aspect=25, label="routing weight")
    return finish(fig, show=show, save=save, return_fig=return_fig, dpi=dpi, owns_figure=owns)


__all__ = ["experts", "spatial"]
