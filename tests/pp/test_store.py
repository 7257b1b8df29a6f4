import numpy as np
import pytest

import sq_spade as sqs
from sq_spade.pp import FeatureStore

GENES = [f"g{i}" for i in range(5)]


def _section(rng, n, dim=8):
    return (rng.normal(size=(n, dim)).astype(np.float32), rng.gamma(1.0, size=(n, len(GENES))).astype(np.float32),
            [f"spot{i}" for i in range(n)])


def _store(tmp_path, sizes=(7, 12, 5, 30, 3), dtype="float32"):
    rng = np.random.default_rng(0)
    store = FeatureStore.create(tmp_path / "f.zarr", genes=GENES, dim=8, backbone="dummy", weights_sha256="none",
                                dtype=dtype, chunk_rows=4)
    data = {}
    for i, n in enumerate(sizes):
        f, e, ids = _section(rng, n)
        store.write_section(f"s{i}", f, e, ids, provenance={"note": np.float64(np.nan), "i": i})
        data[f"s{i}"] = (f, e, ids)
    return store, data


def test_sections_round_trip_lazily(tmp_path):
    store, data = _store(tmp_path, dtype="float16")
    again = FeatureStore(tmp_path / "f.zarr")  # reopened from disk
    assert again.sections == sorted(data) and again.genes == GENES and again.dim == 8
    sec = again["s3"]
    assert sec.features.dtype == np.float16 and sec.features.chunks == (4, 8)  # on disk, chunked by rows
    w = sec.load(5, 11)
    f, e, ids = data["s3"]
    np.testing.assert_allclose(w.features, f[5:11], rtol=1e-3, atol=1e-3)  # float16 on disk
    assert w.features.dtype == np.float32 and np.array_equal(w.expression, e[5:11])
    assert list(w.spot_ids) == ids[5:11] and w.parts == [("s3", 5, 11)]
    assert sec.provenance == {"note": None, "i": 3}  # NaN stored as JSON null


def test_windows_cover_every_row_once_under_the_budget(tmp_path):
    store, data = _store(tmp_path)
    budget = 40 * store.row_bytes
    rows = store.window_bytes(budget) // store.row_bytes
    assert 5 < rows < 20  # two windows and read buffers within the budget; s3 (30 rows) must be split
    seen = {s: np.zeros(len(d[2]), int) for s, d in data.items()}
    windows = list(store.iter_windows(budget, shuffle=True, seed=1))
    assert len(windows) > 1
    for w in windows:
        assert w.n_spots <= rows and w.features.shape == (w.n_spots, 8)
        at = 0
        for s, a, b in w.parts:
            f, e, ids = data[s]
            assert np.array_equal(w.features[at: at + b - a], f[a:b])
            assert np.array_equal(w.expression[at: at + b - a], e[a:b])
            assert list(w.spot_ids[at: at + b - a]) == ids[a:b] and set(w.section[at: at + b - a]) == {s}
            seen[s][a:b] += 1
            at += b - a
    assert all((v == 1).all() for v in seen.values())
    # sections that fit the budget stay whole; larger ones are split; the seed fixes the order
    parts = [p for w in windows for p in w.parts]
    for s, (_, _, ids) in data.items():
        if len(ids) <= rows:
            assert [p for p in parts if p[0] == s] == [(s, 0, len(ids))]
    assert len([p for p in parts if p[0] == "s3"]) == -(-30 // rows)
    order = [[p[0] for p in w.parts] for w in store.iter_windows(budget, shuffle=True, seed=1)]
    assert order == [[p[0] for p in w.parts] for w in windows]
    plain = [p[0] for w in store.iter_windows(budget) for p in w.parts]
    assert plain == sorted(plain)


def test_prefetch_gives_the_same_windows(tmp_path):
    store, _ = _store(tmp_path)
    budget = 40 * store.row_bytes
    a = list(store.iter_windows(budget, sections=["s4", "s0", "s3"]))
    b = list(store.iter_windows(budget, sections=["s4", "s0", "s3"], prefetch=True))
    assert [w.parts for w in a] == [w.parts for w in b] == store.plan_windows(store.window_bytes(budget),
                                                                              sections=["s4", "s0", "s3"])
    assert store.plan_windows(10 * store.row_bytes, sections=["s4", "s0", "s3"]) == [
        [("s4", 0, 3), ("s0", 0, 7)], [("s3", 0, 10)], [("s3", 10, 20)], [("s3", 20, 30)]]
    assert all(np.array_equal(x.features, y.features) for x, y in zip(a, b, strict=True))


def test_failed_write_leaves_no_section(tmp_path, monkeypatch):
    store, data = _store(tmp_path, sizes=(4,))
    import os

    real_rename = os.rename

    def boom(src, dst):
        if str(dst).endswith("s0") and ".tmp" in str(src):
            raise OSError("disk full")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", boom)
    f, e, ids = _section(np.random.default_rng(5), 6)
    with pytest.raises(OSError, match="disk full"):  # replacing s0 fails at the last step
        store.write_section("s0", f, e, ids, overwrite=True)
    monkeypatch.setattr(os, "rename", lambda src, dst: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):  # a new section fails
        store.write_section("s1", f, e, ids)
    monkeypatch.undo()
    # the old s0 is back, untouched, and no temporary group is left or listed
    assert store.sections == ["s0"]
    assert np.array_equal(store["s0"].load().features, data["s0"][0])
    assert sorted(p.name for p in (store.path / "sections").iterdir() if p.is_dir()) == ["s0"]


def test_bad_sections_refused(tmp_path):
    store, _ = _store(tmp_path, sizes=(4,))
    f, e, ids = _section(np.random.default_rng(1), 4)
    with pytest.raises(FileExistsError, match="overwrite"):
        store.write_section("s0", f, e, ids)
    with pytest.raises(ValueError, match="features"):
        store.write_section("x", f[:, :3], e, ids)
    with pytest.raises(ValueError, match="expression"):
        store.write_section("x", f, e[:, :2], ids)
    with pytest.raises(ValueError, match="spot_ids"):
        store.write_section("x", f, e, ["a"] * 4)
    with pytest.raises(ValueError, match="non-finite"):
        store.write_section("x", np.full_like(f, np.nan), e, ids)
    with pytest.raises(ValueError, match="section"):
        store.write_section("../x", f, e, ids)
    with pytest.raises(KeyError, match="nope"):
        store["nope"]
    assert store.sections == ["s0"]
    with pytest.raises(ValueError, match="float16"):
        FeatureStore.create(tmp_path / "h.zarr", genes=GENES, dim=8, backbone="b", weights_sha256="w",
                            dtype="float16").write_section("big", f * 1e6, e, ids)
    with pytest.raises(FileNotFoundError, match="feature store"):
        FeatureStore(tmp_path / "missing.zarr")


def test_write_feature_store_from_tables(tmp_path):
    secs = [sqs.datasets.synthetic_section(section=s, n_rows=3, n_cols=3, seed=i) for i, s in enumerate(("a", "b"))]
    sd = sqs.io.combine_sections(secs)
    sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0)
    t = sd.tables["table"]
    panel = list(t.var_names[:6])
    store = sqs.pp.write_feature_store(sd, tmp_path / "f.zarr", panel=panel, sections=["a"], dtype="float32")
    # a second call appends; the panel and backbone must match
    store = sqs.pp.write_feature_store(sd, tmp_path / "f.zarr", panel=panel, sections=["b"])
    assert store.sections == ["a", "b"] and store.genes == panel and store.backbone == "dummy"
    from sq_spade.pp._genes import panel_expression

    expr, _ = panel_expression(t, panel)
    for s in ("a", "b"):
        rows = np.flatnonzero(t.obs["section"].astype(str) == s)
        w = store[s].load()
        assert list(w.spot_ids) == list(t.obs_names[rows])
        assert np.array_equal(w.features, t.obsm["X_dummy"][rows])
        np.testing.assert_allclose(w.expression, expr[rows], rtol=1e-6)
        assert store[s].provenance["features"]["backbone"] == "dummy"
    with pytest.raises(ValueError, match="panel"):
        sqs.pp.write_feature_store(sd, tmp_path / "f.zarr", panel=panel[:3], sections=["a"], overwrite=True)
    with pytest.raises(FileExistsError, match="overwrite"):
        sqs.pp.write_feature_store(sd, tmp_path / "f.zarr", panel=panel, sections=["a"])
    assert store.sections == ["a", "b"]


def test_training_windows_serve_every_spot_with_its_expert(tmp_path):
    store, data = _store(tmp_path)
    rng = np.random.default_rng(3)
    expert = {s: rng.integers(0, 3, len(d[2])) for s, d in data.items() if s != "s2"}
    tw = store.training_windows(expert, n_experts=3, memory_budget_bytes=40 * store.row_bytes)
    assert tw["dim"] == 8 and tw["n_genes"] == len(GENES) and tw["key"].startswith("feature_store:")
    assert len(tw["loaders"]) == len(tw["expert_counts"]) > 1
    feats, labs = [], []
    for load, counts in zip(tw["loaders"], tw["expert_counts"], strict=True):
        x, g, ex = load()
        assert x.dtype == g.dtype == np.float32 and ex.dtype == np.int64 and len(x) == len(g) == len(ex)
        assert len(x) * store.row_bytes <= store.window_bytes(40 * store.row_bytes)
        assert np.array_equal(np.bincount(ex, minlength=3), counts)
        feats.append(x)
        labs.append(ex)
    # every spot of the labelled sections once, with its own label, in store order
    order = [s for s in store.sections if s in expert]
    assert np.array_equal(np.concatenate(feats), np.concatenate([data[s][0] for s in order]))
    assert np.array_equal(np.concatenate(labs), np.concatenate([expert[s] for s in order]))
    with pytest.raises(ValueError, match="expert"):
        store.training_windows({"s0": np.full(7, 5)}, n_experts=3)
    with pytest.raises(KeyError, match="s9"):
        store.training_windows({"s9": np.zeros(3, int)}, n_experts=3)


def test_store_of_an_unknown_format_is_refused(tmp_path):
    import zarr

    from sq_spade.pp._store import STORE_ATTR, STORE_FORMATS

    _store(tmp_path, sizes=(3,))
    root = zarr.open_group(tmp_path / "f.zarr", mode="r+")
    meta = dict(root.attrs[STORE_ATTR])
    assert meta["format"] in STORE_FORMATS
    root.attrs[STORE_ATTR] = {**meta, "format": max(STORE_FORMATS) + 1}
    with pytest.raises(ValueError, match="has format 2; this version reads format 1"):
        FeatureStore(tmp_path / "f.zarr")
