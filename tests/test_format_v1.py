"""Models and training checkpoints saved in format 1 (before the issue-12 refactor) still load.

The folders under ``tests/data/format_v1`` were written by ``tests/data/make_format_v1.py``
with the commit named in their ``manifest.json``; next to each, ``<name>.expected/`` holds the
inputs and the outputs the model gave when it was saved. Loading them with today's code must
give the same outputs, and the checkpoints must resume to the same weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sq_spade as sqs

V1 = Path(__file__).resolve().parent / "data" / "format_v1"
GENES = [f"gene{i}" for i in range(6)]


def expected(name: str) -> dict[str, np.ndarray]:
    folder = V1 / f"{name}.expected"
    return {p.stem: np.load(p, allow_pickle=False) for p in sorted(folder.glob("*.npy"))}


def saved_config(name: str) -> dict:
    doc = json.loads((V1 / name / "config.json").read_text())
    assert doc["format_version"] == 1
    return doc["config"]


def same(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_manifest_lists_every_folder():
    manifest = json.loads((V1 / "manifest.json").read_text())
    assert manifest["folders"] == ["checkpoint_contrastive", "checkpoint_experts", "knn", "mclstexp", "ridge", "spade"]
    for name in manifest["folders"]:
        assert (V1 / name / "config.json").is_file() and (V1 / f"{name}.expected").is_dir()


def test_spade_v1_loads_and_embeds_as_saved():
    e = expected("spade")
    model = sqs.models.Spade.load(V1 / "spade")
    same(model.embed_images(e["features"]), e["embed_images"])
    same(model.embed_images(e["features"], routing="hard"), e["embed_images_hard"])
    same(model.routing_weights(e["features"]), e["routing_weights"])
    assert np.array_equal(model.assign(e["features"]), e["assign"])
    same(model.embed_genes(e["genes"], e["assign"]), e["embed_genes"])
    cfg = saved_config("spade")
    assert model.panel == GENES and model.backbone == "fake" and model.n_experts == 2
    assert model.n_members == 1 and "n_members" not in cfg  # saved before ensembles: one member
    for key in ("reference_side", "routing_temperature", "gene_input", "selection", "centroid_groups", "params"):
        assert model.config[key] == cfg[key]
    assert model.history["train_loss"] == cfg["history"]["train_loss"]


def _table(e: dict[str, np.ndarray]) -> ad.AnnData:
    obs = pd.DataFrame({"section": pd.Categorical(e["section"]), "array_row": e["array_row"],
                        "array_col": e["array_col"]}, index=[f"spot{i}" for i in range(len(e["section"]))])
    return ad.AnnData(X=sp.csr_matrix(e["counts"].astype(np.float32)), obs=obs, var=pd.DataFrame(index=GENES))


def test_mclstexp_v1_loads_and_embeds_as_saved():
    from sq_spade.tl._contrastive import spot_keys

    e = expected("mclstexp")
    model = sqs.models.MclSTExp.load(V1 / "mclstexp")
    assert not model.finetuned and model.context == "tile" and model.position == "grid"
    same(model.embed_images(e["features"]), e["embed_images"])
    same(model.embed_spots(e["expr"], e["pos"], e["groups"]), e["embed_spots"])
    same(spot_keys(_table(e), model), e["spot_keys"])
    cfg = saved_config("mclstexp")
    for key in ("n_x", "n_y", "tile_size", "out_dim", "spot_encoder", "params", "train_sections"):
        assert model.config[key] == cfg[key]


@pytest.mark.parametrize("name", ["ridge", "knn"])
def test_baselines_v1_load_and_predict_as_saved(name):
    e = expected(name)
    cls = sqs.models.RidgeModel if name == "ridge" else sqs.models.KNNModel
    model = cls.load(V1 / name)
    same(model.predict(e["features"]), e["predict"])
    assert model.panel == GENES and model.config["regressor"] == saved_config(name)["regressor"]
    # the fitted model predicts from features alone, through the public API too
    t = ad.AnnData(X=sp.csr_matrix((len(e["features"]), len(GENES)), dtype=np.float32),
                   var=pd.DataFrame(index=GENES), obsm={"X_fake": e["features"]})
    pred = sqs.tl.predict_expression(t, model, features_key="X_fake")
    same(pred.layers["predicted"], e["predict"])


def test_checkpoint_experts_v1_reads_and_resumes(tmp_path):
    from sq_spade.train import fit_experts, read_checkpoint

    e = expected("checkpoint_experts")
    info = read_checkpoint(V1 / "checkpoint_experts")
    assert (info["kind"], info["epoch"], info["finished"]) == ("fit_experts", 3, True)
    same(info["history"]["train_loss"], e["train_loss"])
    folder = shutil.copytree(V1 / "checkpoint_experts", tmp_path / "ckpt")
    f, g, x = e["features"], e["genes"], e["expert"]
    img, gen, hist = fit_experts(f[:24], g[:24], x[:24], val_features=f[24:], val_genes=g[24:], val_expert=x[24:],
                                 n_experts=2, epochs=3, batch_size=8, out_dim=4, device="cpu", patience=2,
                                 checkpoint_dir=folder, checkpoint_every=1, resume=True)
    import torch

    with torch.inference_mode():
        same(img.forward_assigned(torch.as_tensor(f), torch.as_tensor(x)).numpy(), e["image_out"])
        same(gen.forward_assigned(torch.as_tensor(g), torch.as_tensor(x)).numpy(), e["gene_out"])
    same(hist["train_loss"], e["train_loss"])
    np.testing.assert_array_equal(np.isnan(hist["val_loss"]), np.isnan(e["val_loss"]))


def test_checkpoint_contrastive_v1_reads_and_resumes(tmp_path):
    import torch

    from sq_spade.train import fit_contrastive, read_checkpoint

    e = expected("checkpoint_contrastive")
    info = read_checkpoint(V1 / "checkpoint_contrastive")
    assert (info["kind"], info["epoch"], info["finished"]) == ("fit_contrastive", 3, True)
    folder = shutil.copytree(V1 / "checkpoint_contrastive", tmp_path / "ckpt")
    f, g, p = e["features"], e["genes"], e["pos"]
    fit = fit_contrastive(f[:24], g[:24], p[:24], "self", val_features=f[24:], val_expr=g[24:], val_pos=p[24:],
                          epochs=3, batch_size=8, out_dim=4, heads=2, dim_head=2, device="cpu",
                          checkpoint_dir=folder, checkpoint_every=2, resume=True)
    with torch.inference_mode():
        same(fit.image_head(torch.as_tensor(f)).numpy(), e["image_out"])
        same(fit.spot_encoder(torch.as_tensor(g), torch.as_tensor(p), "self").numpy(), e["spot_out"])
    same(fit.history["train_loss"], e["train_loss"])


def test_each_format_version_has_its_reader_and_newer_ones_are_refused(tmp_path):
    from sq_spade._files import FORMAT_VERSION, FORMATS
    from sq_spade.pp._store import STORE_FORMAT, STORE_FORMATS
    from sq_spade.train import CheckpointError, read_checkpoint
    from sq_spade.train._checkpoint import CHECKPOINT_FORMATS, CHECKPOINT_VERSION

    assert FORMAT_VERSION in FORMATS and CHECKPOINT_VERSION in CHECKPOINT_FORMATS and STORE_FORMAT in STORE_FORMATS
    model = shutil.copytree(V1 / "ridge", tmp_path / "ridge")
    doc = json.loads((model / "config.json").read_text())
    for version, match in ((FORMAT_VERSION + 1, "newer than this sq_spade reads"), (0, "not a model-file format")):
        (model / "config.json").write_text(json.dumps({**doc, "format_version": version}))
        with pytest.raises(sqs.models.ModelFileError, match=match):
            sqs.models.RidgeModel.load(model)
    ckpt = shutil.copytree(V1 / "checkpoint_experts", tmp_path / "ckpt")
    doc = json.loads((ckpt / "config.json").read_text())
    doc["config"]["checkpoint_version"] = CHECKPOINT_VERSION + 1
    (ckpt / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="checkpoint format 2, newer"):
        read_checkpoint(ckpt)
