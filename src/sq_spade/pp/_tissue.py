"""Tissue detection on H&E: Otsu on saturation at a coarse pyramid level, stored as labels.

Stained tissue is saturated (pink, purple); bare glass is white or light grey and masked
backgrounds are black, both unsaturated. So the mask is scikit-image's Otsu threshold of the
HSV saturation channel, read at a coarse pyramid level (a few um per pixel: the whole level is
small whatever the slide's size), smoothed, with small specks removed and holes inside the
tissue (adipocytes, lumina, which are white) filled. Faint tissue touching stained
tissue joins by hysteresis. This follows squidpy's ``detect_tissue`` and CLAM's tissue
segmentation (Otsu on saturation), with scikit-image doing every step.

The mask is a labels element ``f"{section}_tissue"`` (1 = tissue, 0 = background) with a
transformation to the section's micrometre coordinate system, so spatialdata-plot draws it
over the image and :func:`sq_spade.pp.tile_tissue` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sq_spade import _constants as K
from sq_spade._deprecate import renamed_arguments
from sq_spade._settings import settings
from sq_spade._validation import check_positive, is_spatialdata
from sq_spade.io._sections import affine_to, image_levels
from sq_spade.io._sections import microns_per_pixel as _affine_mpp
from sq_spade.pp._patches import _read_array, _source_array

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: Resolution the mask is computed at (the coarsest level at least this fine is read).
DEFAULT_TISSUE_MPP = 8.0
#: Specks of stain smaller than this (um^2) are dropped (0.02 mm^2: about two ST spots).
DEFAULT_MIN_AREA_UM2 = 20_000.0


@dataclass
class ImageOfSection:
    """One section's image: its key, micrometre coordinate system and level-0 pixel size."""

    section: str
    image_key: str
    coordinate_system: str
    mpp: float


def sections_of_images(sdata: SpatialData, image_key: str | None = None,
                       section: str | None = None) -> list[ImageOfSection]:
    """The sections of ``sdata`` as found from its images (each section's finest image).

    A section is a ``'<section>_um'`` coordinate system of an image element; with
    ``image_key`` only that image is used, with ``section`` only that section.
    """
    from spatialdata.transformations import get_transformation

    if image_key is not None and image_key not in sdata.images:
        raise KeyError(f"`image_key={image_key!r}` is not an image of `sdata`; expected one of {sorted(sdata.images)}.")
    keys = [image_key] if image_key is not None else list(sdata.images)
    found: dict[str, ImageOfSection] = {}
    for key in keys:
        for cs in get_transformation(sdata.images[key], get_all=True):
            if not cs.endswith(K.MICRONS_SUFFIX):
                continue
            sec = cs[: -len(K.MICRONS_SUFFIX)]
            if section is not None and sec != str(section):
                continue
            mpp = _affine_mpp(affine_to(sdata.images[key], cs), what=f"image {key!r}")
            if sec not in found or mpp < found[sec].mpp:
                found[sec] = ImageOfSection(sec, key, cs, mpp)
    if not found:
        where = f"`image_key={image_key!r}`" if image_key is not None else "No image of `sdata`"
        only = f" for `section={section!r}`" if section is not None else ""
        raise ValueError(f"{where} has a transformation to a '<section>{K.MICRONS_SUFFIX}' coordinate system{only}: "
                         "read the slide with sq_spade.io or call sq_spade.io.set_microns_per_pixel first.")
    return list(found.values())


def tissue_key(section: str) -> str:
    """Key of the labels element holding the tissue mask of ``section``."""
    return f"{section}{K.TISSUE_SUFFIX}"


def _coarse_level(sdata: SpatialData, img: ImageOfSection,
                  target_mpp: float) -> tuple[int, np.ndarray, float, tuple[float, float]]:
    """The coarsest level at least as fine as ``target_mpp``: (index, (h, w, c) uint8, um/px, scale).

    ``scale`` is (x, y) level-0 pixels per returned pixel. When that level is computed (a lazy
    downsampling of an in-memory level 0, as for images parsed from arrays), level 0 is read with
    a stride instead: the same resolution without a pass over every full-resolution pixel.
    """
    levels = image_levels(sdata.images[img.image_key])
    w0, h0 = levels[0].sizes["x"], levels[0].sizes["y"]
    mpps = [img.mpp * w0 / lv.sizes["x"] for lv in levels]
    ok = [i for i, m in enumerate(mpps) if m <= target_mpp * (1 + 1e-3)]
    idx = max(ok) if ok else 0
    data = levels[idx].data
    lv0 = levels[0]
    small0 = int(np.prod(lv0.shape)) * lv0.dtype.itemsize <= settings.memory_budget_bytes
    if idx > 0 and not isinstance(data, np.ndarray) and _source_array(data) is None and small0:
        step = max(int(np.floor(w0 / levels[idx].sizes["x"])), 1)
        sub = _read_array(lv0.data, (slice(None), slice(None, None, step), slice(None, None, step)))
        return idx, np.moveaxis(np.asarray(sub), 0, -1), img.mpp * step, (float(step), float(step))
    arr = np.moveaxis(_read_array(data, (slice(None),) * 3), 0, -1)
    return idx, arr, mpps[idx], (w0 / arr.shape[1], h0 / arr.shape[0])


def tissue_mask_array(rgb: np.ndarray, mpp: float, *, min_area_um2: float = DEFAULT_MIN_AREA_UM2,
                      smooth_um: float | None = None, fill_holes: bool = True) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of an ``(H, W, 3)`` H&E image at ``mpp`` um/px, and the Otsu threshold.

    Otsu threshold of the Gaussian-smoothed HSV saturation (scikit-image), with hysteresis:
    pixels above a lower threshold (halfway between the background's median saturation and
    Otsu's) join when connected to pixels above Otsu's, so faint tissue attached to stained
    tissue is kept. Then specks below ``min_area_um2`` are removed and holes inside tissue
    filled.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.full((100, 100, 3), 240, np.uint8)
    >>> img[30:70, 30:70] = (200, 80, 160)
    >>> mask, _ = tissue_mask_array(img, 10.0)
    >>> bool(mask[50, 50]), bool(mask[5, 5])  # the stained square is tissue, the pale border is not
    (True, False)
    >>> 1600 <= int(mask.sum()) < 2000  # the square's 1,600 px, widened a little by the smoothing
    True
    """
    from scipy import ndimage as ndi
    from skimage.color import rgb2hsv
    from skimage.filters import apply_hysteresis_threshold, gaussian, threshold_otsu

    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"Expected an (H, W, 3) RGB image, got shape {rgb.shape}.")
    sat = rgb2hsv(np.asarray(rgb[..., :3]))[..., 1]
    sigma = (smooth_um if smooth_um is not None else 2.0 * mpp) / mpp
    if sigma > 0:
        sat = gaussian(sat, sigma=sigma, preserve_range=True)
    if float(sat.max() - sat.min()) < 1e-6:
        return np.zeros(sat.shape, bool), float(sat.max())
    thr = float(threshold_otsu(sat))
    # hysteresis: faint tissue (loose stroma, edges) joins when it touches clearly stained tissue;
    # the low threshold is halfway between the background's typical saturation and Otsu's
    low = (float(np.median(sat[sat <= thr])) + thr) / 2
    mask = apply_hysteresis_threshold(sat, low, thr)
    min_px = int(np.ceil(min_area_um2 / (mpp * mpp)))
    if min_px > 1:
        lab, n = ndi.label(mask)
        if n:
            sizes = np.bincount(lab.ravel())
            small = sizes < min_px
            small[0] = True
            mask = ~small[lab]
    if fill_holes:
        mask = ndi.binary_fill_holes(mask)
    return mask, thr


@renamed_arguments(mpp="microns_per_pixel")
def detect_tissue(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    section: str | None = None,
    microns_per_pixel: float = DEFAULT_TISSUE_MPP,
    min_area_um2: float = DEFAULT_MIN_AREA_UM2,
    fill_holes: bool = True,
    key_added: str | None = None,
) -> list[str]:
    """Detect the tissue of each section's H&E image and store it as a labels element.

    The coarsest pyramid level at least as fine as ``microns_per_pixel`` is read whole (a small array
    whatever the slide's size); the mask is the Otsu threshold of its HSV saturation (Gaussian
    smoothed over two pixels), extended by hysteresis to faint tissue that touches stained
    tissue, with specks below ``min_area_um2`` removed and holes filled
    (:func:`tissue_mask_array`).
    Glass (white, grey) and masked backgrounds (black) are unsaturated; stain is not.

    Parameters
    ----------
    sdata
        A SpatialData whose images have a transformation to a ``'<section>_um'`` coordinate
        system (from :mod:`sq_spade.io` readers or :func:`sq_spade.io.read_wsi`).
    image_key
        Image to segment (default: each section's finest image).
    section
        Only this section (default: every section found).
    microns_per_pixel
        Resolution of the mask in um/px (default 8; the level read is the coarsest at least as
        fine, or the finest when all are coarser).
    min_area_um2
        Connected pieces of tissue smaller than this are background.
    fill_holes
        Fill holes enclosed by tissue (fat and lumina are white but are tissue).
    key_added
        Key of the labels element (one section only); default ``f"{section}_tissue"``.

    Returns
    -------
    The keys of the labels elements written: ``uint8`` masks (1 tissue) at the level's
    resolution, each with a transformation to its section's micrometre coordinate system;
    the element's ``attrs['sq_spade_tissue']`` records the level, threshold and area.

    Examples
    --------
    >>> sd = sqs.datasets.synthetic_section()
    >>> sqs.pp.detect_tissue(sd)
    ['synth_tissue']
    """
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale, Sequence, get_transformation

    if not is_spatialdata(sdata):
        raise TypeError(f"`sdata` must be a SpatialData with an image, got {type(sdata).__name__}.")
    check_positive(microns_per_pixel, "microns_per_pixel")
    check_positive(min_area_um2, "min_area_um2", allow_zero=True)
    images = sections_of_images(sdata, image_key=image_key, section=section)
    if key_added is not None and len(images) > 1:
        raise ValueError(f"`key_added={key_added!r}` names one element but {len(images)} sections were found; "
                         "pass `section` or leave `key_added` unset.")
    written: dict[str, Any] = {}
    for img in images:
        idx, rgb, level_mpp, (fx, fy) = _coarse_level(sdata, img, microns_per_pixel)
        mask, thr = tissue_mask_array(rgb, level_mpp, min_area_um2=min_area_um2, fill_holes=fill_holes)
        to_cs = get_transformation(sdata.images[img.image_key], to_coordinate_system=img.coordinate_system)
        tr = Sequence([Scale([fx, fy], axes=("x", "y")), to_cs]) if (fx, fy) != (1.0, 1.0) else to_cs
        el = Labels2DModel.parse(mask.astype(np.uint8), dims=("y", "x"), transformations={img.coordinate_system: tr})
        el.attrs[K.UNS.TISSUE] = {
            "image_key": img.image_key, "level": int(idx), "microns_per_pixel": float(level_mpp),
            "threshold": thr, "method": "otsu_saturation", "area_um2": float(mask.sum() * level_mpp**2),
            "fraction": float(mask.mean()),
        }
        written[key_added or tissue_key(img.section)] = el
    for k, el in written.items():  # nothing is written unless every section succeeded
        sdata.labels[k] = el
    return list(written)


def read_tissue_mask(sdata: SpatialData, section: str, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The boolean mask of ``section`` and its 3x3 affine from mask pixels (x, y) to micrometres."""
    key = key or tissue_key(section)
    if key not in sdata.labels:
        raise KeyError(f"No tissue mask {key!r} in `sdata.labels`; run sqs.pp.detect_tissue first.")
    el = sdata.labels[key]
    lv = image_levels(el)[0]
    return _read_array(lv.data, (slice(None),) * lv.ndim) > 0, affine_to(el, K.microns_cs(section))
