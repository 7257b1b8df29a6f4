"""What every plotting function shares: figures, ``show`` / ``save`` / ``return_fig``, colours."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sq_spade._utils import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

# Backends that cannot display a window; ``show=None`` shows everywhere else (Qt, Tk, macOS,
# notebooks' inline and widget backends).
_NON_INTERACTIVE = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}


def is_interactive_backend() -> bool:
    """Whether the current matplotlib backend can show figures."""
    import matplotlib

    return matplotlib.get_backend().lower() not in _NON_INTERACTIVE


def check_ax(ax: Any, n_panels: int, *, what: str = "panel") -> None:
    """Refuse an ``ax`` that is not an Axes, or an ``ax`` for a multi-panel figure."""
    if ax is None:
        return
    from matplotlib.axes import Axes

    if not isinstance(ax, Axes):
        raise TypeError(f"`ax` must be a matplotlib Axes or None, got {type(ax).__name__}.")
    if n_panels != 1:
        raise ValueError(
            f"`ax` is only accepted for a single panel, but this call draws {n_panels} {what}s; "
            "leave `ax=None` (or ask for one panel)."
        )


def new_figure(figsize: tuple[float, float], *, dpi: float | None = None) -> Figure:
    """A figure with constrained layout (colourbars and legends get their own space)."""
    import matplotlib.pyplot as plt

    kw = {"dpi": dpi} if dpi is not None else {}
    return plt.figure(figsize=figsize, layout="constrained", **kw)


def finish(fig: Figure, *, show: bool | None, save: str | Path | None, return_fig: bool,
           dpi: float | None = None, owns_figure: bool = True) -> Figure | None:
    """Save, show and return (or not) a finished figure, with scanpy's conventions.

    ``show=None`` shows only on interactive backends, and not when drawing into the caller's
    ``ax`` (the caller is composing a figure and shows it when done). A figure that was saved, neither shown nor
    returned and created here is closed, so scripts that save many plots do not pile up open
    figures; an unsaved one stays the current figure (``plt.gcf()``).
    """
    import matplotlib.pyplot as plt

    if save is not None:
        if not isinstance(save, (str, Path)):
            raise TypeError(f"`save` must be a file path (str or Path) or None, got {type(save).__name__}.")
        path = Path(save)
        if path.suffix == "":
            raise ValueError(f"`save={str(save)!r}` needs a file extension (e.g. '.png', '.pdf').")

        kw = {"dpi": dpi} if dpi is not None else {}
        with atomic_path(path) as tmp:  # the temporary name hides the extension: say the format
            fig.savefig(tmp, bbox_inches="tight", format=path.suffix[1:].lower(), **kw)
    if show is None:
        show = owns_figure and is_interactive_backend()
    if show:
        plt.show()
    if return_fig:
        return fig
    if save is not None and not show and owns_figure:
        plt.close(fig)
    return None


def grid(n: int, ncols: int) -> tuple[int, int]:
    """Rows and columns of a grid holding ``n`` panels, at most ``ncols`` per row."""
    ncols = max(1, min(int(ncols), n))
    return math.ceil(n / ncols), ncols


def get_cmap(cmap: str | Colormap, *, arg: str = "cmap", bad: Any = None) -> Colormap:
    """A colormap given by name or object, with the colour of NaN set to ``bad`` (on a copy)."""
    import matplotlib
    from matplotlib.colors import Colormap

    if isinstance(cmap, str):
        try:
            cmap = matplotlib.colormaps[cmap]
        except KeyError:
            raise ValueError(f"`{arg}={cmap!r}` is not a matplotlib colormap.") from None
    if isinstance(cmap, Colormap):
        return cmap.with_extremes(bad=bad) if bad is not None else cmap.copy()
    raise TypeError(f"`{arg}` must be a colormap name or a Colormap, got {type(cmap).__name__}.")


_PCT = re.compile(r"^p(\d+(?:\.\d+)?)$")


def resolve_limit(value: float | str | None, data: np.ndarray, *, arg: str, default: str) -> float:
    """A colour limit: a number, ``"pNN"`` (percentile of the finite data) or ``None`` (min / max)."""
    finite = data[np.isfinite(data)]
    if value is None:
        if finite.size == 0:
            return 0.0
        return float(finite.min() if default == "min" else finite.max())
    if isinstance(value, str):
        m = _PCT.match(value)
        if m is None or not 0 <= float(m.group(1)) <= 100:
            raise ValueError(f"`{arg}` must be a number, None or a percentile such as 'p99', got {value!r}.")
        return float(np.percentile(finite, float(m.group(1)))) if finite.size else 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
        raise ValueError(f"`{arg}` must be a finite number, None or a percentile such as 'p99', got {value!r}.")
    return float(value)


def check_fraction(value: Any, arg: str) -> float:
    """Raise unless ``value`` is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 <= value <= 1:
        raise ValueError(f"`{arg}` must be a number between 0 and 1, got {value!r}.")
    return float(value)


def categorical_colors(categories: Sequence[str], palette: Any = None, *,
                       uns_colors: Sequence[str] | None = None) -> dict[str, tuple[float, ...]]:
    """RGBA colour per category.

    From ``palette`` (dict, list or colormap name), else scanpy's ``uns['<key>_colors']`` when it
    fits, else tab10 / tab20 / a sampled rainbow.
    """
    from matplotlib.colors import to_rgba

    cats = [str(c) for c in categories]
    n = len(cats)
    if isinstance(palette, dict):
        missing = [c for c in cats if c not in {str(k) for k in palette}]
        if missing:
            raise ValueError(f"`palette` has no colour for categories {missing[:5]}.")
        pal = {str(k): v for k, v in palette.items()}
        return {c: to_rgba(pal[c]) for c in cats}
    if palette is not None and not isinstance(palette, str):
        colors = list(palette)
        if len(colors) < n:
            raise ValueError(f"`palette` has {len(colors)} colours for {n} categories.")
        return {c: to_rgba(col) for c, col in zip(cats, colors, strict=False)}
    if palette is None and uns_colors is not None and len(uns_colors) == n:
        return {c: to_rgba(col) for c, col in zip(cats, uns_colors, strict=True)}
    if palette is None:
        palette = "tab10" if n <= 10 else "tab20" if n <= 20 else "gist_rainbow"
    cmap = get_cmap(palette, arg="palette")
    if hasattr(cmap, "colors") and len(cmap.colors) >= n:  # qualitative: take colours in order
        return {c: to_rgba(cmap.colors[i]) for i, c in enumerate(cats)}
    return {c: to_rgba(cmap(x)) for c, x in zip(cats, np.linspace(0, 1, max(n, 1)), strict=False)}


def natural_categories(values: Any) -> list[str]:
    """Categories of a column as strings, numeric ones in numeric order (``'2'`` before ``'10'``)."""
    import pandas as pd

    s = pd.Series(values)
    if isinstance(s.dtype, pd.CategoricalDtype):
        cats = [str(c) for c in s.cat.categories if (s == c).any()]
    else:
        cats = sorted({str(v) for v in s.dropna()})
    try:
        return sorted(cats, key=float)
    except ValueError:
        return cats


def legend_handles(colors: dict[str, tuple[float, ...]], *, markersize: float = 7) -> list[Any]:
    """Round markers for a categorical legend."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], linestyle="", marker="o", markersize=markersize, markerfacecolor=col,
                   markeredgewidth=0, label=cat) for cat, col in colors.items()]


def add_legend(ax: Axes, colors: dict[str, tuple[float, ...]], *, title: str | None, loc: str | None) -> None:
    """A categorical legend right of the axes (``"right margin"``), inside (matplotlib loc), or none."""
    if loc is None or loc == "none" or not colors:
        return
    handles = legend_handles(colors)
    ncol = 1 if len(colors) <= 14 else 2
    if loc == "right margin":
        ax.legend(handles=handles, title=title, loc="center left", bbox_to_anchor=(1.02, 0.5),
                  frameon=False, ncol=ncol)
    else:
        ax.legend(handles=handles, title=title, loc=loc, ncol=ncol)
