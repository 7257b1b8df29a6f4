"""The field's baseline regressors on frozen image features: PCA + ridge, and k-NN retrieval.

Arrays in, arrays out: :class:`~sq_spade.models.RidgeModel` and :class:`~sq_spade.models.KNNModel`
own one of these with the backbone and panel it belongs to.

- :class:`RidgeRegressor` is HEST-Benchmark's baseline (frozen encoder features, PCA to 256,
  ridge regression), with the ridge penalty chosen by cross-validation over training sections.
- :class:`KNNRegressor` is BLEEP's inference without training a contrastive model: the
  expression of a new spot is the plain mean of that of its ``k`` most cosine-similar training
  spots in the frozen feature space, ``k`` chosen by cross-validation over training sections.

Both hold their state as numpy arrays plus a JSON-able dict (:meth:`to_state` /
:meth:`from_state`), to be saved as safetensors + JSON.

Cross-validation (both): with ``groups`` naming at least two training groups (sections, or
patients), leave one group out; otherwise ``n_folds`` contiguous folds (no shuffling: neighbouring
rows are usually neighbouring spots, so contiguous blocks leak less than a random split). The
score of a fold is the mean per-gene Pearson r of its held-out spots (ACG, genes constant in the
fold skipped) or minus its MSE; folds without a score are ignored in the mean over folds.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from sq_spade import _constants as K
from sq_spade._metrics import _correlations
from sq_spade._validation import check_choice, check_positive_int

__all__ = ["KNNRegressor", "RidgeRegressor"]

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 15))
DEFAULT_K_GRID = (5, 10, 20, 50, 100, 200)
SCORINGS = K.SCORINGS


# --- checks and shared pieces ------------------------------------------------------------------


def _check_x(X: Any, arg: str = "X", n_features: int | None = None) -> np.ndarray:
    try:
        a = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`{arg}` must be a numeric (n_samples, n_features) array, got {type(X).__name__}.") from e
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"`{arg}` must be a non-empty 2-D (n_samples, n_features) array, got shape {a.shape}.")
    if not np.isfinite(a).all():
        raise ValueError(f"`{arg}` contains NaN or infinite values.")
    if n_features is not None and a.shape[1] != n_features:
        raise ValueError(f"`{arg}` must have {n_features} features (as in fit), got {a.shape[1]}.")
    return a


def _check_xy(X: Any, Y: Any, groups: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    X = _check_x(X, "X")
    Y = _check_x(Y, "Y")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"`X` and `Y` must have the same number of rows, got {X.shape[0]} and {Y.shape[0]}.")
    if X.shape[0] < 2:
        raise ValueError(f"`X` must have at least 2 samples to fit, got {X.shape[0]}.")
    codes = None
    if groups is not None:
        import pandas as pd

        g = np.asarray(groups)
        if g.ndim != 1 or g.shape[0] != X.shape[0]:
            raise ValueError(f"`groups` must be 1-D with one label per row of `X` ({X.shape[0]}), got shape {g.shape}.")
        codes, _ = pd.factorize(g, sort=True)
        if (codes < 0).any():
            raise ValueError("`groups` contains missing values.")
    return X, Y, codes


def _cv_splits(n: int, groups: np.ndarray | None, n_folds: int) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Leave-one-group-out with >= 2 groups, else ``min(n_folds, n)`` contiguous folds."""
    rows = np.arange(n)
    if groups is not None and len(np.unique(groups)) >= 2:
        return "leave_one_group_out", [(rows[groups != g], rows[groups == g]) for g in np.unique(groups)]
    from sklearn.model_selection import KFold

    return "kfold", list(KFold(n_splits=min(n_folds, n), shuffle=False).split(rows))


def _score(pred: np.ndarray, obs: np.ndarray, scoring: str) -> float:
    """Higher is better: ACG (NaN when every gene is constant in the fold) or -MSE."""
    if scoring == "mse":
        return -float(np.mean((pred - obs) ** 2))
    r = _correlations(pred.astype(np.float64), obs.astype(np.float64))
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def _fold_mean(scores: np.ndarray) -> np.ndarray:
    """Mean over folds (columns) of the finite scores; NaN for a row without any."""
    ok = np.isfinite(scores)
    counts = ok.sum(axis=1)
    return np.where(counts > 0, np.where(ok, scores, 0.0).sum(axis=1) / np.maximum(counts, 1), np.nan)


def _best(grid: Sequence[float], scores: np.ndarray, what: str) -> tuple[int, np.ndarray]:
    """Index of the best mean score over folds; ties go to the later (more regularised) value."""
    mean = _fold_mean(scores)
    if not np.isfinite(mean).any():
        warnings.warn(f"No cross-validation fold could be scored (every gene constant within folds); "
                      f"using the largest {what}, {grid[-1]}.", UserWarning, stacklevel=3)
        return len(grid) - 1, mean
    best = np.nanmax(mean)
    return int(np.flatnonzero(mean == best)[-1]), mean


def _fit_pca(Z: np.ndarray, n_components: int) -> np.ndarray:
    """Principal axes ``(n_components, D)`` of centred ``Z``, signs fixed for determinism."""
    _, _, vt = np.linalg.svd(Z, full_matrices=False)
    comps = vt[:n_components]
    # Same convention as sklearn's svd_flip: the largest |loading| of each axis is positive.
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1.0
    return comps * signs[:, None]


def _n_components(requested: int | None, n: int, d: int) -> int | None:
    if requested is None:
        return None
    return int(min(requested, n - 1, d))


class _Base:
    """fit / predict / state plumbing shared by the reference regressors."""

    _params: ClassVar[tuple[str, ...]] = ()
    _array_keys: ClassVar[tuple[str, ...]] = ()

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters, JSON-able."""
        out = {}
        for p in self._params:
            v = getattr(self, p)
            out[p] = list(v) if isinstance(v, tuple) else v
        return out

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has run (or the state was loaded)."""
        return getattr(self, "n_features_in_", None) is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"This {type(self).__name__} is not fitted: call `fit(X, Y)` first.")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    @classmethod
    def _check_state(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(config, dict) or config.get("class") != cls.__name__:
            got = config.get("class") if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"`config` must be a {cls.__name__} state (config['class'] == {cls.__name__!r}), got {got!r}.")
        missing = [k for k in cls._array_keys if k not in arrays]
        if missing:
            raise KeyError(f"`arrays` lacks {missing} for a {cls.__name__} state.")
        return dict(config["params"])


# --- ridge -------------------------------------------------------------------------------------


class RidgeRegressor(_Base):
    """Standardise, PCA, multi-output ridge with the penalty chosen by grouped cross-validation.

    HEST-Benchmark's baseline for expression prediction from frozen image features.

    Parameters
    ----------
    n_components
        Principal components kept (256 in HEST), capped at ``n_samples - 1`` and ``n_features``;
        ``None`` regresses on the standardised features themselves.
    alphas
        Ridge penalties tried (default 15 values from 1e-2 to 1e5, log-spaced).
    standardize
        Scale each feature to unit variance before PCA (features of zero variance keep scale 1).
    scoring
        ``"pearson"`` (mean per-gene Pearson r of held-out spots, the field's ACG) or ``"mse"``.
    n_folds
        Contiguous folds when ``groups`` has fewer than two groups.

    Notes
    -----
    Standardisation and PCA are fitted once on all training rows before cross-validation (they
    never see ``Y``); the ridge is refitted in each fold. For a fold, the ridge path over every
    ``alpha`` comes from one SVD of the fold's training components.

    Attributes
    ----------
    alpha_
        The chosen penalty.
    cv_scores_
        ``(n_alphas, n_folds)`` fold scores (NaN for folds without a score).
    cv_
        ``"leave_one_group_out"`` or ``"kfold"``.

    Examples
    --------
    >>> import numpy as np
    >>> from sq_spade.models._regressors import RidgeRegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((200, 30))
    >>> Y = X[:, :3] @ rng.standard_normal((3, 5)) + 0.1 * rng.standard_normal((200, 5))
    >>> model = RidgeRegressor(n_components=10).fit(X, Y, groups=np.repeat([0, 1, 2, 3], 50))
    >>> model.predict(X).shape
    (200, 5)
    """

    _params = ("n_components", "alphas", "standardize", "scoring", "n_folds")
    _array_keys = ("mean", "scale", "coef", "intercept", "cv_scores")

    def __init__(self, n_components: int | None = 256, *, alphas: Sequence[float] | None = None,
                 standardize: bool = True, scoring: str = "pearson", n_folds: int = 5) -> None:
        self.n_components = check_positive_int(n_components, "n_components", allow_none=True)
        alphas = DEFAULT_ALPHAS if alphas is None else tuple(float(a) for a in alphas)
        if not alphas or not all(np.isfinite(a) and a > 0 for a in alphas):
            raise ValueError(f"`alphas` must be a non-empty sequence of positive numbers, got {alphas!r}.")
        self.alphas = tuple(sorted(alphas))
        self.standardize = bool(standardize)
        check_choice(scoring, "scoring", SCORINGS)
        self.scoring = scoring
        self.n_folds = check_positive_int(n_folds, "n_folds")
        if self.n_folds < 2:
            raise ValueError(f"`n_folds` must be at least 2, got {n_folds}.")
        self.n_features_in_: int | None = None

    def _transform(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean_) / self.scale_
        return Z if self.components_ is None else Z @ self.components_.T

    def fit(self, X: Any, Y: Any, groups: Any = None) -> RidgeRegressor:
        """Fit on features ``X`` ``(n, D)`` and targets ``Y`` ``(n, G)``.

        Parameters
        ----------
        X
            Frozen image features of the training spots.
        Y
            Their normalised expression.
        groups
            Group label per row (section or patient) for leave-one-group-out selection of alpha.

        Returns
        -------
        ``self``.
        """
        X, Y, codes = _check_xy(X, Y, groups)
        n, d = X.shape
        self.mean_ = X.mean(axis=0)
        scale = X.std(axis=0) if self.standardize else np.ones(d)
        self.scale_ = np.where(scale > 0, scale, 1.0)
        Xs = (X - self.mean_) / self.scale_
        p = _n_components(self.n_components, n, d)
        self.components_ = None if p is None else _fit_pca(Xs, p)
        Z = Xs if self.components_ is None else Xs @ self.components_.T

        self.cv_, splits = _cv_splits(n, codes, self.n_folds)
        alphas = np.asarray(self.alphas)
        scores = np.full((len(alphas), len(splits)), np.nan)
        for j, (tr, te) in enumerate(splits):
            zm, ym = Z[tr].mean(axis=0), Y[tr].mean(axis=0)
            u, s, vt = np.linalg.svd(Z[tr] - zm, full_matrices=False)
            uty = u.T @ (Y[tr] - ym)
            a = (Z[te] - zm) @ vt.T
            for i, alpha in enumerate(alphas):
                pred = a @ ((s / (s * s + alpha))[:, None] * uty) + ym
                scores[i, j] = _score(pred, Y[te], self.scoring)
        best, mean = _best(self.alphas, scores, "alpha")
        self.alpha_ = float(alphas[best])
        self.cv_scores_ = scores
        self.cv_mean_ = mean

        zm, ym = Z.mean(axis=0), Y.mean(axis=0)
        u, s, vt = np.linalg.svd(Z - zm, full_matrices=False)
        self.coef_ = vt.T @ ((s / (s * s + self.alpha_))[:, None] * (u.T @ (Y - ym)))
        self.intercept_ = ym - zm @ self.coef_
        self.n_features_in_ = d
        self.n_outputs_ = Y.shape[1]
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predicted targets ``(n, G)`` float32 for features ``X`` ``(n, D)``.

        Parameters
        ----------
        X
            Frozen image features.

        Returns
        -------
        Predictions.
        """
        self._check_fitted()
        X = _check_x(X, "X", self.n_features_in_)
        return (self._transform(X) @ self.coef_ + self.intercept_).astype(np.float32)

    def to_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays (for safetensors) and a JSON-able config from which :meth:`from_state` rebuilds it.

        Returns
        -------
        ``(arrays, config)``.
        """
        self._check_fitted()
        arrays = {"mean": self.mean_, "scale": self.scale_, "coef": self.coef_, "intercept": self.intercept_,
                  "cv_scores": self.cv_scores_}
        if self.components_ is not None:
            arrays["components"] = self.components_
        config = {"class": type(self).__name__, "params": self.get_params(), "alpha": self.alpha_,
                  "cv": self.cv_, "n_features_in": int(self.n_features_in_), "n_outputs": int(self.n_outputs_),
                  "n_components_fitted": None if self.components_ is None else int(len(self.components_))}
        return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, config

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> RidgeRegressor:
        """Rebuild a fitted model from :meth:`to_state`'s output.

        Parameters
        ----------
        arrays
            The arrays.
        config
            The config.

        Returns
        -------
        The fitted model.
        """
        params = cls._check_state(arrays, config)
        self = cls(**params)
        self.mean_ = np.asarray(arrays["mean"], dtype=np.float64)
        self.scale_ = np.asarray(arrays["scale"], dtype=np.float64)
        self.components_ = np.asarray(arrays["components"], dtype=np.float64) if "components" in arrays else None
        self.coef_ = np.asarray(arrays["coef"], dtype=np.float64)
        self.intercept_ = np.asarray(arrays["intercept"], dtype=np.float64)
        self.cv_scores_ = np.asarray(arrays["cv_scores"], dtype=np.float64)
        self.cv_mean_ = _fold_mean(self.cv_scores_)
        self.alpha_ = float(config["alpha"])
        self.cv_ = config["cv"]
        d, g = int(config["n_features_in"]), int(config["n_outputs"])
        p = d if self.components_ is None else self.components_.shape[0]
        if (self.mean_.shape != (d,) or self.scale_.shape != (d,) or self.coef_.shape != (p, g)
                or self.intercept_.shape != (g,)
                or (self.components_ is not None and self.components_.shape != (p, d))):
            raise ValueError("`arrays` have shapes inconsistent with `config` (n_features_in, n_outputs).")
        self.n_outputs_ = g
        self.n_features_in_ = d
        return self


# --- k-NN retrieval ----------------------------------------------------------------------------


class KNNRegressor(_Base):
    """BLEEP-style retrieval on frozen features: mean expression of the ``k`` most similar spots.

    Features are (optionally centred and PCA-reduced, then) L2-normalised; neighbours are ranked
    by cosine similarity and averaged with equal weights (:func:`retrieve_predict`).

    Parameters
    ----------
    k
        Neighbours; ``None`` chooses it by cross-validation from ``k_grid``.
    k_grid
        Candidates for ``k``, each capped at the smallest training fold (duplicates dropped).
    n_components
        Principal components kept before normalising (``None``: the features themselves).
    scoring
        ``"pearson"`` (ACG of the held-out fold) or ``"mse"``.
    n_folds
        Contiguous folds when ``groups`` has fewer than two groups.
    batch_size, device
        Passed to :func:`~sq_spade.nn.retrieval.retrieve_predict`.

    Attributes
    ----------
    k_
        The number of neighbours used.
    cv_scores_
        ``(len(k_grid_), n_folds)`` fold scores (absent when ``k`` was given).

    Examples
    --------
    >>> import numpy as np
    >>> from sq_spade.models._regressors import KNNRegressor
    >>> rng = np.random.default_rng(0)
    >>> X, Y = rng.standard_normal((100, 16)), rng.random((100, 4))
    >>> KNNRegressor(k=5).fit(X, Y).predict(X[:3]).shape
    (3, 4)
    """

    _params = ("k", "k_grid", "n_components", "scoring", "n_folds", "batch_size", "device")
    _array_keys = ("keys", "values", "mean")

    def __init__(self, k: int | None = None, *, k_grid: Sequence[int] = DEFAULT_K_GRID,
                 n_components: int | None = None, scoring: str = "pearson", n_folds: int = 5,
                 batch_size: int = 4096, device: str = "cpu") -> None:
        self.k = check_positive_int(k, "k", allow_none=True)
        grid = tuple(check_positive_int(v, "k_grid") for v in k_grid)
        if not grid:
            raise ValueError("`k_grid` must hold at least one positive integer.")
        self.k_grid = tuple(sorted(set(grid)))
        self.n_components = check_positive_int(n_components, "n_components", allow_none=True)
        check_choice(scoring, "scoring", SCORINGS)
        self.scoring = scoring
        self.n_folds = check_positive_int(n_folds, "n_folds")
        if self.n_folds < 2:
            raise ValueError(f"`n_folds` must be at least 2, got {n_folds}.")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.device = device
        self.n_features_in_: int | None = None

    def _embed(self, X: np.ndarray) -> np.ndarray:
        Z = X - self.mean_
        if self.components_ is not None:
            Z = Z @ self.components_.T
        norm = np.linalg.norm(Z, axis=1, keepdims=True)
        return (Z / np.maximum(norm, 1e-12)).astype(np.float32)

    def fit(self, X: Any, Y: Any, groups: Any = None) -> KNNRegressor:
        """Store the training spots and choose ``k`` (unless given) by grouped cross-validation.

        Parameters
        ----------
        X
            Frozen image features of the training spots ``(n, D)``.
        Y
            Their normalised expression ``(n, G)``.
        groups
            Group label per row (section or patient) for leave-one-group-out selection of ``k``.

        Returns
        -------
        ``self``.
        """
        from sq_spade.nn.retrieval import retrieve_predict, weighted_neighbor_mean

        X, Y, codes = _check_xy(X, Y, groups)
        n, d = X.shape
        if self.k is not None and self.k > n:
            raise ValueError(f"`k={self.k}` exceeds the {n} training samples.")
        p = _n_components(self.n_components, n, d)
        # Centring only matters with PCA (cosine similarity depends on the origin otherwise, and
        # BLEEP compares raw features); without PCA the mean is kept at zero.
        self.mean_ = X.mean(axis=0) if p is not None else np.zeros(d)
        self.components_ = None if p is None else _fit_pca(X - self.mean_, p)
        keys = self._embed(X)
        values = Y.astype(np.float32)

        if self.k is not None:
            self.k_ = self.k
            self.cv_ = None
            self.k_grid_ = (self.k,)
            self.cv_scores_ = np.full((1, 0), np.nan)
            self.cv_mean_ = np.full(1, np.nan)
        else:
            self.cv_, splits = _cv_splits(n, codes, self.n_folds)
            n_min = min(len(tr) for tr, _ in splits)
            self.k_grid_ = tuple(sorted({min(v, n_min) for v in self.k_grid}))
            k_max = self.k_grid_[-1]
            scores = np.full((len(self.k_grid_), len(splits)), np.nan)
            for j, (tr, te) in enumerate(splits):
                # Neighbours come sorted by similarity, so the top-k of every k is a prefix.
                _, idx, _ = retrieve_predict(keys[te], keys[tr], values[tr], k=k_max, weighting="uniform",
                                             batch_size=self.batch_size, device=self.device, return_neighbors=True)
                for i, kk in enumerate(self.k_grid_):
                    pred = weighted_neighbor_mean(values[tr], idx[:, :kk], np.full((len(te), kk), 1.0 / kk))
                    scores[i, j] = _score(pred, Y[te], self.scoring)
            best, self.cv_mean_ = _best(self.k_grid_, scores, "k")
            self.k_ = int(self.k_grid_[best])
            self.cv_scores_ = scores
        self.keys_ = keys
        self.values_ = values
        self.n_features_in_ = d
        self.n_outputs_ = Y.shape[1]
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Mean expression ``(n, G)`` float32 of the ``k_`` training spots nearest to each row of ``X``.

        Parameters
        ----------
        X
            Frozen image features ``(n, D)``.

        Returns
        -------
        Predictions.
        """
        from sq_spade.nn.retrieval import retrieve_predict

        self._check_fitted()
        X = _check_x(X, "X", self.n_features_in_)
        return retrieve_predict(self._embed(X), self.keys_, self.values_, k=self.k_, weighting="uniform",
                                similarity="cosine", batch_size=self.batch_size, device=self.device)

    def to_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays (for safetensors) and a JSON-able config from which :meth:`from_state` rebuilds it.

        Returns
        -------
        ``(arrays, config)``.
        """
        self._check_fitted()
        arrays = {"keys": self.keys_, "values": self.values_, "mean": self.mean_.astype(np.float32),
                  "k_grid": np.asarray(self.k_grid_, dtype=np.float32), "cv_scores": self.cv_scores_.astype(np.float32)}
        if self.components_ is not None:
            arrays["components"] = self.components_.astype(np.float32)
        config = {"class": type(self).__name__, "params": self.get_params(), "k": int(self.k_), "cv": self.cv_,
                  "n_features_in": int(self.n_features_in_), "n_outputs": int(self.n_outputs_)}
        return {k: np.ascontiguousarray(v) for k, v in arrays.items()}, config

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> KNNRegressor:
        """Rebuild a fitted model from :meth:`to_state`'s output.

        Parameters
        ----------
        arrays
            The arrays.
        config
            The config.

        Returns
        -------
        The fitted model.
        """
        params = cls._check_state(arrays, config)
        self = cls(**params)
        self.keys_ = np.asarray(arrays["keys"], dtype=np.float32)
        self.values_ = np.asarray(arrays["values"], dtype=np.float32)
        self.mean_ = np.asarray(arrays["mean"], dtype=np.float64)
        self.components_ = np.asarray(arrays["components"], dtype=np.float64) if "components" in arrays else None
        self.k_grid_ = tuple(int(v) for v in np.asarray(arrays.get("k_grid", [config["k"]])))
        self.cv_scores_ = np.asarray(arrays.get("cv_scores", np.full((1, 0), np.nan)), dtype=np.float64)
        self.cv_mean_ = _fold_mean(self.cv_scores_)
        self.k_ = int(config["k"])
        self.cv_ = config.get("cv")
        d, g = int(config["n_features_in"]), int(config["n_outputs"])
        n = self.keys_.shape[0]
        p = d if self.components_ is None else self.components_.shape[0]
        if (self.keys_.shape != (n, p) or self.values_.shape != (n, g) or self.mean_.shape != (d,)
                or (self.components_ is not None and self.components_.shape != (p, d)) or not 1 <= self.k_ <= n):
            raise ValueError("`arrays` have shapes inconsistent with `config` (n_features_in, n_outputs, k).")
        self.n_outputs_ = g
        self.n_features_in_ = d
        return self
