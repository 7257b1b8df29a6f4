"""The model-file format: a folder with ``config.json`` and ``model-<sha>.safetensors``.

The container shared by every saved model (:mod:`sq_spade.models`) and by training checkpoints
(:mod:`sq_spade.train`), so it sits on the bottom floor and neither depends on the other.

Loading never runs code: tensors come from safetensors only, and the JSON config is validated
(format version, known keys; the config itself by the class's :class:`~sq_spade._config.JsonConfig`).
The config names its tensors file, which must match ``model-<16 hex>.safetensors`` inside the
folder, and both files are opened with ``O_NOFOLLOW`` (a symbolic link is refused), so no path
outside the folder is ever followed. From format 2 the config's own sha256 is recorded in the
tensors file, whose sha256 the config records: neither can be edited alone. The sizes in the
config are checked against the tensors' shapes (from the safetensors header) before any module
is built, and NaN or infinite parameters are refused on save and on load.

Writes survive being killed at any instant: the tensors go to a new content-addressed file
(atomically: temporary file, then rename), then the config is replaced atomically, and only
then are older tensors files removed. Whatever moment a process dies, ``config.json`` names a
complete tensors file whose sha256 it records. Writers hold the folder's ``.lock``
(``fcntl.flock``, exclusive) for the whole write and readers hold it shared, so two writers
(threads or processes) take turns and a reader never sees a config without its tensors.

Format versions (spatialdata's ``_io/format.py`` style): one class per on-disk version of the
folder, in :data:`FORMATS`. A reader upgrades an older document to the current layout before
the class's config reads it; a newer version is refused with a message to upgrade sq_spade.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
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
LOCK_FILE = ".lock"
TENSORS_PATTERN = re.compile(r"^model-[0-9a-f]{16}\.safetensors$")
#: The class of a training checkpoint folder (:mod:`sq_spade.train`); no model is saved over one.
CHECKPOINT_CLASS = "TrainingCheckpoint"
_TEMPORARIES = (".model-*.partial", f".{CONFIG_FILE}.*.tmp")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


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
        """The document in the current layout (format 1 lacks only ``config_sha256``)."""
        return doc


class ModelFolderV2(ModelFolderV1):
    """Format 2 of a model folder: format 1 plus ``config_sha256``.

    ``config_sha256`` is the sha256 of the canonical JSON of every entry of ``config.json`` but
    ``tensors_file``, ``tensors_sha256`` and itself (see :func:`config_digest`). The tensors
    file records the same digest in its safetensors metadata, so the tensors' sha256 (and the
    file name derived from it) covers the config: an edited config no longer matches its tensors.
    """

    version: ClassVar[int] = 2
    keys: ClassVar[frozenset[str]] = ModelFolderV1.keys | {"config_sha256"}


#: Every model-folder format this version reads, by ``format_version``.
FORMATS: dict[int, ModelFolderV1] = {1: ModelFolderV1(), 2: ModelFolderV2()}
#: The format :func:`save_model_files` writes.
CURRENT_FORMAT = ModelFolderV2
FORMAT_VERSION = CURRENT_FORMAT.version
_DIGESTED_OUT = ("tensors_file", "tensors_sha256", "config_sha256")


def config_digest(doc: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``doc`` without its tensor entries.

    Examples
    --------
    >>> config_digest({"format": "sq_spade-model", "config": {"n": 1}}) == config_digest(
    ...     {"config": {"n": 1}, "format": "sq_spade-model", "tensors_file": "x"})
    True
    """
    body = {k: v for k, v in doc.items() if k not in _DIGESTED_OUT}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, *, exclusive: bool) -> Iterator[None]:
    """Hold the folder's ``.lock`` (``fcntl.flock``): exclusive to write, shared to read.

    Writers create the lock file; a reader takes it only when it exists (it never writes into a
    folder it reads, which may be read-only), and otherwise relies on the retry in
    :func:`load_model_files`. The lock file is opened without following a symbolic link.
    Where ``fcntl`` is missing (Windows) this does nothing.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock = Path(path) / LOCK_FILE
    try:
        if exclusive:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
        else:
            fd = os.open(lock, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except FileNotFoundError:
        if exclusive:
            raise
        yield
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ModelFileError(f"{LOCK_FILE} in {str(path)!r} is a symbolic link; sq_spade follows "
                                 f"no link in a model folder. Remove it.") from e
        if exclusive:
            raise
        yield  # an unreadable lock file: read without it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_inside(path: Path, name: str) -> bytes:
    """The bytes of the regular file ``path / name``, refusing a symbolic link (``O_NOFOLLOW``)."""
    try:
        fd = os.open(path / name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ModelFileError(f"{name} in {str(path)!r} is a symbolic link; sq_spade follows no link "
                                 f"in a model folder (it could point outside it). Copy the file "
                                 f"into the folder instead.") from e
        raise
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ModelFileError(f"{name} in {str(path)!r} is not a regular file.")
        return fh.read()


def _is_link(p: Path) -> bool:
    return p.is_symlink()


def _tensor_header(data: bytes, where: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """``(shapes, metadata)`` from a safetensors header, without reading any tensor."""
    if len(data) < 8:
        raise ModelFileError(f"{where} is not a readable safetensors file (it has {len(data)} bytes).")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ModelFileError(f"{where} is not a readable safetensors file (its header runs past its end).")
    try:
        header = json.loads(data[8: 8 + n])
        meta = header.pop("__metadata__", None) or {}
        shapes = {str(k): tuple(int(s) for s in v["shape"]) for k, v in header.items()}
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{where} is not a readable safetensors file (bad header: {e})") from e
    if not isinstance(meta, dict):
        raise ModelFileError(f"{where} is not a readable safetensors file (bad header metadata).")
    return shapes, meta


def _check_finite(tensors: Mapping[str, Any], what: str, error: type[Exception]) -> None:
    import torch

    for k, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            raise error(f"{what}: tensor {k!r} holds NaN or infinite values (did training diverge?); "
                        f"sq_spade never saves or loads a model with non-finite parameters.")


def save_model_files(path: str | os.PathLike, *, cls: str, config: Mapping[str, Any],
                     tensors: Mapping[str, Any], version: str = __version__) -> Path:
    """Write ``tensors`` (torch tensors or numpy arrays) and ``config`` into the folder ``path``.

    The folder's lock is held for the whole write, so concurrent writers (threads or processes)
    take turns and readers never see a config without its tensors. Non-finite float tensors
    are refused (``ValueError``), and so is replacing a training checkpoint with a model (or a
    folder whose ``config.json`` is not an sq_spade config).

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
    flat = {}
    for k, v in tensors.items():
        t = torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
        flat[k] = t.detach().cpu().contiguous()
    _check_finite(flat, f"cannot save into {str(path)!r}", ValueError)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "class": cls, "sq_spade_version": version,
           "config": to_jsonable(config)}
    text = json.dumps(doc)  # what a reader will parse: the digest is of the round-tripped document
    doc = json.loads(text)
    doc["config_sha256"] = config_digest(doc)
    path.mkdir(parents=True, exist_ok=True)
    with folder_lock(path, exclusive=True):
        _check_replaceable(path, cls)
        for pattern in _TEMPORARIES:  # left by a killed writer (no writer is active: we hold the lock)
            for p in path.glob(pattern):
                p.unlink(missing_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".model-", suffix=".partial", dir=path)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            save_file(flat, str(tmp), metadata={"config_sha256": doc["config_sha256"]})
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            digest = sha256_file(tmp)
            tensors_name = f"model-{digest[:16]}.safetensors"
            umask_mode(tmp)
            os.replace(tmp, path / tensors_name)
        finally:
            tmp.unlink(missing_ok=True)
        doc.update(tensors_file=tensors_name, tensors_sha256=digest)
        with atomic_path(path / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
        for old in path.glob("model-*.safetensors"):
            if old.name != tensors_name and TENSORS_PATTERN.match(old.name):
                old.unlink(missing_ok=True)
    return path


def _check_replaceable(path: Path, cls: str) -> None:
    """Refuse to replace a checkpoint by a model (and the reverse), or a foreign ``config.json``."""
    if not (path / CONFIG_FILE).exists() and not _is_link(path / CONFIG_FILE):
        return
    try:
        doc = json.loads(_read_inside(path, CONFIG_FILE))
    except (ModelFileError, OSError, ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"`path` {str(path)!r} holds a {CONFIG_FILE} that is not an sq_spade model "
                         f"config; sq_spade does not replace it. Choose another folder or remove it.")
    held = doc.get("class")
    if held != cls and CHECKPOINT_CLASS in (held, cls):
        what = "a training checkpoint" if held == CHECKPOINT_CLASS else f"a saved {held} model"
        raise ValueError(f"`path` {str(path)!r} holds {what}; saving a {cls} there would replace it "
                         f"(a checkpoint could no longer be resumed). Choose another folder.")


def load_model_files(path: str | os.PathLike, *, cls: str, config_class: type[JsonConfig] | None = None,
                     check_shapes: Callable[[Any, dict[str, tuple[int, ...]]], None] | None = None,
                     ) -> tuple[Any, dict[str, Any]]:
    """Read and validate a model folder; returns ``(config, tensors)`` (tensors as torch).

    ``config`` is ``config_class.from_json`` of the stored configuration (which names the key
    that does not fit), or the plain JSON object when ``config_class`` is ``None``.
    ``check_shapes(config, shapes)`` is called with the tensors' shapes read from the
    safetensors header before any tensor is built, and raises :class:`ModelFileError` when the
    config's sizes do not fit them.

    Nothing is followed out of the folder: ``config.json`` and the tensors file are opened with
    ``O_NOFOLLOW`` (a symbolic link is refused). The read holds the folder's shared lock, and the
    tensors' bytes are hashed and parsed from one read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"`path` must be a model folder with {CONFIG_FILE}: {str(path)!r}.")
    for attempt in range(5):
        with folder_lock(path, exclusive=False):
            doc, fmt = _read_config(path, cls)
            name = doc["tensors_file"]
            try:
                data = _read_inside(path, name)
            except FileNotFoundError:
                # a writer without our lock (an older sq_spade) replaced the config meanwhile: retry
                if attempt < 4 and _read_inside(path, CONFIG_FILE) != doc["_raw"]:
                    continue
                raise ModelFileError(f"Model folder {str(path)!r} lacks {name}, named by its {CONFIG_FILE}.") from None
        break
    doc.pop("_raw")
    expected = doc.get("tensors_sha256")
    if not isinstance(expected, str) or hashlib.sha256(data).hexdigest() != expected:
        raise ModelFileError(f"{name} in {str(path)!r} does not match the sha256 its config records.")
    shapes, meta = _tensor_header(data, f"{name} in {str(path)!r}")
    # the tensors file's metadata decides (not the config's own format_version, which an edit
    # could lower to 1 to skip the check)
    if fmt.version >= 2 or "config_sha256" in meta:
        recorded = doc.get("config_sha256")
        if recorded != config_digest(doc) or meta.get("config_sha256") != recorded:
            raise ModelFileError(f"{CONFIG_FILE} in {str(path)!r} does not match the config_sha256 recorded "
                                 f"in it and in its tensors file: it was edited after saving. Save the "
                                 f"model again instead of editing {CONFIG_FILE}.")
    doc = fmt.upgrade(doc)
    config = doc.get("config")
    if not isinstance(config, dict):
        raise ModelFileError(f"`config` must be a JSON object, got {type(config).__name__}.")
    if config_class is not None:
        config = config_class.from_json(config)
    if check_shapes is not None:
        check_shapes(config, shapes)
    try:
        tensors = load_bytes(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{name} in {str(path)!r} is not a readable safetensors file: {e}") from e
    _check_finite(tensors, f"{name} in {str(path)!r}", ModelFileError)
    return config, tensors


def _read_config(path: Path, cls: str) -> tuple[dict[str, Any], ModelFolderV1]:
    """The validated ``config.json`` document (with its raw bytes under ``"_raw"``) and its format."""
    try:
        raw = _read_inside(path, CONFIG_FILE)
    except FileNotFoundError:
        raise ModelFileError(f"Model folder {str(path)!r} lacks {CONFIG_FILE}.") from None
    cfg_path = path / CONFIG_FILE
    try:
        doc = json.loads(raw)
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
    doc["_raw"] = raw
    return doc, fmt

