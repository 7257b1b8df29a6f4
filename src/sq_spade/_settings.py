"""Package-wide settings, in the style of ``scanpy.settings``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _default_data_dir() -> Path | None:
    env = os.environ.get("SQ_SPADE_DATA_DIR")
    return Path(env).expanduser() if env else None


def _default_cache_dir() -> Path | None:
    env = os.environ.get("SQ_SPADE_CACHE_DIR")
    return Path(env).expanduser() if env else None


@dataclass
class Settings:
    """Global settings of sq_spade.

    Attributes
    ----------
    progress
        Show tqdm progress bars on long work.
    device
        Default device for torch work: ``"auto"`` picks cuda, then mps, then cpu.
    num_workers
        Default number of DataLoader workers for patch loading (0: in the main process).
    data_dir
        Folder of public datasets (``SQ_SPADE_DATA_DIR``); ``None`` uses pooch's cache.
    cache_dir
        Folder of the on-disk feature cache (``SQ_SPADE_CACHE_DIR``); ``None`` disables it.
        Entries are keyed by a hash of the patches' pixels and the backbone's weights, so a
        cached entry can never be stale.
    memory_budget_bytes
        A pyramid level larger than this is read window by window instead of into memory.
    seed
        Default random seed.

    Examples
    --------
    >>> import sq_spade as sqs
    >>> sqs.settings.progress = False
    """

    progress: bool = True
    device: str = "auto"
    num_workers: int = 0
    data_dir: Path | None = field(default_factory=_default_data_dir)
    cache_dir: Path | None = field(default_factory=_default_cache_dir)
    memory_budget_bytes: int = 2 * 1024**3
    seed: int = 0


settings = Settings()
