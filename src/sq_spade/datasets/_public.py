"""Loaders of public spatial-transcriptomics sections (her2st, STUtility MOB, Visium fixtures)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sq_spade.datasets._fetch import GIOTTO, HER2ST, HISTOGENE, SCANPY, STUTILITY, fetch
from sq_spade.io import read_st, read_visium, section_from_arrays

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: her2st sections available through :func:`her2st` (full-resolution JPEGs or downscaled PNGs).
HER2ST_IMAGES = {
    "B4": "data/ST-imgs/B/B4/BT10737_D2_HE.jpg",
    "C2": "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
    "C3": "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg",
    "C4": "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg",
    "A1": "app/www/imgs/A1_HE_image_dark.png",
    "A2": "app/www/imgs/A2_HE_image_dark.png",
}
#: The app's PNGs are 2000 px wide; the spot files' pixels refer to the original widths.
HER2ST_DOWNSCALE = {"A1": 2000 / 6954, "A2": 2000 / 6966}
#: Legacy ST 1k array: 289.8 px between spot centres in the full-resolution her2st images.
MOB_SECTIONS = ("MOB1", "MOB2", "MOB3")
MOB_ANIMAL = {"MOB1": "1", "MOB2": "1", "MOB3": "2"}


def _check_section(section: str, known: tuple[str, ...] | list[str]) -> None:
    if section not in known:
        raise ValueError(f"`section` must be one of {list(known)}, got {section!r}.")


def her2st(section: str = "C2") -> SpatialData:
    """A section of the her2st HER2-positive breast cancer data (Andersson et al. 2021).

    Sections B4, C2, C3 and C4 come with full-resolution H&E (about 0.69 um/px); A1 and A2
    with the project app's 2000-px-wide images (about 3.2 um/px, background masked black).
    The section letter is the patient, stored in ``obs['patient']``. The data carry no licence:
    use them for evaluation, never redistribute them.

    Parameters
    ----------
    section
        One of ``"A1", "A2", "B4", "C2", "C3", "C4"``.

    Returns
    -------
    A single-section SpatialData (see :func:`sq_spade.io.read_st`).

    Examples
    --------
    >>> sd = sqs.datasets.her2st("C2")  # doctest: +SKIP
    >>> sd.tables["table"].n_obs  # doctest: +SKIP
    187
    """
    _check_section(section, tuple(HER2ST_IMAGES))
    counts = fetch(HER2ST, f"data/ST-cnts/{section}.tsv.gz")
    spots = fetch(HER2ST, f"data/ST-spotfiles/{section}_selection.tsv")
    image = fetch(HER2ST, HER2ST_IMAGES[section])
    return read_st(counts, spots, image, sample_id=section, image_scale=HER2ST_DOWNSCALE.get(section, 1.0),
                   patient=section[0])


def her2st_labels(section: str = "A1") -> pd.Series:
    """Pathologist region labels of her2st A1, indexed by spot id ``"{x}x{y}"``.

    The label file's array coordinates are rounded to the grid to join with the counts.

    Examples
    --------
    >>> labels = sqs.datasets.her2st_labels("A1")  # doctest: +SKIP
    >>> labels.value_counts()["invasive cancer"]  # doctest: +SKIP
    284
    """
    _check_section(section, ("A1",))
    path = fetch(HER2ST, f"data/ST-pat/lbl/{section}_labeled_coordinates.tsv")
    df = pd.read_csv(path, sep="\t").dropna(subset=["x", "y"])
    idx = [f"{int(round(x))}x{int(round(y))}" for x, y in zip(df["x"], df["y"], strict=True)]
    s = pd.Series(df["label"].to_numpy(), index=pd.Index(idx, name="spot_id"), name="label")
    return s[~s.index.duplicated()]


def histogene_genes() -> list[str]:
    """The 785-gene her2st panel used by HisToGene, Hist2ST, THItoGene and mclSTExp."""
    path = fetch(HISTOGENE, "data/her_hvg_cut_1000.npy")
    return [str(g) for g in np.load(path, allow_pickle=False)]


def stutility_mob(section: str = "MOB1", *, in_tissue_only: bool = True, symbols: bool = True) -> SpatialData:
    """A mouse olfactory bulb section from STUtility (MIT licence; ST 2k array).

    Parameters
    ----------
    section
        ``"MOB1"``, ``"MOB2"`` or ``"MOB3"`` (MOB1 and MOB2 share an animal).
    in_tissue_only
        Keep only spots under tissue.
    symbols
        Map Ensembl ids to gene symbols (duplicated symbols are summed).

    Examples
    --------
    >>> sd = sqs.datasets.stutility_mob("MOB1")  # doctest: +SKIP
    >>> sd.tables["table"].n_obs  # doctest: +SKIP
    379
    """
    _check_section(section, MOB_SECTIONS)
    counts = fetch(STUTILITY, f"inst/extdata/counts/{section}.tsv")
    spots = fetch(STUTILITY, f"inst/extdata/counts/alignment_table_{section}.tsv")
    image = fetch(STUTILITY, f"inst/extdata/counts/{section}.jpg")
    mapping = None
    if symbols:
        genes = pd.read_csv(fetch(STUTILITY, "inst/extdata/mouse_genes.tsv.gz"), sep="\t")
        mapping = dict(zip(genes["gene_id"], genes["gene_name"], strict=True))
    return read_st(counts, spots, image, sample_id=section, in_tissue_only=in_tissue_only,
                   patient=f"mouse{MOB_ANIMAL[section]}", gene_names=mapping)


def visium_mini(image: str = "deg_image2") -> SpatialData:
    """GiottoData's mini Visium of the mouse dentate gyrus (624 spots, MIT licence).

    A Visium-layout fixture at about 12 um/px: too coarse to learn morphology from, good for
    checking the Visium path. The image is mapped onto the spots' full-resolution pixels with
    the extent GiottoData documents for it.

    Examples
    --------
    >>> sd = sqs.datasets.visium_mini()  # doctest: +SKIP
    >>> sd.tables["table"].n_obs  # doctest: +SKIP
    624
    """
    from PIL import Image
    from spatialdata.transformations import Affine

    extents = {"deg_image2": (2000.5, 6790.5, -5730.25, -2380.75), "deg_image": (2364.5, 6522.5, -5425.25, -2620.75)}
    _check_section(image, tuple(extents))
    raw = "inst/Mini_datasets/Visium/Raw/"
    expr = pd.read_csv(fetch(GIOTTO, raw + "visium_DG_expr.txt.gz"), sep=r"\s+", index_col=0)
    locs = pd.read_csv(fetch(GIOTTO, raw + "visium_DG_locs.txt"), sep=r"\s+", header=None, names=["x", "y"])
    meta = pd.read_csv(fetch(GIOTTO, raw + "visium_DG_meta.txt")).set_index("cell_ID")
    scalef = json.loads(fetch(GIOTTO, raw + "scalefactors_json.json").read_text())
    with Image.open(fetch(GIOTTO, raw + f"images/{image}.png")) as im:
        # GiottoData ships opaque RGBA PNGs; the alpha channel carries nothing.
        rgb = np.asarray(im.convert("RGB"))
    xmin, xmax, ymin, ymax = extents[image]
    h, w = rgb.shape[:2]
    # image pixel (col, row) -> full-resolution pixel (x, -y): the locs file stores y negated
    sx, sy = (xmax - xmin) / w, (ymax - ymin) / h
    to_full = Affine(np.array([[sx, 0, xmin], [0, sy, -ymax], [0, 0, 1]]), input_axes=("x", "y"), output_axes=("x", "y"))
    centers = np.column_stack([locs["x"].to_numpy(float), -locs["y"].to_numpy(float)])
    mpp = 55.0 / float(scalef["spot_diameter_fullres"])
    in_tissue = meta.reindex(expr.columns)["in_tissue"].fillna(1).to_numpy() == 1
    return section_from_arrays(expr.T.to_numpy(), genes=expr.index, spot_ids=expr.columns, centers_px=centers,
                               image=rgb, section="visium_mini", microns_per_pixel=mpp, spot_diameter_um=55.0,
                               in_tissue=in_tissue, image_transform=to_full, patient="mouse")


def visium_fixture() -> SpatialData:
    """Scanpy's Space Ranger 1.0 test fixture (100 spots x 100 genes; BSD-3), via :func:`sq_spade.io.read_visium`.

    Its hires image is blank (all zeros); the lowres image is real. A file-format fixture.
    """
    base = "tests/_data/visium_data/1.0.0/"
    for f in ("spatial/scalefactors_json.json", "spatial/tissue_hires_image.png",
              "spatial/tissue_lowres_image.png", "spatial/tissue_positions_list.csv"):
        fetch(SCANPY, base + f)
    h5 = fetch(SCANPY, base + "filtered_feature_bc_matrix.h5")
    return read_visium(h5.parent, sample_id="visium_fixture", counts_file=h5.name)
