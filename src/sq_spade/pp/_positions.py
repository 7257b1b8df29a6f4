"""Spot positions of a table: array-grid coordinates, centres in micrometres, spatial tiles.

mclSTExp's spot encoder learns one embedding per integer position; these functions turn a
table's grid coordinates or physical spot centres into such positions, and group spots into
the spatial tiles whose spots attend to each other (``context="tile"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sq_spade import _constants as K
from sq_spade._validation import is_spatialdata, section_labels
from sq_spade.io._sections import get_sections, spot_centers_um

if TYPE_CHECKING:
    from anndata import AnnData


def _array_coords(table: AnnData, what: str) -> np.ndarray:
    """``obs[['array_col', 'array_row']]`` as int64 ``(N, 2)`` (x, y)."""
    missing = [c for c in (K.OBS.ARRAY_COL, K.OBS.ARRAY_ROW) if c not in table.obs]
    if missing:
        raise KeyError(f"{what} needs the obs columns {K.OBS.ARRAY_COL!r} and {K.OBS.ARRAY_ROW!r} (array grid "
                       f"coordinates); missing {missing}. Available: {list(table.obs.columns)}.")
    xy = table.obs[[K.OBS.ARRAY_COL, K.OBS.ARRAY_ROW]].to_numpy(dtype=np.float64)
    if not np.isfinite(xy).all():
        raise ValueError(f"{what}: obs {K.OBS.ARRAY_COL!r}/{K.OBS.ARRAY_ROW!r} contain missing values.")
    return np.floor(xy).astype(np.int64)


def _centres_um(data: Any, table: AnnData, table_key: str) -> np.ndarray:
    """Spot centres (x, y) in micrometres, from the shapes (SpatialData) or ``obsm['spatial']``."""
    out = np.full((table.n_obs, 2), np.nan)
    if is_spatialdata(data):
        for sec in get_sections(data, table_key=table_key):
            out[sec.rows] = spot_centers_um(data, sec, table_key=table_key)[0]
    else:
        if K.OBSM.SPATIAL not in table.obsm:
            raise KeyError("`position='pixel'` needs spot centres: `obsm['spatial']` (pixels) is missing.")
        meta = table.uns.get(K.UNS.SECTIONS, {})
        labels = section_labels(table)
        xy = np.asarray(table.obsm[K.OBSM.SPATIAL], dtype=np.float64)
        for s in dict.fromkeys(labels):
            mpp = meta.get(s, {}).get("microns_per_pixel")
            if mpp is None:
                raise KeyError(f"`position='pixel'`: the pixel size of section {s!r} is unknown "
                               f"(`uns[{K.UNS.SECTIONS!r}][section]['microns_per_pixel']`); pass the SpatialData.")
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


def spot_positions(data: Any, table: AnnData, mode: K.Position | None, *, bin_um: float | None = None,
                   rows: np.ndarray | None = None,
                   table_key: str = K.TABLES.DEFAULT) -> tuple[np.ndarray | None, float | None]:
    """Integer positions ``(N, 2)`` of every spot for the spot encoder, and the pixel bin.

    ``"grid"``: ``obs`` array_col / array_row minus each section's minimum. ``"pixel"``: spot
    centres in micrometres minus each section's minimum, divided by ``bin_um`` and rounded
    (``bin_um=None``: the spot pitch, the median nearest-neighbour distance over ``rows``).
    ``None``: no positions.

    Examples
    --------
    >>> sd = sqs.datasets.synthetic_section(n_rows=2, n_cols=3)
    >>> pos, bin_um = spot_positions(sd, sd.tables["table"], "pixel")
    >>> pos.max(0).tolist(), bin_um
    ([2, 1], 40.0)
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


def tile_ids(table: AnnData, tile_size: int = 4) -> np.ndarray:
    """Tile id of every spot: section and ``floor(array coordinates / tile_size)``, as int64.

    Examples
    --------
    >>> tile_ids(sqs.datasets.synthetic_section(n_rows=2, n_cols=4).tables["table"], 2).tolist()
    [0, 0, 1, 1, 0, 0, 1, 1]
    """
    xy = _array_coords(table, "`context='tile'`") // int(tile_size)
    keys = pd.Series(section_labels(table)).astype(str) + "|" + pd.Series(xy[:, 0]).astype(str) + "|" + \
        pd.Series(xy[:, 1]).astype(str)
    return pd.factorize(keys)[0].astype(np.int64)
