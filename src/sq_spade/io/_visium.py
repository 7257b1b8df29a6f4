"""Reader for 10x Visium (Space Ranger output) through spatialdata-io."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sq_spade import _constants as K
from sq_spade._docs import inject_docs
from sq_spade._validation import (
    check_positive,
    check_positive_number,
    check_section_id,
    get_table,
    is_spatialdata,
)
from sq_spade.io._sections import image_levels

if TYPE_CHECKING:
    from spatialdata import SpatialData

VISIUM_SPOT_DIAMETER_UM = 55.0


def _rgb_only(img: Any) -> Any:
    """Drop an alpha channel Space Ranger sometimes writes into its PNGs; keep transforms."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    level = image_levels(img)[0]
    if level.sizes["c"] == 3:
        return img
    if level.sizes["c"] != 4:
        raise ValueError(f"Visium image has {level.sizes['c']} channels; expected RGB (3) or RGBA (4).")
    tr = get_transformation(img, get_all=True)
    return Image2DModel.parse(level.data[:3], dims=("c", "y", "x"), transformations=tr, c_coords=["r", "g", "b"])


def _library_id(path: Path, counts_file: str) -> str:
    """Section id of a Space Ranger folder: the library id, else the folder name.

    The library id is the file-name prefix spatialdata-io reads (``<id>_<counts_file>``), else
    the ``library_ids`` attribute of the counts h5 file; the folder is ``path`` (its parent
    when ``path`` is Space Ranger's ``outs``).
    """
    prefixed = sorted(p.name for p in path.glob(f"*_{counts_file}"))
    if prefixed:
        return prefixed[0][: -len(f"_{counts_file}")]
    h5 = path / counts_file
    if h5.suffix == ".h5" and h5.is_file():
        try:
            import h5py

            with h5py.File(h5, "r") as f:
                ids = f.attrs.get("library_ids")
            if ids is not None and len(np.atleast_1d(ids)):
                first = np.atleast_1d(ids)[0]
                lib = first.decode() if isinstance(first, bytes) else str(first)
                if lib:
                    return lib
        except (ImportError, OSError):
            pass
    return path.parent.name if path.name == "outs" else path.name


def read_visium(
    path: str | os.PathLike,
    *,
    sample_id: str | None = None,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    fullres_image_file: str | os.PathLike | None = None,
    patient: str | None = None,
    in_tissue_only: bool = True,
    **kwargs: Any,
) -> SpatialData:
    """Read a Space Ranger output folder into a SpatialData laid out like every sq_spade reader.

    Reading is done by :func:`spatialdata_io.visium`; sq_spade then adopts the object as
    :func:`from_spatialdata` does: the micrometre coordinate system ``"<id>_um"`` on every
    element, with the pixel size taken from ``spot_diameter_fullres`` (a Visium spot is 55 um
    across), alpha channels dropped, and ``obs`` annotated (``section``, ``array_row``,
    ``array_col``, ``in_tissue``).

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (with ``spatial/``).
    sample_id
        Section id; defaults to the library id (the ``<id>_`` prefix of the counts file that
        spatialdata-io reads, else the ``library_ids`` of the counts h5 file), else the folder
        name (the parent's for a folder named ``outs``).
    counts_file
        Counts file name inside ``path``.
    fullres_image_file
        Optional full-resolution H&E image (relative to ``path``), to extract patches at full
        resolution; otherwise the hires and lowres images are used.
    patient
        Patient id stored in ``obs['patient']``.
    in_tissue_only
        Keep only spots under tissue.
    **kwargs
        Passed to :func:`spatialdata_io.visium`.

    Returns
    -------
    SpatialData with images ``"<id>_hires_image"``, ``"<id>_lowres_image"`` (and
    ``"<id>_full_image"``), circles ``"<id>"`` and table ``"table"``.

    Examples
    --------
    >>> sd = sqs.io.read_visium("outs/", sample_id="V1")  # doctest: +SKIP
    """
    import spatialdata_io

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"`path` must be a Space Ranger output folder; {str(path)!r} is not a directory.")
    sf_path = path / "spatial" / "scalefactors_json.json"
    if not sf_path.is_file():
        raise FileNotFoundError(f"`path` has no spatial/scalefactors_json.json: {str(sf_path)!r}.")
    try:
        scalef = json.loads(sf_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"`path`: {str(sf_path)!r} is not valid JSON: {e}") from e
    if not isinstance(scalef, dict) or "spot_diameter_fullres" not in scalef:
        raise ValueError(f"{str(sf_path)!r} lacks 'spot_diameter_fullres': the pixel size cannot be known.")
    diameter_px = check_positive_number(scalef["spot_diameter_fullres"],
                                        f"'spot_diameter_fullres' in {str(sf_path)!r} (the spot diameter in pixels)")
    mpp = VISIUM_SPOT_DIAMETER_UM / diameter_px
    dataset_id = check_section_id(str(sample_id) if sample_id is not None else _library_id(path, counts_file),
                                  "sample_id" if sample_id is not None else "sample_id (read from the files)")
    sd = spatialdata_io.visium(path, dataset_id=dataset_id, counts_file=counts_file,
                               fullres_image_file=fullres_image_file, **kwargs)
    return _adopt(sd, dataset_id, section=dataset_id, mpp=mpp, source="spot_diameter_fullres", patient=patient,
                  in_tissue_only=in_tissue_only)


def _adopt(sd: SpatialData, dataset_id: str, *, section: str, mpp: float, source: str, patient: str | None,
           in_tissue_only: bool, table_key: str = K.TABLES.DEFAULT) -> SpatialData:
    """A spatialdata-io Visium object of one dataset, laid out as sq_spade's readers do."""
    from spatialdata import SpatialData
    from spatialdata.transformations import Scale, get_transformation, set_transformation
    from spatialdata.transformations import Sequence as Seq

    if dataset_id not in sd.shapes:
        raise KeyError(f"No spot circles {dataset_id!r} in `sdata`; shapes: {sorted(sd.shapes)}.")
    cs = K.microns_cs(section)
    images = {k: _rgb_only(v) for k, v in sd.images.items() if dataset_id in get_transformation(v, get_all=True)}
    shapes = {dataset_id: sd.shapes[dataset_id]}
    for el in [*images.values(), *shapes.values()]:
        base = get_transformation(el, to_coordinate_system=dataset_id)
        set_transformation(el, Seq([base, Scale([mpp, mpp], axes=("x", "y"))]), to_coordinate_system=cs)
    table = sd.tables[table_key]
    region = table.obs[table.uns[K.UNS.SPATIALDATA_ATTRS]["region_key"]].astype(str).to_numpy() \
        if K.UNS.SPATIALDATA_ATTRS in table.uns else np.full(table.n_obs, dataset_id)
    table = table[region == dataset_id].copy()
    if in_tissue_only and "in_tissue" in table.obs:
        keep = table.obs["in_tissue"].to_numpy() == 1
        if not keep.any():
            raise ValueError("No spot is under tissue (`in_tissue == 1`); pass `in_tissue_only=False`.")
        table = table[keep].copy()
    table.obs[K.OBS.SECTION] = pd.Categorical([section] * table.n_obs)
    if "in_tissue" in table.obs:
        table.obs[K.OBS.IN_TISSUE] = table.obs["in_tissue"].to_numpy() == 1
    if patient is not None:
        table.obs[K.OBS.PATIENT] = pd.Categorical([str(patient)] * table.n_obs)
    table.obs_names = [f"{section}_{b}" for b in table.obs_names]
    import scipy.sparse as sp

    table.X = sp.csr_matrix(table.X, dtype=np.float32)
    table.uns[K.UNS.SECTIONS] = {section: {
        "image": next(iter(images), None), "shapes": dataset_id, "microns_per_pixel": mpp,
        "spot_diameter_um": VISIUM_SPOT_DIAMETER_UM, "microns_per_pixel_source": source,
        "layout": "visium"}}
    return SpatialData(images=images, shapes=shapes, tables={K.TABLES.DEFAULT: table})


@inject_docs
def from_spatialdata(
    sdata: SpatialData,
    *,
    section: str | None = None,
    microns_per_pixel: float | None = None,
    table_key: str = K.TABLES.DEFAULT,
    patient: str | None = None,
    in_tissue_only: bool = True,
) -> SpatialData:
    """Adopt a Visium SpatialData from :func:`spatialdata_io.visium` in one call.

    What sq_spade needs and spatialdata-io leaves implicit is added: the micrometre
    coordinate system ``"<section>_um"`` on the images and spots, with the pixel size from the
    spot circles (spatialdata-io stores ``spot_diameter_fullres / 2`` as their radius, and a
    Visium spot is 55 um across) unless ``microns_per_pixel`` is given; RGBA images lose their
    alpha channel; ``obs`` gains ``section`` and ``in_tissue``. Images and shapes are shared with
    ``sdata`` (their transformations gain the new coordinate system); the table is copied.

    Parameters
    ----------
    sdata
        A SpatialData of one Visium dataset, as :func:`spatialdata_io.visium` returns it.
    section
        Section id (default: the dataset id, i.e. the name of the spot circles).
    microns_per_pixel
        Pixel size of the full-resolution coordinate system (default: from the spot radius).
    %(table_key)s
    patient
        Patient id stored in ``obs['patient']``.
    in_tissue_only
        Keep only spots under tissue.

    Returns
    -------
    A SpatialData laid out like every sq_spade reader's: images, circles ``"<dataset id>"``
    and table ``"table"``.

    Examples
    --------
    >>> import spatialdata_io  # doctest: +SKIP
    >>> sd = sqs.io.from_spatialdata(spatialdata_io.visium("outs/"))  # doctest: +SKIP
    >>> sqs.pp.compute_features(sd)  # doctest: +SKIP
    """
    if not is_spatialdata(sdata):
        raise TypeError(f"`sdata` must be a SpatialData from spatialdata_io.visium, got {type(sdata).__name__}.")
    table = get_table(sdata, table_key)
    attrs = table.uns.get(K.UNS.SPATIALDATA_ATTRS, {})
    regions = attrs.get("region")
    regions = [regions] if isinstance(regions, str) else list(regions or [])
    circles = [r for r in regions if r in sdata.shapes]
    if len(circles) != 1:
        raise ValueError(f"`sdata` must hold one Visium dataset: table {table_key!r} annotates {regions}, of which "
                         f"{circles} are shapes. Split it with `sdata.subset(...)` first.")
    dataset_id = circles[0]
    if microns_per_pixel is None:
        radius = np.asarray(sdata.shapes[dataset_id]["radius"], dtype=np.float64) \
            if "radius" in sdata.shapes[dataset_id] else np.array([])
        if radius.size == 0 or not np.isfinite(radius).all() or (radius <= 0).any():
            raise ValueError(f"The spots {dataset_id!r} carry no radius to infer the pixel size from; pass "
                             "`microns_per_pixel=` (full-resolution um/px, e.g. 55 / spot_diameter_fullres).")
        mpp, source = VISIUM_SPOT_DIAMETER_UM / (2 * float(np.median(radius))), "spot radius (55 um spots)"
    else:
        check_positive(microns_per_pixel, "microns_per_pixel")
        mpp, source = float(microns_per_pixel), "given"
    return _adopt(sdata, dataset_id, section=str(section) if section is not None else dataset_id, mpp=mpp,
                  source=source, patient=patient, in_tissue_only=in_tissue_only, table_key=table_key)
