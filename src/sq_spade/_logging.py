"""The ``sq_spade`` logger: what was computed and where it was written, at info level.

Verbosity follows ``sqs.settings.verbosity`` (scanpy's levels: 0 errors, 1 warnings, 2 info,
3 hints/debug); the default 1 keeps the package quiet. Handlers are the user's business: a
single stderr handler is attached to the ``sq_spade`` logger unless the user configured one.
"""

from __future__ import annotations

import logging
from typing import Any

LOGGER_NAME = "sq_spade"
#: ``settings.verbosity`` -> logging level.
LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}

logger = logging.getLogger(LOGGER_NAME)


def set_verbosity(verbosity: int) -> None:
    """Set the level of the ``sq_spade`` logger from a scanpy-style verbosity (0-3)."""
    level = LEVELS[min(max(int(verbosity), 0), 3)]
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)


def info(msg: str, *args: Any) -> None:
    """Log at info level (shown with ``sqs.settings.verbosity = 2``)."""
    logger.info(msg, *args)


def debug(msg: str, *args: Any) -> None:
    """Log at debug level (shown with ``sqs.settings.verbosity = 3``)."""
    logger.debug(msg, *args)


__all__ = ["LEVELS", "LOGGER_NAME", "debug", "info", "logger", "set_verbosity"]
