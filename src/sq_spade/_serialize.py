"""Conversions for what sq_spade writes: JSON (model configs, checkpoints) and AnnData ``uns``.

- :func:`to_jsonable` turns numpy, torch and dataclass values into plain JSON values: the one
  helper behind model configs, training histories, checkpoint metadata and store attributes.
- :func:`storable` turns such a JSON-like dict into what h5ad and zarr can write into ``uns``.

The exact round trip of a checkpoint's loop state (non-finite floats and array dtypes kept) is
:mod:`sq_spade.train._checkpoint`'s own ``_encode``/``_decode``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np


def to_jsonable(obj: Any, *, nonfinite: Literal["keep", "null"] = "keep") -> Any:
    """A copy of ``obj`` made of dicts (string keys), lists, numbers, strings, booleans and None.

    Numpy arrays and scalars, torch tensors (anything with ``tolist``) and dataclass instances
    are converted; other values are returned as they are.

    Parameters
    ----------
    obj
        Nested mappings, sequences and values.
    nonfinite
        ``"keep"``: NaN and infinities stay floats (``json.dumps`` writes ``NaN``);
        ``"null"``: they become ``None`` (strict JSON, e.g. a loss history with missing epochs).

    Examples
    --------
    >>> to_jsonable({"val_loss": np.array([np.nan, 1.0]), "k": np.int64(3)}, nonfinite="null")
    {'val_loss': [None, 1.0], 'k': 3}
    """

    def conv(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, np.ndarray):
            return conv(v.tolist())
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, np.integer):
            return int(v)
        if isinstance(v, (float, np.floating)):
            f = float(v)
            return None if nonfinite == "null" and not math.isfinite(f) else f
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return conv({f.name: getattr(v, f.name) for f in dataclasses.fields(v)})
        if hasattr(v, "tolist") and hasattr(v, "detach"):  # a torch tensor, without importing torch
            return conv(v.detach().cpu().tolist())
        return v

    return conv(obj)


def storable(obj: Any) -> Any:
    """A copy of a JSON-like dict that h5ad and zarr can write: no ``None``, lists as arrays.

    ``None`` entries are dropped, numeric lists (with ``None`` for NaN) become float arrays,
    other lists string arrays (an empty list an empty string array), lists of containers dicts
    keyed by position.

    Examples
    --------
    >>> storable({"sections": ["a", "b"], "loss": [1.0, None], "seed": None})
    {'sections': array(['a', 'b'], dtype='<U1'), 'loss': array([ 1., nan])}
    """
    if isinstance(obj, Mapping):
        return {str(k): storable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        flat = list(obj)
        if any(isinstance(v, (list, tuple, Mapping)) for v in flat):
            return {str(i): storable(v) for i, v in enumerate(flat) if v is not None}
        if flat and all(v is None or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool))
                        for v in flat):
            return np.array([np.nan if v is None else v for v in flat], dtype=np.float64)
        return np.array([str(v) for v in flat], dtype=str)
    return obj
