import warnings

import numpy as np
import pytest

import sq_spade as sqs
from sq_spade import _constants as K


def test_dummy_features_rows_follow_table_order():
    sd = sqs.datasets.synthetic_section(n_rows=3, n_cols=3)
    key = sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0)
    t = sd.tables["table"]
    before = dict(zip(t.obs_names, t.obsm[key], strict=True))
    perm = np.random.default_rng(0).permutation(t.n_obs)
    sd.tables["table"] = t[perm].copy()
    sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0, key_added="again")
    t2 = sd.tables["table"]
    for name, row in zip(t2.obs_names, t2.obsm["again"], strict=True):
        assert np.allclose(row, before[name], atol=1e-5)  # batch composition changes rounding only
    prov = t2.uns[K.FEATURES_UNS]["again"]
    assert prov["backbone"] == "dummy" and prov["patch_geometry"]["patch_px"] == 32
    assert prov["sq_spade_version"] == sqs.__version__


def test_tta_is_the_mean_of_the_eight_views():
    import torch

    from sq_spade.nn.backbones import get_backbone
    from sq_spade.nn.inference import dihedral_transforms

    sd = sqs.datasets.synthetic_section(n_rows=2, n_cols=2)
    sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0, tta=True, key_added="tta")
    p = sqs.pp.patches(sd, patch_size_um=32, microns_per_pixel=1.0)
    model = get_backbone("dummy").eval()
    x = torch.as_tensor(p.batch(range(len(p)))).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=model.input_size, mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        ref = torch.stack([model(v) for v in dihedral_transforms(x)]).mean(0).numpy()
    assert np.allclose(sd.tables["table"].obsm["tta"], ref, atol=1e-5)


def _grid(**kw):
    sd = sqs.datasets.synthetic_section(n_rows=3, n_cols=3, **kw)
    return sd, sd.tables["table"]


def test_layers_concatenate_pooled_blocks_in_backbone_order():
    import torch

    from sq_spade.nn.backbones import get_backbone

    sd, t = _grid()
    sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0, layers=["final", "pool"],
                            zscore=None, key_added="both")
    sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0, key_added="final")
    p = sqs.pp.patches(sd, patch_size_um=32, microns_per_pixel=1.0)
    bb = get_backbone("dummy")
    x = torch.as_tensor(p.batch(range(len(p)))).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        pool = bb.model.pool((x - bb.mean) / bb.std).numpy()
    both = t.obsm["both"]
    assert both.shape == (9, 96 + 64)
    assert np.allclose(both[:, :96], pool, atol=1e-5)  # "pool" first: the backbone's order, not the argument's
    assert np.allclose(both[:, 96:], t.obsm["final"], atol=1e-5)
    prov = t.uns[K.FEATURES_UNS]["both"]
    assert list(prov["layers"]) == ["pool", "final"] and prov["dim"] == 160 and "zscore" not in prov
    # "final" alone (the dummy's default): raw, as before layers existed
    assert list(t.uns[K.FEATURES_UNS]["final"]["layers"]) == ["final"]
    assert "zscore" not in t.uns[K.FEATURES_UNS]["final"]


def test_zscore_per_section_and_auto():
    secs = [sqs.datasets.synthetic_section(section=s, n_rows=3, n_cols=3, seed=i) for i, s in enumerate(("a", "b"))]
    sd = sqs.io.combine_sections(secs)
    t = sd.tables["table"]
    raw = sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0, layers="pool", zscore=None,
                                  key_added="raw")
    auto = sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0, layers="pool", key_added="auto")
    assert t.uns[K.FEATURES_UNS][auto]["zscore"] == "section"  # an intermediate layer: z-scored by default
    sec = t.obs[K.OBS.SECTION].astype(str).to_numpy()
    for s in ("a", "b"):
        x, z = t.obsm[raw][sec == s], t.obsm[auto][sec == s]
        sd_ = x.std(0)
        varying = sd_ > 1e-6
        assert np.allclose(z.mean(0), 0, atol=1e-5)
        assert np.allclose(z[:, varying], ((x - x.mean(0)) / np.where(varying, sd_, 1))[:, varying], atol=1e-4)
    assert not np.allclose(t.obsm[raw], t.obsm[auto])


def test_keep_views_stores_the_eight_views_scaled_like_their_mean():
    sd, t = _grid()
    key = sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0, layers=["pool", "final"],
                                  tta=True, keep_views=True, key_added="v")
    views = t.obsm["v" + K.VIEWS_SUFFIX]
    assert views.shape == (9, 8, 160) and views.dtype == np.float32
    assert np.allclose(views.mean(1), t.obsm[key], atol=1e-5)
    assert np.abs(views[:, 0] - views[:, 1]).max() > 1e-3  # really different views
    prov = t.uns[K.FEATURES_UNS][key]
    assert prov["tta"] and prov["zscore"] == "section" and prov["views_key"] == "v" + K.VIEWS_SUFFIX
    # the raw views average to the raw TTA features
    sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0, layers="final", tta=True,
                            keep_views=True, key_added="f")
    sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0, layers="final", tta=True, key_added="g")
    assert np.allclose(t.obsm["f"], t.obsm["g"], atol=1e-5)
    assert np.allclose(t.obsm["f_views"].mean(1), t.obsm["g"], atol=1e-5)


def test_layer_arguments_refused_before_anything_is_written():
    sd, t = _grid()
    with pytest.raises(ValueError, match="layers backbone 'dummy' offers"):
        sqs.pp.compute_features(sd, backbone="dummy", layers=["blocks.3"])
    with pytest.raises(ValueError, match="keep_views"):
        sqs.pp.compute_features(sd, backbone="dummy", keep_views=True)
    with pytest.raises(ValueError, match="zscore"):
        sqs.pp.compute_features(sd, backbone="dummy", zscore="global")
    with pytest.raises(ValueError, match="layers backbone 'efficientnet_lite0' offers"):
        sqs.pp.compute_features(sd, backbone="efficientnet_lite0", layers="block5")
    assert K.FEATURES_UNS not in t.uns and list(t.obsm) == ["spatial"]


def test_bad_arguments():
    sd = sqs.datasets.synthetic_section(n_rows=2, n_cols=2)
    with pytest.raises(KeyError, match="nope"):
        sqs.pp.compute_features(sd, backbone="nope")
    with pytest.raises(ValueError, match="batch_size"):
        sqs.pp.compute_features(sd, backbone="dummy", batch_size=0)
    with pytest.raises(TypeError, match="SpatialData"):
        sqs.pp.compute_features(sd.tables["table"], backbone="dummy")
    assert K.FEATURES_UNS not in sd.tables["table"].uns


@pytest.mark.realdata
@pytest.mark.xdist_group("lite0")
def test_lite0_features_for_every_real_section(her2st_section, mob_section, lite0_features):
    """Done-when of the features issue: Lite0 features for every spot of 9 real sections."""
    n = 0
    for name in ("B4", "C2", "C3", "C4", "A1", "A2", "MOB1", "MOB2", "MOB3"):
        f = lite0_features(name)
        # the default: stages 3-5 pooled (80 + 112 + 192), z-scored within the section
        assert f.dtype == np.float32 and f.shape[1] == 384
        assert np.isfinite(f).all() and np.allclose(f.mean(0), 0, atol=1e-4) and np.allclose(f.std(0), 1, atol=1e-3)
        n += len(f)
    assert n == 283 + 187 + 180 + 184 + 346 + 325 + 379 + 407 + 438


@pytest.mark.realdata
@pytest.mark.xdist_group("lite0")
def test_lite0_on_real_patch_is_deterministic_and_not_random(her2st_section):
    import timm
    import torch

    from sq_spade.nn.backbones import get_backbone

    sd = her2st_section("C2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        p = sqs.pp.patches(sd)
    x = torch.as_tensor(p.batch([0, 50, 100])).permute(0, 3, 1, 2).float() / 255
    model = get_backbone("efficientnet_lite0").eval()
    assert model.weights_sha256 == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    with torch.no_grad():
        a, b = model(x), model(x)
        torch.manual_seed(0)
        rand = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
        r = rand((x - 0.5) / 0.5)
    assert torch.equal(a, b)
    cos = torch.nn.functional.cosine_similarity(a, r).mean()
    assert cos < 0.9


def test_feature_cache_is_keyed_by_pixels_and_weights(tmp_path, monkeypatch):
    import torch

    from sq_spade.nn.backbones import get_backbone

    monkeypatch.setattr(sqs.settings, "cache_dir", tmp_path)
    model = get_backbone("dummy")
    model.weights_sha256 = "a" * 64  # pretend the weights are identified, as real ones are
    sd = sqs.datasets.synthetic_section(n_rows=2, n_cols=2)
    sqs.pp.compute_features(sd, backbone=model, patch_size_um=32, microns_per_pixel=1.0)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1
    t = sd.tables["table"]
    assert not t.uns[K.FEATURES_UNS]["X_dummy"]["from_cache"]
    first = t.obsm["X_dummy"].copy()
    sqs.pp.compute_features(sd, backbone=model, patch_size_um=32, microns_per_pixel=1.0)
    assert t.uns[K.FEATURES_UNS]["X_dummy"]["from_cache"]
    assert np.array_equal(t.obsm["X_dummy"], first)
    # other pixels (another geometry) or other weights: a new entry
    sqs.pp.compute_features(sd, backbone=model, patch_size_um=40, microns_per_pixel=1.0)
    model.weights_sha256 = "b" * 64
    sqs.pp.compute_features(sd, backbone=model, patch_size_um=32, microns_per_pixel=1.0)
    # other layers, TTA or views: new entries; the same again: from the cache
    for kw in ({"layers": "pool"}, {"layers": "pool", "tta": True}, {"layers": "pool", "tta": True, "keep_views": True}):
        sqs.pp.compute_features(sd, backbone=model, patch_size_um=32, microns_per_pixel=1.0, key_added="k", **kw)
        assert not t.uns[K.FEATURES_UNS]["k"]["from_cache"]
        sqs.pp.compute_features(sd, backbone=model, patch_size_um=32, microns_per_pixel=1.0, key_added="k", **kw)
        assert t.uns[K.FEATURES_UNS]["k"]["from_cache"]
    assert len(list(tmp_path.glob("*.npy"))) == 6
    # the z-score is applied after the cache: no new entry
    sqs.pp.compute_features(sd, backbone=model, patch_size_um=32, microns_per_pixel=1.0, key_added="k", layers="pool", zscore=None)
    assert len(list(tmp_path.glob("*.npy"))) == 6
    model.weights_sha256 = "c" * 64
    # a backbone without a weights hash is never cached
    with torch.no_grad():
        sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0)
    assert len(list(tmp_path.glob("*.npy"))) == 6


def _three_sections():
    secs = [sqs.datasets.synthetic_section(section=s, n_rows=r, n_cols=c, seed=i)
            for i, (s, r, c) in enumerate((("s1", 3, 3), ("s2", 2, 4), ("s3", 3, 2)))]
    sd = sqs.io.combine_sections(secs)
    t = sd.tables["table"]
    # interleave the sections' rows: results must come back in the table's row order
    sd.tables["table"] = t[np.random.default_rng(0).permutation(t.n_obs)].copy()
    return sd


@pytest.mark.xdist_group("dask")
def test_dask_features_equal_serial(tmp_path, monkeypatch):
    """Two worker processes, one task per section, from a zarr-backed SpatialData: the serial obsm."""
    import spatialdata
    from distributed import Client, LocalCluster

    from sq_spade.pp import _features

    sd = _three_sections()
    sd.write(tmp_path / "three.zarr")
    sd = spatialdata.read_zarr(tmp_path / "three.zarr")
    monkeypatch.setattr(sqs.settings, "cache_dir", None)
    sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0, key_added="serial")
    # workers processes, one thread each; the backbone is built by each worker, not shipped
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        key = sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0, key_added="dask",
                                      client=client)
        built = client.run(lambda: list(_features._WORKER_BACKBONES))
    t = sd.tables["table"]
    assert key == "dask" and np.isfinite(t.obsm["dask"]).all()
    np.testing.assert_allclose(t.obsm["dask"], t.obsm["serial"], rtol=0, atol=1e-6)
    prov = t.uns[K.FEATURES_UNS]
    assert prov["dask"] == prov["serial"]
    assert sorted(prov["dask"]["patch_geometry"]["sections"]) == ["s1", "s2", "s3"]
    # one model per worker that ran a task, keyed by name and weights sha256
    assert 1 <= len(built) <= 2 and all(v == [("dummy", "none")] for v in built.values())


def test_dask_arguments_refused_before_anything_is_written():
    sd = sqs.datasets.synthetic_section(n_rows=2, n_cols=2)
    with pytest.raises(ValueError, match="parallel"):
        sqs.pp.compute_features(sd, backbone="dummy", parallel="ray")
    with pytest.raises(TypeError, match="client"):
        sqs.pp.compute_features(sd, backbone="dummy", client="tcp://localhost:8786")
    assert K.FEATURES_UNS not in sd.tables["table"].uns
