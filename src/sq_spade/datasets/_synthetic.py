"""Procedurally generated, seeded sections for tests and examples (no files, no network)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sq_spade.io._sections import section_from_arrays

if TYPE_CHECKING:
    from spatialdata import SpatialData

_PALETTE = np.array([[200, 90, 160], [120, 60, 170], [235, 170, 200], [150, 40, 90],
                     [230, 120, 130], [90, 50, 140]], dtype=np.float64)


def synthetic_section(
    *,
    section: str = "synth",
    n_rows: int = 8,
    n_cols: int = 8,
    pitch_px: float = 40.0,
    margin_px: float = 40.0,
    microns_per_pixel: float = 1.0,
    spot_diameter_um: float = 30.0,
    n_genes: int = 50,
    n_types: int = 3,
    image: str = "tissue",
    seed: int = 0,
    patient: str | None = None,
) -> SpatialData:
    """A small synthetic section whose image and counts share a hidden tissue type per spot.

    Parameters
    ----------
    section
        Section id.
    n_rows, n_cols
        Spot grid.
    pitch_px
        Spot spacing in pixels.
    margin_px
        Image border around the grid (0 puts corner spots on the image edge).
    microns_per_pixel
        Pixel size.
    spot_diameter_um
        Spot diameter.
    n_genes
        Number of genes; the first ``3 * n_types`` are markers of the types.
    n_types
        Number of hidden tissue types (stored in ``obs['tissue_type']``).
    image
        ``"tissue"``: each spot's neighbourhood is coloured by its type with texture noise;
        ``"pattern"``: pixel (row, col) has colour ``(col % 256, row % 256, (row // 256 + 8 * (col // 256)) % 256)``,
        so a patch's centre pixel tells where it was cut.
    seed
        Random seed.
    patient
        Optional patient id.

    Examples
    --------
    >>> sd = sqs.datasets.synthetic_section(n_rows=4, n_cols=4)
    >>> sd.tables["table"].n_obs
    16
    """
    if image not in ("tissue", "pattern"):
        raise ValueError(f"`image` must be 'tissue' or 'pattern', got {image!r}.")
    if n_types > len(_PALETTE):
        raise ValueError(f"`n_types` must be at most {len(_PALETTE)}, got {n_types}.")
    rng = np.random.default_rng(seed)
    h = int(round(2 * margin_px + (n_rows - 1) * pitch_px)) + 1
    w = int(round(2 * margin_px + (n_cols - 1) * pitch_px)) + 1
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    centers = np.column_stack([margin_px + cols * pitch_px, margin_px + rows * pitch_px]).astype(float)
    # spatially coherent types: blobs around a few random seeds
    seeds = rng.uniform([0, 0], [n_cols, n_rows], size=(n_types, 2))
    d = np.linalg.norm(np.column_stack([cols, rows])[:, None, :] - seeds[None], axis=-1)
    types = d.argmin(1)
    if image == "pattern":
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx % 256, yy % 256, (yy // 256 + 8 * (xx // 256)) % 256], axis=-1).astype(np.uint8)
    else:
        # in strips of rows: float temporaries stay small however large the image (the noise is
        # drawn in the same order as one draw of the whole image, so the pixels do not change)
        img = np.empty((h, w, 3), np.uint8)
        xx = np.arange(w)[None, :]
        pix_col = np.clip(np.round((xx - margin_px) / pitch_px), 0, n_cols - 1).astype(int)
        for y0 in range(0, h, 512):
            yy = np.arange(y0, min(y0 + 512, h))[:, None]
            pix_row = np.clip(np.round((yy - margin_px) / pitch_px), 0, n_rows - 1).astype(int)
            pix_type = types[pix_row * n_cols + pix_col]
            texture = rng.normal(0, 12, size=(len(yy), w, 1)) + 10 * np.sin(xx / (2 + pix_type))[..., None]
            img[y0: y0 + len(yy)] = np.clip(_PALETTE[pix_type] + texture, 0, 255).astype(np.uint8)
    n = len(types)
    rate = np.full((n, n_genes), 2.0)
    for t in range(n_types):
        rate[types == t, 3 * t: 3 * t + 3] = 25.0
    depth = rng.lognormal(0, 0.3, size=(n, 1))
    counts = rng.poisson(rate * depth).astype(np.float32)
    genes = [f"gene{i}" for i in range(n_genes)]
    spot_ids = [f"{c}x{r}" for r, c in zip(rows, cols, strict=True)]
    import pandas as pd

    obs = pd.DataFrame({"tissue_type": pd.Categorical([f"type{t}" for t in types])})
    return section_from_arrays(counts, genes=genes, spot_ids=spot_ids, centers_px=centers, image=img,
                               section=section, microns_per_pixel=microns_per_pixel,
                               spot_diameter_um=spot_diameter_um, array_coords=np.column_stack([cols, rows]),
                               obs=obs, patient=patient)
