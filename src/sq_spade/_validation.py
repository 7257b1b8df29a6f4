"""Shared argument checks. Every error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sq_spade import _constants as K

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def is_spatialdata(obj: Any) -> bool:
    """Whether ``obj`` is a SpatialData without importing spatialdata eagerly."""
    return type(obj).__name__ == "SpatialData" and hasattr(obj, "tables")


def check_section_id(value: Any, arg: str = "section") -> str:
    """A section id usable as an element name.

    A non-empty string without slashes or backslashes, not ending in ``"_um"`` (the suffix of
    the section's micrometre coordinate system).

    Examples
    --------
    >>> check_section_id("A1")
    'A1'
    >>> check_section_id("A/1", "sample_id")
    Traceback (most recent call last):
    ...
    ValueError: `sample_id` must be a section id without slashes or backslashes (it names zarr elements), got 'A/1'.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"`{arg}` must be a non-empty string, got {value!r}.")
    if "/" in value or chr(92) in value:
        raise ValueError(f"`{arg}` must be a section id without slashes or backslashes (it names zarr elements), "
                         f"got {value!r}.")
    if value.endswith(K.MICRONS_SUFFIX):
        raise ValueError(f"`{arg}` must not end in {K.MICRONS_SUFFIX!r}, the suffix of a section's micrometre "
                         f"coordinate system, got {value!r}.")
    return value


def check_positive_number(value: Any, what: str) -> float:
    """``value`` as a finite positive float; a ValueError naming ``what`` (e.g. a file's key) otherwise.

    Examples
    --------
    >>> check_positive_number("n/a", "'spot_diameter' in meta.json")
    Traceback (most recent call last):
    ...
    ValueError: 'spot_diameter' in meta.json must be a positive number, got 'n/a'.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{what} must be a positive number, got {value!r}.")
    return float(value)


def get_table(data: AnnData | SpatialData, table_key: str | None = K.TABLES.DEFAULT, *,
              arg: str = "sdata", key_arg: str = "table_key", hint: str = "") -> AnnData:
    """Return the AnnData of ``data`` (itself, or ``data.tables[table_key]``).

    ``key_arg`` names the argument that gave ``table_key`` in the error, ``hint`` says what to do.
    """
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data
    if not is_spatialdata(data):
        raise TypeError(f"`{arg}` must be an AnnData or a SpatialData, got {type(data).__name__}.")
    table_key = K.TABLES.DEFAULT if table_key is None else table_key
    if table_key not in data.tables:
        raise KeyError(
            f"`{key_arg}={table_key!r}` is not a table of `{arg}`; "
            f"expected one of {sorted(data.tables)}.{hint}"
        )
    return data.tables[table_key]


def check_choice(value: Any, arg: str, options: Iterable[Any]) -> Any:
    """Raise unless ``value`` is one of ``options``."""
    options = list(options)
    if value not in options:
        raise ValueError(f"`{arg}` must be one of {options}, got {value!r}.")
    return value


def check_positive_int(value: Any, arg: str, *, allow_zero: bool = False, allow_none: bool = False) -> int | None:
    """``value`` as an ``int`` if it is a positive (or non-negative) integer, else raise naming ``arg``.

    The one integer check of the package: booleans are refused, numpy integers accepted.

    Examples
    --------
    >>> check_positive_int(3, "epochs")
    3
    >>> check_positive_int(None, "k", allow_none=True) is None
    True
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        sign = "non-negative" if allow_zero else "positive"
        raise ValueError(f"`{arg}` must be a {sign} integer{' or None' if allow_none else ''}, got {value!r}.")
    return int(value)


def check_positive_float(value: Any, arg: str, *, allow_zero: bool = False) -> float:
    """``value`` as a ``float`` if it is a positive (or non-negative) finite number, else raise naming ``arg``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        sign = "non-negative" if allow_zero else "positive"
        raise ValueError(f"`{arg}` must be a {sign} number, got {value!r}.")
    return float(value)


def check_positive(value: Any, arg: str, *, integer: bool = False, allow_zero: bool = False) -> Any:
    """Raise unless ``value`` is a positive (or non-negative) finite number; return it unchanged.

    ``integer=True`` checks as :func:`check_positive_int`, otherwise as :func:`check_positive_float`.
    """
    if integer:
        check_positive_int(value, arg, allow_zero=allow_zero)
    else:
        check_positive_float(value, arg, allow_zero=allow_zero)
    return value


def check_obsm(adata: AnnData, key: str, *, arg: str = "features_key") -> np.ndarray:
    """Return ``adata.obsm[key]`` as a 2-D float32 array, or raise naming ``arg``."""
    if key not in adata.obsm:
        raise KeyError(f"`{arg}={key!r}` is not in `obsm`; available keys: {sorted(adata.obsm)}.")
    x = np.asarray(adata.obsm[key], dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != adata.n_obs:
        raise ValueError(f"`obsm[{key!r}]` must be (n_obs, D), got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"`obsm[{key!r}]` contains NaN or infinite values.")
    return x


def check_obs_column(adata: AnnData, key: str, *, arg: str) -> Any:
    """Return ``adata.obs[key]`` or raise naming ``arg``."""
    if key not in adata.obs:
        raise KeyError(f"`{arg}={key!r}` is not a column of `obs`; available: {list(adata.obs.columns)}.")
    return adata.obs[key]


def check_sections(adata: AnnData, sections: Sequence[str] | str | None, *, arg: str) -> list[str]:
    """Validate a list of section ids against ``obs['section']``; ``None`` means all."""
    present = list(section_ids(adata))
    if sections is None:
        return present
    if isinstance(sections, str):
        sections = [sections]
    missing = [s for s in sections if s not in present]
    if missing:
        raise ValueError(f"`{arg}` names sections {missing} that are not in the table; present: {present}.")
    return list(sections)


def section_ids(adata: AnnData) -> np.ndarray:
    """Section ids in order of first appearance (one id ``'section'`` if the column is absent)."""
    if K.OBS.SECTION not in adata.obs:
        return np.array(["section"])
    return np.asarray(list(dict.fromkeys(adata.obs[K.OBS.SECTION].astype(str))))


def section_labels(adata: AnnData) -> np.ndarray:
    """Per-row section id as a string array."""
    if K.OBS.SECTION not in adata.obs:
        return np.full(adata.n_obs, "section", dtype=object)
    return adata.obs[K.OBS.SECTION].astype(str).to_numpy()


def check_rgb_uint8(image: np.ndarray, *, arg: str = "image") -> np.ndarray:
    """Raise unless ``image`` is an ``(H, W, 3)`` uint8 array."""
    if image.ndim == 2:
        raise ValueError(f"`{arg}` must be an RGB image (H, W, 3) of uint8, got a grayscale image {image.shape}.")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"`{arg}` must be an RGB image (H, W, 3) of uint8, got shape {image.shape} "
                         "(RGBA images: drop the alpha channel first).")
    if image.dtype != np.uint8:
        raise ValueError(f"`{arg}` must be 8-bit (uint8) RGB, got dtype {image.dtype}; rescale it to 0..255 first.")
    return image


def feature_recipe(prov: Any) -> dict[str, Any]:
    """How features were computed (``layers``, ``tta``, ``zscore``) from their provenance.

    Fields an earlier version did not record take :data:`sq_spade._constants.FEATURE_PROVENANCE_DEFAULTS`
    (the final layer, no TTA, no z-score).

    Examples
    --------
    >>> feature_recipe({"backbone": "efficientnet_lite0"})
    {'layers': ['final'], 'tta': False, 'zscore': None}
    """
    prov = dict(prov or {})
    d = K.FEATURE_PROVENANCE_DEFAULTS
    layers = prov.get("layers", d["layers"])
    layers = [str(layers)] if isinstance(layers, str) else [str(v) for v in np.asarray(layers).ravel()]
    zscore = prov.get("zscore", d["zscore"])
    return {"layers": layers, "tta": bool(prov.get("tta", d["tta"])),
            "zscore": None if zscore in (None, "none", "None") else str(zscore)}
