"""Spatial domains on her2st A1 against the pathologist labels: ARI and NMI per representation.

Models are trained on B4, C2, C3, C4 (another two patients) with their defaults (what
`train_*(sdata)` gives) on Lite0 features and the SPADE 50-gene panel, then A1 (held out, patient A) is clustered by
``sqs.tl.spatial_domains`` (k-means, ``n_domains`` = the number of labelled classes, 20 PCs)
from each representation:

- observed expression (log1p CP10k of the panel genes A1 measured, the assay's own measurement);
- predicted expression of ridge, k-NN, SPADE and mclSTExp (``predict_expression``, reference =
  the training sections);
- raw Lite0 features; SPADE's and mclSTExp's image embeddings;

without and with spatial smoothing (``smooth=2`` rounds over 6 neighbours), scored by
``sqs.tl.domain_scores`` against the labels (spots labelled "undetermined" left out) with the
shuffled-label floor (mean and 95th percentile of 200 permutations).

Run: ``OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_domains.py [--seed 0]
[--no-neural] [--json out.json]``. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
from _common import machine, write_json
from _data import tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-neural", action="store_true", help="skip SPADE and mclSTExp (CPU time)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import sq_spade as sqs

    sqs.settings.progress = False
    warnings.simplefilter("ignore")
    print("machine:", machine())
    t0 = time.perf_counter()
    train = tables(["B4", "C2", "C3", "C4"])
    a1 = tables(["A1"])
    labels = sqs.datasets.her2st_labels("A1")
    truth = labels.reindex(a1.obs["spot_id"].astype(str)).astype(object)
    truth[truth == "undetermined"] = None
    a1.obs["label"] = pd.Categorical(truth.to_numpy())
    n_classes = int(a1.obs["label"].nunique())
    panel = sqs.pp.select_genes(train, "spade", n_top=50, train_sections=["B4", "C2", "C3", "C4"], inplace=False)
    reps: dict[str, np.ndarray] = {}
    obs = a1[:, [g for g in panel if g in a1.var_names]].copy()  # the panel genes A1 measured
    sqs.pp.normalize(obs)
    y = obs.layers["log1p_cp10k"]
    reps["observed expression"] = np.asarray(y.toarray() if hasattr(y, "toarray") else y)
    reps["raw features (Lite0)"] = a1.obsm["X_efficientnet_lite0"]
    rows = []

    def score(names):  # print as they come: the neural models take the longest
        for name in names:
            for smooth in (0, 2):
                a = a1.copy()
                a.obsm["X_rep"] = np.asarray(reps[name], dtype=np.float64)
                sqs.tl.spatial_domains(a, use="X_rep", n_domains=n_classes, smooth=smooth, seed=args.seed)
                sc = sqs.tl.domain_scores(a.obs["label"], a.obs["domain"], n_shuffles=200, seed=args.seed)
                rows.append({"representation": name, "smooth": smooth, **sc})
                print(f"{name}, smooth {smooth}: ARI {sc['ari']:.3f} NMI {sc['nmi']:.3f} (shuffled ARI "
                      f"{sc['ari_shuffled']:.3f}, p95 {sc['ari_shuffled_p95']:.3f}; NMI {sc['nmi_shuffled']:.3f}, "
                      f"p95 {sc['nmi_shuffled_p95']:.3f})", flush=True)

    models = {m: sqs.tl.train_baseline(train, method=m, panel=panel, train_sections=["B4", "C2", "C3", "C4"],
                                       seed=args.seed) for m in ("ridge", "knn")}
    for name, model in models.items():
        pred = sqs.tl.predict_expression(a1, model, reference=train, k=min(200, train.n_obs))
        reps[f"predicted ({name})"] = np.asarray(pred.layers["predicted"])
    score(list(reps))
    if not args.no_neural:
        # what a user gets: the defaults, trained on all four sections (the recipes validate internally)
        spade = sqs.tl.train_experts(train, panel=panel, train_sections=["B4", "C2", "C3", "C4"], seed=args.seed)
        q = a1.copy()
        sqs.tl.embed(q, spade)
        reps["embedding (SPADE)"] = q.obsm["X_spade"]
        reps["predicted (spade)"] = np.asarray(
            sqs.tl.predict_expression(a1, spade, reference=train, k=min(200, train.n_obs)).layers["predicted"])
        score(["predicted (spade)", "embedding (SPADE)"])
        mcl = sqs.tl.train_contrastive(train, method="mclstexp", panel=panel, train_sections=["B4", "C2", "C3", "C4"],
                                       seed=args.seed)
        reps["embedding (mclSTExp)"] = mcl.embed_images(a1.obsm["X_efficientnet_lite0"])
        reps["predicted (mclstexp)"] = np.asarray(
            sqs.tl.predict_expression(a1, mcl, reference=train, k=min(200, train.n_obs)).layers["predicted"])
        score(["predicted (mclstexp)", "embedding (mclSTExp)"])
    res = pd.DataFrame(rows)
    print(f"A1: {int(a1.obs['label'].notna().sum())} labelled spots, {n_classes} classes "
          f"{a1.obs['label'].value_counts().to_dict()}; panel {len(panel)} genes; {time.perf_counter() - t0:.0f} s")
    with pd.option_context("display.width", 200):
        print(res[["representation", "smooth", "ari", "nmi", "ari_shuffled", "ari_shuffled_p95", "nmi_shuffled",
                   "nmi_shuffled_p95"]].round(3).to_string(index=False))
    if args.json:
        write_json(args.json, {"machine": machine(), "seed": args.seed, "n_classes": n_classes,
                               "rows": res.to_dict(orient="records")})


if __name__ == "__main__":
    main()
