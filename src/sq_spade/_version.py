"""The package version, in one place: the face re-exports it, saved files record it."""

__version__ = "0.1.0"
