"""Small shared helpers: device choice, progress bars, seeding, atomic writes."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from sq_spade._settings import settings

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def resolve_device(device: str | None = None) -> torch.device:
    """Turn ``"auto"`` (or ``None``: :attr:`settings.device`) into a concrete torch device.

    ``"auto"`` picks cuda, then mps, then cpu. Under ``torchrun`` (``LOCAL_RANK`` set), ``"auto"``
    and ``"cuda"`` pick the process's own GPU, ``cuda:<LOCAL_RANK>``.
    """
    import torch

    device = settings.device if device is None else device
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"`device` must be a string such as 'auto', 'cpu' or 'cuda', got {device!r}.")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK", "")
        if local.isdigit() and int(local) < torch.cuda.device_count():
            return torch.device("cuda", int(local))  # one GPU per torchrun process
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"`device` must be 'auto', 'cpu', 'cuda[:i]' or 'mps', got {device!r}.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device={device!r}` asked for CUDA, but torch sees no CUDA device.")
    return dev


def process_rank() -> int:
    """Rank of this process among ``torchrun``'s (0 when not distributed).

    The initialised process group's rank, else the ``RANK`` environment variable that
    ``torchrun`` sets, else 0. Only rank 0 writes files and shows progress bars.
    """
    dist = sys.modules.get("torch.distributed")  # never import torch just to ask
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isdigit() else 0


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str | None = None,
             enabled: bool | None = None, **kwargs: Any) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when :attr:`settings.progress` (or ``enabled``) is set.

    Never on a process of rank other than 0 (under ``torchrun``), so one bar shows.
    """
    enabled = settings.progress if enabled is None else enabled
    if not enabled or process_rank() != 0:
        yield from iterable
        return
    try:  # notebook bars need ipywidgets; without it tqdm.auto warns "IProgress not found"
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm.std import tqdm

    yield from tqdm(iterable, total=total, desc=desc, **kwargs)


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch; return a numpy Generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code still reads the legacy global RNG
    with contextlib.suppress(ImportError):
        import torch

        torch.manual_seed(seed)
    return np.random.default_rng(seed)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A reader never sees a half-written file: on any error (or a killed process) the previous
    file at ``path`` stays intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        umask_mode(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def umask_mode(path: str | os.PathLike) -> None:
    """Give a file made by ``mkstemp`` (mode 0600) the mode a plain ``open`` would: 0666 & ~umask.

    Saved models and caches are meant to be shared (a group folder, a lab's model zoo).
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def copy_data(data: Any) -> Any:
    """A copy for ``copy=True``: an AnnData copied; a SpatialData with copied tables.

    The images, shapes, points and labels elements of a SpatialData are shared with the
    original (sq_spade never writes into them), so a copy of a large slide costs its tables only.
    """
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data.copy()
    from spatialdata import SpatialData

    if not isinstance(data, SpatialData):
        raise TypeError(f"`copy=True` needs an AnnData or a SpatialData, got {type(data).__name__}.")
    out = SpatialData(images=dict(data.images), labels=dict(data.labels), points=dict(data.points),
                      shapes=dict(data.shapes), tables={k: t.copy() for k, t in data.tables.items()})
    if hasattr(out, "attrs"):
        out.attrs.update(getattr(data, "attrs", {}) or {})
    return out

