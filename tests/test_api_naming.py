"""One API dialect, the scanpy/squidpy one, checked on every public function's signature.

- the first argument is ``sdata`` for SpatialData-or-AnnData inputs (``adata`` where only an
  AnnData is accepted);
- every output key is ``key_added``; ``table_key`` defaults to ``"table"`` everywhere and the
  predictions table is found through ``predictions_key``;
- seeds are ``seed`` (never ``random_state``) and default to ``sqs.settings.seed``;
- old names are gone from the signatures but keep working for one release (``FutureWarning``).
"""

from __future__ import annotations

import inspect
import logging
import warnings

import numpy as np
import pytest

import sq_spade as sqs
from sq_spade import _constants as K

NAMESPACES = ("pp", "tl", "pl", "io")
#: Public functions whose first argument is not a dataset (readers, result tables, stores...).
NOT_DATA_FIRST = {
    "pp.register_backbone", "pl.gene_correlation", "pl.training_history", "tl.train_experts_from_store",
    "io.combine_sections", "io.infer_microns_per_pixel", "io.read_hest", "io.read_rgb", "io.read_st",
    "io.read_visium", "io.section_from_arrays", "io.from_spatialdata", "tl.spade_retrieve",
    "io.read_wsi", "tl.domain_scores", "tl.export_bag",
}
#: Names of the older dialects; none may appear in a public signature.
OLD_NAMES = {"data", "query", "layer_added", "table_added", "predicted_layer", "random_state", "mpp"}
#: Every rename, by function: (old, new).
RENAMES = {
    "tl.predict_expression": {"query": "sdata", "layer_added": "key_added", "table_added": "predictions_key"},
    "tl.evaluate_expression": {"data": "sdata", "predicted_layer": "layer", "table_key": "predictions_key"},
    "tl.few_shot": {"data": "sdata"},
    "pp.normalize": {"data": "sdata", "layer_added": "key_added"},
    "pp.select_genes": {"data": "sdata"},
    "pp.write_feature_store": {"data": "sdata"},
    "pp.compute_features": {"mpp": "microns_per_pixel"},
    "pp.extract_patches": {"mpp": "microns_per_pixel"},
    "pp.detect_tissue": {"mpp": "microns_per_pixel"},
    "pp.patches": {"mpp": "microns_per_pixel"},
    "pl.spatial": {"genes": "color"},
    "pl.experts": {"key": "color"},
    "pl.embedding": {"random_state": "seed"},
}
#: Functions with ``copy=`` (scanpy's: work on a copy and return it).
COPY = {"pp.normalize", "pp.compute_features", "tl.embed", "tl.predict_expression"}


def public_functions():
    out = []
    for ns in NAMESPACES:
        mod = getattr(sqs, ns)
        for name in mod.__all__:
            fn = getattr(mod, name)
            if inspect.isfunction(fn):
                out.append((f"{ns}.{name}", fn))
    return out


FUNCTIONS = public_functions()
IDS = [n for n, _ in FUNCTIONS]


def test_the_introspection_sees_the_api():
    names = set(IDS)
    assert {"tl.predict_expression", "tl.evaluate_expression", "pp.normalize", "pl.spatial", "pl.embedding",
            "pp.compute_features", "tl.train_experts", "io.get_sections"} <= names
    assert set(RENAMES) <= names and COPY <= names


@pytest.mark.parametrize(("name", "fn"), FUNCTIONS, ids=IDS)
def test_first_argument_is_sdata_or_adata(name, fn):
    if name in NOT_DATA_FIRST:
        return
    first = next(iter(inspect.signature(fn).parameters.values()))
    ann = str(first.annotation)
    if "SpatialData" in ann:
        assert first.name == "sdata", f"{name}: first argument {first.name!r}, expected 'sdata' ({ann})"
    else:
        assert "AnnData" in ann, f"{name}: first argument {first.name!r} is neither SpatialData nor AnnData ({ann})"
        assert first.name == "adata", f"{name}: first argument {first.name!r}, expected 'adata' ({ann})"


@pytest.mark.parametrize(("name", "fn"), FUNCTIONS, ids=IDS)
def test_one_dialect_of_keys_and_seeds(name, fn):
    params = inspect.signature(fn).parameters
    old = OLD_NAMES & set(params)
    assert not old, f"{name} still has the old argument names {sorted(old)}"
    added = [p for p in params if p.endswith("_added")]
    assert added in ([], ["key_added"]), f"{name}: output keys {added}, expected only 'key_added'"
    if "table_key" in params:
        assert params["table_key"].default == K.TABLES.DEFAULT, f"{name}: table_key defaults to " \
                                                                 f"{params['table_key'].default!r}"
    if "predictions_key" in params:
        assert params["predictions_key"].default == K.TABLES.PREDICTED
    if "seed" in params and name.split(".")[0] in ("tl", "pl"):
        assert params["seed"].default is None, f"{name}: seed must default to None (sqs.settings.seed)"
    if name in COPY:
        assert params["copy"].default is False, f"{name} lacks copy=False"
    if name in RENAMES:
        declared = getattr(fn, "__renamed_arguments__", {})
        assert declared == RENAMES[name], f"{name}: renames {declared}, expected {RENAMES[name]}"
        for new in RENAMES[name].values():
            assert new in params, f"{name}: the new name {new!r} is not in the signature"


def test_every_rename_is_declared_in_the_table_above():
    declared = {n: fn.__renamed_arguments__ for n, fn in FUNCTIONS if getattr(fn, "__renamed_arguments__", None)}
    assert declared == RENAMES


# --- old names keep working, with a FutureWarning -------------------------------------------------


def _future(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    future = [w for w in rec if issubclass(w.category, FutureWarning)]
    return out, [str(w.message) for w in future]


def test_old_names_work_with_a_future_warning():
    sd = sqs.datasets.synthetic_section(n_rows=3, n_cols=3)
    _, msgs = _future(sqs.pp.normalize, data=sd, layer_added="norm")
    assert "norm" in sd.tables["table"].layers
    assert any("`data` of sqs.pp.normalize is renamed `sdata`" in m for m in msgs)
    assert any("`layer_added`" in m and "`key_added`" in m for m in msgs)
    p, msgs = _future(sqs.pp.patches, sd, patch_size_um=16, mpp=1.0)
    assert p.geometry.patch_px == 16 and any("microns_per_pixel" in m for m in msgs)
    with pytest.raises(TypeError, match="pass `sdata` only"):
        sqs.pp.normalize(sdata=sd, data=sd)
    # the new names raise no warning
    _, msgs = _future(sqs.pp.normalize, sdata=sd, key_added="norm2")
    assert msgs == []


def test_evaluate_and_predict_accept_their_old_names():
    import anndata as ad

    rng = np.random.default_rng(0)
    pred = ad.AnnData(X=rng.normal(size=(20, 3)).astype(np.float32))
    pred.layers["predicted"] = pred.X.copy()
    pred.layers["log1p_cp10k"] = pred.X + rng.normal(scale=0.1, size=pred.X.shape).astype(np.float32)
    pred.obs["section"] = "s"
    new = sqs.tl.evaluate_expression(pred, layer="predicted")
    old, msgs = _future(sqs.tl.evaluate_expression, data=pred, predicted_layer="predicted")
    assert old.equals(new) and len(msgs) == 2


# --- copy= and settings.seed ----------------------------------------------------------------------


def test_copy_returns_a_new_object_and_leaves_the_input_alone():
    sd = sqs.datasets.synthetic_section(n_rows=3, n_cols=3)
    out = sqs.pp.normalize(sd, copy=True)
    assert out is not sd and "log1p_cp10k" in out.tables["table"].layers
    assert "log1p_cp10k" not in sd.tables["table"].layers
    assert out.images[next(iter(out.images))] is sd.images[next(iter(sd.images))]  # images shared, not copied
    adata = sd.tables["table"]
    out = sqs.pp.normalize(adata, copy=True)
    assert "log1p_cp10k" in out.layers and "log1p_cp10k" not in adata.layers
    assert sqs.pp.normalize(sd) is None


def test_settings_seed_is_the_default_seed():
    import anndata as ad

    rng = np.random.default_rng(1)
    adata = ad.AnnData(X=np.zeros((60, 1), np.float32))
    adata.obs["label"] = np.repeat(["a", "b", "c"], 20)
    adata.obsm["X_e"] = rng.normal(size=(60, 4)) + np.repeat(np.eye(3, 4), 20, axis=0)
    kw = {"label_key": "label", "embedding_keys": ["X_e"], "shots": (1,), "n_repeats": 3, "summarize": False}
    seed_5 = sqs.tl.few_shot(adata, seed=5, **kw)
    old = sqs.settings.seed
    try:
        sqs.settings.seed = 5
        default = sqs.tl.few_shot(adata, **kw)
    finally:
        sqs.settings.seed = old
    seed_0 = sqs.tl.few_shot(adata, seed=0, **kw)
    col = "balanced_accuracy"
    np.testing.assert_array_equal(default[col], seed_5[col])
    assert not np.array_equal(seed_0[col], seed_5[col])


# --- logging --------------------------------------------------------------------------------------


def test_info_logs_say_what_was_written_where(caplog):
    sd = sqs.datasets.synthetic_section(n_rows=3, n_cols=3)
    old = sqs.settings.verbosity
    try:
        sqs.settings.verbosity = 2
        with caplog.at_level(logging.INFO, logger="sq_spade"):
            sqs.pp.normalize(sd)
        assert any("layers['log1p_cp10k']" in r.getMessage() for r in caplog.records)
        caplog.clear()
        sqs.settings.verbosity = 1
        sqs.pp.normalize(sd)
        assert not [r for r in caplog.records if r.name == "sq_spade" and r.levelno == logging.INFO]
    finally:
        sqs.settings.verbosity = old
    with pytest.raises(ValueError, match="verbosity"):
        sqs.settings.verbosity = 7


def test_warnings_of_renamed_functions_point_at_the_callers_line():
    sd = sqs.datasets.synthetic_section(n_rows=2, n_cols=2)
    with pytest.warns(UserWarning, match="upsampled") as rec:
        sqs.pp.patches(sd, patch_size_um=16, microns_per_pixel=0.25)
    assert {w.filename for w in rec if "upsampled" in str(w.message)} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user's filters still apply
        with pytest.raises(UserWarning, match="upsampled"):
            sqs.pp.patches(sd, patch_size_um=16, microns_per_pixel=0.25)
