"""tl.spatial_domains, tl.domain_scores, tl.slide_embedding and the CLAM-layout bags."""

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

import sq_spade as sqs
from sq_spade import _constants as K


def _blocks(n_per=40, seed=0, noise=0.3):
    """Two sections; left half of each is domain 'a', right half 'b', separable in a 6-d embedding."""
    rng = np.random.default_rng(seed)
    obs, xs, xy = [], [], []
    for s in ("s1", "s2"):
        for i in range(n_per):
            r, c = divmod(i, 8)
            truth = "a" if c < 4 else "b"
            centre = np.r_[np.full(3, 2.0), np.zeros(3)] if truth == "a" else np.r_[np.zeros(3), np.full(3, 2.0)]
            xs.append(centre + rng.normal(0, noise, 6))
            xy.append((c * 100.0, r * 100.0))
            obs.append({"section": s, "truth": truth})
    a = ad.AnnData(obs=pd.DataFrame(obs, index=[f"o{i}" for i in range(len(obs))]))
    a.obsm["X_emb"] = np.array(xs)
    a.obsm["spatial"] = np.array(xy)
    return a


def test_domains_recover_the_blocks_and_beat_the_floor():
    a = _blocks()
    sqs.tl.spatial_domains(a, use="X_emb", n_domains=2, n_pcs=None)
    assert a.obs[K.OBS.DOMAIN].dtype == "category" and a.obs[K.OBS.DOMAIN].nunique() == 2
    sc = sqs.tl.domain_scores(a.obs["truth"], a.obs[K.OBS.DOMAIN], n_shuffles=20)
    assert sc["ari"] == pytest.approx(1.0) and sc["nmi"] == pytest.approx(1.0)
    assert sc["ari_shuffled"] < 0.1 and sc["n"] == a.n_obs
    assert a.uns[K.UNS.DOMAINS]["domain"]["source"] == "obsm['X_emb']"


def test_spatial_smoothing_rescues_noisy_features():
    a = _blocks(noise=2.0, seed=1)
    raw = sqs.tl.spatial_domains(a, use="X_emb", n_domains=2, n_pcs=None, copy=True)
    smooth = sqs.tl.spatial_domains(a, use="X_emb", n_domains=2, n_pcs=None, smooth=3, n_neighbors=4, copy=True)
    assert K.OBS.DOMAIN not in a.obs  # copy=True leaves the input alone
    ari_raw = sqs.tl.domain_scores(a.obs["truth"], raw.obs[K.OBS.DOMAIN], n_shuffles=1)["ari"]
    ari_smooth = sqs.tl.domain_scores(a.obs["truth"], smooth.obs[K.OBS.DOMAIN], n_shuffles=1)["ari"]
    assert ari_smooth > ari_raw + 0.2 and ari_smooth > 0.8


def test_leiden_and_errors():
    a = _blocks()
    sqs.tl.spatial_domains(a, use="X_emb", method="leiden", resolution=0.3, n_pcs=None, key_added="leiden_dom")
    assert a.obs["leiden_dom"].nunique() >= 2
    with pytest.raises(KeyError, match="use='nope'"):
        sqs.tl.spatial_domains(a, use="nope")
    with pytest.raises(ValueError, match="`method`"):
        sqs.tl.spatial_domains(a, use="X_emb", method="dbscan")
    with pytest.raises(ValueError, match="n_domains"):
        sqs.tl.spatial_domains(a, use="X_emb", n_domains=10_000)
    assert K.OBS.DOMAIN not in a.obs


def test_domain_scores_drop_missing_truth():
    sc = sqs.tl.domain_scores(["a", None, "b", "b"], [0, 5, 1, 1], n_shuffles=5)
    assert sc["n"] == 3 and sc["ari"] == pytest.approx(1.0)


def test_slide_embedding_pools_per_section_and_writes_bags(tmp_path):
    a = _blocks()
    a.uns[K.UNS.SECTIONS] = {"s1": {"microns_per_pixel": 2.0}, "s2": {"microns_per_pixel": 2.0}}
    a.uns[K.UNS.TILES] = {"tile_um": 100.0}
    df = sqs.tl.slide_embedding(a, key="X_emb")
    assert list(df.index) == ["s1", "s2"] and df.shape == (2, 6)
    assert np.allclose(df.loc["s2"].to_numpy(), a.obsm["X_emb"][a.obs["section"] == "s2"].mean(0))
    dq = sqs.tl.slide_embedding(a, key="X_emb", pooling="quantiles", quantiles=(0.5,))
    assert dq.shape == (2, 12)
    assert np.allclose(dq.iloc[0, 6:], np.median(a.obsm["X_emb"][a.obs["section"] == "s1"], 0))
    assert a.uns[K.UNS.SLIDES]["X_emb"]["pooling"] == "quantiles"
    sqs.tl.slide_embedding(a, key="X_emb", pooling="attention-ready", bags_dir=tmp_path)
    with h5py.File(tmp_path / "s1.h5", "r") as f:
        feats, coords = f["features"][:], f["coords"][:]
        assert f["coords"].attrs["patch_size"] == 50 and f["coords"].attrs["patch_level"] == 0
    sel = (a.obs["section"] == "s1").to_numpy()
    assert feats.dtype == np.float32 and np.allclose(feats, a.obsm["X_emb"][sel])
    assert coords.dtype == np.int64 and np.array_equal(coords, np.floor(a.obsm["spatial"][sel] - 25))


def test_slide_embedding_errors():
    a = _blocks()
    with pytest.raises(ValueError, match="bags_dir"):
        sqs.tl.slide_embedding(a, key="X_emb", pooling="attention-ready")
    with pytest.raises(KeyError, match="key='X_none'"):
        sqs.tl.slide_embedding(a, key="X_none")
    with pytest.raises(ValueError, match="pooling"):
        sqs.tl.slide_embedding(a, key="X_emb", pooling="max")
    assert K.UNS.SLIDES not in a.uns
