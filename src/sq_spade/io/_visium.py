"""Reader for 10x Visium (Space Ranger output) through spatialdata-io."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sq_spade import _constants as K
from sq_spade._validation import check_positive_number, check_section_id
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

    Reading is done by :func:`spatialdata_io.visium`; sq_spade then adds the micrometre
    coordinate system ``"<id>_um"`` to every element, with the pixel size taken from
    ``spot_diameter_fullres`` (a Visium spot is 55 um across), drops alpha channels, and
    annotates ``obs`` (``section``, ``array_row``, ``array_col``, ``in_tissue``).

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (with ``spatial/``).
    sample_id
        Section id; defaults to the library id spatialdata-io infers, or the folder name.
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
    from spatialdata import SpatialData
    from spatialdata.transformations import Scale, get_transformation, set_transformation
    from spatialdata.transformations import Sequence as Seq

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
    dataset_id = check_section_id(sample_id if sample_id is not None else path.name,
                                  "sample_id" if sample_id is not None else "path (its folder name, the default sample_id)")
    sd = spatialdata_io.visium(path, dataset_id=dataset_id, counts_file=counts_file,
                               fullres_image_file=fullres_image_file, **kwargs)
    section = str(dataset_id)
    cs = K.microns_cs(section)
    images = {k: _rgb_only(v) for k, v in sd.images.items()}
    for el in [*images.values(), *sd.shapes.values()]:
        base = get_transformation(el, to_coordinate_system=dataset_id)
        set_transformation(el, Seq([base, Scale([mpp, mpp], axes=("x", "y"))]), to_coordinate_system=cs)
    table = sd.tables[K.TABLES.DEFAULT]
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
        "image": next(iter(images), None), "shapes": section, "microns_per_pixel": mpp,
        "spot_diameter_um": VISIUM_SPOT_DIAMETER_UM, "microns_per_pixel_source": "spot_diameter_fullres",
        "layout": "visium"}}
    return SpatialData(images=images, shapes=dict(sd.shapes), tables={K.TABLES.DEFAULT: table})
