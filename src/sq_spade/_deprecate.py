"""Renamed arguments: the old names keep working for one release, with a ``FutureWarning``.

Every rename of a public argument is declared once, on the function, with
:func:`renamed_arguments`; the decorator keeps the new signature (``inspect.signature`` and the
docs show the new names only) and records the renames in ``fn.__renamed_arguments__``, which
the API naming test reads.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _public_name(fn: Callable[..., Any]) -> str:
    module = fn.__module__.split(".")
    # sq_spade.tl._predict -> sqs.tl
    public = ".".join(["sqs", *[m for m in module[1:] if not m.startswith("_")]])
    return f"{public}.{fn.__qualname__}"


def renamed_arguments(**old_to_new: str) -> Callable[[F], F]:
    """Accept the old keyword names of ``fn`` for one release, warning with a ``FutureWarning``.

    Parameters
    ----------
    **old_to_new
        Old argument name -> new argument name.

    Examples
    --------
    >>> import warnings
    >>> @renamed_arguments(data="sdata")
    ... def f(sdata):
    ...     return sdata
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     f(data=1), w[0].category.__name__
    (1, 'FutureWarning')
    """

    def deco(fn: F) -> F:
        name = _public_name(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{name}() got `{old}` and `{new}`; `{old}` is the old name of `{new}`: "
                                    f"pass `{new}` only.")
                warnings.warn(f"`{old}` of {name} is renamed `{new}`; `{old}` stops working in the next "
                              f"release. Pass `{new}={kwargs[old]!r}` instead." if _short(kwargs[old]) else
                              f"`{old}` of {name} is renamed `{new}`; `{old}` stops working in the next "
                              f"release. Pass `{new}=...` instead.", FutureWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            # this wrapper is one frame more between the user and the function: warnings that
            # the function attributes to its caller (stacklevel) are moved to the user's line
            caught: list[warnings.WarningMessage] = []
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    return fn(*args, **kwargs)
            finally:  # after the `with`: the user's filters and handlers again
                _reemit(caught, sys._getframe(1))

        wrapper.__renamed_arguments__ = {**getattr(fn, "__renamed_arguments__", {}), **old_to_new}  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return deco


def _reemit(caught: list[warnings.WarningMessage], caller: Any) -> None:
    """Emit ``caught`` again (through the user's filters), those pointing at this file at ``caller``."""
    for w in caught:
        if w.filename == __file__:
            g = caller.f_globals
            warnings.warn_explicit(w.message, w.category, caller.f_code.co_filename, caller.f_lineno,
                                   module=g.get("__name__"), registry=g.setdefault("__warningregistry__", {}))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _short(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


__all__ = ["renamed_arguments"]
