"""Every key that sq_spade reads from or writes into AnnData / SpatialData, and every option set.

Keys are grouped by where they live (scvi-tools' ``REGISTRY_KEYS`` style): ``K.OBS.SECTION`` is
the ``obs`` column of section ids, ``K.UNS.SECTIONS`` the ``uns`` entry of per-section metadata.
The flat names of earlier versions (``K.SECTION_KEY``, ``K.PANEL_UNS``...) stay as aliases.

Option sets are declared once, as a ``Literal`` alias for signatures and a tuple for checks
(``LOSSES = get_args(Loss)``), so the check, the signature and the documentation cannot drift.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

# --- coordinate systems -------------------------------------------------------------------
#: Suffix of the per-section physical coordinate system. Every image and shapes element of a
#: section ``s`` carries a transformation to ``f"{s}{MICRONS_SUFFIX}"`` whose unit is the
#: micrometre; this is the one place where the physical pixel size is recorded.
MICRONS_SUFFIX = "_um"
#: Suffix of the labels element holding a section's tissue mask (``pp.detect_tissue``).
TISSUE_SUFFIX = "_tissue"
#: Suffix of the shapes element of a section's tiles (``pp.tile_tissue``).
TILES_SUFFIX = "_tiles"


# --- keys, by where they live ---------------------------------------------------------------
class _Tables(NamedTuple):
    DEFAULT: str = "table"  # the annotation table of a SpatialData
    PREDICTED: str = "predicted"  # predictions table written by tl.predict_expression
    TILES: str = "tiles"  # tiles table written by pp.tile_tissue


class _Obs(NamedTuple):
    REGION: str = "region"  # names the shapes element (one per section)
    INSTANCE: str = "spot_id"  # links a row to its circle in the shapes element
    SECTION: str = "section"  # categorical section id
    ARRAY_ROW: str = "array_row"
    ARRAY_COL: str = "array_col"
    IN_TISSUE: str = "in_tissue"
    PATIENT: str = "patient"
    PATCH_TISSUE: str = "patch_tissue_fraction"  # written by pp.extract_patches
    PATCH_PADDED: str = "patch_padded_fraction"
    SPADE_EXPERT: str = "spade_expert"  # expert of each spot (tl.train_experts, tl.embed)
    TILE_TISSUE: str = "tile_tissue_fraction"  # written by pp.tile_tissue
    TILE_ROW: str = "tile_row"  # grid indices of a tile
    TILE_COL: str = "tile_col"
    DOMAIN: str = "domain"  # written by tl.spatial_domains


class _Var(NamedTuple):
    PANEL: str = "sq_spade_panel"  # boolean: the gene panel of pp.select_genes
    OBSERVED: str = "observed"  # predictions table: genes the query measured


class _Varm(NamedTuple):
    GENES_PRESENT: str = "genes_present"  # DataFrame: which genes each section measured


class _Obsm(NamedTuple):
    SPATIAL: str = "spatial"  # spot centres in pixels of the section's image
    SPADE: str = "X_spade"
    MCLSTEXP: str = "X_mclstexp"


class _Layers(NamedTuple):
    NORMALIZED: str = "log1p_cp10k"
    COUNTS: str = "counts"
    PREDICTED: str = "predicted"
    # beside a prediction layer ``<key_added>``: ``<key_added>_sd`` etc. (the default names)
    PREDICTED_SD: str = "predicted_sd"  # predictive standard deviation (retrieval + ensemble spread)
    PREDICTED_LOWER: str = "predicted_lower"  # conformal interval, lower end
    PREDICTED_UPPER: str = "predicted_upper"  # conformal interval, upper end


class _Uns(NamedTuple):
    SECTIONS: str = "sq_spade_sections"  # per section: microns_per_pixel, image and shapes keys...
    PATCHES: str = "sq_spade_patches"  # geometry of the last pp.extract_patches call
    PANEL: str = "sq_spade_panel"  # how the panel was chosen
    NORMALIZE: str = "sq_spade_normalize"  # per layer: parameters of pp.normalize
    FEATURES: str = "sq_spade_features"  # per obsm key: provenance of the features
    SPADE: str = "spade"  # tl.train_experts / tl.embed provenance
    MCLSTEXP: str = "mclstexp"  # tl.train_contrastive provenance
    PREDICTION: str = "sq_spade_prediction"  # per layer: parameters of tl.predict_expression
    PREDICTION_X: str = "sq_spade_prediction_x"  # predictions table: the layer X copies (the latest)
    UMAP: str = "sq_spade_umap"  # per obsm key X_umap_<basis>: parameters of the UMAP pl.embedding stored
    TISSUE: str = "sq_spade_tissue"  # attrs of a tissue mask: level, threshold, area
    TILES: str = "sq_spade_tiles"  # parameters of pp.tile_tissue
    DOMAINS: str = "sq_spade_domains"  # parameters of tl.spatial_domains
    SLIDES: str = "sq_spade_slides"  # tl.slide_embedding: one vector per section
    SPATIALDATA_ATTRS: str = "spatialdata_attrs"  # spatialdata's own: region and instance keys


#: Layers a prediction may have beside ``<key_added>``: ``<key_added>_sd``, ``_lower``, ``_upper``.
UNCERTAINTY_SUFFIXES: tuple[str, ...] = ("sd", "lower", "upper")

TABLES = _Tables()
OBS = _Obs()
VAR = _Var()
VARM = _Varm()
OBSM = _Obsm()
LAYERS = _Layers()
UNS = _Uns()

#: Entries of a feature provenance record (``uns['sq_spade_features'][key]``) that must agree
#: between features used together (training and prediction, reference and query), with the value
#: an older record that lacks the entry is taken to have. Entries not listed (version, device,
#: cache use) never change the features.
FEATURE_PROVENANCE_DEFAULTS: dict[str, object] = {
    "backbone": None, "weights_sha256": None, "dim": None, "input_size": None,
    "patch_geometry": None, "tta": False, "layers": ("final",), "zscore": None,
}
#: Key of a model config's ``params`` holding the provenance of its training features.
FEATURE_PROVENANCE_PARAM = "feature_provenance"
#: Entries of a recorded patch geometry compared the same way (``sections`` says where, not how).
PATCH_GEOMETRY_DEFAULTS: dict[str, object] = {
    "patch_size_um": None, "mpp": None, "patch_px": None, "fill": 255, "mode": "physical",
}

#: Attribute of a feature store's root zarr group (``pp.write_feature_store``).
FEATURE_STORE_ATTR = "sq_spade_feature_store"

# flat aliases of the keys above (the names of earlier versions)
TABLE_KEY = TABLES.DEFAULT
PREDICTED_TABLE = TABLES.PREDICTED
REGION_KEY = OBS.REGION
INSTANCE_KEY = OBS.INSTANCE
SECTION_KEY = OBS.SECTION
ARRAY_ROW = OBS.ARRAY_ROW
ARRAY_COL = OBS.ARRAY_COL
IN_TISSUE = OBS.IN_TISSUE
PATIENT_KEY = OBS.PATIENT
PATCH_TISSUE = OBS.PATCH_TISSUE
PATCH_PADDED = OBS.PATCH_PADDED
SPADE_EXPERT = OBS.SPADE_EXPERT
PANEL_VAR = VAR.PANEL
GENES_PRESENT = VARM.GENES_PRESENT
SPADE_KEY = OBSM.SPADE
MCLSTEXP_KEY = OBSM.MCLSTEXP
NORMALIZED_LAYER = LAYERS.NORMALIZED
COUNTS_LAYER = LAYERS.COUNTS
PREDICTED_LAYER = LAYERS.PREDICTED
PATCHES_UNS = UNS.PATCHES
PANEL_UNS = UNS.PANEL
FEATURES_UNS = UNS.FEATURES
SPADE_UNS = UNS.SPADE
MCLSTEXP_UNS = UNS.MCLSTEXP
PREDICTION_UNS = UNS.PREDICTION
SECTIONS_UNS = UNS.SECTIONS


def features_key(backbone: str) -> str:
    """Default ``obsm`` key of a backbone's features."""
    return f"X_{backbone}"


def umap_key(basis: str) -> str:
    """``obsm`` key of the stored UMAP of an embedding: ``"X_spade"`` -> ``"X_umap_spade"``."""
    return f"X_umap_{basis.removeprefix('X_')}"


def microns_cs(section: str) -> str:
    """Name of the micrometre coordinate system of ``section``."""
    return f"{section}{MICRONS_SUFFIX}"


# --- option sets ------------------------------------------------------------------------------
#: Contrastive loss: BLEEP's soft targets, or CLIP's identity targets.
Loss = Literal["bleep", "clip"]
LOSSES: tuple[str, ...] = get_args(Loss)
#: Expression fed to a gene head / spot encoder.
GeneInput = Literal["log1p_cp10k", "raw"]
GENE_INPUTS: tuple[str, ...] = get_args(GeneInput)
#: How retrieved reference values are averaged.
Weighting = Literal["inverse_sq_l2", "softmax", "uniform"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
#: How keys are ranked in retrieval.
Similarity = Literal["cosine", "dot"]
SIMILARITIES: tuple[str, ...] = get_args(Similarity)
#: Spot positions of mclSTExp's spot encoder (``None``: no position embeddings).
Position = Literal["grid", "pixel"]
POSITIONS: tuple[str, ...] = get_args(Position)
#: Which spots attend to each other in mclSTExp's spot encoder.
Context = Literal["self", "batch", "tile"]
CONTEXTS: tuple[str, ...] = get_args(Context)
#: Which parameters of an image encoder train.
Finetune = Literal["none", "last", "all"]
FINETUNES: tuple[str, ...] = get_args(Finetune)
#: What SPADE retrieves against on the reference side (``"auto"``: chosen on validation).
ReferenceSide = Literal["genes", "images", "both"]
REFERENCE_SIDES: tuple[str, ...] = get_args(ReferenceSide)
ReferenceSideChoice = Literal["auto", "genes", "images", "both"]
REFERENCE_SIDE_CHOICES: tuple[str, ...] = get_args(ReferenceSideChoice)
#: SPADE's routing of a spot to its experts.
Routing = Literal["soft", "hard"]
ROUTINGS: tuple[str, ...] = get_args(Routing)
#: How SPADE's experts share one embedding space: one gene head shared by all experts, an
#: orthogonal rotation of each expert onto a common anchor after training, or none (published).
Alignment = Literal["shared_genes", "procrustes", "none"]
ALIGNMENTS: tuple[str, ...] = get_args(Alignment)
#: Which SPADE embedding ``embed`` writes: the experts' common space or the published routed sum.
Space = Literal["aligned", "published"]
SPACES: tuple[str, ...] = get_args(Space)
#: Retrieval keys of mclSTExp: the reference spots' spot-encoder embeddings, their image
#: embeddings, or both (the mean of the two cosine similarities).
Keys = Literal["spot", "image", "both"]
KEYS: tuple[str, ...] = get_args(Keys)
#: What picks the epoch of a run with validation data: the validation loss or the validation ACG.
Select = Literal["loss", "acg"]
SELECTS: tuple[str, ...] = get_args(Select)
#: Training recipes of mclSTExp: small-data defaults, or the published settings.
Recipe = Literal["small_data", "published"]
RECIPES: tuple[str, ...] = get_args(Recipe)
#: Learning-rate schedule of mclSTExp.
Schedule = Literal["constant", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
#: Ways to choose a gene panel on training sections.
PanelMethod = Literal["spade", "heg"]
PANEL_METHODS: tuple[str, ...] = get_args(PanelMethod)
#: The reference regressors on frozen features.
BaselineMethod = Literal["ridge", "knn"]
BASELINE_METHODS: tuple[str, ...] = get_args(BaselineMethod)
#: What ``tl.train_contrastive`` trains (``"ridge"``/``"knn"``: deprecated, see ``tl.train_baseline``).
ContrastiveMethod = Literal["mclstexp", "ridge", "knn"]
CONTRASTIVE_METHODS: tuple[str, ...] = get_args(ContrastiveMethod)
#: Every method ``tl.cross_validate`` evaluates.
Method = Literal["spade", "mclstexp", "ridge", "knn"]
METHODS: tuple[str, ...] = get_args(Method)
#: Cross-validation folds.
Split = Literal["leave_one_section_out", "by_patient"]
SPLITS: tuple[str, ...] = get_args(Split)
#: Few-shot probe classifiers.
Classifier = Literal["logistic", "knn", "prototype"]
CLASSIFIERS: tuple[str, ...] = get_args(Classifier)
#: Score of a cross-validation fold of the regressors.
Scoring = Literal["pearson", "mse"]
SCORINGS: tuple[str, ...] = get_args(Scoring)
#: Colour scale of an observed / predicted pair in ``pl.spatial``.
ColorScale = Literal["panel", "shared", "zscore"]
COLOR_SCALES: tuple[str, ...] = get_args(ColorScale)
#: Feature dtype of a feature store.
StoreDtype = Literal["float16", "float32"]
STORE_DTYPES: tuple[str, ...] = get_args(StoreDtype)
#: Clustering of tl.spatial_domains.
DomainMethod = Literal["kmeans", "leiden"]
DOMAIN_METHODS: tuple[str, ...] = get_args(DomainMethod)
#: Pooling of tile embeddings into one vector per slide (tl.slide_embedding).
Pooling = Literal["mean", "quantiles", "attention-ready"]
POOLINGS: tuple[str, ...] = get_args(Pooling)

#: Standardisation of frozen features (``"section"``: every column z-scored within each section).
Zscore = Literal["section"]
ZSCORES: tuple[str, ...] = get_args(Zscore)

#: Suffix of the ``obsm`` key holding the 8 dihedral views of features (``compute_features(keep_views=True)``).
VIEWS_SUFFIX = "_views"

# FEATURE_PROVENANCE_DEFAULTS (above): features computed before layers, TTA and z-scoring were
# recorded are the final layer, without TTA, raw.
