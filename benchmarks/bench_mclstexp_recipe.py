"""mclSTExp's small-data recipe against the baselines, the published recipe and a shuffled control.

For every fold of ``loso`` (her2st B4, C2, C3, C4; the HisToGene panel) and ``mob`` (MOB1-3; the
SPADE panel chosen on the training sections), every method trains on the *same* training
sections (all of them):

- ``ridge``, ``knn``: :func:`sq_spade.tl.train_baseline` (penalty / k chosen by
  cross-validation over the training sections);
- ``mclstexp``: :func:`sq_spade.tl.train_contrastive` with its defaults (``recipe="small_data"``:
  the held-out training section rotates over the 5 seeds, the median of their best epochs by
  validation ACG is the epoch count every seed is refit for on all training sections; the
  conformal intervals are calibrated on the held-out sections, pooled);
- ``mclstexp (published)``: ``recipe="published"`` (temperature 1, early stopping on the
  validation loss of the last training section, trained on the others, one seed);
- ``mclstexp (shuffled)``: the defaults on a copy of the training sections whose expression
  rows are permuted within each section (retrieval reference shuffled too): the floor.

Also printed: the realised coverage of the 90 % conformal intervals on each held-out section
(the fraction of (spot, gene) pairs inside), and the training time of the defaults (5 seeds,
selection runs and refit) on her2st C2-C4 (551 spots, frozen features).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_mclstexp_recipe.py [--split loso mob]
[--no-control] [--no-published] [--no-timing] [--folds 0 1] [--out benchmarks/bench_mclstexp_recipe.json]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import time
import warnings

import numpy as np
from _common import ROOT, machine
from _data import SPLITS, tables
from bench_accuracy import shuffled


def _panel(split, train, test, train_secs):
    import sq_spade as sqs

    if split == "mob":
        return sqs.pp.select_genes(train, "spade", n_top=50, train_sections=train_secs, inplace=False)
    return [g for g in sqs.datasets.histogene_genes() if g in train.var_names and g in test.var_names]


def _score(pred) -> dict:
    import sq_spade as sqs

    res = sqs.tl.evaluate_expression(pred, by=None)
    out = {"ACG": float(res["ACG"].iloc[0]), "HEG": float(res["HEG"].iloc[0])}
    if "predicted_lower" in pred.layers:
        genes = pred.var["observed"].to_numpy(bool)
        y = np.asarray(pred.layers["log1p_cp10k"])[:, genes]
        lo, hi = pred.layers["predicted_lower"][:, genes], pred.layers["predicted_upper"][:, genes]
        inside = (lo <= y) & (y <= hi)
        per_gene = inside.mean(axis=0)
        out.update(coverage=float(inside.mean()), coverage_gene_p10=float(np.quantile(per_gene, 0.1)),
                   coverage_gene_p90=float(np.quantile(per_gene, 0.9)),
                   mean_width=float((hi - lo).mean()))
    return out


METHODS = ("ridge", "knn", "mclstexp", "published", "shuffled")


def run_fold(split, train_secs, test_secs, *, seed, control, published, methods=METHODS) -> list[dict]:
    import sq_spade as sqs

    train, test = tables(train_secs), tables(test_secs)
    panel = _panel(split, train, test, train_secs)
    rows = []

    def record(name, model, reference, t0, **extra):
        t_fit = time.perf_counter() - t0
        pred = sqs.tl.predict_expression(test, model, reference=reference, k=min(200, reference.n_obs))
        row = {"split": split, "test": "+".join(test_secs), "train": "+".join(train_secs), "method": name,
               "n_panel": len(panel), "fit_s": round(t_fit, 1), **_score(pred), **extra}
        rows.append(row)
        print("   ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    for method in [m for m in ("ridge", "knn") if m in methods]:
        t0 = time.perf_counter()
        m = sqs.tl.train_baseline(train, method=method, panel=panel, train_sections=train_secs, seed=seed)
        record(method, m, train, t0)
    if "mclstexp" in methods:
        t0 = time.perf_counter()
        m = sqs.tl.train_contrastive(train, panel=panel, train_sections=train_secs, seed=seed)
        sel = m.history.get("selection", {})
        record("mclstexp", m, train, t0, refit_epochs=sel.get("refit_epochs"), best_epochs=sel.get("best_epochs"),
               best_val_acg=sel.get("best_val_acg"), held_out=sel.get("held_out_sections"))
    if published and "published" in methods:
        t0 = time.perf_counter()
        m = sqs.tl.train_contrastive(train, panel=panel, recipe="published", train_sections=train_secs[:-1],
                                     validation_sections=train_secs[-1:], seed=seed)
        record("mclstexp (published)", m, train, t0, best_epoch=int(m.history["best_epoch"]))
    if control and "shuffled" in methods:
        ctrl = shuffled(train, seed)
        t0 = time.perf_counter()
        m = sqs.tl.train_contrastive(ctrl, panel=panel, train_sections=train_secs, seed=seed)
        record("mclstexp (shuffled)", m, ctrl, t0)
    return rows


def time_defaults(sections=("C2", "C3", "C4"), seed: int = 0) -> dict:
    """Seconds to train the defaults (5 seeds, epochs chosen on the rotating held-out section, then
    refit) on about 550 spots (her2st C2-C4, 785 genes), as a user calls them."""
    import sq_spade as sqs

    t = tables(list(sections))
    panel = [g for g in sqs.datasets.histogene_genes() if g in t.var_names]
    t0 = time.perf_counter()
    m = sqs.tl.train_contrastive(t, panel=panel, seed=seed)
    sel = m.history.get("selection", {})
    return {"sections": list(sections), "n_spots": int(t.n_obs), "n_genes": len(panel), "n_seeds": m.n_members,
            "refit_epochs": sel.get("refit_epochs"), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", nargs="+", default=["loso", "mob"], choices=list(SPLITS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-control", action="store_true")
    ap.add_argument("--no-published", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--folds", nargs="+", type=int, default=None, help="fold indices of each split (default: all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "bench_mclstexp_recipe.json"))
    args = ap.parse_args()
    import torch

    import sq_spade as sqs

    torch.set_num_threads(1)
    sqs.settings.progress = False
    warnings.simplefilter("ignore", UserWarning)
    doc = {"machine": machine(), "seed": args.seed, "rows": [], "timing": None,
           "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_mclstexp_recipe.py"}

    def save():
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)

    if not args.no_timing:
        doc["timing"] = time_defaults(seed=args.seed)
        print("timing:", doc["timing"], flush=True)
        save()
    for split in args.split:
        for i, (train_secs, test_secs) in enumerate(SPLITS[split]):
            if args.folds is not None and i not in args.folds:
                continue
            print(f"[{split}] train {'+'.join(train_secs)} -> test {'+'.join(test_secs)}", flush=True)
            doc["rows"] += run_fold(split, train_secs, test_secs, seed=args.seed,
                                    control=not args.no_control and split == "loso",
                                    published=not args.no_published and split == "loso", methods=args.methods)
            save()
    summary = {}
    for split in args.split:
        for method in dict.fromkeys(r["method"] for r in doc["rows"] if r["split"] == split):
            rs = [r for r in doc["rows"] if r["split"] == split and r["method"] == method]
            summary[f"{split} {method}"] = {
                "ACG": round(float(np.mean([r["ACG"] for r in rs])), 4),
                "HEG": round(float(np.mean([r["HEG"] for r in rs])), 4),
                **({"coverage_per_fold": [round(r["coverage"], 3) for r in rs]} if "coverage" in rs[0] else {})}
    doc["summary"] = summary
    save()
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
