"""Whole-slide image files (pyramidal TIFF, OME-TIFF, svs, ndpi) as lazy SpatialData images.

The file's own pyramid is used level by level (nothing is recomputed or loaded: each level is a
dask array over the file's tiles, read on demand). Pyramidal TIFF and OME-TIFF are read with
tifffile; svs and ndpi with tiffslide (``pip install 'sq_spade[wsi]'``). The microns per pixel
come from the file's metadata (OME ``PhysicalSizeX``, Aperio ``MPP``, TIFF resolution tags in
centimetres or inches); a file without them is refused unless ``microns_per_pixel`` is given.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sq_spade import _constants as K
from sq_spade._validation import check_positive

if TYPE_CHECKING:
    from spatialdata import SpatialData

_SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".mrxs", ".bif")
_UM_PER_UNIT = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_mpp(xml: str) -> float | None:
    m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', xml)
    if not m:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', xml)
    return float(m.group(1)) * _UM_PER_UNIT.get(unit.group(1) if unit else "µm", 1.0)


def _tiff_mpp(tif: Any) -> float | None:
    """Microns per pixel of a tifffile.TiffFile from OME, Aperio or resolution-tag metadata."""
    if tif.ome_metadata:
        mpp = _ome_mpp(tif.ome_metadata)
        if mpp:
            return mpp
    page = tif.pages[0]
    desc = page.description or ""
    m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
    if m:
        return float(m.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den and unit in (2, 3):  # inch, centimetre
            mpp = (25400.0 if unit == 2 else 10000.0) * den / num
            # 72 or 96 dpi are writers' defaults, not a scan's resolution
            return mpp if mpp < 100 else None
    return None


def _levels_tifffile(path: Path) -> tuple[list[Any], float | None]:
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        mpp = _tiff_mpp(tif)
        series = tif.series[0]
        axes = series.axes
    store = tifffile.imread(path, aszarr=True)
    grp = zarr.open(store, mode="r")
    arrays = [grp[k] for k in sorted(grp.array_keys(), key=int)] if isinstance(grp, zarr.Group) else [grp]
    levels = [_to_cyx(a, axes, path) for a in arrays]
    return levels, mpp


def _levels_tiffslide(path: Path) -> tuple[list[Any], float | None]:
    try:
        from tiffslide import TiffSlide
    except ImportError as e:
        raise ImportError(f"Reading {path.suffix} files needs tiffslide: pip install 'sq_spade[wsi]'.") from e
    slide = TiffSlide(path)
    mpp = slide.properties.get("tiffslide.mpp-x")
    grp = slide.zarr_group
    levels = [_to_cyx(grp[str(i)], "YXS", path) for i in range(slide.level_count)]
    return levels, (float(mpp) if mpp else None)


class _ChannelsFirst:
    """A read-only (3, H, W) view of an (H, W, C) stored array: windows read straight from it.

    Wrapped by ``da.from_array`` it is a plain stored array to :mod:`sq_spade.pp` patches, which
    then slice it directly (only the file tiles a window touches are decoded) instead of going
    through a dask transpose, whose graph work per window grows with the slide.
    """

    def __init__(self, arr: Any):
        self._arr = arr
        h, w = arr.shape[:2]
        self.shape = (3, int(h), int(w))
        self.dtype = np.dtype(arr.dtype)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        c, y, x = key
        win = np.asarray(self._arr[y, x, :3])
        return np.ascontiguousarray(np.moveaxis(win, -1, 0)[c])


def _to_cyx(arr: Any, axes: str, path: Path) -> Any:
    """An (H, W, 3) / (3, H, W) uint8 stored level as a (3, H, W) dask array; other layouts refused."""
    import dask.array as da

    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and axes.endswith("S"):
        chunks = getattr(arr, "chunks", None)
        tile = tuple(chunks[:2]) if chunks and isinstance(chunks[0], int) else (1024, 1024)
        arr = da.from_array(_ChannelsFirst(arr), chunks=(3, *tile), asarray=False)
    elif arr.ndim == 3 and arr.shape[0] in (3, 4):
        arr = da.from_array(arr, chunks=(arr.shape[0], 1024, 1024))[:3]
    else:
        raise ValueError(f"`path`: {path.name!r} has a level of shape {arr.shape} (axes {axes!r}); "
                         "expected an RGB slide (H, W, 3).")
    if arr.dtype != np.uint8:
        raise ValueError(f"`path`: {path.name!r} has dtype {arr.dtype}; sq_spade reads 8-bit RGB slides.")
    return arr


def read_wsi(path: str | os.PathLike, *, section: str | None = None,
             microns_per_pixel: float | None = None) -> SpatialData:
    """Read a whole-slide image lazily into a SpatialData with one multiscale image.

    Parameters
    ----------
    path
        A pyramidal TIFF or OME-TIFF (tifffile), or an svs / ndpi file (tiffslide, the ``wsi``
        extra).
    section
        Section id (names the image ``f"{section}_image"`` and the coordinate system
        ``f"{section}_um"``); default: the file's stem.
    microns_per_pixel
        The finest level's pixel size, when the file's metadata lacks it (or to override it).

    Returns
    -------
    A SpatialData with the image only (no spots, no table), every level of the file's pyramid
    as a lazy dask array: ready for :func:`sq_spade.pp.detect_tissue` and
    :func:`sq_spade.pp.tile_tissue`.

    Raises
    ------
    ValueError
        The file records no microns per pixel and ``microns_per_pixel`` is not given, or it is
        not 8-bit RGB.

    Examples
    --------
    >>> slide = sqs.io.read_wsi("slide.ome.tif")  # doctest: +SKIP
    >>> sqs.pp.tile_tissue(slide, tile_um=112)  # doctest: +SKIP
    """
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale
    from spatialdata.transformations._utils import _set_transformations, compute_coordinates
    from xarray import DataArray, Dataset, DataTree

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`path`: no such slide file: {str(path)!r}.")
    if microns_per_pixel is not None:
        check_positive(microns_per_pixel, "microns_per_pixel")
    reader = _levels_tiffslide if path.suffix.lower() in _SLIDE_SUFFIXES else _levels_tifffile
    levels, mpp = reader(path)
    if microns_per_pixel is not None:
        mpp = float(microns_per_pixel)
    if not mpp:
        raise ValueError(f"`path`: {path.name!r} records no microns per pixel (no OME PhysicalSizeX, Aperio MPP "
                         "or resolution tags in cm/inch); pass `microns_per_pixel`.")
    section = str(section) if section is not None else path.name.split(".")[0]
    # finest first, each coarser than the one before
    levels = sorted(levels, key=lambda a: -a.shape[2])
    tree = DataTree.from_dict({
        f"scale{i}": Dataset({"image": DataArray(a, dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})})
        for i, a in enumerate(levels)})
    # what Image2DModel.parse does for the pyramids it builds: each level gets level 0's transformation
    # preceded by its own downscaling (from the level shapes)
    _set_transformations(tree, {K.microns_cs(section): Scale([mpp, mpp], axes=("x", "y"))})
    tree = compute_coordinates(tree)
    Image2DModel().validate(tree)
    return SpatialData(images={f"{section}_image": tree})
