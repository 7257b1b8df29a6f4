"""Small shared helpers: device choice, progress bars, seeding, atomic writes."""

from __future__ import annotations

import contextlib
import os
import random
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

    ``"auto"`` picks cuda, then mps, then cpu.
    """
    import torch

    device = settings.device if device is None else device
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"`device` must be a string such as 'auto', 'cpu' or 'cuda', got {device!r}.")
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


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str | None = None,
             enabled: bool | None = None, **kwargs: Any) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when :attr:`settings.progress` (or ``enabled``) is set."""
    enabled = settings.progress if enabled is None else enabled
    if not enabled:
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
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
