"""Build, inspect and combine sections: one image, one shapes element and table rows each.

The physical scale lives in exactly one place: every element of section ``s`` carries a
transformation to the coordinate system ``f"{s}_um"`` (:func:`sq_spade._constants.microns_cs`)
whose unit is the micrometre. Patches, plots and readers all go through it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sq_spade import _constants as K
from sq_spade._validation import check_positive, check_rgb_uint8, check_section_id, get_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

_MIN_PYRAMID_SIDE = 1024


def pyramid_scale_factors(height: int, width: int) -> list[int]:
    """Factors of 2 until the coarsest level's short side is below ~1,024 px."""
    factors = []
    side = min(height, width)
    while side // 2 >= _MIN_PYRAMID_SIDE // 2 and side > _MIN_PYRAMID_SIDE:
        factors.append(2)
        side //= 2
    return factors


def parse_image(image: Any, *, section: str, microns_per_pixel: float,
                extra_transformations: Mapping[str, Any] | None = None) -> Any:
    """Wrap an ``(H, W, 3)`` uint8 array (numpy or dask) as a multiscale spatialdata image."""
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    if isinstance(image, np.ndarray):
        check_rgb_uint8(image)
    elif image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        check_rgb_uint8(np.empty((1, 1, image.shape[-1]) if image.ndim == 3 else (1, 1), dtype=image.dtype))
    h, w = image.shape[:2]
    arr = da.from_array(image, chunks=(4096, 4096, 3)) if isinstance(image, np.ndarray) else image
    arr = arr.transpose(2, 0, 1)
    tr = {K.microns_cs(section): Scale([microns_per_pixel, microns_per_pixel], axes=("x", "y"))}
    tr.update(extra_transformations or {})
    factors = pyramid_scale_factors(h, w)
    return Image2DModel.parse(arr, dims=("c", "y", "x"), scale_factors=factors or None,
                              transformations=tr, c_coords=["r", "g", "b"])


def section_from_arrays(
    counts: Any | None,
    *,
    genes: Sequence[str] | None = None,
    spot_ids: Sequence[str],
    centers_px: np.ndarray,
    image: Any,
    section: str,
    microns_per_pixel: float,
    spot_diameter_um: float,
    array_coords: np.ndarray | None = None,
    in_tissue: np.ndarray | None = None,
    obs: pd.DataFrame | None = None,
    patient: str | None = None,
    image_transform: Any = None,
) -> SpatialData:
    """Assemble one section into a SpatialData (the common back-end of every reader).

    Parameters
    ----------
    counts
        ``(n_spots, n_genes)`` raw counts (dense or sparse), or ``None`` for an H&E-only
        section (a slide to predict: the table has the spots and no genes).
    genes, spot_ids
        Gene names (``None`` with ``counts=None``) and spot ids (unique).
    centers_px
        ``(n_spots, 2)`` spot centres as (x, y) in pixels of ``image``'s full resolution.
    image
        ``(H, W, 3)`` uint8 H&E image (numpy or dask).
    section
        Section id; names the elements ``f"{section}_image"``, ``f"{section}_spots"`` and the
        coordinate system ``f"{section}_um"``.
    microns_per_pixel
        Physical size of one full-resolution pixel.
    spot_diameter_um
        Capture-spot diameter (100 um legacy ST, 55 um Visium).
    array_coords
        ``(n_spots, 2)`` integer array (col, row) coordinates, if known.
    in_tissue
        Boolean per spot; all True when ``None``.
    obs
        Extra per-spot columns.
    patient
        Patient / donor id, used by patient-disjoint splits.
    image_transform
        Optional spatialdata transformation from the image's pixels to the spots' pixels,
        for images that do not share the spots' pixel grid.

    Returns
    -------
    A SpatialData with one image, one circles element and the table ``"table"``.

    Examples
    --------
    >>> import numpy as np, sq_spade as sqs
    >>> img = np.full((200, 200, 3), 230, np.uint8)
    >>> sd = sqs.io.section_from_arrays(np.ones((2, 3)), genes=["a", "b", "c"], spot_ids=["s1", "s2"],
    ...     centers_px=np.array([[50.0, 50.0], [150.0, 150.0]]), image=img, section="demo",
    ...     microns_per_pixel=1.0, spot_diameter_um=55.0)
    >>> sd.tables["table"].n_obs
    2
    >>> query = sqs.io.section_from_arrays(None, spot_ids=["s1", "s2"], centers_px=np.array([[50.0, 50.0],
    ...     [150.0, 150.0]]), image=img, section="query", microns_per_pixel=1.0, spot_diameter_um=55.0)
    >>> query.tables["table"].shape
    (2, 0)
    """
    from anndata import AnnData
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Scale
    from spatialdata.transformations import Sequence as Seq

    check_positive(microns_per_pixel, "microns_per_pixel")
    check_positive(spot_diameter_um, "spot_diameter_um")
    section = check_section_id(str(section), "section")
    if counts is None:
        if genes is not None and len(genes):
            raise ValueError("`genes` were given without `counts`; pass both, or neither for an H&E-only section.")
        genes = []
        X = sp.csr_matrix((len(spot_ids), 0), dtype=np.float32)
    else:
        if genes is None:
            raise ValueError("`genes` must name the columns of `counts`, got None.")
        X = sp.csr_matrix(counts, dtype=np.float32)
    n, g = X.shape
    if n == 0:
        raise ValueError(f"Section {section!r} has no spots: the counts table is empty.")
    if g == 0 and counts is not None:
        raise ValueError(f"Section {section!r} has no genes: the counts table has no columns.")
    genes = pd.Index([str(x) for x in genes])
    spot_ids = pd.Index([str(x) for x in spot_ids])
    if len(genes) != g or len(spot_ids) != n:
        raise ValueError(f"`genes` ({len(genes)}) and `spot_ids` ({len(spot_ids)}) must match counts {X.shape}.")
    if genes.has_duplicates:
        dup = genes[genes.duplicated()].unique()[:5].tolist()
        raise ValueError(f"`genes` must be unique; duplicated: {dup}.")
    if spot_ids.has_duplicates:
        dup = spot_ids[spot_ids.duplicated()].unique()[:5].tolist()
        raise ValueError(f"`spot_ids` must be unique; duplicated: {dup}.")
    data = X.data
    if not np.isfinite(data).all() or (data < 0).any():
        raise ValueError(f"`counts` of section {section!r} must be finite and non-negative.")
    centers_px = np.asarray(centers_px, dtype=np.float64)
    if centers_px.shape != (n, 2) or not np.isfinite(centers_px).all():
        raise ValueError(f"`centers_px` must be a finite (n_spots, 2) array, got {centers_px.shape}.")

    mpp = float(microns_per_pixel)
    cs = K.microns_cs(section)
    img_el = parse_image(image, section=section, microns_per_pixel=mpp)
    if image_transform is not None:
        from spatialdata.transformations import set_transformation

        set_transformation(img_el, Seq([image_transform, Scale([mpp, mpp], axes=("x", "y"))]),
                           to_coordinate_system=cs)
        h, w = _image_extent_px(img_el, image_transform)
    else:
        h, w = image.shape[:2]
    outside = (centers_px[:, 0] < 0) | (centers_px[:, 0] > w) | (centers_px[:, 1] < 0) | (centers_px[:, 1] > h)
    if outside.all():
        raise ValueError(
            f"All {n} spot centres of section {section!r} lie outside the image ({w} x {h} px): "
            "check `image_scale` / the pixel columns of the spot table."
        )
    if outside.any():
        warnings.warn(f"{int(outside.sum())} of {n} spots of section {section!r} lie outside the image; "
                      "their patches will be padded.", UserWarning, stacklevel=3)

    shapes_key, image_key = f"{section}_spots", f"{section}_image"
    radius = np.full(n, spot_diameter_um / 2 / mpp)
    shapes = ShapesModel.parse(centers_px, geometry=0, radius=radius, index=spot_ids,
                               transformations={cs: Scale([mpp, mpp], axes=("x", "y"))})

    obs_df = pd.DataFrame(index=pd.Index([f"{section}_{s}" for s in spot_ids]))
    obs_df[K.OBS.SECTION] = pd.Categorical([section] * n)
    obs_df[K.OBS.REGION] = pd.Categorical([shapes_key] * n)
    obs_df[K.OBS.INSTANCE] = spot_ids.to_numpy()
    if array_coords is not None:
        ac = np.asarray(array_coords)
        obs_df[K.OBS.ARRAY_COL] = ac[:, 0]
        obs_df[K.OBS.ARRAY_ROW] = ac[:, 1]
    obs_df[K.OBS.IN_TISSUE] = np.ones(n, bool) if in_tissue is None else np.asarray(in_tissue, bool)
    if patient is not None:
        obs_df[K.OBS.PATIENT] = pd.Categorical([str(patient)] * n)
    if obs is not None:
        for c in obs.columns:
            obs_df[c] = obs[c].array  # keeps categoricals categorical
    adata = AnnData(X=X, obs=obs_df, var=pd.DataFrame(index=genes))
    adata.obsm[K.OBSM.SPATIAL] = centers_px.copy()
    adata.uns[K.UNS.SECTIONS] = {
        section: {"image": image_key, "shapes": shapes_key, "microns_per_pixel": mpp,
                  "spot_diameter_um": float(spot_diameter_um)}
    }
    table = TableModel.parse(adata, region=shapes_key, region_key=K.OBS.REGION, instance_key=K.OBS.INSTANCE)
    return SpatialData(images={image_key: img_el}, shapes={shapes_key: shapes}, tables={K.TABLES.DEFAULT: table})


def _image_extent_px(img_el: Any, transform: Any) -> tuple[float, float]:
    """Height and width of an image's extent, in the spots' pixel units."""
    h, w = image_levels(img_el)[0].shape[1:]
    m = transform.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    corner = m @ np.array([w, h, 1.0])
    return float(corner[1]), float(corner[0])


# ----------------------------------------------------------------------------------------------
# inspecting sections


@dataclass
class Section:
    """Where one section lives inside a SpatialData."""

    section: str
    shapes_key: str
    image_key: str | None
    coordinate_system: str
    rows: np.ndarray  # integer positions of the section's rows in the table

    @property
    def n_spots(self) -> int:
        return len(self.rows)


def image_levels(img: Any) -> list[Any]:
    """The DataArrays of an image element, finest first (one for a single-scale image)."""
    if hasattr(img, "children") and len(getattr(img, "children", {})) > 0:
        keys = sorted(img.children, key=lambda k: int(str(k).replace("scale", "")))
        return [next(iter(img[k].data_vars.values())) for k in keys]
    return [img]


def affine_to(element: Any, cs: str) -> np.ndarray:
    """3x3 affine (x, y) from an element's intrinsic coordinates to coordinate system ``cs``."""
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def microns_per_pixel(affine: np.ndarray, *, what: str = "image") -> float:
    """Isotropic pixel size of an affine to micrometres; refuses anisotropic pixels."""
    sx = float(np.hypot(affine[0, 0], affine[1, 0]))
    sy = float(np.hypot(affine[0, 1], affine[1, 1]))
    # a few percent of anisotropy comes from rounding an image's extent to whole pixels
    if not np.isclose(sx, sy, rtol=0.02):
        raise ValueError(f"The {what} has anisotropic pixels ({sx:.4g} x {sy:.4g} um); sq_spade expects square pixels.")
    return float(np.sqrt(sx * sy))


def _coordinate_systems(element: Any) -> list[str]:
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True))


def get_sections(sdata: SpatialData, *, table_key: str = K.TABLES.DEFAULT, image_key: str | None = None,
                 shapes_key: str | None = None) -> list[Section]:
    """Resolve the sections of a SpatialData: their shapes, image and micrometre coordinate system.

    The table's region column names each section's shapes element. A shapes element belongs to
    section ``s`` through its transformation to ``f"{s}_um"``; the section's image is the image
    element with a transformation to the same coordinate system (or ``image_key``).

    Raises
    ------
    KeyError
        A key that does not exist.
    ValueError
        A section without a micrometre coordinate system (no physical scale) or without image.
    """
    table = get_table(sdata, table_key, arg="sdata")
    attrs = table.uns.get(K.UNS.SPATIALDATA_ATTRS, {})
    region_key = attrs.get("region_key", K.OBS.REGION)
    if region_key not in table.obs:
        raise ValueError(f"Table {table_key!r} has no region column {region_key!r}: it is not linked to shapes.")
    regions = table.obs[region_key].astype(str).to_numpy()
    if image_key is not None and image_key not in sdata.images:
        raise KeyError(f"`image_key={image_key!r}` is not an image of `sdata`; expected one of {sorted(sdata.images)}.")
    if shapes_key is not None:
        if shapes_key not in sdata.shapes:
            raise KeyError(f"`shapes_key={shapes_key!r}` is not a shapes element of `sdata`; expected one of {sorted(sdata.shapes)}.")
        wanted = [shapes_key]
    else:
        wanted = list(dict.fromkeys(regions))
    out = []
    for sk in wanted:
        if sk not in sdata.shapes:
            raise KeyError(f"The table's region {sk!r} is not a shapes element of `sdata` ({sorted(sdata.shapes)}).")
        rows = np.flatnonzero(regions == sk)
        if rows.size == 0:
            raise ValueError(f"`shapes_key={sk!r}` annotates no row of table {table_key!r}.")
        cands = [c for c in _coordinate_systems(sdata.shapes[sk]) if c.endswith(K.MICRONS_SUFFIX)]
        if not cands:
            raise ValueError(
                f"Shapes {sk!r} have no physical scale: no transformation to a '<section>{K.MICRONS_SUFFIX}' "
                "coordinate system. Read the data with sq_spade.io readers or call "
                "sq_spade.io.set_microns_per_pixel(sdata, ...)."
            )
        cs = cands[0]
        sec = cs[: -len(K.MICRONS_SUFFIX)]
        if image_key is not None:
            ik = image_key
            if cs not in _coordinate_systems(sdata.images[ik]):
                raise ValueError(f"`image_key={ik!r}` has no transformation to {cs!r}, the coordinate system of {sk!r}.")
        else:
            imgs = [k for k, v in sdata.images.items() if cs in _coordinate_systems(v)]
            # prefer the finest image of the section (e.g. hires over lowres)
            ik = min(imgs, key=lambda k: microns_per_pixel(affine_to(sdata.images[k], cs))) if imgs else None
        out.append(Section(section=sec, shapes_key=sk, image_key=ik, coordinate_system=cs, rows=rows))
    return out


def spot_centers_um(sdata: SpatialData, sec: Section, *, table_key: str = K.TABLES.DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """Spot centres (x, y) in micrometres and radii in micrometres, in table row order of ``sec``."""
    table = get_table(sdata, table_key)
    attrs = table.uns.get(K.UNS.SPATIALDATA_ATTRS, {})
    inst_key = attrs.get("instance_key", K.OBS.INSTANCE)
    shapes = sdata.shapes[sec.shapes_key]
    inst = table.obs[inst_key].to_numpy()[sec.rows]
    idx = shapes.index
    pos = idx.get_indexer(pd.Index(inst).astype(idx.dtype) if len(idx) else pd.Index(inst))
    if (pos < 0).any():
        missing = inst[pos < 0][:5].tolist()
        raise ValueError(f"Table rows of {sec.shapes_key!r} point to spots absent from the shapes: {missing}.")
    geom = shapes.geometry.iloc[pos]
    xy = np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()])
    a = affine_to(shapes, sec.coordinate_system)
    xy_um = xy @ a[:2, :2].T + a[:2, 2]
    scale = microns_per_pixel(a, what=f"shapes {sec.shapes_key!r}")
    radius = shapes["radius"].to_numpy()[pos] * scale if "radius" in shapes else np.full(len(pos), np.nan)
    return xy_um, radius


def set_microns_per_pixel(sdata: SpatialData, microns_per_pixel: float, *, section: str,
                          elements: Sequence[str], from_coordinate_system: str | None = None) -> None:
    """Give existing elements a physical scale (for SpatialData objects not read by sq_spade).

    Each element in ``elements`` gets a transformation to ``f"{section}_um"``: its transform to
    ``from_coordinate_system`` (identity when ``None``) followed by a scaling by
    ``microns_per_pixel``.

    Examples
    --------
    >>> sqs.io.set_microns_per_pixel(sdata, 0.5, section="s1", elements=["s1_image", "s1_spots"])  # doctest: +SKIP
    """
    from spatialdata.transformations import Identity, Scale, get_transformation, set_transformation
    from spatialdata.transformations import Sequence as Seq

    check_positive(microns_per_pixel, "microns_per_pixel")
    for name in elements:
        el = sdata[name]
        base = Identity() if from_coordinate_system is None else get_transformation(el, to_coordinate_system=from_coordinate_system)
        set_transformation(el, Seq([base, Scale([microns_per_pixel] * 2, axes=("x", "y"))]),
                           to_coordinate_system=K.microns_cs(section))


# ----------------------------------------------------------------------------------------------
# combining


def combine_sections(sdatas: Sequence[SpatialData] | Mapping[str, SpatialData], *, join: str = "outer",
                     table_key: str = K.TABLES.DEFAULT) -> SpatialData:
    """Combine single-section objects into one multi-section SpatialData.

    One image and one shapes element per section are kept under their names; the tables are
    concatenated into one table whose region column names each row's shapes element (and
    ``obs['section']`` its section). With ``join="outer"`` genes missing from a section are
    zero-filled and recorded as absent in ``varm['genes_present']`` (sections x genes), so panel
    selection can restrict itself to genes measured everywhere.

    Parameters
    ----------
    sdatas
        Objects from :mod:`sq_spade.io` readers (or any with the same layout).
    join
        ``"outer"`` (union of genes) or ``"inner"`` (genes shared by all sections).
    table_key
        Table of each input.

    Returns
    -------
    The combined SpatialData; the inputs are not modified.

    Examples
    --------
    >>> sd = sqs.io.combine_sections([sqs.datasets.her2st("C2"), sqs.datasets.her2st("C3")])  # doctest: +SKIP
    """
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    if join not in ("outer", "inner"):
        raise ValueError(f"`join` must be 'outer' or 'inner', got {join!r}.")
    items = list(sdatas.values()) if isinstance(sdatas, Mapping) else list(sdatas)
    if not items:
        raise ValueError("`sdatas` is empty: expected at least one SpatialData.")
    images, shapes, tables, sections_meta = {}, {}, [], {}
    for i, s in enumerate(items):
        t = get_table(s, table_key, arg=f"sdatas[{i}]")
        for name, el in s.images.items():
            if name in images:
                raise ValueError(f"Image {name!r} appears in two inputs; section ids must be unique.")
            images[name] = el
        for name, el in s.shapes.items():
            if name in shapes:
                raise ValueError(f"Shapes {name!r} appear in two inputs; section ids must be unique.")
            shapes[name] = el
        t = t.copy()
        t.uns.pop(K.UNS.SPATIALDATA_ATTRS, None)
        sections_meta.update(t.uns.get(K.UNS.SECTIONS, {}))
        tables.append(t)
    present = pd.DataFrame(
        {str(np.asarray(t.obs[K.OBS.SECTION])[0]) if K.OBS.SECTION in t.obs else f"s{i}": True
         for i, t in enumerate(tables)}, index=[0]
    )
    gene_sets = [t.var_names for t in tables]
    combined = ad.concat(tables, join=join, merge="same", uns_merge=None, fill_value=0, index_unique=None)
    if combined.obs_names.has_duplicates:
        raise ValueError("Spot names collide across sections; give each section a distinct id.")
    combined.X = sp.csr_matrix(combined.X, dtype=np.float32)
    secs = list(present.columns)
    mask = pd.DataFrame({s: combined.var_names.isin(g) for s, g in zip(secs, gene_sets, strict=True)},
                        index=combined.var_names)
    combined.varm[K.VARM.GENES_PRESENT] = mask
    for c in (K.OBS.SECTION, K.OBS.REGION, K.OBS.PATIENT):
        if c in combined.obs:
            combined.obs[c] = pd.Categorical(combined.obs[c].astype(str))
    combined.uns[K.UNS.SECTIONS] = sections_meta
    regions = list(dict.fromkeys(combined.obs[K.OBS.REGION].astype(str)))
    table = TableModel.parse(combined, region=regions, region_key=K.OBS.REGION, instance_key=K.OBS.INSTANCE)
    return SpatialData(images=images, shapes=shapes, tables={K.TABLES.DEFAULT: table})


def genes_present_in(adata: AnnData, sections: Sequence[str]) -> np.ndarray:
    """Boolean mask of genes measured in every one of ``sections``."""
    if K.VARM.GENES_PRESENT not in adata.varm:
        return np.ones(adata.n_vars, bool)
    m = adata.varm[K.VARM.GENES_PRESENT]
    cols = [s for s in sections if s in m.columns]
    if not cols:
        return np.ones(adata.n_vars, bool)
    return np.asarray(m[cols].all(axis=1))
