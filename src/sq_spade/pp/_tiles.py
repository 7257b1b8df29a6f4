"""Tiles of physical size over the tissue of a slide: spots for slides that have none.

:func:`tile_tissue` lays a square grid (side ``tile_um``, step ``stride_um``, in the section's
micrometre coordinate system) over each section's image, keeps the tiles whose share of tissue
(from :func:`sq_spade.pp.detect_tissue`'s mask) reaches ``min_tissue``, and writes them as a
circles element (one circle inscribed in each tile) annotated by a table, exactly the layout of
spots. So tiles go everywhere spots go: ``compute_features(sdata, table_key="tiles")``,
``embed``, ``predict_expression``, ``pl.spatial``. Pixels are never read here (the mask is a
coarse level); the patches of the tiles are read window by window later, within
``settings.memory_budget_bytes``, as for spots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sq_spade import _constants as K
from sq_spade._validation import check_positive, is_spatialdata
from sq_spade.io._sections import affine_to, image_levels
from sq_spade.pp._tissue import detect_tissue, read_tissue_mask, sections_of_images, tissue_key

if TYPE_CHECKING:
    from spatialdata import SpatialData

DEFAULT_TILE_UM = 112.0


def tiles_key(section: str) -> str:
    """Key of the shapes element of ``section``'s tiles."""
    return f"{section}{K.TILES_SUFFIX}"


def _box_fraction(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Share of mask pixels inside each box [x0, x1) x [y0, y1) (mask pixels; outside counts as 0)."""
    h, w = mask.shape
    dtype = np.int32 if mask.size < 2**31 else np.int64  # a 5,000 px mask: 100 MB, not 200
    integral = np.zeros((h + 1, w + 1), dtype)
    np.cumsum(mask, axis=0, dtype=dtype, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
    area = np.maximum((x1 - x0) * (y1 - y0), 1e-12)
    cx0, cx1 = np.clip(np.floor(x0), 0, w).astype(int), np.clip(np.ceil(x1), 0, w).astype(int)
    cy0, cy1 = np.clip(np.floor(y0), 0, h).astype(int), np.clip(np.ceil(y1), 0, h).astype(int)
    inside = (integral[cy1, cx1].astype(np.int64) - integral[cy0, cx1] - integral[cy1, cx0]
              + integral[cy0, cx0])
    covered = (cx1 - cx0) * (cy1 - cy0)
    # pixel-rounded box: scale by the rounded box's area so a full box reads 1.0
    return np.clip(inside / np.maximum(covered, 1), 0.0, 1.0) * np.clip(covered / area, 0.0, 1.0)


def tile_tissue(
    sdata: SpatialData,
    *,
    tile_um: float = DEFAULT_TILE_UM,
    stride_um: float | None = None,
    image_key: str | None = None,
    section: str | None = None,
    min_tissue: float = 0.5,
    mask_key: str | None = None,
    key_added: str = K.TABLES.TILES,
) -> int:
    """Tile each section's tissue with squares of ``tile_um`` micrometres, ``stride_um`` apart.

    The grid covers the image's extent in the section's micrometre coordinate system; a tile is
    kept when the tissue mask covers at least ``min_tissue`` of it. The mask is the labels
    element ``f"{section}_tissue"``, computed with :func:`detect_tissue` when absent.

    Parameters
    ----------
    sdata
        A SpatialData whose images have a transformation to a ``'<section>_um'`` coordinate
        system (an :mod:`sq_spade.io` section, with or without counts, or a whole slide from
        :func:`sq_spade.io.read_wsi`).
    tile_um
        Side of a tile in micrometres (default 112 um, the side of SPADE's patches).
    stride_um
        Step between tile centres (default ``tile_um``: tiles touch). Below the spot pitch it
        gives a finer virtual map than the assay measured (overlapping tiles).
    image_key
        Image to tile (default: each section's finest image).
    section
        Only this section (default: every section found).
    min_tissue
        Smallest share of a tile that must be tissue, in [0, 1].
    mask_key
        Labels element of the mask (one section only); default ``f"{section}_tissue"``.
    key_added
        Key of the tiles table (default ``"tiles"``); it replaces an earlier one.

    Returns
    -------
    The number of tiles. ``sdata`` gains, per section, a circles element
    ``f"{section}_tiles"`` (the circle inscribed in each tile, in the image's pixels, with the
    image's transformation to the section's coordinate system) and the table ``key_added``
    with one row per tile: ``obs`` ``section``, ``region``, ``spot_id``,
    ``tile_tissue_fraction``, ``tile_row``, ``tile_col`` (grid indices), ``obsm['spatial']``
    (centres in image pixels), no genes, and ``uns['sq_spade_tiles']`` (the parameters) and
    ``uns['sq_spade_patches']`` (patches of side ``tile_um`` at 0.5 um/px, so
    :func:`~sq_spade.pp.compute_features` cuts each tile exactly). Nothing is written if an
    error is raised.

    Examples
    --------
    >>> sd = sqs.datasets.synthetic_section()
    >>> n = sqs.pp.tile_tissue(sd, tile_um=32, stride_um=32)
    >>> sd.tables["tiles"].obs[["tile_row", "tile_col"]].shape[0] == n > 0
    True
    """
    from anndata import AnnData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import get_transformation

    if not is_spatialdata(sdata):
        raise TypeError(f"`sdata` must be a SpatialData with an image, got {type(sdata).__name__}.")
    check_positive(tile_um, "tile_um")
    stride_um = float(tile_um) if stride_um is None else float(check_positive(stride_um, "stride_um"))
    if not (isinstance(min_tissue, (int, float)) and 0.0 <= float(min_tissue) <= 1.0):
        raise ValueError(f"`min_tissue` must be a number in [0, 1], got {min_tissue!r}.")
    images = sections_of_images(sdata, image_key=image_key, section=section)
    if mask_key is not None and len(images) > 1:
        raise ValueError(f"`mask_key={mask_key!r}` names one mask but {len(images)} sections were found; pass `section`.")
    new_masks = [img.section for img in images if (mask_key or tissue_key(img.section)) not in sdata.labels]
    if mask_key is not None and new_masks:
        raise KeyError(f"`mask_key={mask_key!r}` is not a labels element of `sdata`; expected one of {sorted(sdata.labels)}.")

    shapes_out, tables, sections_meta = {}, [], {}
    staged_masks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    staged_labels: dict = {}
    if new_masks:
        # detect into a scratch object so that nothing is written on a later error
        from spatialdata import SpatialData

        scratch = SpatialData(images={img.image_key: sdata.images[img.image_key] for img in images
                                      if img.section in new_masks})
        for sec in new_masks:
            detect_tissue(scratch, section=sec, image_key=next(i.image_key for i in images if i.section == sec))
            staged_masks[sec] = read_tissue_mask(scratch, sec)
            staged_labels[tissue_key(sec)] = scratch.labels[tissue_key(sec)]
    for img in images:
        mask, m_aff = staged_masks.get(img.section) or read_tissue_mask(sdata, img.section, mask_key)
        img_el = sdata.images[img.image_key]
        i_aff = affine_to(img_el, img.coordinate_system)
        h0, w0 = image_levels(img_el)[0].shape[1:]
        corners = np.array([[0, 0, 1], [w0, 0, 1], [0, h0, 1], [w0, h0, 1]], float) @ i_aff.T
        (ux0, uy0), (ux1, uy1) = corners[:, :2].min(0), corners[:, :2].max(0)
        ncol = max(int(np.floor((ux1 - ux0 - tile_um) / stride_um)) + 1, 1)
        nrow = max(int(np.floor((uy1 - uy0 - tile_um) / stride_um)) + 1, 1)
        # centre the grid on the image
        ox = ux0 + (ux1 - ux0 - (tile_um + (ncol - 1) * stride_um)) / 2 + tile_um / 2
        oy = uy0 + (uy1 - uy0 - (tile_um + (nrow - 1) * stride_um)) / 2 + tile_um / 2
        rr, cc = np.meshgrid(np.arange(nrow), np.arange(ncol), indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        cx, cy = ox + cc * stride_um, oy + rr * stride_um
        # tile boxes in mask pixels (the mask's affine is a scale + translation of the image's)
        inv = np.linalg.inv(m_aff)
        half = tile_um / 2
        bx0, by0 = (np.column_stack([cx - half, cy - half, np.ones_like(cx)]) @ inv.T)[:, :2].T
        bx1, by1 = (np.column_stack([cx + half, cy + half, np.ones_like(cx)]) @ inv.T)[:, :2].T
        frac = _box_fraction(mask, np.minimum(bx0, bx1), np.minimum(by0, by1), np.maximum(bx0, bx1),
                             np.maximum(by0, by1))
        keep = frac >= float(min_tissue) - 1e-9
        if float(min_tissue) == 0.0:
            keep[:] = True
        if not keep.any():
            raise ValueError(f"Section {img.section!r}: no tile of {tile_um:g} um has at least {min_tissue:g} tissue; "
                             "lower `min_tissue` or check the mask (sqs.pp.detect_tissue).")
        cx, cy, rr, cc, frac = cx[keep], cy[keep], rr[keep], cc[keep], frac[keep]
        # centres in the image's level-0 pixels, with the image's transformation (as spots)
        ii = np.linalg.inv(i_aff)
        xy_px = np.column_stack([cx, cy, np.ones_like(cx)]) @ ii.T
        xy_px = xy_px[:, :2]
        ids = pd.Index([f"r{r}_c{c}" for r, c in zip(rr, cc, strict=True)])
        skey = tiles_key(img.section)
        radius = np.full(len(ids), half / img.mpp)
        to_cs = get_transformation(img_el, to_coordinate_system=img.coordinate_system)
        shapes_out[skey] = ShapesModel.parse(xy_px, geometry=0, radius=radius, index=ids,
                                             transformations={img.coordinate_system: to_cs})
        obs = pd.DataFrame(index=pd.Index([f"{img.section}_{i}" for i in ids]))
        obs[K.OBS.SECTION] = img.section
        obs[K.OBS.REGION] = skey
        obs[K.OBS.INSTANCE] = ids.to_numpy()
        obs[K.OBS.TILE_ROW] = rr.astype(np.int64)
        obs[K.OBS.TILE_COL] = cc.astype(np.int64)
        obs[K.OBS.TILE_TISSUE] = frac.astype(np.float64)
        obs[K.OBS.IN_TISSUE] = True
        ad = AnnData(X=sp.csr_matrix((len(ids), 0), dtype=np.float32), obs=obs)
        ad.obsm[K.OBSM.SPATIAL] = xy_px
        tables.append(ad)
        sections_meta[img.section] = {"image": img.image_key, "shapes": skey, "microns_per_pixel": img.mpp,
                                      "spot_diameter_um": float(tile_um)}
    import anndata

    table = anndata.concat(tables, index_unique=None) if len(tables) > 1 else tables[0]
    for c in (K.OBS.SECTION, K.OBS.REGION):
        table.obs[c] = pd.Categorical(table.obs[c].astype(str))
    table.uns[K.UNS.SECTIONS] = sections_meta
    table.uns[K.UNS.TILES] = {"tile_um": float(tile_um), "stride_um": float(stride_um),
                              "min_tissue": float(min_tissue), "shape": "circle_inscribed_in_square"}
    patch_px = max(int(round(tile_um / 0.5)), 1)
    table.uns[K.UNS.PATCHES] = {"patch_size_um": float(tile_um), "mpp": float(tile_um) / patch_px,
                                "patch_px": patch_px, "fill": 255, "mode": "physical", "sections": {}}
    regions = list(dict.fromkeys(table.obs[K.OBS.REGION].astype(str)))
    table = TableModel.parse(table, region=regions, region_key=K.OBS.REGION, instance_key=K.OBS.INSTANCE)
    # write: masks first, then shapes, then the table (all prepared above)
    for k, el in staged_labels.items():
        sdata.labels[k] = el
    for k, el in shapes_out.items():
        sdata.shapes[k] = el
    if key_added in sdata.tables:
        del sdata.tables[key_added]
    sdata.tables[key_added] = table
    return int(table.n_obs)
