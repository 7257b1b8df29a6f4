"""Reader for a HEST-1k sample: ``st/<id>.h5ad``, ``wsis/<id>.tif``, ``metadata/<id>.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sq_spade import _constants as K
from sq_spade._validation import check_positive_number, check_section_id
from sq_spade.io._sections import section_from_arrays

if TYPE_CHECKING:
    from spatialdata import SpatialData


def _lazy_tiff(path: Path):
    """Level 0 of a (pyramidal) TIFF as a lazy dask array (H, W, 3), read through tifffile's zarr store."""
    import dask.array as da
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        shape, dtype = series.shape, series.dtype
    if dtype != np.uint8:
        raise ValueError(f"`wsi` must be an 8-bit RGB image; {path.name!r} has dtype {dtype}.")
    store = tifffile.imread(path, aszarr=True, level=0)
    z = zarr.open(store, mode="r")
    arr = da.from_zarr(z)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"`wsi` must be an RGB image (H, W, 3); {path.name!r} has shape {shape}.")
    return arr


def _check_raw_counts(X: Any, where: str) -> None:
    """Refuse an ``X`` that is not raw counts (non-integer values: log-normalised data)."""
    import scipy.sparse as sp

    data = X.data if sp.issparse(X) else np.asarray(X)
    sample = np.asarray(data).ravel()[:1_000_000]
    if sample.size and (not np.isfinite(sample).all() or (sample < 0).any() or (sample != np.round(sample)).any()):
        raise ValueError(f"{where}: X must hold raw counts (non-negative integers), but it holds non-integer or "
                         f"negative values (log-normalised data?). sq_spade normalises counts itself.")


def read_hest(
    sample_id: str,
    root: str | os.PathLike | None = None,
    *,
    h5ad: str | os.PathLike | None = None,
    wsi: str | os.PathLike | None = None,
    metadata: str | os.PathLike | None = None,
    spot_diameter_um: float | None = None,
    patient: str | None = None,
) -> SpatialData:
    """Read a HEST-1k sample into a SpatialData.

    The whole-slide image is read lazily (tifffile's zarr store through dask); the pixel size
    comes from the metadata's ``pixel_size_um_estimated`` and spot centres from the h5ad's
    ``obsm['spatial']`` (full-resolution pixels).

    Parameters
    ----------
    sample_id
        HEST sample id (e.g. ``"TENX95"``); names the elements.
    root
        HEST folder with ``st/``, ``wsis/`` and ``metadata/``; or give the three paths.
    h5ad, wsi, metadata
        Explicit file paths (override ``root``).
    spot_diameter_um
        Spot diameter; defaults to the metadata's ``spot_diameter`` or 55 um (Visium).
    patient
        Patient id; defaults to the metadata's ``patient`` when present.

    Examples
    --------
    >>> sd = sqs.io.read_hest("TENX95", "hest_data/")  # doctest: +SKIP
    """
    import anndata as ad

    check_section_id(sample_id, "sample_id")
    if root is None and (h5ad is None or wsi is None or metadata is None):
        raise ValueError("Give `root` (the HEST folder) or all of `h5ad`, `wsi` and `metadata`.")
    root_p = Path(root) if root is not None else None
    h5ad = Path(h5ad) if h5ad is not None else root_p / "st" / f"{sample_id}.h5ad"
    wsi = Path(wsi) if wsi is not None else root_p / "wsis" / f"{sample_id}.tif"
    metadata = Path(metadata) if metadata is not None else root_p / "metadata" / f"{sample_id}.json"
    for arg, p in (("h5ad", h5ad), ("wsi", wsi), ("metadata", metadata)):
        if not p.is_file():
            raise FileNotFoundError(f"`{arg}`: no such file {str(p)!r}.")
    try:
        meta = json.loads(metadata.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"`metadata` {metadata.name!r} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"`metadata` {metadata.name!r} must hold a JSON object.")
    src = "pixel_size_um_estimated" if meta.get("pixel_size_um_estimated") is not None else "pixel_size_um_embedded"
    if meta.get(src) is None:
        raise ValueError(f"`metadata` {metadata.name!r} has no 'pixel_size_um_estimated': the pixel size is unknown.")
    mpp = check_positive_number(meta[src], f"`metadata` {metadata.name!r}: {src!r} (um per pixel)")
    if spot_diameter_um is not None:
        diameter = check_positive_number(spot_diameter_um, "`spot_diameter_um`")
    elif meta.get("spot_diameter") is not None:
        diameter = check_positive_number(meta["spot_diameter"], f"`metadata` {metadata.name!r}: 'spot_diameter' (um)")
    else:
        diameter = 55.0  # Visium
    adata = ad.read_h5ad(h5ad)
    if K.OBSM.SPATIAL not in adata.obsm:
        raise ValueError(f"`h5ad` {h5ad.name!r} has no obsm['spatial'] with the spot centres.")
    _check_raw_counts(adata.X, f"`h5ad` {h5ad.name!r}")
    xy = np.asarray(adata.obsm[K.OBSM.SPATIAL], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise ValueError(f"`h5ad` {h5ad.name!r}: obsm['spatial'] must hold finite (x, y) pixel centres for every "
                         f"spot; {int((~np.isfinite(xy).all(axis=1)).sum()) if xy.ndim == 2 else 'some'} rows do not.")
    img = _lazy_tiff(wsi)
    obs = adata.obs.copy()
    array_coords = None
    if {"array_col", "array_row"} <= set(obs.columns):
        ac = obs[["array_col", "array_row"]].to_numpy(np.float64)
        if not np.isfinite(ac).all() or (ac != np.round(ac)).any():
            raise ValueError(f"`h5ad` {h5ad.name!r}: obs 'array_col'/'array_row' must be finite integers (the spots' "
                             f"grid positions); {int((~np.isfinite(ac).all(axis=1)).sum())} rows are NaN or infinite.")
        array_coords = ac.astype(int)
    in_tissue = obs["in_tissue"].to_numpy() == 1 if "in_tissue" in obs else None
    extra = obs.drop(columns=[c for c in ("array_col", "array_row", "in_tissue") if c in obs.columns])
    sd = section_from_arrays(
        adata.X, genes=adata.var_names, spot_ids=adata.obs_names, centers_px=np.asarray(adata.obsm[K.OBSM.SPATIAL])[:, :2],
        image=img, section=sample_id, microns_per_pixel=float(mpp), spot_diameter_um=diameter,
        array_coords=array_coords, in_tissue=in_tissue, obs=extra,
        patient=patient if patient is not None else meta.get("patient"),
    )
    info = sd.tables[K.TABLES.DEFAULT].uns[K.UNS.SECTIONS][sample_id]
    info.update({"microns_per_pixel_source": "pixel_size_um_estimated", "layout": "hest",
                 "hest_metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}})
    return sd
