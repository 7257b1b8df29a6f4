"""The model-file format: a folder with ``config.json`` and ``model-<sha>.safetensors``.

Loading never runs code: tensors come from safetensors only, and the JSON config is validated
(known keys, types, format version). The config names its tensors file, which must match
``model-<16 hex>.safetensors`` inside the folder, so no path outside it is ever followed.

Writes survive being killed at any instant: the tensors go to a new content-addressed file
(atomically: temporary file, then rename), then the config is replaced atomically, and only
then are older tensors files removed. Whatever moment a process dies, ``config.json`` names a
complete tensors file whose sha256 it records.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sq_spade._utils import atomic_path, process_rank, sha256_file, umask_mode

FORMAT = "sq_spade-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TENSORS_PATTERN = re.compile(r"^model-[0-9a-f]{16}\.safetensors$")


class ModelFileError(ValueError):
    """A model folder that cannot be loaded safely."""


def save_model_files(path: str | os.PathLike, *, cls: str, config: Mapping[str, Any],
                     tensors: Mapping[str, Any], version: str) -> Path:
    """Write ``tensors`` (torch tensors or numpy arrays) and ``config`` into the folder ``path``.

    Under ``torchrun`` only rank 0 writes; on the other ranks this does nothing and returns
    ``path`` (their models are the same), so every rank may call ``save``.
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if process_rank() != 0:
        return path
    if path.exists() and not path.is_dir():
        raise ValueError(f"`path` must be a folder; {str(path)!r} is a file.")
    path.mkdir(parents=True, exist_ok=True)
    flat = {}
    for k, v in tensors.items():
        t = torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
        flat[k] = t.detach().cpu().contiguous()
    fd, tmp_name = tempfile.mkstemp(prefix=".model-", suffix=".partial", dir=path)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(flat, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        digest = sha256_file(tmp)
        tensors_name = f"model-{digest[:16]}.safetensors"
        umask_mode(tmp)
        os.replace(tmp, path / tensors_name)
    finally:
        tmp.unlink(missing_ok=True)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "class": cls, "sq_spade_version": version,
           "tensors_file": tensors_name, "tensors_sha256": digest, "config": _jsonable(config)}
    with atomic_path(path / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    for old in path.glob("model-*.safetensors"):
        if old.name != tensors_name and TENSORS_PATTERN.match(old.name):
            old.unlink(missing_ok=True)
    return path


def load_model_files(path: str | os.PathLike, *, cls: str, schema: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and validate a model folder; returns ``(config, tensors)`` (tensors as torch)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"`path` must be a model folder with {CONFIG_FILE}: {str(path)!r}.")
    if not cfg_path.is_file():
        raise ModelFileError(f"Model folder {str(path)!r} lacks {CONFIG_FILE}.")
    try:
        doc = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{CONFIG_FILE} in {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelFileError(f"{str(cfg_path)!r} is not an sq_spade model config (format {doc.get('format') if isinstance(doc, dict) else None!r}).")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"`format_version` in {CONFIG_FILE} must be an integer, got {version!r}.")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"The model was written with model-file format {version}, newer than this sq_spade reads "
                             f"({FORMAT_VERSION}); upgrade sq_spade.")
    if doc.get("class") != cls:
        raise ModelFileError(f"The folder holds a {doc.get('class')!r} model, not a {cls!r}.")
    unknown = set(doc) - {"format", "format_version", "class", "sq_spade_version", "tensors_file",
                          "tensors_sha256", "config"}
    if unknown:
        raise ModelFileError(f"Unknown keys in {CONFIG_FILE}: {sorted(unknown)}.")
    name = doc.get("tensors_file")
    if not isinstance(name, str) or not TENSORS_PATTERN.match(name):
        raise ModelFileError(f"`tensors_file` in {CONFIG_FILE} must be 'model-<16 hex>.safetensors' inside the "
                             f"folder, got {name!r}.")
    ten_path = path / name
    if not ten_path.is_file():
        raise ModelFileError(f"Model folder {str(path)!r} lacks {name}, named by its {CONFIG_FILE}.")
    config = validate_config(doc.get("config"), schema)
    expected = doc.get("tensors_sha256")
    if not isinstance(expected, str) or sha256_file(ten_path) != expected:
        raise ModelFileError(f"{name} in {str(path)!r} does not match the sha256 its config records.")
    try:
        tensors = load_file(str(ten_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{name} in {str(path)!r} is not a readable safetensors file: {e}") from e
    return config, tensors


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,),
          "dict": (dict,), "any": (object,)}


def validate_config(config: Any, schema: Mapping[str, Any]) -> dict[str, Any]:
    """Check a config against ``schema``: ``{key: (type_name, required, check or None)}``."""
    if not isinstance(config, dict):
        raise ModelFileError(f"`config` must be a JSON object, got {type(config).__name__}.")
    unknown = set(config) - set(schema)
    if unknown:
        raise ModelFileError(f"Unknown config keys: {sorted(unknown)}.")
    for key, (tname, required, check) in schema.items():
        if key not in config or config[key] is None:
            if required:
                raise ModelFileError(f"Config key {key!r} is required.")
            continue
        val = config[key]
        types = _TYPES[tname]
        if (tname in ("int", "float") and isinstance(val, bool)) or not isinstance(val, types):
            raise ModelFileError(f"Config key {key!r} must be of type {tname}, got {type(val).__name__}.")
        if check is not None and not check(val):
            raise ModelFileError(f"Config key {key!r} has an invalid value {val!r}.")
    return dict(config)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj
