"""Few-shot probes of spot embeddings: k labelled spots per class, classify all the others.

The spot-level analogue of SPADE's few-shot slide-level evaluation: how well does an
embedding separate pathologist-annotated regions when only a handful of spots per region
are labelled? Several embeddings are compared on exactly the same sampled spots (paired).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from sq_spade import _constants as K
from sq_spade._validation import check_choice, check_positive_float, check_positive_int

__all__ = ["few_shot_probe", "summarize_few_shot"]

CLASSIFIERS = K.CLASSIFIERS


def _check_embeddings(embeddings: Any, n: int) -> dict[str, np.ndarray]:
    if not isinstance(embeddings, Mapping) or not embeddings:
        raise TypeError("`embeddings` must be a non-empty dict {name: (n_spots, D) array}, "
                        f"got {type(embeddings).__name__}.")
    out = {}
    for name, x in embeddings.items():
        a = np.asarray(x, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] != n or a.shape[1] == 0:
            raise ValueError(f"`embeddings[{name!r}]` must be (n_spots={n}, D), got shape {a.shape}.")
        if not np.isfinite(a).all():
            raise ValueError(f"`embeddings[{name!r}]` contains NaN or infinite values.")
        out[str(name)] = a
    return out


def _check_shots(shots: Any) -> list[int]:
    shots = [shots] if isinstance(shots, (int, np.integer)) else list(shots)
    if not shots or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shots):
        raise ValueError(f"`shots` must be positive integers, got {shots!r}.")
    return sorted({int(s) for s in shots})


def _standardise(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _fit_predict(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, n_classes: int, *, classifier: str,
                 C: float, max_iter: int, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class (``0..n_classes-1``) and a per-class score ``(n_test, n_classes)``."""
    if classifier == "prototype":
        # SimpleShot: nearest class mean of L2-normalised features, by cosine similarity.
        xt = _unit(x_tr)
        protos = _unit(np.stack([xt[y_tr == c].mean(axis=0) for c in range(n_classes)]))
        scores = _unit(x_te) @ protos.T
        return scores.argmax(axis=1), scores
    if classifier == "logistic":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=C, max_iter=max_iter)
    else:
        from sklearn.neighbors import KNeighborsClassifier

        clf = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(y_tr)), weights="distance", metric="cosine",
                                   algorithm="brute")
    from threadpoolctl import threadpool_limits

    # On a few dozen training rows, multi-threaded BLAS inside scipy's L-BFGS-B spends its time
    # synchronising threads: one thread fits the same model about 20x faster.
    with threadpool_limits(limits=1, user_api="blas"):
        clf.fit(x_tr, y_tr)
    proba = clf.predict_proba(x_te)  # clf.classes_ == 0..n_classes-1: every class has training spots
    return proba.argmax(axis=1), proba


def _auc_macro_ovr(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean over the classes present in ``y`` of the one-vs-rest ROC AUC of their score column."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(y == c, scores[:, c]) for c in np.unique(y)]
    return float(np.mean(aucs)) if len(aucs) >= 2 else float("nan")


def few_shot_probe(
    embeddings: Mapping[str, Any],
    labels: Any,
    *,
    shots: Sequence[int] | int = (1, 2, 4, 8, 16),
    n_repeats: int = 20,
    classifier: str = "logistic",
    seed: int = 0,
    min_test_per_class: int = 1,
    standardize: bool = True,
    C: float = 1.0,
    max_iter: int = 1000,
    n_neighbors: int | None = None,
) -> pd.DataFrame:
    """Few-shot classification of spot labels from each embedding, on paired random draws.

    For each number of shots ``k`` and each repeat, ``k`` labelled spots are drawn at random
    from every eligible class; a classifier is trained on them and tested on *all* the other
    labelled spots of the eligible classes. The draw depends only on ``(seed, k, repeat)``, and
    every embedding is trained and tested on the same spots, so comparisons are paired.

    Parameters
    ----------
    embeddings
        ``{name: (n_spots, D) array}``; dimensions may differ between embeddings.
    labels
        ``(n_spots,)`` class of each spot (e.g. pathologist region); missing values (NaN,
        None) mark unlabelled spots, which are neither drawn nor tested.
    shots
        Numbers of labelled spots per class.
    n_repeats
        Random draws per number of shots.
    classifier
        ``"logistic"`` (multinomial logistic regression, L2 penalty ``C``), ``"knn"``
        (distance-weighted cosine k-NN with ``n_neighbors``) or ``"prototype"`` (SimpleShot:
        nearest class mean of L2-normalised features by cosine similarity; the class scores
        used for the AUC are the cosine similarities).
    seed
        Seed of the draws (non-negative integer).
    min_test_per_class
        A class takes part for ``k`` shots only if it has at least ``k + min_test_per_class``
        labelled spots (so with the default 1, classes with ``<= k`` spots are dropped for that
        ``k``); dropped classes are listed in ``df.attrs["dropped_classes"]`` and reported in one
        warning. A ``k`` that leaves fewer than two classes is skipped
        (``df.attrs["skipped_shots"]``).
    standardize
        Centre and scale each feature by its mean and standard deviation over *all* spots of the
        embedding (no labels involved) before the classifier; statistics of the 1 to 16 training
        spots per class would be too noisy to scale by.
    C
        Inverse L2 penalty of the logistic regression. 1.0 suits standardised features of a few
        hundred to a few thousand dimensions; SPADE's slide-level probe used ``2 * D / 100``.
    max_iter
        Iterations of the logistic regression's L-BFGS solver.
    n_neighbors
        Neighbours of the k-NN classifier (default: the number of shots ``k``, capped by the
        training set).

    Returns
    -------
    Long table, one row per embedding x shots x repeat: ``embedding, shots, repeat,
    balanced_accuracy, auc_macro_ovr`` (macro average over classes of the one-vs-rest ROC AUC),
    ``n_classes, n_train, n_test``. Summarise it with :func:`summarize_few_shot`.

    Examples
    --------
    >>> import numpy as np
    >>> from sq_spade.tl._probes import few_shot_probe, summarize_few_shot
    >>> rng = np.random.default_rng(0)
    >>> labels = np.repeat(["tumour", "stroma", "immune"], 40)
    >>> good = rng.standard_normal((120, 8)) + 3 * (labels[:, None] == ["tumour", "stroma", "immune"])[:, :1]
    >>> df = few_shot_probe({"good": good, "noise": rng.standard_normal((120, 8))}, labels,
    ...                     shots=(1, 4), n_repeats=3)
    >>> summarize_few_shot(df).shape
    (4, 7)
    """
    check_choice(classifier, "classifier", CLASSIFIERS)
    from sklearn.metrics import balanced_accuracy_score

    arr = labels.to_numpy() if isinstance(labels, (pd.Series, pd.Index)) else np.asarray(labels, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"`labels` must be 1-D (one label per spot), got shape {arr.shape}.")
    lab = pd.Series(arr, dtype=object)
    embs = _check_embeddings(embeddings, len(lab))
    shot_list = _check_shots(shots)
    for arg, val in (("n_repeats", n_repeats), ("min_test_per_class", min_test_per_class), ("max_iter", max_iter)):
        check_positive_int(val, arg)
    check_positive_int(seed, "seed", allow_zero=True)
    check_positive_float(C, "C")
    check_positive_int(n_neighbors, "n_neighbors", allow_none=True)

    labelled = ~lab.isna().to_numpy()
    codes_l, classes = pd.factorize(lab[labelled], sort=True)
    codes = np.full(len(lab), -1)
    codes[labelled] = codes_l
    counts = np.bincount(codes_l, minlength=len(classes))
    members = [np.flatnonzero(codes == c) for c in range(len(classes))]
    feats = {name: _standardise(x) if standardize else x for name, x in embs.items()}

    rows, dropped, skipped = [], {}, []
    for k in shot_list:
        eligible = np.flatnonzero(counts >= k + min_test_per_class)
        gone = [str(classes[c]) for c in np.setdiff1d(np.arange(len(classes)), eligible)]
        if gone:
            dropped[k] = gone
        if len(eligible) < 2:
            skipped.append(k)
            continue
        remap = np.full(len(classes), -1)
        remap[eligible] = np.arange(len(eligible))
        pool = np.isin(codes, eligible)
        for r in range(n_repeats):
            rng = np.random.default_rng([int(seed), k, r])
            train = np.sort(np.concatenate([rng.choice(members[c], size=k, replace=False) for c in eligible]))
            test_mask = pool.copy()
            test_mask[train] = False
            test = np.flatnonzero(test_mask)
            y_tr, y_te = remap[codes[train]], remap[codes[test]]
            for name, x in feats.items():
                pred, scores = _fit_predict(x[train], y_tr, x[test], len(eligible), classifier=classifier, C=float(C),
                                            max_iter=int(max_iter), n_neighbors=n_neighbors or k)
                rows.append({"embedding": name, "shots": k, "repeat": r,
                             "balanced_accuracy": float(balanced_accuracy_score(y_te, pred)),
                             "auc_macro_ovr": _auc_macro_ovr(y_te, scores),
                             "n_classes": len(eligible), "n_train": len(train), "n_test": len(test)})
    if dropped or skipped:
        parts = [f"k={k}: {v}" for k, v in dropped.items()]
        msg = ("few_shot_probe: classes with fewer than k + min_test_per_class labelled spots were dropped "
               f"for those k ({'; '.join(parts)})")
        if skipped:
            msg += f"; shots {skipped} left fewer than two classes and were skipped"
        warnings.warn(msg + ".", UserWarning, stacklevel=2)
    cols = ["embedding", "shots", "repeat", "balanced_accuracy", "auc_macro_ovr", "n_classes", "n_train", "n_test"]
    df = pd.DataFrame(rows, columns=cols)
    df.attrs["dropped_classes"] = dropped
    df.attrs["skipped_shots"] = skipped
    df.attrs["classifier"] = classifier
    return df


def summarize_few_shot(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation (over repeats, ddof=1) per embedding and number of shots.

    Parameters
    ----------
    df
        Output of :func:`few_shot_probe`.

    Returns
    -------
    One row per embedding x shots: ``embedding, shots, balanced_accuracy_mean,
    balanced_accuracy_std, auc_macro_ovr_mean, auc_macro_ovr_std, n_repeats``.

    Examples
    --------
    >>> import pandas as pd
    >>> from sq_spade.tl._probes import summarize_few_shot
    >>> df = pd.DataFrame({"embedding": ["a", "a"], "shots": [1, 1], "repeat": [0, 1],
    ...                    "balanced_accuracy": [0.5, 0.7], "auc_macro_ovr": [0.6, 0.8]})
    >>> float(summarize_few_shot(df)["balanced_accuracy_mean"].iloc[0])
    0.6
    """
    need = {"embedding", "shots", "repeat", "balanced_accuracy", "auc_macro_ovr"}
    if not isinstance(df, pd.DataFrame) or not need <= set(df.columns):
        raise ValueError(f"`df` must be a DataFrame from few_shot_probe with columns {sorted(need)}.")
    g = df.groupby(["embedding", "shots"], sort=False)
    out = g.agg(balanced_accuracy_mean=("balanced_accuracy", "mean"), balanced_accuracy_std=("balanced_accuracy", "std"),
                auc_macro_ovr_mean=("auc_macro_ovr", "mean"), auc_macro_ovr_std=("auc_macro_ovr", "std"),
                n_repeats=("repeat", "nunique"))
    return out.reset_index()
