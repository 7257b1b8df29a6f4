"""Every key that sq_spade reads from or writes into AnnData / SpatialData, in one place."""

from __future__ import annotations

# --- coordinate systems -------------------------------------------------------------------
#: Suffix of the per-section physical coordinate system. Every image and shapes element of a
#: section ``s`` carries a transformation to ``f"{s}{MICRONS_SUFFIX}"`` whose unit is the
#: micrometre; this is the one place where the physical pixel size is recorded.
MICRONS_SUFFIX = "_um"

# --- table layout ---------------------------------------------------------------------------
TABLE_KEY = "table"
REGION_KEY = "region"  # column naming the shapes element (one per section)
INSTANCE_KEY = "spot_id"  # column linking a row to its circle in the shapes element
SECTION_KEY = "section"  # categorical section id
ARRAY_ROW = "array_row"
ARRAY_COL = "array_col"
IN_TISSUE = "in_tissue"
PATIENT_KEY = "patient"

#: ``varm`` DataFrame: which genes were measured in which section (combined objects).
GENES_PRESENT = "genes_present"

# --- patches -------------------------------------------------------------------------------
PATCHES_UNS = "sq_spade_patches"  # geometry of the last extract_patches call
PATCH_TISSUE = "patch_tissue_fraction"
PATCH_PADDED = "patch_padded_fraction"

# --- panels and normalisation --------------------------------------------------------------
PANEL_VAR = "sq_spade_panel"  # boolean var column
PANEL_UNS = "sq_spade_panel"
NORMALIZED_LAYER = "log1p_cp10k"
COUNTS_LAYER = "counts"

# --- features / embeddings / predictions -----------------------------------------------------
FEATURES_UNS = "sq_spade_features"  # uns[FEATURES_UNS][obsm_key] -> provenance
SPADE_KEY = "X_spade"
SPADE_EXPERT = "spade_expert"
SPADE_UNS = "spade"
MCLSTEXP_KEY = "X_mclstexp"
PREDICTED_LAYER = "predicted"
PREDICTION_UNS = "sq_spade_prediction"
PREDICTED_TABLE = "predicted"


def features_key(backbone: str) -> str:
    """Default ``obsm`` key of a backbone's features."""
    return f"X_{backbone}"


def microns_cs(section: str) -> str:
    """Name of the micrometre coordinate system of ``section``."""
    return f"{section}{MICRONS_SUFFIX}"
