"""Safe weight loading: no unpickling, wrappers and prefixes removed, keys renamed, mismatches listed.

``.safetensors`` files go through safetensors, anything else through
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

KeyMap = Mapping[str, str | None] | Callable[[str], str | None]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (no network, gated repository, missing package)."""


_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


def read_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a weights file without unpickling arbitrary objects, unwrapped to a flat dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap(load_file(str(path), device="cpu"), path.name)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path.name!r}: it holds Python objects other than tensors, and "
            f"sq_spade only loads weights with torch.load(weights_only=True). Re-save the plain "
            f"state dict (or convert it to .safetensors). Details: {str(e).splitlines()[0]}"
        ) from e
    return _unwrap(obj, path.name)


def _unwrap(obj: Any, source: str) -> dict[str, Tensor]:
    for _ in range(4):  # {"state_dict": {"model": {...}}} and the like
        if not isinstance(obj, Mapping):
            break
        if all(isinstance(v, Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights {source!r} hold a {type(obj).__name__}, expected a state dict.")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"weights {source!r} are not a flat state dict: {len(bad)} non-tensor "
                         f"entries {key_list(bad)}.")
    sd = {str(k): v for k, v in obj.items()}
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def key_list(keys: list[Any], n: int = 10) -> str:
    """The first ``n`` of ``keys`` for an error message, ``[a, b, ...]``."""
    shown = ", ".join(map(str, keys[:n]))
    return f"[{shown}{', ...' if len(keys) > n else ''}]"


def load_state_dict_safely(
    module: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
    *,
    key_map: KeyMap | None = None,
    strict: bool = True,
) -> Any:
    """Load weights into ``module`` safely, with optional key renaming and clear errors.

    ``.safetensors`` files are read with safetensors; other files with
    ``torch.load(path, map_location="cpu", weights_only=True)``, which refuses pickled code.
    Wrappers are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``, a ``"module."`` or
    ``"_orig_mod."`` prefix on every key) before ``key_map`` is applied.

    Parameters
    ----------
    module
        Module to load into.
    path_or_state_dict
        Weights file or an in-memory state dict.
    key_map
        A mapping ``{source_key: target_key}`` (keys not in it are kept; a ``None`` target
        drops the key) or a callable ``source_key -> target_key | None``.
    strict
        Require exactly the module's keys with matching shapes. With ``False`` the matching
        keys are loaded and the rest reported in the return value.

    Returns
    -------
    torch's ``(missing_keys, unexpected_keys)`` named tuple.

    Raises
    ------
    ValueError
        Missing, unexpected or wrongly shaped keys (the message names the file and lists up
        to 10 keys of each kind with their counts), or a file holding non-tensor objects.

    Examples
    --------
    >>> import tempfile
    >>> from safetensors.torch import save_file
    >>> lin = nn.Linear(2, 2)
    >>> path = Path(tempfile.mkdtemp()) / "w.safetensors"
    >>> save_file({"layer.weight": torch.eye(2), "layer.bias": torch.zeros(2)}, str(path))
    >>> load_state_dict_safely(lin, path, key_map=lambda k: k.removeprefix("layer."))
    <All keys matched successfully>
    """
    if isinstance(path_or_state_dict, Mapping):
        sd, source = _unwrap(path_or_state_dict, "<state dict>"), "<state dict>"
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        sd, source = read_weights_file(path_or_state_dict), Path(path_or_state_dict).name
    else:
        raise TypeError(f"`path_or_state_dict` must be a path or a mapping of tensors, got "
                        f"{type(path_or_state_dict).__name__}.")
    return load_into(module, sd, source=source, key_map=key_map, strict=strict)


def load_into(module: nn.Module, sd: Mapping[str, Tensor], *, source: str,
              key_map: KeyMap | None, strict: bool) -> Any:
    """Rename the keys of the flat state dict ``sd`` by ``key_map`` and load it into ``module``.

    Shape mismatches always raise; with ``strict``, missing and unexpected keys too (``source``
    names the file in the message). See :func:`load_state_dict_safely`.
    """
    if key_map is not None and not (isinstance(key_map, Mapping) or callable(key_map)):
        raise TypeError(f"`key_map` must be a mapping or a callable, got {type(key_map).__name__}.")
    mapped: dict[str, Tensor] = {}
    for k, v in sd.items():
        if key_map is None:
            nk: str | None = k
        elif isinstance(key_map, Mapping):
            nk = key_map.get(k, k)
        else:
            nk = key_map(k)
        if nk is None:
            continue
        if nk in mapped:
            raise ValueError(f"`key_map` sends two keys of {source!r} onto {nk!r}.")
        mapped[nk] = v
    target = module.state_dict()
    # BatchNorm fills a missing num_batches_tracked itself: not worth an error
    missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in target]
    shapes = [f"{k}: {tuple(mapped[k].shape)} vs {tuple(target[k].shape)}"
              for k in mapped if k in target and mapped[k].shape != target[k].shape]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys {key_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys {key_list(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (file vs model) {key_list(shapes)}")
        raise ValueError(f"weights {source!r} do not fit {type(module).__name__}: "
                         + "; ".join(parts) + ".")
    if not strict:
        mapped = {k: v for k, v in mapped.items() if k in target}
    return module.load_state_dict(mapped, strict=strict)

