"""sq_spade: expression-informed latent spaces for H&E histology on SpatialData.

``import sq_spade as sqs`` exposes ``sqs.pp``, ``sqs.tl``, ``sqs.pl``, ``sqs.io``,
``sqs.datasets``, ``sqs.models`` and ``sqs.settings``; the submodules (and torch) are only
imported when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sq_spade._settings import settings
from sq_spade._version import __version__

_SUBMODULES = ("pp", "tl", "pl", "io", "datasets", "models", "nn", "train")

if TYPE_CHECKING:
    from sq_spade import datasets, io, models, nn, pl, pp, tl, train  # noqa: F401

__all__ = ["settings", "__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        mod = importlib.import_module(f"sq_spade.{name}")
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'sq_spade' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
