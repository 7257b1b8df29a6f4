"""Package-wide settings, in the style of ``scanpy.settings``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sq_spade._logging import set_verbosity


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
        Default seed of every function with a ``seed`` argument left at ``None`` (training,
        clustering, few-shot draws, UMAPs).
    verbosity
        What the ``sq_spade`` logger reports, as in scanpy: 0 errors, 1 warnings (default),
        2 info (what was computed and where it was written), 3 debug.

    Examples
    --------
    >>> import sq_spade as sqs
    >>> sqs.settings.progress = False
    >>> sqs.settings.verbosity = 2  # info: what was computed and where it was written
    >>> sqs.settings.verbosity = 1
    """

    progress: bool = True
    device: str = "auto"
    num_workers: int = 0
    data_dir: Path | None = field(default_factory=_default_data_dir)
    cache_dir: Path | None = field(default_factory=_default_cache_dir)
    memory_budget_bytes: int = 2 * 1024**3
    seed: int = 0
    verbosity: int = 1

    def __setattr__(self, name: str, value: object) -> None:
        if name == "verbosity":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 3:
                raise ValueError(f"`settings.verbosity` must be an integer 0-3 (0 errors, 1 warnings, 2 info, "
                                 f"3 debug), got {value!r}.")
            set_verbosity(value)
        super().__setattr__(name, value)

    def resolve_seed(self, seed: int | None) -> int:
        """``seed``, or :attr:`seed` when ``seed`` is ``None``."""
        return int(self.seed if seed is None else seed)


settings = Settings()
