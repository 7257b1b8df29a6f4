from __future__ import annotations

import numpy as np
import pytest
import torch

from sq_spade.nn.retrieval import retrieve_predict


def _cosine_order(q, k):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    return np.argsort(-(qn @ kn.T), axis=1, kind="stable")


@pytest.fixture
def qkv():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((37, 8)).astype(np.float32), rng.standard_normal((90, 8)).astype(np.float32),
            rng.random((90, 5)).astype(np.float32))


def test_k1_returns_nearest_value(qkv):
    q, k, v = qkv
    pred = retrieve_predict(q, k, v, k=1)
    np.testing.assert_allclose(pred, v[_cosine_order(q, k)[:, 0]], rtol=1e-6)


@pytest.mark.parametrize("weighting", ["inverse_sq_l2", "softmax", "uniform"])
def test_weights_sum_to_one_and_define_prediction(qkv, weighting):
    q, k, v = qkv
    pred, idx, w = retrieve_predict(q, k, v, k=10, weighting=weighting, return_neighbors=True)
    assert idx.shape == w.shape == (37, 10) and pred.shape == (37, 5) and pred.dtype == np.float32
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
    assert (w > 0).all()
    np.testing.assert_allclose(pred, np.einsum("bk,bkg->bg", w, v[idx]), rtol=1e-5, atol=1e-6)
    # neighbours are the 10 most cosine-similar keys, in order
    np.testing.assert_array_equal(idx, _cosine_order(q, k)[:, :10])


def test_inverse_sq_l2_hand_example():
    # cosine ranks [2,0] (cos 1), [1,1] (0.71), [0,1] (0); squared distances to [1,0] are 1, 1, 2.
    q = np.array([[1.0, 0.0]])
    keys = np.array([[0.0, 1.0], [2.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    values = np.array([[1.0, 0.0], [2.0, 10.0], [100.0, 100.0], [4.0, 20.0]])
    pred, idx, w = retrieve_predict(q, keys, values, k=3, return_neighbors=True)
    np.testing.assert_array_equal(idx, [[1, 3, 0]])
    np.testing.assert_allclose(w, [[0.4, 0.4, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(pred, [[0.4 * 2 + 0.4 * 4 + 0.2 * 1, 0.4 * 10 + 0.4 * 20]], rtol=1e-6)


def test_exact_match_dominates_inverse_sq_l2():
    keys = np.array([[1.0, 2.0], [1.3, 2.0], [0.7, 2.4]])
    values = np.array([[5.0], [0.0], [0.0]])
    pred = retrieve_predict(keys[:1], keys, values, k=3)
    assert pred[0, 0] == pytest.approx(5.0, rel=1e-3)


def test_softmax_weights_by_hand(qkv):
    q, k, v = qkv
    _, idx, w = retrieve_predict(q, k, v, k=6, weighting="softmax", temperature=0.3, return_neighbors=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    s = np.take_along_axis(qn @ kn.T, idx, axis=1) / 0.3
    e = np.exp(s - s.max(axis=1, keepdims=True))
    np.testing.assert_allclose(w, e / e.sum(axis=1, keepdims=True), rtol=1e-5)


def test_uniform_is_plain_mean_of_neighbours(qkv):
    q, k, v = qkv
    pred = retrieve_predict(q, k, v, k=7, weighting="uniform")
    order = _cosine_order(q, k)[:, :7]
    np.testing.assert_allclose(pred, v[order].mean(axis=1), rtol=1e-5)


@pytest.mark.parametrize("weighting", ["inverse_sq_l2", "softmax", "uniform"])
def test_batched_equals_unbatched(qkv, weighting):
    q, k, v = qkv
    a, ia, wa = retrieve_predict(q, k, v, k=12, weighting=weighting, return_neighbors=True)
    b, ib, wb = retrieve_predict(q, k, v, k=12, weighting=weighting, batch_size=5, return_neighbors=True)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(wa, wb, rtol=1e-6)


def test_ties_broken_by_key_index_and_prefix_property():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((6, 4)).astype(np.float32)
    keys = np.concatenate([base, base, base])  # every key three times
    values = np.arange(18, dtype=np.float32)[:, None]
    q = base[:2] + 0.01
    _, i2, _ = retrieve_predict(q, keys, values, k=2, weighting="uniform", return_neighbors=True)
    _, i9, _ = retrieve_predict(q, keys, values, k=9, weighting="uniform", return_neighbors=True)
    # the two nearest are copies of the same key: the lower indices win, in increasing order
    np.testing.assert_array_equal(i2, [[0, 6], [1, 7]])
    np.testing.assert_array_equal(i9[:, :2], i2)
    assert (np.diff(i9[:, :3], axis=1) > 0).all()
    again = retrieve_predict(q, keys, values, k=2, weighting="uniform", return_neighbors=True)[1]
    np.testing.assert_array_equal(again, i2)


def test_dot_similarity_ranks_by_raw_dot():
    keys = np.array([[1.0, 0.0], [5.0, 5.0]])
    values = np.array([[1.0], [2.0]])
    q = np.array([[1.0, 0.1]])
    assert retrieve_predict(q, keys, values, k=1)[0, 0] == 1.0  # cosine prefers the aligned key
    assert retrieve_predict(q, keys, values, k=1, similarity="dot")[0, 0] == 2.0


def test_k_equal_to_n_keys_and_empty_query(qkv):
    q, k, v = qkv
    pred = retrieve_predict(q, k, v, k=90, weighting="uniform")
    np.testing.assert_allclose(pred, np.broadcast_to(v.mean(axis=0), pred.shape), rtol=1e-5)
    assert retrieve_predict(q[:0], k, v, k=3).shape == (0, 5)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k": 91}, r"`k=91` exceeds the number of keys \(90\)"),
    ({"k": 0}, "`k` must be a positive integer"),
    ({"weighting": "mean"}, "`weighting`"),
    ({"similarity": "l1"}, "`similarity`"),
    ({"k": 3, "temperature": 0.0, "weighting": "softmax"}, "`temperature`"),
    ({"k": 3, "batch_size": 0}, "`batch_size`"),
])
def test_argument_errors(qkv, kwargs, match):
    q, k, v = qkv
    with pytest.raises(ValueError, match=match):
        retrieve_predict(q, k, v, **kwargs)


def test_shape_and_value_errors(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="same dimension"):
        retrieve_predict(q[:, :3], k, v, k=2)
    with pytest.raises(ValueError, match="`values` must have one row per key"):
        retrieve_predict(q, k, v[:10], k=2)
    bad = q.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="`query` contains NaN"):
        retrieve_predict(bad, k, v, k=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(qkv):
    q, k, v = qkv
    a, ia, _ = retrieve_predict(q, k, v, k=10, return_neighbors=True)
    b, ib, _ = retrieve_predict(q, k, v, k=10, device="cuda", return_neighbors=True)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# --- the accelerator averaging path, run on the CPU ----------------------------------------------------------------
@pytest.mark.parametrize("block_elements", [1, 7 * 5 * 3, 1 << 24])
def test_gather_mean_equals_the_sparse_cpu_average(block_elements):
    from sq_spade.nn.retrieval import gather_mean, weighted_neighbor_mean

    rng = np.random.default_rng(3)
    values = rng.normal(size=(40, 5)).astype(np.float32)
    idx = rng.integers(0, 40, size=(23, 7))
    w = rng.random((23, 7)).astype(np.float32)
    w /= w.sum(1, keepdims=True)
    got = gather_mean(torch.as_tensor(values), torch.as_tensor(idx), torch.as_tensor(w), block_elements=block_elements)
    expected = np.einsum("bk,bkg->bg", w, values[idx])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weighted_neighbor_mean(values, idx, w), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_retrieval_on_the_gpu_equals_the_cpu(qkv):
    q, k, v = qkv
    for weighting in ("inverse_sq_l2", "softmax", "uniform"):
        cpu = retrieve_predict(q, k, v, k=5, weighting=weighting, device="cpu")
        gpu = retrieve_predict(q, k, v, k=5, weighting=weighting, device="cuda")
        np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-5)


def test_mixture_variance_is_the_variance_of_the_mixture_of_neighbours():
    from sq_spade.nn.retrieval import mixture_retrieve_predict, neighbor_variance

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 4)).astype(np.float32)
    vals = rng.normal(size=(30, 3)).astype(np.float32)
    q = rng.normal(size=(5, 4)).astype(np.float32)
    ke = np.repeat([0, 1], 15)
    # one expert: the neighbour variance of plain retrieval
    one = mixture_retrieve_predict(lambda e, r: q[r], np.ones((5, 1)), np.zeros(30, int), lambda e, r: emb[r], vals,
                                   k=6, return_variance=True)
    p, idx, w = retrieve_predict(q, emb, vals, k=6, return_neighbors=True)
    np.testing.assert_allclose(one[0], p, rtol=1e-6)
    np.testing.assert_allclose(one[2], neighbor_variance(vals, idx, w, p), rtol=1e-5, atol=1e-6)
    # two experts: sum_e a_e (var_e + p_e^2) - p^2
    a = np.tile([[0.3, 0.7]], (5, 1))
    pred, _, var = mixture_retrieve_predict(lambda e, r: q[r], a, ke, lambda e, r: emb[r], vals, k=6,
                                            return_variance=True)
    m2 = np.zeros_like(pred, dtype=np.float64)
    for e in (0, 1):
        pe, ie, we = retrieve_predict(q, emb[ke == e], vals[ke == e], k=6, return_neighbors=True)
        m2 += a[:, e, None] * (neighbor_variance(vals[ke == e], ie, we, pe) + pe.astype(np.float64) ** 2)
    np.testing.assert_allclose(var, m2 - pred.astype(np.float64) ** 2, rtol=1e-4, atol=1e-5)
    assert len(mixture_retrieve_predict(lambda e, r: q[r], a, ke, lambda e, r: emb[r], vals, k=6)) == 2
