"""SPADE as users call it: ``train_experts`` defaults against k-NN on the same folds (issue 13).

For every fold of the splits (her2st ``loso``: B4, C2, C3, C4; ``mob``: MOB1-3), both methods
train on *all* the fold's training sections with their defaults (no validation section, no
tuning: what ``sqs.tl.train_experts(train)`` gives), and predict the held-out section from its
image: SPADE by expert-consistent retrieval from the training spots (``k=200``, the default), k-NN from the
frozen Lite0 features. Optional: the A1 few-shot probe (``X_spade`` of a default model trained
on B4, C2-C4 vs the raw Lite0 features), the published mixture (``n_experts=16``) as an extra,
labelled row, and the speed of 16 experts x 100 epochs x 10,000 synthetic spots and of
predicting 10,000 query spots against 10,000 reference spots.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_spade_defaults.py [--splits loso mob]
[--seeds 0 1] [--published] [--few-shot] [--speed] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
from _common import machine, write_json
from _data import SPLITS, tables

FEATURES = "X_efficientnet_lite0"


def accuracy(split: str, seeds: list[int], published: bool, k: int) -> pd.DataFrame:
    import sq_spade as sqs

    rows = []
    for train_secs, test_secs in SPLITS[split]:
        train, test = tables(train_secs), tables(test_secs)
        panel = sqs.pp.select_genes(train, "spade", n_top=50, train_sections=train_secs, inplace=False)
        for seed in seeds:
            runs = {"knn": ("baseline", {"method": "knn"}), "spade (defaults)": ("spade", {})}
            if published:
                runs["spade (16 experts, published lr 1e-4, alignment none)"] = (
                    "spade", {"n_experts": 16, "lr": 1e-4, "alignment": "none"})
            for name, (kind, kw) in runs.items():
                t0 = time.perf_counter()
                trainer = sqs.tl.train_baseline if kind == "baseline" else sqs.tl.train_experts
                model = trainer(train, panel=panel, seed=seed, **kw)
                pred = sqs.tl.predict_expression(test, model, reference=train, k=min(k, train.n_obs))
                res = sqs.tl.evaluate_expression(pred, by=None)
                extra = {}
                if hasattr(model, "n_experts"):
                    sel = model.config["selection"] or {}
                    extra = {"n_experts": model.n_experts, "reference_side": model.config["reference_side"],
                             "n_members": model.n_members, "refit_epochs": sel.get("refit_epochs"),
                             "best_epochs": sel.get("best_epochs")}
                rows.append({"split": split, "test": "+".join(test_secs), "seed": seed, "method": name,
                             "ACG": float(res["ACG"].iloc[0]), "HEG": float(res["HEG"].iloc[0]),
                             "seconds": round(time.perf_counter() - t0, 1), **extra})
                print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def few_shot(seed: int) -> pd.DataFrame:
    import sq_spade as sqs

    train = tables(["B4", "C2", "C3", "C4"])
    a1 = tables(["A1"])
    labels = sqs.datasets.her2st_labels("A1")
    a1.obs["label"] = pd.Categorical(labels.reindex(a1.obs["spot_id"].astype(str)).to_numpy())
    model = sqs.tl.train_experts(train, seed=seed)
    sqs.tl.embed(a1, model)
    return sqs.tl.few_shot(a1, label_key="label", embedding_keys=["X_spade", FEATURES], shots=(4, 16),
                           n_repeats=20, seed=seed)


def speed() -> dict:
    import sq_spade as sqs
    from sq_spade.tl._experts import spade_retrieve
    from sq_spade.train import fit_experts

    rng = np.random.default_rng(0)
    n, d, g = 10_000, 1280, 250
    f = rng.normal(size=(n, d)).astype(np.float32)
    e = rng.normal(size=(n, g)).astype(np.float32)
    ex = rng.integers(0, 16, n)
    t0 = time.perf_counter()
    img, gene, _ = fit_experts(f, e, ex, n_experts=16, epochs=100, device="cpu", lr=1e-3)
    train_s = time.perf_counter() - t0
    import torch

    from sq_spade.models._spade import Spade
    from sq_spade.nn.experts import MixtureOfExperts

    cents = torch.as_tensor(np.stack([f[ex == i].mean(0) for i in range(16)]))
    cfg = {"backbone": "synthetic", "feature_dim": d, "panel": [f"g{i}" for i in range(g)],
           "gene_input": "log1p_cp10k", "n_experts": 16, "n_fine": 16, "out_dim": 256, "dropout": 0.1,
           "routing_temperature": 0.1, "reference_side": "genes"}
    model = Spade(MixtureOfExperts(img, gene, cents, torch.arange(16)), cfg)
    q = rng.normal(size=(n, d)).astype(np.float32)
    t0 = time.perf_counter()
    spade_retrieve(model, q, f, e, reference_genes=e, k=50)
    predict_s = time.perf_counter() - t0
    del sqs
    return {"train_16x100x10000_s": round(train_s, 1), "predict_10000x10000_s": round(predict_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", nargs="*", default=["loso", "mob"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--k", type=int, default=200, help="neighbours retrieved (predict_expression's default)")
    ap.add_argument("--published", action="store_true", help="also the published 16-expert mixture (a labelled row)")
    ap.add_argument("--few-shot", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import sq_spade as sqs

    sqs.settings.progress = False
    warnings.simplefilter("ignore", UserWarning)
    print("machine:", machine())
    out: dict = {"machine": machine(), "seeds": args.seeds, "k": args.k}
    if args.speed:
        out["speed"] = speed()
        print(out["speed"], flush=True)
    frames = [accuracy(s, args.seeds, args.published, args.k) for s in args.splits]
    if frames:
        acc = pd.concat(frames, ignore_index=True)
        summary = acc.groupby(["split", "method"])[["ACG", "HEG"]].mean().round(3)
        with pd.option_context("display.width", 200):
            print(acc.round(3).to_string(index=False))
            print(summary.to_string())
        out["accuracy"] = acc.to_dict(orient="records")
        out["summary"] = summary.reset_index().to_dict(orient="records")
    if args.few_shot:
        fs = few_shot(args.seeds[0])
        with pd.option_context("display.width", 200):
            print(fs.round(3).to_string(index=False))
        out["few_shot"] = fs.to_dict(orient="records")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
