from __future__ import annotations

import json

import numpy as np
import pytest

from sq_spade._metrics import expression_metrics
from sq_spade.models._regressors import KNNRegressor, RidgeRegressor


@pytest.fixture
def linear():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 40))
    W = rng.standard_normal((40, 6)) / np.sqrt(40)
    return X, X @ W, np.repeat(np.arange(5), 40), rng


def test_ridge_recovers_linear_signal():
    # features driven by 5 latent factors that also drive the targets: PCA to 8 keeps the signal
    rng = np.random.default_rng(5)
    latent = rng.standard_normal((200, 5))
    X = latent @ rng.standard_normal((5, 60)) + 0.3 * rng.standard_normal((200, 60))
    Y = latent @ rng.standard_normal((5, 6)) + 0.2 * rng.standard_normal((200, 6))
    groups = np.repeat(np.arange(5), 40)
    tr = groups < 4
    model = RidgeRegressor(n_components=8).fit(X[tr], Y[tr], groups=groups[tr])
    assert model.components_.shape == (8, 60)
    assert model.cv_ == "leave_one_group_out" and model.cv_scores_.shape == (len(model.alphas), 4)
    summary, _ = expression_metrics(model.predict(X[~tr]), Y[~tr])
    assert summary["ACG"] > 0.9
    assert model.alpha_ in model.alphas


def test_ridge_picks_larger_alpha_on_noisier_data(linear):
    X, S, groups, rng = linear
    noise = rng.standard_normal(S.shape)
    clean = RidgeRegressor(n_components=32).fit(X, S + 0.05 * noise, groups=groups)
    noisy = RidgeRegressor(n_components=32).fit(X, S + 3.0 * noise, groups=groups)
    assert noisy.alpha_ > 10 * clean.alpha_
    mse = RidgeRegressor(n_components=32, scoring="mse")
    assert mse.fit(X, S + 3.0 * noise, groups=groups).alpha_ > RidgeRegressor(
        n_components=32, scoring="mse").fit(X, S + 0.05 * noise, groups=groups).alpha_


def test_ridge_components_capped_and_kfold_without_groups(linear):
    X, S, _, _ = linear
    model = RidgeRegressor().fit(X[:20], S[:20])
    assert model.components_.shape == (19, 40)  # n_samples - 1
    assert model.cv_ == "kfold" and model.cv_scores_.shape[1] == 5
    assert RidgeRegressor(n_components=None).fit(X, S).components_ is None


def test_ridge_state_round_trip_and_determinism(linear, tmp_path):
    from safetensors.numpy import load_file, save_file

    X, S, groups, _ = linear
    model = RidgeRegressor(n_components=16).fit(X, S, groups=groups)
    arrays, config = model.to_state()
    save_file(arrays, str(tmp_path / "m.safetensors"))
    text = json.dumps(config, allow_nan=False)
    loaded = RidgeRegressor.from_state(load_file(str(tmp_path / "m.safetensors")), json.loads(text))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert loaded.alpha_ == model.alpha_
    again = RidgeRegressor(n_components=16).fit(X, S, groups=groups)
    np.testing.assert_array_equal(again.predict(X), model.predict(X))
    with pytest.raises(ValueError, match="config"):
        KNNRegressor.from_state(arrays, config)


def test_ridge_errors(linear):
    X, S, groups, _ = linear
    with pytest.raises(ValueError, match="same number of rows"):
        RidgeRegressor().fit(X, S[:-1])
    with pytest.raises(ValueError, match="`groups`"):
        RidgeRegressor().fit(X, S, groups=groups[:-1])
    with pytest.raises(ValueError, match="`X` contains NaN"):
        RidgeRegressor().fit(np.full_like(X, np.nan), S)
    with pytest.raises(RuntimeError, match="not fitted"):
        RidgeRegressor().predict(X)
    with pytest.raises(ValueError, match="40 features"):
        RidgeRegressor(n_components=8).fit(X, S).predict(X[:, :5])
    with pytest.raises(ValueError, match="`alphas`"):
        RidgeRegressor(alphas=[-1.0])


def _neighbour_mean(Xq, Xk, Y, k):
    qn = Xq / np.linalg.norm(Xq, axis=1, keepdims=True)
    kn = Xk / np.linalg.norm(Xk, axis=1, keepdims=True)
    idx = np.argsort(-(qn @ kn.T), axis=1, kind="stable")[:, :k]
    return Y[idx].mean(axis=1)


def test_knn_predicts_neighbours_mean():
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((120, 12)), rng.random((120, 4))
    Xq = rng.standard_normal((15, 12))
    model = KNNRegressor(k=7).fit(X, Y)
    assert model.k_ == 7
    np.testing.assert_allclose(model.predict(Xq), _neighbour_mean(Xq, X, Y, 7), rtol=1e-5)


def _clustered(rng, noise):
    centers = rng.standard_normal((8, 10)) * 3
    X = centers[np.repeat(np.arange(8), 25)] + rng.standard_normal((200, 10))
    Y = np.tanh(X[:, :3]) + noise * rng.standard_normal((200, 3))
    return X, Y, np.tile(np.arange(4), 50)


def test_knn_chooses_k_by_cv():
    rng = np.random.default_rng(2)
    X, Y, groups = _clustered(rng, 0.0)
    smooth = KNNRegressor().fit(X, Y, groups=groups)
    # folds hold 150 training rows: the 200 of the grid is capped at 150
    assert smooth.k_grid_ == (5, 10, 20, 50, 100, 150) and smooth.cv_scores_.shape == (6, 4)
    assert smooth.k_ == smooth.k_grid_[int(np.nanargmax(smooth.cv_mean_))]
    Xn, Yn, _ = _clustered(np.random.default_rng(2), 2.0)
    noisy = KNNRegressor().fit(Xn, Yn, groups=groups)
    assert noisy.k_ > smooth.k_  # noisier targets call for averaging more neighbours
    Xq = rng.standard_normal((5, 10))
    np.testing.assert_allclose(noisy.predict(Xq), _neighbour_mean(Xq, Xn, Yn, noisy.k_), rtol=1e-5)


def test_knn_pca_state_round_trip(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(3)
    X, Y, groups = _clustered(rng, 0.5)
    model = KNNRegressor(n_components=5, k_grid=(3, 10)).fit(X, Y, groups=groups)
    assert model.components_.shape == (5, 10) and model.keys_.shape == (200, 5)
    arrays, config = model.to_state()
    save_file(arrays, str(tmp_path / "knn.safetensors"))
    loaded = KNNRegressor.from_state(load_file(str(tmp_path / "knn.safetensors")),
                                     json.loads(json.dumps(config, allow_nan=False)))
    np.testing.assert_array_equal(loaded.predict(X[:20]), model.predict(X[:20]))
    assert loaded.k_ == model.k_


def test_knn_errors():
    rng = np.random.default_rng(4)
    X, Y = rng.standard_normal((10, 3)), rng.random((10, 2))
    with pytest.raises(ValueError, match="`k=20` exceeds the 10 training samples"):
        KNNRegressor(k=20).fit(X, Y)
    with pytest.raises(ValueError, match="`k`"):
        KNNRegressor(k=0)
    with pytest.raises(ValueError, match="same number of rows"):
        KNNRegressor(k=2).fit(X, Y[:5])
    with pytest.raises(ValueError, match="3 features"):
        KNNRegressor(k=2).fit(X, Y).predict(rng.standard_normal((2, 4)))
    assert KNNRegressor().fit(X, Y).k_ <= 8  # grid capped by the 8 rows of a 5-fold training split
