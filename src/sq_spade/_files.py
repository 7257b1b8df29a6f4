"""The model-file format: a folder with ``config.json`` and ``model-<sha>.safetensors``.

The container shared by every saved model (:mod:`sq_spade.models`) and by training checkpoints
(:mod:`sq_spade.train`), so it sits on the bottom floor and neither depends on the other.

Loading never runs code: tensors come from safetensors only, and the JSON config is validated
(format version, known keys; the config itself by the class's :class:`~sq_spade._config.JsonConfig`).
The config names its tensors file, which must match ``model-<16 hex>.safetensors`` inside the
folder, so no path outside it is ever followed.

Writes survive being killed at any instant: the tensors go to a new content-addressed file
(atomically: temporary file, then rename), then the config is replaced atomically, and only
then are older tensors files removed. Whatever moment a process dies, ``config.json`` names a
complete tensors file whose sha256 it records.

Format versions (spatialdata's ``_io/format.py`` style): one class per on-disk version of the
folder, in :data:`FORMATS`. A reader upgrades an older document to the current layout before
the class's config reads it; a newer version is refused with a message to upgrade sq_spade.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from sq_spade._serialize import to_jsonable
from sq_spade._utils import atomic_path, process_rank, sha256_file, umask_mode
from sq_spade._version import __version__

if TYPE_CHECKING:
    from sq_spade._config import JsonConfig

FORMAT = "sq_spade-model"
CONFIG_FILE = "config.json"
TENSORS_PATTERN = re.compile(r"^model-[0-9a-f]{16}\.safetensors$")


class ModelFileError(ValueError):
    """A model folder that cannot be loaded safely."""


class ModelFolderV1:
    """Format 1 of a model folder (sq_spade 0.1).

    ``config.json`` holds ``format`` (``"sq_spade-model"``), ``format_version`` (1), ``class``
    (``Spade``, ``MclSTExp``, ``RidgeModel``, ``KNNModel`` or ``TrainingCheckpoint``),
    ``sq_spade_version``, ``tensors_file``, ``tensors_sha256`` and ``config`` (the class's
    configuration, checked by the class).
    """

    version: ClassVar[int] = 1
    keys: ClassVar[frozenset[str]] = frozenset({"format", "format_version", "class", "sq_spade_version",
                                                "tensors_file", "tensors_sha256", "config"})

    def upgrade(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The document in the current layout (format 1 is the current one)."""
        return doc


#: Every model-folder format this version reads, by ``format_version``.
FORMATS: dict[int, ModelFolderV1] = {1: ModelFolderV1()}
#: The format :func:`save_model_files` writes.
CURRENT_FORMAT = ModelFolderV1
FORMAT_VERSION = CURRENT_FORMAT.version


def save_model_files(path: str | os.PathLike, *, cls: str, config: Mapping[str, Any],
                     tensors: Mapping[str, Any], version: str = __version__) -> Path:
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
           "tensors_file": tensors_name, "tensors_sha256": digest, "config": to_jsonable(config)}
    with atomic_path(path / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    for old in path.glob("model-*.safetensors"):
        if old.name != tensors_name and TENSORS_PATTERN.match(old.name):
            old.unlink(missing_ok=True)
    return path


def load_model_files(path: str | os.PathLike, *, cls: str,
                     config_class: type[JsonConfig] | None = None) -> tuple[Any, dict[str, Any]]:
    """Read and validate a model folder; returns ``(config, tensors)`` (tensors as torch).

    ``config`` is ``config_class.from_json`` of the stored configuration (which names the key
    that does not fit), or the plain JSON object when ``config_class`` is ``None``.
    """
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
    if version not in FORMATS:
        raise ModelFileError(f"`format_version` {version} in {CONFIG_FILE} is not a model-file format; this sq_spade "
                             f"reads {sorted(FORMATS)}.")
    fmt = FORMATS[version]
    if doc.get("class") != cls:
        raise ModelFileError(f"The folder holds a {doc.get('class')!r} model, not a {cls!r}.")
    unknown = set(doc) - fmt.keys
    if unknown:
        raise ModelFileError(f"Unknown keys in {CONFIG_FILE}: {sorted(unknown)}.")
    name = doc.get("tensors_file")
    if not isinstance(name, str) or not TENSORS_PATTERN.match(name):
        raise ModelFileError(f"`tensors_file` in {CONFIG_FILE} must be 'model-<16 hex>.safetensors' inside the "
                             f"folder, got {name!r}.")
    ten_path = path / name
    if not ten_path.is_file():
        raise ModelFileError(f"Model folder {str(path)!r} lacks {name}, named by its {CONFIG_FILE}.")
    doc = fmt.upgrade(doc)
    config = doc.get("config")
    if not isinstance(config, dict):
        raise ModelFileError(f"`config` must be a JSON object, got {type(config).__name__}.")
    if config_class is not None:
        config = config_class.from_json(config)
    expected = doc.get("tensors_sha256")
    if not isinstance(expected, str) or sha256_file(ten_path) != expected:
        raise ModelFileError(f"{name} in {str(path)!r} does not match the sha256 its config records.")
    try:
        tensors = load_file(str(ten_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{name} in {str(path)!r} is not a readable safetensors file: {e}") from e
    return config, tensors
