"""Expression prediction by retrieval: top-k keys by similarity, weighted mean of their values.

This is the inference of BLEEP and mclSTExp (and of SPADE used for expression): each query
(the image embedding of a new spot) is compared with every key (the embeddings of annotated
reference spots), the ``k`` most similar keys are retrieved, and the prediction is a weighted
mean of their values (the reference spots' normalised expression).

Selection uses :func:`torch.topk` on a batch of the similarity matrix. Selecting the top 200
of 2,000 queries x 10,000 keys (256-d) on a shared 2-core CPU took 0.10-0.21 s with two torch
threads against 0.12-0.27 s for ``numpy.argpartition`` plus sorting the selected part (15 runs
each, interleaved; single-threaded, numpy was faster, 0.12 s against 0.20 s). torch.topk is kept
because it scales with threads and runs where the embeddings are, GPUs included. Averaging the
retrieved values is a sparse ``(n_query, n_keys)`` weight matrix times ``values`` on CPU: 8-10x
faster than gathering ``(batch, k, n_values)`` blocks (3 s against 26 s for 8,000 genes).

Arrays in, arrays out (no AnnData): the ``tl`` predictors, SPADE's reference-side selection and
the k-NN regressor all retrieve with :func:`retrieve_predict`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from sq_spade import _constants as K
from sq_spade._utils import resolve_device
from sq_spade._validation import check_choice, check_positive_float, check_positive_int

__all__ = ["combine_keys", "ensemble_prediction", "mixture_retrieve_predict", "neighbor_variance",
           "retrieve_predict", "weighted_neighbor_mean"]

WEIGHTINGS = K.WEIGHTINGS
SIMILARITIES = K.SIMILARITIES
#: Squared distances below this fraction of ``|q|^2 + |k|^2`` are within float32 rounding of
#: zero (they are computed as ``|q|^2 + |k|^2 - 2 q.k``); they are floored there so that an
#: exact match gets a large but finite weight, and several exact matches share it equally.
REL_EPS = 1e-6
#: Elements of one gathered ``(batch, k, n_values)`` block, to bound memory (64 MiB float32).
_GATHER_ELEMENTS = 1 << 24


def _as_matrix(x: Any, arg: str, shape: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`{arg}` must be a numeric {shape} array, got {type(x).__name__}.") from e
    if a.ndim != 2:
        raise ValueError(f"`{arg}` must be a 2-D {shape} array, got shape {a.shape}.")
    if not np.isfinite(a).all():
        raise ValueError(f"`{arg}` contains NaN or infinite values.")
    return np.ascontiguousarray(a)


def _topk_stable(sim: Any, k: int) -> Any:
    """Indices of the ``k`` largest entries of each row, by decreasing value, ties by lower index.

    :func:`torch.topk` returns the right values but, among equal values, no defined subset or
    order; ties straddling the cut are rare (duplicated keys) and are resolved here explicitly,
    so the result is reproducible and the top-k of a smaller ``k`` is a prefix of a larger one.
    """
    n_keys = sim.shape[1]
    # One extra candidate tells, per row, whether a tie straddles the cut, without a pass over
    # the whole block: only then can topk's choice among equal values matter.
    vals, idx = torch.topk(sim, min(k + 1, n_keys), dim=1, largest=True, sorted=True)
    idx = idx[:, :k]
    bad = (torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten() if k < n_keys
           else torch.empty(0, dtype=torch.long, device=sim.device))
    if bad.numel():
        s = sim[bad]
        t = vals[bad, k - 1:k]
        tied = s == t
        need = k - (s > t).sum(dim=1, keepdim=True)
        keep = (s > t) | (tied & (torch.cumsum(tied.int(), dim=1) <= need))
        idx = idx.clone()
        idx[bad] = torch.nonzero(keep)[:, 1].reshape(len(bad), k)
    # Ascending index first, then a stable sort by decreasing similarity.
    idx, _ = torch.sort(idx, dim=1)
    order = torch.sort(sim.gather(1, idx), dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


def weighted_neighbor_mean(values: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``out[b] = sum_j w[b, j] * values[idx[b, j]]`` as a sparse ``(n, n_keys)`` product.

    Sequential (scipy), hence deterministic; summation follows the column order of ``idx``.
    """
    n, k = idx.shape
    W = sp.csr_matrix((np.asarray(w, dtype=np.float32).ravel(), np.asarray(idx).ravel(),
                       np.arange(0, n * k + 1, k)), shape=(n, values.shape[0]))
    return np.asarray(W @ values, dtype=np.float32)


def ensemble_prediction(predictions: Sequence[np.ndarray], spreads: Sequence[np.ndarray],
                        ) -> tuple[np.ndarray, np.ndarray]:
    """An ensemble's prediction and predictive standard deviation from its members' retrievals.

    The prediction is the members' mean; the variance is the mean retrieval spread plus the
    spread of the members' predictions (the law of total variance). One member: its own
    prediction, unchanged. Shared by mclSTExp's and SPADE's ensembles.

    Examples
    --------
    >>> p, sd = ensemble_prediction([np.zeros((1, 2)), np.full((1, 2), 2.0)], [np.ones((1, 2))] * 2)
    >>> p.tolist(), sd.tolist()
    ([[1.0, 1.0]], [[1.4142135381698608, 1.4142135381698608]])
    """
    P = np.stack([np.asarray(p, dtype=np.float64) for p in predictions])
    var = np.mean([np.asarray(s, dtype=np.float64) for s in spreads], axis=0) + P.var(axis=0)
    pred = np.asarray(predictions[0], dtype=np.float32) if len(P) == 1 else P.mean(axis=0).astype(np.float32)
    return pred, np.sqrt(var).astype(np.float32)


def neighbor_variance(values: np.ndarray, idx: np.ndarray, w: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Weighted variance of the retrieved values around their weighted ``mean`` (the retrieval spread).

    ``sum_j w[b, j] * (values[idx[b, j]] - mean[b])**2`` for weights summing to 1, computed as
    ``E[v^2] - mean^2`` in float64 and floored at 0.

    Examples
    --------
    >>> import numpy as np
    >>> v = np.array([[0.0], [2.0]])
    >>> neighbor_variance(v, np.array([[0, 1]]), np.array([[0.5, 0.5]]), np.array([[1.0]]))
    array([[1.]], dtype=float32)
    """
    v = np.asarray(values, dtype=np.float64)
    n, k = idx.shape
    W = sp.csr_matrix((np.asarray(w, dtype=np.float64).ravel(), np.asarray(idx).ravel(),
                       np.arange(0, n * k + 1, k)), shape=(n, v.shape[0]))
    m2 = np.asarray(W @ (v * v))
    return np.maximum(m2 - np.asarray(mean, dtype=np.float64) ** 2, 0.0).astype(np.float32)


def combine_keys(query: Any, *, spot_keys: Any = None, image_keys: Any = None,
                 keys: K.Keys = "spot") -> tuple[np.ndarray, np.ndarray]:
    """The query and key matrices of retrieval from the spot side, the image side or both.

    ``"spot"`` and ``"image"`` return ``query`` with those keys unchanged. ``"both"`` scales
    every row to unit length and concatenates ``[q, q]`` and ``[spot, image]``: the cosine
    similarity of the pair is then the mean of the two cosine similarities, and the squared
    distance ``4 (1 - that mean)``.

    Examples
    --------
    >>> import numpy as np
    >>> q, kx = combine_keys(np.ones((1, 2)), spot_keys=np.eye(2), image_keys=np.eye(2), keys="both")
    >>> q.shape, kx.shape
    ((1, 4), (2, 4))
    """
    check_choice(keys, "keys", K.KEYS)
    q = _as_matrix(query, "query", "(n_query, d)")
    if keys == "spot" or keys == "image":
        kx = spot_keys if keys == "spot" else image_keys
        if kx is None:
            raise ValueError(f"`{keys}_keys` is required with keys={keys!r}.")
        return q, _as_matrix(kx, f"{keys}_keys", "(n_keys, d)")
    if spot_keys is None or image_keys is None:
        raise ValueError("keys='both' needs `spot_keys` and `image_keys`.")
    s = _as_matrix(spot_keys, "spot_keys", "(n_keys, d)")
    i = _as_matrix(image_keys, "image_keys", "(n_keys, d)")
    if s.shape != i.shape:
        raise ValueError(f"`spot_keys` and `image_keys` must have the same shape, got {s.shape} and {i.shape}.")

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    qu = unit(q)
    return np.hstack([qu, qu]), np.hstack([unit(s), unit(i)])


def _aggregate(values: Any, idx: Any, w: Any) -> Any:
    """``sum_j w[b, j] * values[idx[b, j]]`` for each row ``b``.

    On CPU, a sparse ``(batch, n_keys)`` weight matrix times ``values`` (scipy, sequential and
    thus deterministic): 8-10x faster than gathering a ``(batch, k, n_values)`` block, which
    is memory-bound. On accelerators, the gather in bounded blocks.
    """
    if values.device.type == "cpu":
        return torch.from_numpy(weighted_neighbor_mean(values.numpy(), idx.numpy(), w.numpy()))
    return gather_mean(values, idx, w)


def gather_mean(values: Any, idx: Any, w: Any, block_elements: int = _GATHER_ELEMENTS) -> Any:
    """``sum_j w[b, j] * values[idx[b, j]]`` by gathering ``(batch, k, n_values)`` blocks (torch, any device).

    The accelerator path of the averaging; each gathered block holds at most
    ``block_elements`` elements (at least one row).

    Examples
    --------
    >>> import torch
    >>> values = torch.tensor([[10.0], [20.0], [30.0]])
    >>> gather_mean(values, torch.tensor([[2, 0]]), torch.tensor([[0.5, 0.5]]))
    tensor([[20.]])
    """
    n, k = idx.shape
    step = max(1, int(block_elements) // max(1, k * values.shape[1]))
    out = torch.empty((n, values.shape[1]), dtype=values.dtype, device=values.device)
    for s in range(0, n, step):
        out[s:s + step] = torch.einsum("bk,bkg->bg", w[s:s + step], values[idx[s:s + step]])
    return out


def retrieve_predict(
    query: Any,
    keys: Any,
    values: Any,
    *,
    k: int = 200,
    weighting: K.Weighting = "inverse_sq_l2",
    similarity: K.Similarity = "cosine",
    temperature: float = 1.0,
    batch_size: int = 4096,
    device: str | Any = "cpu",
    return_neighbors: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predict values of each query as the weighted mean of the values of its ``k`` nearest keys.

    Parameters
    ----------
    query
        Query embeddings, ``(n_query, d)`` (e.g. image embeddings of the spots to predict).
    keys
        Key embeddings, ``(n_keys, d)`` (e.g. embeddings of annotated reference spots).
    values
        Values of the keys, ``(n_keys, n_values)`` (e.g. their log1p CP10k expression).
    k
        Keys retrieved per query (200 for mclSTExp on her2st, 50 for BLEEP); at most ``n_keys``.
    weighting
        How the retrieved values are averaged:

        - ``"inverse_sq_l2"`` (mclSTExp): weights proportional to ``1 / ||q - key||^2`` between
          the *unnormalised* embeddings, normalised to sum to 1. The squared distance is computed
          as ``|q|^2 + |key|^2 - 2 q.key`` and floored at ``1e-6 * (|q|^2 + |key|^2)`` (float32
          rounding of zero), so a key identical to the query dominates with a finite weight and
          several identical keys share it equally.
        - ``"softmax"``: ``softmax(similarity / temperature)`` over the retrieved keys.
        - ``"uniform"`` (BLEEP): the plain mean of the retrieved values.
    similarity
        How keys are ranked: ``"cosine"`` (BLEEP, mclSTExp) or ``"dot"`` (raw dot product).
    temperature
        Softmax temperature (``weighting="softmax"`` only).
    batch_size
        Queries per batch: the similarity block is ``batch_size x n_keys`` float32.
    device
        Torch device of the computation (``"cpu"``, ``"cuda"``, ``"auto"``...).
    return_neighbors
        Also return the retrieved key indices and their weights.

    Returns
    -------
    ``(n_query, n_values)`` float32 predictions; with ``return_neighbors``, also the
    ``(n_query, k)`` int64 key indices, ordered by decreasing similarity (ties: lower key index
    first), and their ``(n_query, k)`` float32 weights (each row sums to 1).

    Notes
    -----
    Deterministic: ties in similarity are broken by key index, so results do not depend on
    ``batch_size`` beyond float rounding, and the neighbours of ``k`` are a prefix of those of
    any larger ``k``.

    Examples
    --------
    >>> import numpy as np
    >>> from sq_spade.nn.retrieval import retrieve_predict
    >>> keys = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> values = np.array([[10.0], [20.0], [30.0]])
    >>> retrieve_predict(np.array([[2.0, 0.1]]), keys, values, k=1)
    array([[10.]], dtype=float32)
    >>> retrieve_predict(np.array([[1.0, 0.9]]), keys, values, k=2, weighting="uniform")
    array([[20.]], dtype=float32)
    """
    q = _as_matrix(query, "query", "(n_query, d)")
    kx = _as_matrix(keys, "keys", "(n_keys, d)")
    v = _as_matrix(values, "values", "(n_keys, n_values)")
    if q.shape[1] != kx.shape[1]:
        raise ValueError(f"`query` and `keys` must have the same dimension, got {q.shape[1]} and {kx.shape[1]}.")
    if v.shape[0] != kx.shape[0]:
        raise ValueError(f"`values` must have one row per key ({kx.shape[0]}), got {v.shape[0]} rows.")
    check_choice(weighting, "weighting", WEIGHTINGS)
    check_choice(similarity, "similarity", SIMILARITIES)
    k = check_positive_int(k, "k")
    if k > kx.shape[0]:
        raise ValueError(f"`k={k}` exceeds the number of keys ({kx.shape[0]}); pass k <= {kx.shape[0]}.")
    check_positive_int(batch_size, "batch_size")
    check_positive_float(temperature, "temperature")
    dev = resolve_device(device)

    n_q = q.shape[0]
    preds = np.empty((n_q, v.shape[1]), dtype=np.float32)
    all_idx = np.empty((n_q, k), dtype=np.int64)
    all_w = np.empty((n_q, k), dtype=np.float32)
    with torch.no_grad():
        kt = torch.from_numpy(kx).to(dev)
        vt = torch.from_numpy(v).to(dev)
        k_norm = torch.linalg.vector_norm(kt, dim=1)
        k_sq = k_norm.double() ** 2
        k_rank = kt / k_norm.clamp_min(1e-12)[:, None] if similarity == "cosine" else kt
        for s in range(0, n_q, batch_size):
            qb = torch.from_numpy(q[s:s + batch_size]).to(dev)
            q_norm = torch.linalg.vector_norm(qb, dim=1)
            q_rank = qb / q_norm.clamp_min(1e-12)[:, None] if similarity == "cosine" else qb
            sim = q_rank @ k_rank.T
            idx = _topk_stable(sim, k)
            s_sel = sim.gather(1, idx).double()
            if weighting == "uniform":
                w = torch.full(idx.shape, 1.0 / k, dtype=torch.float64, device=dev)
            elif weighting == "softmax":
                w = torch.softmax(s_sel / float(temperature), dim=1)
            else:
                ks = k_sq[idx]
                qs = q_norm.double()[:, None] ** 2
                dot = s_sel * q_norm.double()[:, None] * k_norm.double()[idx] if similarity == "cosine" else s_sel
                d2 = (qs + ks - 2.0 * dot).clamp_min(REL_EPS * (qs + ks) + 1e-30)
                inv = 1.0 / d2
                w = inv / inv.sum(dim=1, keepdim=True)
            w32 = w.float()
            preds[s:s + batch_size] = _aggregate(vt, idx, w32).cpu().numpy()
            if return_neighbors:
                all_idx[s:s + batch_size] = idx.cpu().numpy()
                all_w[s:s + batch_size] = w32.cpu().numpy()
    if return_neighbors:
        return preds, all_idx, all_w
    return preds


def mixture_retrieve_predict(
    embed_query: Callable[[int, np.ndarray], Any],
    weights: Any,
    key_expert: Any,
    embed_keys: Callable[[int, np.ndarray], Any],
    values: Any,
    *,
    k: int = 200,
    weighting: K.Weighting = "inverse_sq_l2",
    similarity: K.Similarity = "cosine",
    temperature: float = 1.0,
    min_weight: float = 1e-3,
    center: bool = False,
    batch_size: int = 4096,
    device: str | Any = "cpu",
    return_variance: bool = False,
) -> tuple[np.ndarray, dict[str, Any]] | tuple[np.ndarray, dict[str, Any], np.ndarray]:
    r"""Retrieval by a mixture of experts, each within its own embedding space.

    ``prediction(q) = sum_e a_e(q) * retrieval_e(q)``, where ``retrieval_e`` compares the query
    embedded by expert ``e`` with the keys of expert ``e`` (the reference rows whose expert is
    ``e``) embedded by expert ``e``: no similarity is ever taken between vectors of two
    experts' spaces. Batched per expert: each expert embeds and retrieves its queries at once.

    - Routing weights at or below ``min_weight`` are dropped and each row renormalised (a row
      keeps at least its largest weight); ``weights`` one-hot is hard routing.
    - An expert with fewer than ``k`` keys retrieves all of them.
    - An expert with no key (no reference row was assigned to it) falls back to *all* reference
      rows, embedded by its own heads, so that its queries still retrieve in its space.

    Parameters
    ----------
    embed_query
        ``embed_query(e, rows)``: the queries ``rows`` (int indices) embedded by expert ``e``,
        ``(len(rows), d)``.
    weights
        Routing weights ``(n_query, E)``, non-negative (rows are renormalised).
    key_expert
        Expert of each reference row, integers ``(n_keys,)`` in ``[0, E)``.
    embed_keys
        ``embed_keys(e, rows)``: the reference ``rows`` embedded by expert ``e``.
    values
        Values of the reference rows, ``(n_keys, n_values)``.
    k, weighting, similarity, temperature, batch_size, device
        As :func:`retrieve_predict`, within each expert.
    min_weight
        Routing weights at or below this are dropped (0: keep every positive weight).
    center
        Subtract, within each expert, the mean of its keys from its keys and queries before
        ranking (cosine similarity of centred embeddings; distances are unchanged).
    return_variance
        Also return the retrieval spread: the variance of the mixture of the experts' weighted
        neighbour values, ``sum_e a_e (var_e + p_e^2) - p^2`` (each ``var_e`` the
        :func:`neighbor_variance` of expert ``e``'s neighbours).

    Returns
    -------
    ``(predictions (n_query, n_values) float32, info)`` with ``info``: ``n_keys`` and
    ``n_queries`` per expert (lists) and ``fallback`` (experts that used all reference rows);
    with ``return_variance``, also the ``(n_query, n_values)`` float32 spread.

    Examples
    --------
    >>> import numpy as np
    >>> emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    >>> vals = np.array([[0.0], [1.0], [0.0], [1.0]])
    >>> pred, info = mixture_retrieve_predict(
    ...     lambda e, r: np.array([[1.0, 0.05]])[r], np.array([[0.0, 1.0]]), np.array([0, 0, 1, 1]),
    ...     lambda e, r: emb[r], vals, k=1)
    >>> pred, info["n_keys"]
    (array([[0.]], dtype=float32), [2, 2])
    """
    w = np.asarray(weights, dtype=np.float64)
    v = _as_matrix(values, "values", "(n_keys, n_values)")
    if w.ndim != 2 or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"`weights` must be a finite non-negative (n_query, n_experts) array, got shape {w.shape}.")
    n_q, n_exp = w.shape
    ke = np.asarray(key_expert)
    if ke.shape != (v.shape[0],) or not np.issubdtype(ke.dtype, np.integer):
        raise ValueError(f"`key_expert` must be integers of shape ({v.shape[0]},) (one per row of `values`).")
    if len(ke) and (ke.min() < 0 or ke.max() >= n_exp):
        raise ValueError(f"`key_expert` must lie in [0, {n_exp}) (the columns of `weights`).")
    k = check_positive_int(k, "k")
    check_choice(weighting, "weighting", WEIGHTINGS)
    check_choice(similarity, "similarity", SIMILARITIES)
    if not 0 <= float(min_weight) < 1:
        raise ValueError(f"`min_weight` must lie in [0, 1), got {min_weight!r}.")
    if v.shape[0] == 0:
        raise ValueError("`values` has no reference row to retrieve from.")
    # prune small weights, keep each row's largest, renormalise
    keep = w > float(min_weight)
    if n_q:
        keep[np.arange(n_q), w.argmax(1)] = True
    w = np.where(keep, w, 0.0)
    tot = w.sum(1, keepdims=True)
    w = np.divide(w, tot, out=np.full_like(w, 1.0 / max(n_exp, 1)), where=tot > 0)
    pred = np.zeros((n_q, v.shape[1]), dtype=np.float64)
    m2 = np.zeros_like(pred) if return_variance else None  # the mixture's second moment
    n_keys, n_queries, fallback = [], [], []
    all_rows = np.arange(v.shape[0])
    for e in range(n_exp):
        rows_k = np.flatnonzero(ke == e)
        n_keys.append(int(len(rows_k)))
        rows_q = np.flatnonzero(w[:, e] > 0)
        n_queries.append(int(len(rows_q)))
        if not len(rows_q):
            continue
        if not len(rows_k):
            rows_k = all_rows
            fallback.append(e)
        q = np.asarray(embed_query(e, rows_q), dtype=np.float32)
        kx = np.asarray(embed_keys(e, rows_k), dtype=np.float32)
        if center:
            mu = kx.mean(0, keepdims=True)
            q, kx = q - mu, kx - mu
        out = retrieve_predict(q, kx, v[rows_k], k=min(k, len(rows_k)), weighting=weighting,
                               similarity=similarity, temperature=temperature, batch_size=batch_size,
                               device=device, return_neighbors=return_variance)
        p = out[0] if return_variance else out
        pred[rows_q] += w[rows_q, e, None] * p
        if m2 is not None:
            var_e = neighbor_variance(v[rows_k], out[1], out[2], p).astype(np.float64)
            m2[rows_q] += w[rows_q, e, None] * (var_e + np.asarray(p, dtype=np.float64) ** 2)
    info = {"n_keys": n_keys, "n_queries": n_queries, "fallback": fallback}
    if m2 is not None:
        return pred.astype(np.float32), info, np.maximum(m2 - pred ** 2, 0.0).astype(np.float32)
    return pred.astype(np.float32), info
