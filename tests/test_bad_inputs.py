"""One matrix of bad inputs across io, pp, tl and pl: a fitting exception whose message names the
argument, and the user's object left as it was (no half-written obsm/layers/uns)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

import sq_spade as sqs
from sq_spade import _constants as K

GENES = [f"gene{i}" for i in range(8)]


def _section(**kw):
    return sqs.datasets.synthetic_section(n_rows=4, n_cols=4, **kw)


@pytest.fixture(scope="module")
def trained():
    sd = sqs.io.combine_sections([_section(section="s0", seed=0), _section(section="s1", seed=1)])
    t = sd.tables["table"]
    t.obsm["X_fake"] = np.random.default_rng(0).normal(size=(t.n_obs, 6)).astype(np.float32)
    model = sqs.tl.train_experts(sd, features_key="X_fake", backbone="fake", panel=GENES, n_fine=2, n_experts=2,
                                 epochs=1, train_sections=["s0"])
    return sd, model


def _snapshot(sd):
    out = {}
    for name, t in sd.tables.items():
        out[name] = (tuple(t.obs.columns), tuple(sorted(t.obsm)), tuple(sorted(t.layers)), tuple(sorted(t.uns)),
                     t.shape)
    return out


def _arrays(**over):
    kw = dict(genes=["a", "b"], spot_ids=["1", "2"], centers_px=np.array([[10.0, 10.0], [20.0, 20.0]]),
              image=np.full((40, 40, 3), 200, np.uint8), section="x", microns_per_pixel=1.0, spot_diameter_um=55.0)
    counts = over.pop("counts", np.ones((2, 2)))
    kw.update(over)
    return lambda: sqs.io.section_from_arrays(counts, **kw)


IO_CASES = [
    ("nan counts", _arrays(counts=np.array([[np.nan, 1], [1, 1]])), ValueError, "counts"),
    ("negative counts", _arrays(counts=-np.ones((2, 2))), ValueError, "counts"),
    ("duplicate genes", _arrays(genes=["a", "a"]), ValueError, "genes"),
    ("duplicate spots", _arrays(spot_ids=["1", "1"]), ValueError, "spot_ids"),
    ("all spots outside", _arrays(centers_px=np.array([[500.0, 500], [600, 600]])), ValueError, "outside"),
    ("empty table", _arrays(counts=np.ones((0, 2)), spot_ids=[], centers_px=np.zeros((0, 2))), ValueError, "no spots"),
    ("grayscale image", _arrays(image=np.zeros((40, 40), np.uint8)), ValueError, "grayscale"),
    ("RGBA image", _arrays(image=np.zeros((40, 40, 4), np.uint8)), ValueError, "RGBA"),
    ("uint16 image", _arrays(image=np.zeros((40, 40, 3), np.uint16)), ValueError, "uint16"),
    ("zero pixel size", _arrays(microns_per_pixel=0.0), ValueError, "microns_per_pixel"),
    ("bad centres", _arrays(centers_px=np.zeros((3, 2))), ValueError, "centers_px"),
    ("combine nothing", lambda: sqs.io.combine_sections([]), ValueError, "sdatas"),
    ("combine bad join", lambda: sqs.io.combine_sections([_section()], join="left"), ValueError, "join"),
    ("unknown dataset section", lambda: sqs.datasets.her2st("Z1"), ValueError, "section"),
    ("hest without files", lambda: sqs.io.read_hest("X"), ValueError, "root"),
]


@pytest.mark.parametrize(("name", "call", "exc", "match"), IO_CASES, ids=[c[0] for c in IO_CASES])
def test_io_bad_inputs(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _set_X(t, X):
    t.X = sp.csr_matrix(X)


PP_CASES = [
    ("wrong image key", lambda sd: sqs.pp.extract_patches(sd, image_key="nope"), KeyError, "image_key"),
    ("wrong table key", lambda sd: sqs.pp.extract_patches(sd, table_key="nope"), KeyError, "table_key"),
    ("patch px zero", lambda sd: sqs.pp.extract_patches(sd, patch_px=0), ValueError, "patch_px"),
    ("panel without overlap", lambda sd: sqs.pp.select_genes(sd, ["nope1", "nope2"]), ValueError, "genes of `method`"),
    ("unknown panel method", lambda sd: sqs.pp.select_genes(sd, "best"), ValueError, "method"),
    ("unknown train section", lambda sd: sqs.pp.select_genes(sd, "heg", train_sections=["zz"]), ValueError,
     "train_sections"),
    ("non-integer counts", lambda sd: (_set_X(sd.tables["table"], sd.tables["table"].X.toarray() + 0.5),
                                       sqs.pp.normalize(sd)), ValueError, "integer"),
    ("negative target sum", lambda sd: sqs.pp.normalize(sd, target_sum=-1.0), ValueError, "target_sum"),
    ("unknown backbone", lambda sd: sqs.pp.compute_features(sd, backbone="nope"), KeyError, "nope"),
    ("zero batch size", lambda sd: sqs.pp.compute_features(sd, backbone="dummy", batch_size=0), ValueError,
     "batch_size"),
    ("panel column missing", lambda sd: sqs.pp.normalize(sd, panel="nope"), KeyError, "panel"),
]


@pytest.mark.parametrize(("name", "call", "exc", "match"), PP_CASES, ids=[c[0] for c in PP_CASES])
def test_pp_bad_inputs_leave_object_unchanged(name, call, exc, match):
    sd = _section()
    before = _snapshot(sd)
    with pytest.raises(exc, match=match):
        call(sd)
    after = _snapshot(sd)
    # the non-integer case modified X itself (the test's own doing); only the written keys matter
    assert {k: v[:4] for k, v in after.items()} == {k: v[:4] for k, v in before.items()}


def _other_backbone(sd, model):
    sd.tables["table"].uns[K.FEATURES_UNS] = {"X_fake": {"backbone": "resnet50"}}
    return sqs.tl.embed(sd, model, features_key="X_fake")


TL_CASES = [
    ("features of another backbone", _other_backbone, ValueError, "resnet50"),
    ("n_fine zero", lambda sd, m: sqs.tl.train_experts(sd, features_key="X_fake", backbone="fake", panel=GENES,
                                                       n_fine=0), ValueError, "n_fine"),
    ("no training section", lambda sd, m: sqs.tl.train_experts(sd, features_key="X_fake", backbone="fake",
                                                               panel=GENES, validation_sections=["s0", "s1"]),
     ValueError, "training section"),
    ("unknown loss", lambda sd, m: sqs.tl.train_experts(sd, features_key="X_fake", backbone="fake", panel=GENES,
                                                        loss="mse"), ValueError, "loss"),
    ("k above reference", lambda sd, m: sqs.tl.predict_expression(sd, m, reference=sd, k=10_000), ValueError, "k"),
    ("not a model", lambda sd, m: sqs.tl.predict_expression(sd, object(), reference=sd), TypeError, "model"),
    ("unknown weighting", lambda sd, m: sqs.tl.predict_expression(sd, m, reference=sd, weighting="max"),
     ValueError, "weighting"),
    ("missing reference", lambda sd, m: sqs.tl.predict_expression(sd, m, k=3), ValueError, "reference"),
    ("evaluate unknown layer", lambda sd, m: sqs.tl.evaluate_expression(sd, predictions_key="table"), KeyError,
     "`layer="),
    ("embed a non-model", lambda sd, m: sqs.tl.embed(sd, "model"), TypeError, "model"),
    ("embed bad routing", lambda sd, m: sqs.tl.embed(sd, m, routing="top1"), ValueError, "routing"),
    ("few-shot missing labels", lambda sd, m: sqs.tl.few_shot(sd, label_key="nope", embedding_keys=["X_fake"]),
     KeyError, "label_key"),
    ("few-shot bad embedding", lambda sd, m: sqs.tl.few_shot(sd, label_key="tissue_type", embedding_keys=["X_no"]),
     KeyError, "embedding_keys"),
    ("cross-validate unknown method", lambda sd, m: sqs.tl.cross_validate(sd, method="svm"), ValueError, "method"),
    ("contrastive unknown method", lambda sd, m: sqs.tl.train_contrastive(sd, method="svm"), ValueError, "method"),
]


@pytest.mark.parametrize(("name", "call", "exc", "match"), TL_CASES, ids=[c[0] for c in TL_CASES])
def test_tl_bad_inputs_leave_object_unchanged(trained, name, call, exc, match):
    sd, model = trained
    t = sd.tables["table"]
    uns_before = dict(t.uns)
    before = _snapshot(sd)
    with pytest.raises(exc, match=match):
        call(sd, model)
    t.uns.clear()
    t.uns.update(uns_before)  # the backbone case set provenance itself
    assert _snapshot(sd) == before


def test_model_file_from_a_newer_format_is_refused(trained, tmp_path):
    _, model = trained
    model.save(tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    doc["format_version"] += 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(sqs.models.ModelFileError, match="newer"):
        sqs.models.Spade.load(tmp_path / "m")


PL_CASES = [
    ("unknown gene", lambda sd: sqs.pl.spatial(sd, ["nope"], predictions_key=None, layer="log1p_cp10k",
                                               compare=False, show=False), KeyError, "nope"),
    ("unknown section", lambda sd: sqs.pl.spatial(sd, ["gene0"], predictions_key=None, layer="log1p_cp10k",
                                                  compare=False, section="zz", show=False), (KeyError, ValueError),
     "section"),
    ("unknown layer", lambda sd: sqs.pl.spatial(sd, ["gene0"], table_key="table", layer="nope", compare=False,
                                                show=False), KeyError, "layer"),
    ("experts without experts", lambda sd: sqs.pl.experts(sd, show=False), KeyError, "spade_expert"),
]


@pytest.mark.parametrize(("name", "call", "exc", "match"), PL_CASES, ids=[c[0] for c in PL_CASES])
def test_pl_bad_inputs(name, call, exc, match):
    sd = _section()
    sqs.pp.normalize(sd)
    before = _snapshot(sd)
    with pytest.raises(exc, match=match):
        call(sd)
    assert _snapshot(sd) == before


def test_matrix_is_large_enough():
    assert len(IO_CASES) + len(PP_CASES) + len(TL_CASES) + len(PL_CASES) + 1 >= 30
