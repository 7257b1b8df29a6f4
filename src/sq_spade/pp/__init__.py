"""Preprocessing: patches around spots, gene panels, normalisation, frozen backbone features."""

from sq_spade.pp._genes import normalize, select_genes
from sq_spade.pp._patches import Patches, extract_patches, patches

__all__ = ["Patches", "extract_patches", "normalize", "patches", "select_genes"]
