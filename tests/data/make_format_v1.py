"""Write tests/data/format_v1: model folders and training checkpoints saved by format 1.

Run once with the code of the commit named in ``format_v1/manifest.json`` (the last commit
before the layering refactor of issue 12)::

    PYTHONPATH=src python tests/data/make_format_v1.py

Each ``<name>/`` is a folder exactly as ``save`` (or a trainer with ``checkpoint_dir``) wrote
it; ``<name>.expected/`` holds the inputs and the outputs the model gave when it was saved, as
``.npy`` files (``allow_pickle=False``). ``tests/test_format_v1.py`` loads every folder with
today's code and checks the outputs are still the same: saved models and checkpoints of the
first format keep loading. Tiny synthetic data and dummy features keep each folder a few KB.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "format_v1"
GENES = [f"gene{i}" for i in range(6)]


def _save(name: str, **arrays: np.ndarray) -> None:
    folder = OUT / f"{name}.expected"
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in arrays.items():
        np.save(folder / f"{key}.npy", np.asarray(value), allow_pickle=False)


def _table():
    import sq_spade as sqs

    sd = sqs.io.combine_sections([sqs.datasets.synthetic_section(section=f"s{i}", seed=i, n_rows=4, n_cols=4,
                                                                  n_genes=10, patient=f"p{i}") for i in range(3)])
    t = sd.tables["table"].copy()
    t.obsm["X_fake"] = np.random.default_rng(0).normal(size=(t.n_obs, 5)).astype(np.float32)
    return t


def spade() -> None:
    import torch

    from sq_spade.models import two_stage_clustering
    from sq_spade.tl._experts import _assemble
    from sq_spade.train import fit_experts

    rng = np.random.default_rng(1)
    feats = rng.normal(size=(40, 5)).astype(np.float32)
    genes = rng.random((40, len(GENES))).astype(np.float32) * 3
    clus = two_stage_clustering(feats[:32], np.repeat(["a", "b"], 16), n_fine=2, n_experts=2, seed=0)
    val_expert = clus.fine_to_expert[torch.cdist(torch.as_tensor(feats[32:]),
                                                 torch.as_tensor(clus.centroids)).argmin(1).numpy()]
    img, gen, history = fit_experts(feats[:32], genes[:32], clus.expert, n_experts=clus.n_experts,
                                    val_features=feats[32:], val_genes=genes[32:], val_expert=val_expert,
                                    epochs=2, batch_size=8, out_dim=4, device="cpu")
    model = _assemble(img, gen, torch.as_tensor(clus.centroids), torch.as_tensor(clus.fine_to_expert), history,
                      backbone="fake", weights_sha256=None, panel=GENES, gene_input="log1p_cp10k", n_fine=2,
                      dropout=0.1, routing_temperature=0.1, reference_side="genes",
                      centroid_groups=clus.centroid_group, train=["a", "b"], val=["c"],
                      params={"epochs": 2, "batch_size": 8, "lr": 1e-4, "weight_decay": 1e-2, "loss": "bleep",
                              "temperature": 1.0, "seed": 0, "n_experts_requested": 2, "group_key": None,
                              "features_key": "X_fake", "patience": None})
    model.config["selection"] = {"validation_acg_genes": 0.5, "validation_acg_images": 0.25}
    model.save(OUT / "spade")
    expert = model.assign(feats)
    _save("spade", features=feats, genes=genes, embed_images=model.embed_images(feats),
          embed_images_hard=model.embed_images(feats, routing="hard"), assign=expert,
          routing_weights=model.routing_weights(feats), embed_genes=model.embed_genes(genes, expert))


def mclstexp() -> None:
    import sq_spade as sqs
    from sq_spade.tl._common import panel_expression
    from sq_spade.tl._contrastive import spot_keys, tile_ids

    t = _table()
    model = sqs.tl.train_contrastive(t, features_key="X_fake", backbone="fake", panel=GENES, epochs=2,
                                     batch_size=16, out_dim=4, heads=2, dim_head=2, context="tile",
                                     position="grid", train_sections=["s0", "s1"], validation_sections=["s2"],
                                     device="cpu")
    model.save(OUT / "mclstexp")
    feats = t.obsm["X_fake"]
    expr, _ = panel_expression(t, GENES, gene_input="log1p_cp10k")
    pos = np.column_stack([t.obs["array_col"], t.obs["array_row"]]).astype(np.int64) % 4
    groups = tile_ids(t, 2)
    # what spot_keys reads from a table: the panel's counts, grid coordinates and sections
    counts = t[:, GENES].X.toarray()
    _save("mclstexp", features=feats, expr=expr, pos=pos, groups=groups, embed_images=model.embed_images(feats),
          embed_spots=model.embed_spots(expr, pos, groups), spot_keys=spot_keys(t, model), counts=counts,
          array_row=t.obs["array_row"].to_numpy(), array_col=t.obs["array_col"].to_numpy(),
          section=t.obs["section"].astype(str).to_numpy().astype(str))


def baselines() -> None:
    import sq_spade as sqs

    t = _table()
    for method, kw in (("ridge", {"n_components": 3, "alphas": [0.1, 1.0, 10.0]}), ("knn", {"k_grid": [2, 4]})):
        model = sqs.tl.train_contrastive(t, method=method, features_key="X_fake", backbone="fake", panel=GENES,
                                         regressor_kwargs=kw, train_sections=["s0", "s1"],
                                         validation_sections=["s2"])
        model.save(OUT / method)
        _save(method, features=t.obsm["X_fake"], predict=model.predict(t.obsm["X_fake"]))


def checkpoints() -> None:
    from sq_spade.train import fit_contrastive, fit_experts

    rng = np.random.default_rng(2)
    feats = rng.normal(size=(30, 5)).astype(np.float32)
    genes = rng.random((30, len(GENES))).astype(np.float32)
    expert = np.arange(30) % 2
    args = dict(n_experts=2, epochs=3, batch_size=8, out_dim=4, device="cpu", patience=2)
    img, gen, history = fit_experts(feats[:24], genes[:24], expert[:24], val_features=feats[24:],
                                    val_genes=genes[24:], val_expert=expert[24:],
                                    checkpoint_dir=OUT / "checkpoint_experts", checkpoint_every=1, **args)
    x = torch_eval(img, feats, expert), torch_eval(gen, genes, expert)
    _save("checkpoint_experts", features=feats, genes=genes, expert=expert, image_out=x[0], gene_out=x[1],
          train_loss=history["train_loss"], val_loss=history["val_loss"])
    pos = rng.integers(0, 3, (30, 2))
    fit = fit_contrastive(feats[:24], genes[:24], pos[:24], "self", val_features=feats[24:], val_expr=genes[24:],
                          val_pos=pos[24:], epochs=3, batch_size=8, out_dim=4, heads=2, dim_head=2, device="cpu",
                          checkpoint_dir=OUT / "checkpoint_contrastive", checkpoint_every=2)
    import torch

    with torch.inference_mode():
        head_out = fit.image_head(torch.as_tensor(feats)).numpy()
        spot_out = fit.spot_encoder(torch.as_tensor(genes), torch.as_tensor(pos), "self").numpy()
    _save("checkpoint_contrastive", features=feats, genes=genes, pos=pos, image_out=head_out, spot_out=spot_out,
          train_loss=fit.history["train_loss"], val_loss=fit.history["val_loss"])


def torch_eval(heads, x, expert):
    import torch

    with torch.inference_mode():
        return heads.forward_assigned(torch.as_tensor(x), torch.as_tensor(expert)).numpy()


def main() -> None:
    import sq_spade as sqs

    sqs.settings.progress = False
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    spade()
    mclstexp()
    baselines()
    checkpoints()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    import torch

    manifest = {"written_by_commit": commit, "sq_spade_version": sqs.__version__, "torch": torch.__version__,
                "numpy": np.__version__, "python": sys.version.split()[0],
                "folders": sorted(p.name for p in OUT.iterdir() if p.is_dir() and not p.name.endswith(".expected"))}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
