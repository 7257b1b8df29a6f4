"""Evaluation and training plots: per-gene correlations of methods, loss curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sq_spade._validation import check_choice, check_positive
from sq_spade.pl._utils import categorical_colors, check_ax, finish, new_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# ----------------------------------------------------------------------------------------------
# per-gene correlation


def _per_gene_table(results: Any, *, method_key: str, gene_key: str, value_key: str) -> pd.DataFrame:
    """Long table ``method, gene, r`` from a DataFrame or a ``{method: per-gene table}`` mapping."""
    if isinstance(results, Mapping):
        parts = []
        for method, df in results.items():
            if not isinstance(df, pd.DataFrame):
                raise TypeError(f"`results[{method!r}]` must be a DataFrame, got {type(df).__name__}.")
            parts.append(df.assign(**{method_key: str(method)}))
        if not parts:
            raise ValueError("`results` is empty: expected per-gene results of at least one method.")
        results = pd.concat(parts, ignore_index=True)
    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"`results` must be a DataFrame or a dict of DataFrames, got {type(results).__name__}.")
    for arg, col in (("method_key", method_key), ("gene_key", gene_key), ("value_key", value_key)):
        if col not in results.columns:
            raise KeyError(f"`{arg}={col!r}` is not a column of `results`; columns: {list(results.columns)}.")
    df = results[[method_key, gene_key, value_key]].copy()
    df[value_key] = pd.to_numeric(df[value_key], errors="coerce")
    df[method_key] = df[method_key].astype(str)
    df[gene_key] = df[gene_key].astype(str)
    # several sections per gene: a gene's score is its mean r over sections (constant genes,
    # NaN, are left out rather than counted as 0)
    return (df.dropna(subset=[value_key]).groupby([method_key, gene_key], sort=False, observed=True)[value_key]
            .mean().reset_index())


def gene_correlation(
    results: pd.DataFrame | Mapping[str, pd.DataFrame],
    *,
    method_key: str = "method",
    gene_key: str = "gene",
    value_key: str = "pearson_r",
    top: int | None = None,
    n_labels: int = 3,
    strip: bool = True,
    order: Sequence[str] | None = None,
    palette: Any = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    ax: Axes | None = None,
    save: str | Path | None = None,
    dpi: float | None = None,
) -> Figure | None:
    """Per-gene Pearson r of several methods, ranked: how many genes each method predicts well.

    Left: each method's genes sorted by r (best first), one line per method, the legend giving
    the mean r. Right (``strip=True``): the distribution of r per method as jittered points
    with the median marked. Several rows per (method, gene), e.g. one per held-out section,
    are averaged first.

    Parameters
    ----------
    results
        Long DataFrame with columns ``method_key``, ``gene_key``, ``value_key`` (e.g. the
        per-gene tables of :func:`sq_spade.tl.evaluate_expression` with a method column), or a
        dict ``{method: per-gene DataFrame}``.
    method_key, gene_key, value_key
        Column names.
    top
        Show only each method's ``top`` best genes.
    n_labels
        Name each method's ``n_labels`` best and worst genes on the rank panel (0: none).
    strip
        Add the strip panel.
    order
        Methods and their order (default: order of first appearance).
    palette
        Method colours (dict, list or colormap name).
    title
        Figure title.
    figsize
        Figure size in inches.
    show, return_fig, save, dpi
        As in :func:`sq_spade.pl.spatial`.
    ax
        Axes for the rank panel alone (needs ``strip=False``).

    Returns
    -------
    The Figure when ``return_fig=True``, else ``None``.

    Examples
    --------
    >>> import pandas as pd
    >>> res = pd.DataFrame({"method": ["spade"] * 3 + ["ridge"] * 3, "gene": list("abcabc"),
    ...                     "pearson_r": [0.5, 0.3, 0.1, 0.4, 0.2, 0.0]})
    >>> fig = sqs.pl.gene_correlation(res, return_fig=True)
    >>> len(fig.axes)
    2
    """
    df = _per_gene_table(results, method_key=method_key, gene_key=gene_key, value_key=value_key)
    present = list(dict.fromkeys(df[method_key]))
    if order is None:
        methods = present
    else:
        methods = [str(m) for m in order]
        missing = [m for m in methods if m not in present]
        if missing:
            raise ValueError(f"`order` names methods without results: {missing}; present: {present}.")
    if not methods:
        raise ValueError(f"`results` has no finite `{value_key}` value to plot.")
    if top is not None:
        check_positive(top, "top", integer=True)
    check_positive(n_labels, "n_labels", integer=True, allow_zero=True)
    check_ax(ax, 2 if strip else 1)
    colors = categorical_colors(methods, palette)
    ranked, names = {}, {}
    for m in methods:
        sub = df.loc[df[method_key] == m]
        order = np.argsort(-sub[value_key].to_numpy(np.float64), kind="stable")
        r = sub[value_key].to_numpy(np.float64)[order]
        g = sub[gene_key].to_numpy(object)[order]
        ranked[m], names[m] = (r[:top], g[:top]) if top is not None else (r, g)

    if ax is None:
        fig = new_figure(figsize or ((9.0, 3.8) if strip else (5.0, 3.8)), dpi=dpi)
        if strip:
            ax_rank, ax_strip = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
        else:
            ax_rank, ax_strip = fig.subplots(1, 1), None
        owns = True
    else:
        fig, ax_rank, ax_strip, owns = ax.figure, ax, None, False
    for m in methods:
        r = ranked[m]
        ax_rank.plot(np.arange(1, len(r) + 1), r, marker="o", markersize=2.5, linewidth=1.2, color=colors[m],
                     label=f"{m} (mean r = {np.mean(r):.3f}, {len(r)} genes)")
    if n_labels:
        _label_extremes(ax_rank, ranked, names, colors, n_labels)
    ax_rank.axhline(0, color="0.6", linewidth=0.8, zorder=0)
    ax_rank.set_xlabel("gene rank" + (f" (top {top})" if top is not None else ""))
    ax_rank.set_ylabel(f"Pearson r ({value_key})" if value_key != "pearson_r" else "Pearson r")
    ax_rank.legend(frameon=False, fontsize="small", loc="upper right")
    if ax_strip is not None:
        rng = np.random.default_rng(0)  # fixed jitter: the same figure every time
        for i, m in enumerate(methods):
            r = ranked[m]
            ax_strip.scatter(i + rng.uniform(-0.25, 0.25, len(r)), r, s=8, color=colors[m], alpha=0.7, linewidths=0)
            if len(r):
                ax_strip.hlines(np.median(r), i - 0.35, i + 0.35, color="black", linewidth=1.5)
        ax_strip.axhline(0, color="0.6", linewidth=0.8, zorder=0)
        ax_strip.set_xticks(range(len(methods)), methods, rotation=30 if len(methods) > 3 else 0)
        ax_strip.set_ylabel("Pearson r")
        ax_strip.set_xlim(-0.6, len(methods) - 0.4)
    if title is not None:
        fig.suptitle(title)
    return finish(fig, show=show, save=save, return_fig=return_fig, dpi=dpi, owns_figure=owns)


def _label_extremes(ax: Axes, ranked: dict[str, np.ndarray], names: dict[str, np.ndarray], colors: dict[str, Any],
                    n: int) -> None:
    """Name the ``n`` best genes (right of their points) and ``n`` worst (left) of each method.

    Labels of neighbouring ranks are staggered vertically so that they do not overprint.
    """
    for m, r in ranked.items():
        k = min(n, len(r))
        for j in range(k):  # best, stacked downwards
            ax.annotate(str(names[m][j]), (j + 1, r[j]), xytext=(6, 4 - 7 * j), textcoords="offset points",
                        fontsize="x-small", color=colors[m], ha="left", va="center",
                        arrowprops={"arrowstyle": "-", "color": colors[m], "lw": 0.4})
        for i in range(max(len(r) - n, k), len(r)):  # worst, stacked upwards, to the left
            ax.annotate(str(names[m][i]), (i + 1, r[i]), xytext=(-6, 7 * (len(r) - 1 - i) - 4),
                        textcoords="offset points", fontsize="x-small", color=colors[m], ha="right", va="center",
                        arrowprops={"arrowstyle": "-", "color": colors[m], "lw": 0.4})


# ----------------------------------------------------------------------------------------------
# training history


def _get_history(model_or_history: Any) -> Mapping[str, Any]:
    h = getattr(model_or_history, "history", model_or_history)
    if not isinstance(h, Mapping):
        raise TypeError("`model_or_history` must be a model or fit result with a `.history` dict, or such a "
                        f"dict, got {type(model_or_history).__name__}.")
    return h


def _as_loss(h: Mapping[str, Any], key: str) -> np.ndarray | None:
    """A loss as float ``(epochs,)`` or ``(epochs, E)``; ``None`` when absent or all NaN.

    JSON-saved histories hold ``None`` for NaN; ``dtype=float`` turns them back into NaN.
    """
    if key not in h or h[key] is None:
        return None
    try:
        x = np.asarray(h[key], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`history[{key!r}]` must be numeric per epoch, got {type(h[key]).__name__}.") from e
    if x.ndim == 0 or x.ndim > 2:
        raise ValueError(f"`history[{key!r}]` must be (epochs,) or (epochs, experts), got shape {x.shape}.")
    if x.size == 0 or not np.isfinite(x).any():
        return None
    return x


def training_history(
    model_or_history: Any,
    *,
    keys: Sequence[str] = ("train_loss", "val_loss"),
    experts: str = "band",
    log_scale: bool = False,
    best_epoch: bool = True,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    ax: Axes | None = None,
    save: str | Path | None = None,
    dpi: float | None = None,
) -> Figure | None:
    """Training and validation loss per epoch.

    Accepts ``model.history`` of :class:`sq_spade.models.Spade` (losses ``(epochs, experts)``,
    possibly JSON-loaded with ``None`` for NaN), mclSTExp / fit results (``(epochs,)``) or such a
    dict. Per-expert losses are summarised as the mean over experts with a min-max band
    (``experts="band"``), the mean plus one faint line per expert (``"lines"``), or the mean only.

    Parameters
    ----------
    model_or_history
        Object with a ``history`` dict, or the dict.
    keys
        History entries drawn.
    experts
        ``"band"``, ``"lines"`` or ``"mean"``: how 2-D (per-expert) losses are drawn.
    log_scale
        Logarithmic y axis.
    best_epoch
        Mark ``history["best_epoch"]`` when it is a single epoch.
    title
        Axes title.
    figsize
        Figure size in inches.
    show, return_fig, ax, save, dpi
        As in :func:`sq_spade.pl.spatial`.

    Returns
    -------
    The Figure when ``return_fig=True``, else ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> hist = {"train_loss": np.array([1.0, 0.7, 0.5]), "val_loss": np.array([1.1, 0.9, 0.8])}
    >>> fig = sqs.pl.training_history(hist, return_fig=True)
    >>> len(fig.axes[0].lines)
    2
    """
    h = _get_history(model_or_history)
    check_choice(experts, "experts", ("band", "lines", "mean"))
    if isinstance(keys, str):
        keys = [keys]
    losses = {k: _as_loss(h, k) for k in keys}
    unknown = [k for k in keys if k not in h]
    if unknown and all(losses[k] is None for k in keys):
        raise KeyError(f"`keys` {unknown} are not in the history; available: {sorted(h)}.")
    losses = {k: v for k, v in losses.items() if v is not None}
    if not losses:
        raise ValueError(f"The history has no finite value for {list(keys)}: nothing was recorded.")
    check_ax(ax, 1)
    if ax is None:
        fig = new_figure(figsize or (5.0, 3.5), dpi=dpi)
        ax = fig.subplots(1, 1)
        owns = True
    else:
        fig, owns = ax.figure, False
    palette = {"train_loss": "tab:blue", "val_loss": "tab:orange"}
    others = iter(["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"])
    for k, x in losses.items():
        color = palette.get(k) or next(others, "black")
        epochs = np.arange(1, x.shape[0] + 1)
        label = k.replace("_", " ")
        if x.ndim == 1:
            ax.plot(epochs, x, color=color, label=label, marker="o" if len(x) < 30 else None, markersize=3)
            continue
        import warnings

        with warnings.catch_warnings():  # epochs where every expert is NaN (stopped early)
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(x, axis=1)
            lo, hi = np.nanmin(x, axis=1), np.nanmax(x, axis=1)
        if experts == "lines":
            for e in range(x.shape[1]):
                ax.plot(epochs, x[:, e], color=color, alpha=0.25, linewidth=0.8)
        elif experts == "band":
            ax.fill_between(epochs, lo, hi, color=color, alpha=0.2, linewidth=0)
        suffix = {"band": f", mean and range over {x.shape[1]} experts",
                  "lines": f", mean and {x.shape[1]} experts", "mean": f", mean over {x.shape[1]} experts"}[experts]
        ax.plot(epochs, mean, color=color, label=label + suffix, linewidth=1.8)
    be = h.get("best_epoch")
    if best_epoch and be is not None and np.ndim(be) == 0 and int(be) >= 0:
        ax.axvline(int(be) + 1, color="0.4", linestyle="--", linewidth=1, label=f"best epoch ({int(be) + 1})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if log_scale:
        ax.set_yscale("log")
    ax.legend(frameon=False, fontsize="small")
    if title is not None:
        ax.set_title(title)
    return finish(fig, show=show, save=save, return_fig=return_fig, dpi=dpi, owns_figure=owns)


__all__ = ["gene_correlation", "training_history"]
