import numpy as np
import pytest

from sq_spade.models import two_stage_clustering


def _blobs(n_per=40, k=6, d=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, size=(k, d))
    x = np.vstack([c + rng.normal(0, 0.3, size=(n_per, d)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(k), n_per)


def test_two_stage_structure_and_determinism():
    x, truth = _blobs()
    groups = np.where(np.arange(len(x)) % 2 == 0, "liver", "lung")
    a = two_stage_clustering(x, groups, n_fine=6, n_experts=3, seed=1)
    b = two_stage_clustering(x, groups, n_fine=6, n_experts=3, seed=1)
    assert a.centroids.shape == (12, 5)
    assert list(a.centroid_group[:6]) == ["liver"] * 6 and list(a.centroid_group[6:]) == ["lung"] * 6
    assert np.array_equal(a.expert, b.expert) and np.array_equal(a.centroids, b.centroids)
    # each spot's expert is its fine centroid's
    assert np.array_equal(a.expert, a.fine_to_expert[a.fine_label])
    # fine labels stay inside the spot's own group
    assert (a.centroid_group[a.fine_label] == groups).all()
    # a blob is never split across experts
    for t in range(6):
        assert len(set(a.expert[truth == t])) == 1


def test_small_group_and_too_many_experts_rules():
    x, _ = _blobs(n_per=2, k=2)
    groups = np.array(["a"] * 3 + ["b"] * 1)
    with pytest.warns(UserWarning, match="exceeds"):
        c = two_stage_clustering(x, groups, n_fine=16, n_experts=16)
    assert c.centroids.shape[0] == 4  # one centroid per distinct spot
    assert c.n_experts == 4 and sorted(c.fine_to_expert) == [0, 1, 2, 3]


def test_bad_inputs():
    with pytest.raises(ValueError, match="features"):
        two_stage_clustering(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="groups"):
        two_stage_clustering(np.zeros((4, 3)), np.array(["a"]))
