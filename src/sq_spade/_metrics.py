"""Array-level metrics of expression prediction: per-gene Pearson r, ACG, HEG, MSE, MAE.

The field's conventions (ST-Net, BLEEP, mclSTExp, HEST): per held-out section, the Pearson
correlation of each gene across spots, averaged over all panel genes (ACG, "all considered
genes") and over the genes with the highest mean observed expression (HEG); MSE and MAE on
the normalised scale. Genes constant in the prediction or the observation have no defined
correlation: they are skipped and counted instead of producing NaN warnings.

Arrays only, on the bottom floor: training-time selection (SPADE's reference side), the
regressors' cross-validation and :func:`sq_spade.tl.evaluate_expression` all score with these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sq_spade._validation import check_positive_int

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["expression_metrics", "gene_correlations"]


def _check_pair(predicted: Any, observed: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both as finite float64 2-D arrays of one shape, or raise naming the argument."""
    out = []
    for arg, x in (("predicted", predicted), ("observed", observed)):
        try:
            a = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"`{arg}` must be a numeric (n_spots, n_genes) array, got {type(x).__name__}.") from e
        if a.ndim != 2:
            raise ValueError(f"`{arg}` must be 2-D (n_spots, n_genes), got shape {a.shape}.")
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"`{arg}` must have at least one spot and one gene, got shape {a.shape}.")
        if not np.isfinite(a).all():
            raise ValueError(f"`{arg}` contains {int((~np.isfinite(a)).sum())} NaN or infinite values.")
        out.append(a)
    if out[0].shape != out[1].shape:
        raise ValueError(f"`predicted` and `observed` must have the same shape, got {out[0].shape} and {out[1].shape}.")
    return out[0], out[1]


def _correlations(p: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Pearson r per column of two validated float64 arrays; NaN where either is constant."""
    # A column is constant when all its values are equal; testing the range (not the std) is
    # exact, whereas a std computed from a rounded mean can be a tiny positive number.
    const = (np.ptp(p, axis=0) == 0) | (np.ptp(o, axis=0) == 0)
    pc = p - p.mean(axis=0)
    oc = o - o.mean(axis=0)
    num = (pc * oc).sum(axis=0)
    den = np.sqrt((pc * pc).sum(axis=0) * (oc * oc).sum(axis=0))
    r = np.full(p.shape[1], np.nan)
    ok = ~const & (den > 0)
    r[ok] = np.clip(num[ok] / den[ok], -1.0, 1.0)
    return r


def gene_correlations(predicted: Any, observed: Any) -> np.ndarray:
    """Pearson correlation of each gene between predicted and observed expression, across spots.

    Parameters
    ----------
    predicted
        Predicted expression, ``(n_spots, n_genes)``.
    observed
        Observed expression on the same scale, ``(n_spots, n_genes)``.

    Returns
    -------
    ``(n_genes,)`` float64 array of Pearson r; NaN for genes constant (all values equal) in
    ``predicted`` or in ``observed``, and for every gene when there is a single spot.

    Examples
    --------
    >>> import numpy as np
    >>> from sq_spade._metrics import gene_correlations
    >>> obs = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    >>> gene_correlations(obs * 2 + 1, obs)
    array([ 1., nan])
    """
    p, o = _check_pair(predicted, observed)
    return _correlations(p, o)


def expression_metrics(
    predicted: Any,
    observed: Any,
    *,
    gene_names: Sequence[str] | None = None,
    n_heg: int = 50,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """ACG, HEG, MSE and MAE of predicted against observed expression of one group of spots.

    Parameters
    ----------
    predicted
        Predicted expression, ``(n_spots, n_genes)``.
    observed
        Observed expression on the same (normalised, e.g. log1p CP10k) scale.
    gene_names
        Names of the ``n_genes`` columns (default ``"gene_0"``, ``"gene_1"``, ...).
    n_heg
        Number of highly expressed genes for HEG (capped at ``n_genes``).

    Returns
    -------
    summary
        ``n_spots``, ``n_genes``, ``ACG`` (mean Pearson r over the genes that are not constant),
        ``HEG`` (mean Pearson r over the ``n_heg`` genes with the highest mean *observed*
        expression; constant genes take part in this ranking, so a constant highly expressed
        gene keeps its place among the HEG and is then skipped in the average rather than
        replaced by the next gene), ``MSE`` and ``MAE`` (over all spots and genes, constant
        genes included), ``n_skipped_constant`` (genes without a correlation) and
        ``n_heg_scored`` (HEG genes that entered the HEG average). ``ACG`` / ``HEG`` are NaN
        when no gene can be scored.
    per_gene
        One row per gene: ``gene, pearson_r, mean_observed, mse, mae, is_heg``.

    Examples
    --------
    >>> import numpy as np
    >>> from sq_spade._metrics import expression_metrics
    >>> rng = np.random.default_rng(0)
    >>> obs = rng.random((100, 20))
    >>> summary, per_gene = expression_metrics(obs + 0.1 * rng.random((100, 20)), obs, n_heg=5)
    >>> round(summary["ACG"], 1), int(per_gene["is_heg"].sum())
    (1.0, 5)
    """
    p, o = _check_pair(predicted, observed)
    n_spots, n_genes = o.shape
    n_heg = check_positive_int(n_heg, "n_heg")
    if gene_names is None:
        names = np.array([f"gene_{i}" for i in range(n_genes)], dtype=object)
    else:
        names = np.asarray(list(gene_names), dtype=object)
        if names.shape != (n_genes,):
            raise ValueError(f"`gene_names` must hold {n_genes} names (one per column), got {names.size}.")

    r = _correlations(p, o)
    mean_obs = o.mean(axis=0)
    err = p - o
    mse_g = (err * err).mean(axis=0)
    mae_g = np.abs(err).mean(axis=0)
    # Stable sort of the negated means: ties in observed mean keep the column order.
    heg = np.zeros(n_genes, dtype=bool)
    heg[np.argsort(-mean_obs, kind="stable")[: min(int(n_heg), n_genes)]] = True
    scored = ~np.isnan(r)

    def _mean(mask: np.ndarray) -> float:
        return float(r[mask].mean()) if mask.any() else float("nan")

    summary = {
        "n_spots": int(n_spots),
        "n_genes": int(n_genes),
        "ACG": _mean(scored),
        "HEG": _mean(scored & heg),
        "MSE": float(mse_g.mean()),
        "MAE": float(mae_g.mean()),
        "n_skipped_constant": int((~scored).sum()),
        "n_heg_scored": int((scored & heg).sum()),
    }
    import pandas as pd  # only here: the array-level metrics (and the regressors) do without it

    per_gene = pd.DataFrame({
        "gene": names,
        "pearson_r": r,
        "mean_observed": mean_obs,
        "mse": mse_g,
        "mae": mae_g,
        "is_heg": heg,
    })
    return summary, per_gene
