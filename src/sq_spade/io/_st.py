"""Reader for the legacy Spatial Transcriptomics layout (her2st, STUtility)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sq_spade import _constants as K
from sq_spade._validation import check_positive, check_section_id
from sq_spade.io._images import read_rgb
from sq_spade.io._sections import section_from_arrays

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: Centre-to-centre distance per array unit: 200 um on the 1k array; the 2k array places spots
#: on a checkerboard of 100 um units (nearest neighbours 141 um apart, diagonally).
ARRAY_PITCH_1K_UM = 200.0
ARRAY_PITCH_2K_UM = 100.0
SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def _read_counts(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"`counts`: no such file: {str(path)!r}.")
    try:  # compressed files are read whole by pandas; the header is checked on the parsed frame
        header = pd.read_csv(path, sep="\t", index_col=0, nrows=0, encoding="utf-8")
        df = pd.read_csv(path, sep="\t", index_col=0, encoding="utf-8")
    except pd.errors.EmptyDataError as e:
        raise ValueError(f"`counts` file {path.name!r} is empty (expected spots x genes).") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"`counts` file {path.name!r} is not UTF-8 text (byte {e.start}: {e.reason}); expected a "
                         f"tab-separated spots x genes table.") from e
    except (pd.errors.ParserError, ValueError) as e:
        raise ValueError(f"`counts` file {path.name!r} is not a tab-separated spots x genes table: {e}") from e
    # pandas renames a repeated column "G" to "G.1": compare with the raw header line
    raw = _header_fields(path)
    if raw is not None and len(raw) - 1 == header.shape[1]:
        cols = pd.Index(raw[1:])
        if cols.has_duplicates:
            dup = cols[cols.duplicated()].unique()[:5].tolist()
            raise ValueError(f"`counts` file {path.name!r} has duplicated gene columns: {dup}; each gene must "
                             f"appear once.")
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise ValueError(f"`counts` file {path.name!r} is empty (expected spots x genes).")
    if df.index.has_duplicates:
        dup = df.index[df.index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"`counts` file {path.name!r} has duplicated spot rows: {dup}.")
    df.index = df.index.astype(str)
    return df


def _header_fields(path: Path) -> list[str] | None:
    """The tab-separated fields of the first line (``None`` for a compressed file)."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            return fh.readline().rstrip("\r\n").split("\t")
    except (OSError, UnicodeDecodeError):
        return None


def _read_spots(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"`spots`: no such file: {str(path)!r}.")
    df = pd.read_csv(path, sep="\t")
    missing = [c for c in SPOT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"`spots` file {path.name!r} lacks columns {missing}; expected the ST layout "
            "'x y new_x new_y pixel_x pixel_y selected'."
        )
    df.index = [f"{int(round(x))}x{int(round(y))}" for x, y in zip(df["x"], df["y"], strict=True)]
    return df


def infer_microns_per_pixel(spots: pd.DataFrame, *, array_pitch_um: float | None = None) -> tuple[float, float, str]:
    """Estimate um/px by regressing pixel positions on array coordinates.

    Returns ``(microns_per_pixel, pitch_um, array_kind)``. The array kind is detected from the
    layout: spots only on a checkerboard (x + y of one parity) is the 2k array (100 um units),
    anything else the 1k array (200 um units), unless ``array_pitch_um`` is given.
    """
    ax = spots["new_x"].to_numpy(float) if "new_x" in spots else spots["x"].to_numpy(float)
    ay = spots["new_y"].to_numpy(float) if "new_y" in spots else spots["y"].to_numpy(float)
    px, py = spots["pixel_x"].to_numpy(float), spots["pixel_y"].to_numpy(float)
    if len(ax) < 3:
        raise ValueError("`spots` has fewer than 3 spots: cannot infer `microns_per_pixel`; pass it explicitly.")
    design = np.column_stack([ax, ay, np.ones_like(ax)])
    coef_x, *_ = np.linalg.lstsq(design, px, rcond=None)
    coef_y, *_ = np.linalg.lstsq(design, py, rcond=None)
    # pixels per array unit along each array axis (allowing a small rotation); an axis along
    # which all spots share one coordinate carries no information
    scales = [np.hypot(coef_x[j], coef_y[j]) for j, a in enumerate((ax, ay)) if np.ptp(a) > 0]
    if not scales:
        raise ValueError("`spots` all share one array position: cannot infer `microns_per_pixel`; pass it explicitly.")
    ppu = float(np.mean(scales))
    parity = (spots["x"].round().astype(int) + spots["y"].round().astype(int)) % 2
    kind = "2k" if parity.nunique() == 1 else "1k"
    pitch = array_pitch_um if array_pitch_um is not None else (ARRAY_PITCH_2K_UM if kind == "2k" else ARRAY_PITCH_1K_UM)
    return float(pitch / ppu), float(pitch), kind


def read_st(
    counts: str | os.PathLike,
    spots: str | os.PathLike,
    image: str | os.PathLike | np.ndarray,
    *,
    sample_id: str,
    microns_per_pixel: float | None = None,
    image_scale: float = 1.0,
    array_pitch_um: float | None = None,
    spot_diameter_um: float = 100.0,
    in_tissue_only: bool = True,
    patient: str | None = None,
    gene_names: dict[str, str] | None = None,
) -> SpatialData:
    """Read one section in the legacy ST layout (her2st, STUtility) into a SpatialData.

    Parameters
    ----------
    counts
        Tab-separated counts (optionally gzipped): spots x genes, first column the spot id
        ``"{x}x{y}"`` (array coordinates).
    spots
        Spot table with columns ``x y new_x new_y pixel_x pixel_y selected``; ``pixel_x`` /
        ``pixel_y`` are pixels of the full-resolution image (x = column, y = row).
    image
        Path of the H&E image (RGB, 8-bit) or an ``(H, W, 3)`` uint8 array.
    sample_id
        Section id used to name the elements (``"<id>_image"``, ``"<id>_spots"``) and the
        micrometre coordinate system ``"<id>_um"``.
    microns_per_pixel
        Physical size of a pixel of the *full-resolution* image. When ``None`` it is inferred
        from the spot grid: spot positions are regressed on array coordinates and the array
        pitch (200 um per unit on the 1k array, 100 um per unit on the 2k checkerboard array;
        the kind is detected and reported in ``uns``) gives the scale.
    image_scale
        Factor from full-resolution pixels (the spot table) to ``image``'s pixels, for
        downscaled images (her2st A1: ``2000 / 6954``).
    array_pitch_um
        Override the array pitch per array unit used for the inference.
    spot_diameter_um
        Capture-spot diameter (100 um on legacy ST arrays).
    in_tissue_only
        Keep only spots with ``selected == 1`` (when the column exists).
    patient
        Patient id stored in ``obs['patient']`` for patient-disjoint splits.
    gene_names
        Optional mapping applied to the counts' column names (e.g. Ensembl id -> symbol);
        unmapped names are kept and duplicates after mapping are summed.

    Returns
    -------
    SpatialData with image ``"<id>_image"`` (multiscale), circles ``"<id>_spots"`` and table
    ``"table"`` (sparse raw counts; ``obs`` with ``section``, ``array_col``, ``array_row``,
    ``in_tissue``; ``uns['sq_spade_sections']`` with the pixel size and how it was found).

    Examples
    --------
    >>> sd = sqs.io.read_st("C2.tsv.gz", "C2_selection.tsv", "5714_HE_BT_C2.jpg", sample_id="C2")  # doctest: +SKIP
    """
    check_positive(image_scale, "image_scale")
    check_section_id(sample_id, "sample_id")
    cnt = _read_counts(Path(counts))
    spot_tab = _read_spots(Path(spots))
    if spot_tab.index.has_duplicates:
        raise ValueError(f"`spots` has duplicated array positions: {spot_tab.index[spot_tab.index.duplicated()][:5].tolist()}.")
    if cnt.index.has_duplicates:
        raise ValueError(f"`counts` has duplicated spot ids: {cnt.index[cnt.index.duplicated()][:5].tolist()}.")
    common = cnt.index.intersection(spot_tab.index, sort=False)
    if len(common) == 0:
        raise ValueError(
            f"No spot id of `counts` (e.g. {cnt.index[:3].tolist()}) matches the spot table `spots` "
            f"(ids built as '{{x}}x{{y}}', e.g. {spot_tab.index[:3].tolist()})."
        )
    n_unmatched = len(cnt.index) - len(common)
    if n_unmatched:
        warnings.warn(f"{n_unmatched} spots of `counts` have no row in `spots` and are dropped.", UserWarning, stacklevel=2)
    mpp_source = "given"
    pitch, kind = None, None
    if microns_per_pixel is None:
        microns_per_pixel, pitch, kind = infer_microns_per_pixel(spot_tab, array_pitch_um=array_pitch_um)
        mpp_source = f"inferred from the {kind} array pitch ({pitch:g} um per array unit)"
    check_positive(microns_per_pixel, "microns_per_pixel")
    order = [i for i in cnt.index if i in set(common)]
    st = spot_tab.loc[order]
    c = cnt.loc[order]
    if in_tissue_only and "selected" in st.columns:
        keep = st["selected"].to_numpy() == 1
        if not keep.any():
            raise ValueError("No spot of `spots` has `selected == 1`; pass `in_tissue_only=False` to keep them all.")
        st, c = st[keep], c[keep]
    values = c.to_numpy()
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError("`counts` must be numeric after the spot-id column.")
    if np.isnan(values).any() or (values < 0).any():
        raise ValueError("`counts` must be finite and non-negative raw counts (found NaN or negative values).")
    if not np.allclose(values, np.round(values)):
        raise ValueError("`counts` must hold raw integer counts; found non-integer values (normalised data?).")
    genes = c.columns.astype(str)
    if gene_names is not None:
        mapped = pd.Index([gene_names.get(g, g) for g in genes])
        c = pd.DataFrame(values, index=c.index, columns=mapped).T.groupby(level=0, sort=False).sum().T
        genes, values = c.columns, c.to_numpy()
    img = read_rgb(image) if not isinstance(image, np.ndarray) else image
    centers = st[["pixel_x", "pixel_y"]].to_numpy(float) * image_scale
    in_tissue = st["selected"].to_numpy() == 1 if "selected" in st.columns else None
    sd = section_from_arrays(
        values, genes=genes, spot_ids=st.index, centers_px=centers, image=img, section=sample_id,
        microns_per_pixel=float(microns_per_pixel) / image_scale, spot_diameter_um=spot_diameter_um,
        array_coords=st[["x", "y"]].to_numpy(int), in_tissue=in_tissue, patient=patient,
    )
    meta = sd.tables[K.TABLES.DEFAULT].uns[K.UNS.SECTIONS][sample_id]
    meta.update({"microns_per_pixel_fullres": float(microns_per_pixel), "image_scale": float(image_scale),
                 "microns_per_pixel_source": mpp_source, "array_kind": kind or "unknown",
                 "array_pitch_um": pitch if pitch is not None else float("nan"), "layout": "legacy_st"})
    return sd
