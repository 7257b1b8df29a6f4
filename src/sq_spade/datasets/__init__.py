"""Public datasets (pooch, pinned) and synthetic tissue for tests."""

from sq_spade.datasets._fetch import DataUnavailableError, data_dir, fetch
from sq_spade.datasets._public import (
    her2st,
    her2st_labels,
    histogene_genes,
    stutility_mob,
    visium_fixture,
    visium_mini,
)
from sq_spade.datasets._synthetic import synthetic_section

__all__ = [
    "DataUnavailableError",
    "data_dir",
    "fetch",
    "her2st",
    "her2st_labels",
    "histogene_genes",
    "stutility_mob",
    "synthetic_section",
    "visium_fixture",
    "visium_mini",
]
