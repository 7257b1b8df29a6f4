"""Expression-prediction accuracy on her2st: ridge, kNN, mclSTExp (frozen Lite0) and SPADE.

Splits (panels chosen on each fold's training sections only; nothing tuned on a test section):

- ``loso``: B4, C2, C3, C4; each held out in turn, trained on the other three. Every method
  trains on all three: ridge and kNN choose their penalty / ``k`` by cross-validation over
  them; mclSTExp and SPADE run with the defaults a user gets (``train_contrastive(train)``,
  ``train_experts(train)``: their small-data recipes choose the epoch count on held-out training
  sections and then refit on all three); all three form the retrieval reference;
- ``patient``: each patient held out in turn (A: A1+A2, downscaled images; B: B4; C: C2-C4),
  trained on the other patients' sections (the last one validates);
- ``a_heldout``: the first fold of ``patient`` alone (train B4, C2, C3, C4; test A1, A2);
- ``mob``: STUtility mouse olfactory bulb, MOB1-3 each held out in turn.

``--control``: every method is also trained on a *shuffled* copy of the training sections
(expression rows permuted within each section, so each section keeps its expression
distribution but loses the image-expression pairing; the retrieval reference is that shuffled
copy too) on the first seed: rows ``<method> (shuffled)``, the floor any real result must clear.

``--tune``: mclSTExp and SPADE choose their settings (a small training grid, ``k``, weighting,
SPADE's reference side) by retrieval ACG on the fold's validation section, trained on the fit
sections with the fit sections as reference (see ``tune_validation.py``); the chosen model then
predicts the test section(s) with all training sections as reference. ``--refit`` adds rows
``mclstexp+refit`` / ``spade+refit``: the chosen configuration retrained on all training
sections for its best validation epoch count (as ridge and kNN, which see all training
sections). Ridge and kNN choose their own penalty / ``k`` by cross-validation over the training
sections in every mode.

Prints per-section ACG / HEG / MSE / MAE and the mean per method. Run:
``.venv/bin/python benchmarks/bench_accuracy.py [--split loso patient mob] [--panel spade|histogene]
[--seeds 0 1 2] [--control] [--epochs-spade N] [--epochs-mcl N] [--threads 1] [--tune [--refit]
[--tune-out scores.csv]] [--out results.csv]``.
"""

from __future__ import annotations

import os

# Set before numpy / torch / sklearn load. On a busy shared 2-core machine, an idle OpenMP
# worker of torch's libgomp was seen spinning at ~90% of a core for the whole run (even with
# torch.set_num_threads(1)), slowing every training several-fold; a passive wait policy stops it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import time
import warnings

import numpy as np
import pandas as pd
from _common import machine
from _data import SPLITS, tables


def shuffled(table, seed):
    """A copy of ``table`` whose expression rows are permuted within each section."""
    out = table.copy()
    rng = np.random.default_rng(seed)
    order = np.arange(out.n_obs)
    for sec in out.obs["section"].unique():
        rows = np.flatnonzero((out.obs["section"] == sec).to_numpy())
        order[rows] = rng.permutation(rows)
    out.X = out.X[order]
    for name in list(out.layers):
        out.layers[name] = out.layers[name][order]
    return out


def run_fold(train_secs, test_secs, *, methods, panel_mode, seed, epochs_spade, epochs_mcl, k, tune=False,
             refit=False, control=False):
    from tune_validation import predict as tuned_predict
    from tune_validation import refit as refit_tuned
    from tune_validation import tune as tune_method

    import sq_spade as sqs

    train = tables(train_secs)
    test = tables(test_secs)
    if panel_mode == "spade":
        panel = sqs.pp.select_genes(train, "spade", n_top=50, train_sections=train_secs, inplace=False)
    else:
        panel = [g for g in sqs.datasets.histogene_genes() if g in train.var_names and g in test.var_names]
    rows, per_gene, timing, chosen = [], [], {}, []

    def record(name, pred, t0):
        res, pg = sqs.tl.evaluate_expression(pred, return_per_gene=True)
        timing[name] = time.perf_counter() - t0
        res.insert(0, "method", name)
        pg.insert(0, "method", name)
        rows.append(res)
        per_gene.append(pg)

    runs = [(m, m, train) for m in methods]
    if control:
        ctrl = shuffled(train, seed)
        runs += [(m, f"{m} (shuffled)", ctrl) for m in methods]
    for method, name, train in runs:
        t0 = time.perf_counter()
        if tune and method in ("spade", "mclstexp") and name == method:
            # chosen on the validation section only; the chosen model is the fold's final model
            tuned = tune_method(method, train, panel, train_secs, seed=seed,
                                epochs=epochs_spade if method == "spade" else epochs_mcl)
            record(method, tuned_predict(test, tuned.model, train, tuned.infer_params), t0)
            chosen.append({"method": method, "train": "+".join(train_secs), "seed": seed,
                           "train_params": tuned.train_params, "infer_params": tuned.infer_params,
                           "val_acg": tuned.val_acg, "scores": tuned.scores})
            if refit:
                # extra rows: the chosen configuration retrained on all training sections
                t1 = time.perf_counter()
                model = refit_tuned(method, train, panel, train_secs, tuned, seed=seed)
                record(f"{method}+refit", tuned_predict(test, model, train, tuned.infer_params), t1)
            continue
        # every method trains on the same sections: all the training sections of the fold
        if method == "spade":
            # what a user gets: train_experts' defaults (its recipe); --epochs-spade overrides the recipe's epochs
            model = sqs.tl.train_experts(train, panel=panel, train_sections=train_secs, seed=seed,
                                         **({} if epochs_spade is None else {"epochs": epochs_spade}))
        elif method == "mclstexp":
            # the default recipe: epochs chosen on the last training section, then refit on all of them
            model = sqs.tl.train_contrastive(train, method="mclstexp", panel=panel, train_sections=train_secs,
                                             seed=seed, **({} if epochs_mcl is None else {"epochs": epochs_mcl}))
        else:
            model = sqs.tl.train_baseline(train, method=method, panel=panel, train_sections=train_secs, seed=seed)
        record(name, sqs.tl.predict_expression(test, model, reference=train, k=min(k, train.n_obs)), t0)
    out = pd.concat(rows, ignore_index=True)
    out["train"] = "+".join(train_secs)
    out["seed"] = seed
    out["n_panel"] = len(panel)
    return out, pd.concat(per_gene, ignore_index=True), timing, chosen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", nargs="+", default=["loso", "patient", "mob"], choices=list(SPLITS))
    ap.add_argument("--methods", nargs="+", default=["ridge", "knn", "mclstexp", "spade"])
    ap.add_argument("--panel", default="spade", choices=["spade", "histogene"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs-spade", type=int, default=None,
                    help="SPADE's epochs (default: the recipe's, as train_experts(sdata) gives)")
    ap.add_argument("--epochs-mcl", type=int, default=None,
                    help="mclSTExp's most epochs (default: the recipe's)")
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--tune", action="store_true", help="choose mclSTExp / SPADE settings on validation")
    ap.add_argument("--refit", action="store_true",
                    help="with --tune, also report the chosen config retrained on all training sections")
    ap.add_argument("--tune-out", default=None, help="CSV of every validation score (with --tune)")
    # one thread: the heads are tiny, and OpenMP barriers on a busy shared 2-core machine made a
    # 2-thread run >10x slower (threads spinning while their partner was descheduled)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--control", action="store_true", help="add shuffled-label controls (first seed)")
    ap.add_argument("--out", default=None, help="CSV of the per-section results")
    ap.add_argument("--per-gene-out", default=None, help="CSV of the per-gene results")
    args = ap.parse_args()
    import torch

    import sq_spade as sqs

    if args.threads:
        torch.set_num_threads(args.threads)

    sqs.settings.progress = False
    warnings.simplefilter("ignore", UserWarning)
    print("machine:", machine())
    print(f"backbone efficientnet_lite0 (frozen, ImageNet), panel {args.panel}, seeds {args.seeds}, "
          + ("k etc. chosen on validation for mclstexp / spade" if args.tune else f"k {args.k}"))
    allres, allgenes, allchosen = [], [], []
    t_start = time.perf_counter()
    for split in args.split:
        for train_secs, test_secs in SPLITS[split]:
            for seed in args.seeds:
                res, pg, timing, chosen = run_fold(train_secs, test_secs, methods=args.methods,
                                                  panel_mode=args.panel, seed=seed, epochs_spade=args.epochs_spade,
                                                  epochs_mcl=args.epochs_mcl, k=args.k, tune=args.tune,
                                                  refit=args.refit, control=args.control and seed == args.seeds[0])
                res.insert(0, "split", split)
                allres.append(res)
                pg.insert(0, "split", split)
                pg["train"] = "+".join(train_secs)
                pg["seed"] = seed
                allgenes.append(pg)
                print(f"[{split}] train {'+'.join(train_secs)} -> test {'+'.join(test_secs)} seed {seed}: "
                      + ", ".join(f"{m} {t:.0f}s" for m, t in timing.items()), flush=True)
                for c in chosen:
                    c["split"] = split
                    print(f"    {c['method']}: chose {c['train_params'] or 'defaults'} {c['infer_params']} "
                          f"(validation ACG {c['val_acg']:.3f} on {train_secs[-1]})", flush=True)
                allchosen.extend(chosen)
    print(f"total {time.perf_counter() - t_start:.0f}s")
    df = pd.concat(allres, ignore_index=True)
    if args.out:
        df.to_csv(args.out, index=False)
    if args.per_gene_out:
        pd.concat(allgenes, ignore_index=True).to_csv(args.per_gene_out, index=False)
    if allchosen:
        _report_tuning(allchosen, args.tune_out)
    cols = ["ACG", "HEG", "MSE", "MAE"]
    with pd.option_context("display.width", 200, "display.max_rows", 200, "display.precision", 3):
        print("\nper held-out section (mean over seeds):")
        print(df.groupby(["split", "section", "method"], sort=False)[cols + ["n_genes"]].mean().round(3).to_string())
        print("\nmean over held-out sections (and seeds):")
        summ = df.groupby(["split", "method"], sort=False)[cols].mean()
        summ["ACG_sd_sections"] = df.groupby(["split", "method"], sort=False)["ACG"].std()
        print(summ.round(3).to_string())
    np.set_printoptions(precision=3)


def _report_tuning(chosen, path) -> None:
    """Print the chosen settings per fold and the validation ACG of each training config."""
    print("\nchosen on validation (validation ACG of the best inference setting per training config):")
    frames = []
    for c in chosen:
        sc = c["scores"].copy()
        for col in ("method", "split", "train", "seed"):
            sc.insert(0, col, c[col])
        frames.append(sc)
        per_cfg = sc.groupby("params", sort=False)["ACG"].max()
        print(f"  [{c['split']}] {c['method']} train {c['train']} seed {c['seed']}: chose "
              f"{c['train_params'] or 'defaults'} {c['infer_params']}; "
              + "; ".join(f"{p} {v:.3f}" for p, v in per_cfg.items()))
    if path:
        pd.concat(frames, ignore_index=True).to_csv(path, index=False)


if __name__ == "__main__":
    main()
