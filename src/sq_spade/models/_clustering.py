"""SPADE's two-stage clustering of image features into fine centroids and experts."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class TwoStageClustering:
    """Result of :func:`two_stage_clustering`.

    Attributes
    ----------
    centroids
        Fine centroids ``(K, D)``, grouped by ``group`` in order of first appearance.
    centroid_group
        Group of each fine centroid ``(K,)``.
    fine_to_expert
        Expert of each fine centroid ``(K,)``.
    fine_label
        Fine centroid of each input row ``(N,)``.
    expert
        Expert of each input row ``(N,)`` (its fine centroid's).
    n_experts
        Number of experts actually made (see the clamping rule).
    """

    centroids: np.ndarray
    centroid_group: np.ndarray
    fine_to_expert: np.ndarray
    fine_label: np.ndarray
    expert: np.ndarray
    n_experts: int


def _kmeans(x: np.ndarray, k: int, seed: int, n_init: int, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed, algorithm="lloyd")
    labels = km.fit_predict(x.astype(np.float64))
    return km.cluster_centers_.astype(np.float32), labels.astype(np.int64)


def fine_centroids(x: np.ndarray, n_fine: int, *, seed: int = 0, n_init: int = 5,
                   max_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Stage one for one group: ``(centroids (k, D), label of each row)``, ``k = min(n_fine, distinct rows)``."""
    k = min(n_fine, len(np.unique(x, axis=0)))
    return _kmeans(x, k, seed, n_init, max_iter)


def pool_centroids(centroids: np.ndarray, n_experts: int, *, seed: int = 0, n_init: int = 5,
                   max_iter: int = 50) -> tuple[np.ndarray, int]:
    """Stage two: ``(expert of each fine centroid, number of experts)``, clamped to the centroids."""
    n_eff = n_experts
    if n_experts > len(centroids):
        warnings.warn(f"`n_experts={n_experts}` exceeds the {len(centroids)} fine centroids; each fine centroid "
                      "becomes its own expert.", UserWarning, stacklevel=3)
        n_eff = len(centroids)
    if n_eff == len(centroids):
        return np.arange(len(centroids), dtype=np.int64), n_eff
    return _kmeans(centroids, n_eff, seed, n_init, max_iter)[1], n_eff


def two_stage_clustering(features: np.ndarray, groups: np.ndarray | None = None, *, n_fine: int = 16,
                         n_experts: int = 16, seed: int = 0, n_init: int = 5, max_iter: int = 50) -> TwoStageClustering:
    """Cluster features per group into fine centroids, then the pooled centroids into experts.

    Rules for small inputs (documented, deterministic):

    - a group with fewer distinct feature vectors than ``n_fine`` gets one fine centroid per
      distinct vector;
    - when ``n_experts`` exceeds the number of fine centroids, each fine centroid becomes its
      own expert (``n_experts`` is clamped, with a warning).

    Parameters
    ----------
    features
        ``(N, D)`` training features.
    groups
        Group (organ, tissue) of each row; ``None``: one group.
    n_fine
        k of the per-group k-means (16 in SPADE).
    n_experts
        k of the k-means over the pooled fine centroids (16 in SPADE).
    seed, n_init, max_iter
        k-means settings (SPADE: 5 restarts, 50 iterations).

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(200, 8)).astype("float32")
    >>> c = two_stage_clustering(x, n_fine=6, n_experts=3)
    >>> c.centroids.shape, c.n_experts
    ((6, 8), 3)
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"`features` must be a non-empty (N, D) array, got shape {x.shape}.")
    if n_fine < 1 or n_experts < 1:
        raise ValueError(f"`n_fine` and `n_experts` must be positive, got {n_fine} and {n_experts}.")
    groups = np.zeros(len(x), dtype=object) if groups is None else np.asarray(groups, dtype=object)
    if len(groups) != len(x):
        raise ValueError(f"`groups` must have one entry per row ({len(x)}), got {len(groups)}.")
    cents, cgroup = [], []
    fine_label = np.empty(len(x), np.int64)
    offset = 0
    for g in dict.fromkeys(groups):
        rows = np.flatnonzero(groups == g)
        c, lab = fine_centroids(x[rows], n_fine, seed=seed, n_init=n_init, max_iter=max_iter)
        cents.append(c)
        cgroup.extend([g] * len(c))
        fine_label[rows] = lab + offset
        offset += len(c)
    centroids = np.vstack(cents)
    f2e, n_eff = pool_centroids(centroids, n_experts, seed=seed, n_init=n_init, max_iter=max_iter)
    return TwoStageClustering(centroids=centroids, centroid_group=np.asarray(cgroup, dtype=object),
                              fine_to_expert=f2e, fine_label=fine_label, expert=f2e[fine_label], n_experts=int(n_eff))
