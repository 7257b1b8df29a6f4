"""Readers into SpatialData and helpers for sections (physical scale, combining)."""

from sq_spade.io._hest import read_hest
from sq_spade.io._images import read_rgb
from sq_spade.io._sections import (
    Section,
    combine_sections,
    get_sections,
    section_from_arrays,
    set_microns_per_pixel,
    spot_centers_um,
)
from sq_spade.io._st import infer_microns_per_pixel, read_st
from sq_spade.io._visium import from_spatialdata, read_visium
from sq_spade.io._wsi import read_wsi

__all__ = [
    "Section",
    "combine_sections",
    "from_spatialdata",
    "get_sections",
    "infer_microns_per_pixel",
    "read_hest",
    "read_rgb",
    "read_st",
    "read_visium",
    "read_wsi",
    "section_from_arrays",
    "set_microns_per_pixel",
    "spot_centers_um",
]
