"""Choose mclSTExp and SPADE settings on a validation section, never on a test section.

Used by ``bench_accuracy.py --tune``. Inside one fold the training sections are split into fit
sections and one validation section (the fold's ``train_secs[:-1]`` and ``train_secs[-1]``).
Each training configuration of a small grid is trained on the fit sections (the validation
section serves early stopping, as in the untuned benchmark); every inference setting (``k``,
weighting, and for SPADE the reference side and routing temperature) is then scored by
retrieval ACG on the validation section, with the fit sections as the reference. The best
(training, inference) pair is kept. Because the final model of a fold is trained exactly that
way (fit sections, validation for early stopping), the chosen model *is* the final model: it
is not retrained, and only the reference grows to all training sections when the test
section(s) are predicted.

Run on its own it prints the validation grid of every fold (no test section is touched):
``.venv/bin/python benchmarks/tune_validation.py --method mclstexp spade [--seeds 0]
[--grid default|explore] [--threads 2]``.
"""

from __future__ import annotations

import os

# Set before numpy / torch / sklearn load. On a busy shared 2-core machine, an idle OpenMP
# worker of torch's libgomp was seen spinning at ~90% of a core for the whole run (even with
# torch.set_num_threads(1)), slowing every training several-fold; a passive wait policy stops it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

#: Retrieval neighbours tried on validation (the fit reference holds ~360-550 spots).
K_GRID = (20, 50, 100, 200)
#: Retrieval weightings tried on validation.
WEIGHTINGS = ("inverse_sq_l2", "uniform")
#: SPADE routing temperatures tried on validation (inference only; 0.1 is the default).
ROUTING_TEMPERATURES = (0.1,)

# Training grids, defaults first (ties go to the earlier entry); small enough for the whole
# benchmark to run in ~15 min on 2 busy cores. Why these knobs (exploration on validation
# sections only, ``--grid explore``): the heads end in a LayerNorm, so 256-d embeddings have
# norm ~16 and dot products in the hundreds; at temperature 1 the contrastive softmax is
# saturated (BLEEP's soft targets are exactly the identity, so "bleep" and "clip" train
# identically) and the models memorise the few hundred training spots within ~20 epochs.
# A larger temperature softens the logits. SPADE's 16 experts get ~25 spots each here.
MCL_GRID: list[dict[str, Any]] = [
    {},
    {"temperature": 16.0},
    {"temperature": 32.0},
    {"temperature": 64.0},
]
SPADE_GRID: list[dict[str, Any]] = [
    {},
    {"n_experts": 4},
    {"n_experts": 1},
    {"n_experts": 1, "loss": "clip", "temperature": 16.0},
    {"n_experts": 1, "loss": "clip", "temperature": 64.0},
]
#: Wider grids for exploring on validation sections only (``--grid explore``).
EXPLORE: dict[str, list[dict[str, Any]]] = {
    "mclstexp": [
        {},
        {"position": None},
        {"dropout": 0.3, "position": None},
        {"dropout": 0.5, "position": None},
        {"weight_decay": 1e-1, "position": None},
        {"loss": "bleep", "position": None},
        {"lr": 3e-4, "position": None},
        {"context": "tile", "position": None},
    ],
    "spade": [
        {},
        {"n_experts": 1},
        {"n_experts": 2},
        {"n_experts": 4},
        {"n_experts": 8},
        {"n_experts": 4, "dropout": 0.3},
        {"n_experts": 4, "loss": "clip"},
    ],
}
#: Settings every run shares (those of the untuned benchmark).
BASE = {
    "mclstexp": {},
    "spade": {"n_fine": 16, "n_experts": 16},
}


@dataclass
class Tuned:
    """Outcome of :func:`tune` for one method and fold."""

    model: Any
    """The chosen model (trained on the fit sections)."""
    train_params: dict[str, Any]
    """Training settings of the chosen model (beyond :data:`BASE`)."""
    infer_params: dict[str, Any]
    """Inference settings for :func:`sq_spade.tl.predict_expression` (and SPADE config keys)."""
    val_acg: float
    """Validation ACG of the chosen pair."""
    scores: pd.DataFrame = field(repr=False)
    """Every (training, inference) pair scored: ``config, params, k, weighting, ..., ACG, HEG``."""
    seconds: float = 0.0


def subset(table: Any, sections: list[str]) -> Any:
    """Copy of the rows of ``table`` belonging to ``sections``."""
    return table[table.obs["section"].astype(str).isin(sections).to_numpy()].copy()


def train(method: str, table: Any, panel: list[str], fit_secs: list[str], val_secs: list[str], *,
          seed: int, epochs: int | None = None, **params: Any) -> Any:
    """Train ``method`` on ``fit_secs`` with ``val_secs`` for early stopping."""
    import sq_spade as sqs

    kw = {**BASE[method], **params}
    if epochs is not None:
        kw.setdefault("epochs", epochs)
    if method == "spade":
        return sqs.tl.train_experts(table, panel=panel, train_sections=fit_secs, validation_sections=val_secs,
                                    seed=seed, **kw)
    if method == "mclstexp":
        return sqs.tl.train_contrastive(table, method="mclstexp", panel=panel, train_sections=fit_secs,
                                        validation_sections=val_secs, seed=seed, **kw)
    raise ValueError(f"`method` must be 'mclstexp' or 'spade', got {method!r}.")


def inference_grid(method: str, ks: tuple[int, ...] = K_GRID) -> list[dict[str, Any]]:
    """Inference settings scored on validation for a trained model."""
    base = [{"k": k, "weighting": w} for k in ks for w in WEIGHTINGS]
    if method != "spade":
        return base
    return [{**b, "reference_side": s, "routing_temperature": t} for b in base for s in ("images", "genes")
            for t in ROUTING_TEMPERATURES]


def predict(query: Any, model: Any, reference: Any, infer: dict[str, Any]) -> Any:
    """:func:`sq_spade.tl.predict_expression` with the SPADE config keys of ``infer`` applied."""
    import sq_spade as sqs

    for key in ("reference_side", "routing_temperature"):
        if key in infer:
            model.config[key] = infer[key]
    k = min(int(infer.get("k", 200)), reference.n_obs)
    return sqs.tl.predict_expression(query, model, reference=reference, k=k,
                                     weighting=infer.get("weighting", "inverse_sq_l2"))


def score(model: Any, method: str, val_table: Any, fit_table: Any) -> pd.DataFrame:
    """Validation ACG / HEG of every inference setting (reference = the fit sections)."""
    import sq_spade as sqs

    rows = []
    for infer in inference_grid(method):
        res = sqs.tl.evaluate_expression(predict(val_table, model, fit_table, infer))
        rows.append({**infer, "ACG": float(res["ACG"].mean()), "HEG": float(res["HEG"].mean())})
    return pd.DataFrame(rows)


def _best_epoch(model: Any) -> int:
    h = model.config.get("history", {})
    b = h.get("best_epoch", -1)
    return int(np.max(b)) if np.ndim(b) else int(b)


def tune(method: str, train_table: Any, panel: list[str], train_secs: list[str], *, seed: int,
         grid: list[dict[str, Any]] | None = None, epochs: int | None = None) -> Tuned:
    """Grid-search ``method`` on the fold's validation section; return the chosen model.

    ``train_secs[:-1]`` are the fit sections, ``train_secs[-1]`` the validation section.
    Ties (equal validation ACG) go to the earlier configuration, then the earlier inference
    setting, so the grids list the defaults first.
    """
    t0 = time.perf_counter()
    fit_secs, val_secs = list(train_secs[:-1]), [train_secs[-1]]
    grid = (MCL_GRID if method == "mclstexp" else SPADE_GRID) if grid is None else grid
    fit_table, val_table = subset(train_table, fit_secs), subset(train_table, val_secs)
    best: tuple[float, int, dict[str, Any]] | None = None
    best_model, frames = None, []
    for i, params in enumerate(grid):
        t1 = time.perf_counter()
        model = train(method, train_table, panel, fit_secs, val_secs, seed=seed, epochs=epochs, **params)
        fit_s = time.perf_counter() - t1
        sc = score(model, method, val_table, fit_table)
        sc.insert(0, "params", json.dumps(params, sort_keys=True))
        sc.insert(0, "config", i)
        sc["best_epoch"] = _best_epoch(model)
        sc["train_s"] = fit_s
        frames.append(sc)
        j = int(np.nanargmax(sc["ACG"].to_numpy()))  # first maximum: the earlier setting wins ties
        if best is None or sc["ACG"].iloc[j] > best[0]:
            infer = {c: sc[c].iloc[j] for c in inference_grid(method)[0]}
            infer = {c: (v.item() if hasattr(v, "item") else v) for c, v in infer.items()}
            best, best_model = (float(sc["ACG"].iloc[j]), i, infer), model
    if best is None:
        raise ValueError("`grid` must hold at least one configuration.")
    acg, i, infer = best
    model = best_model
    for key in ("reference_side", "routing_temperature"):
        if key in infer:
            model.config[key] = infer[key]
    return Tuned(model=model, train_params=dict(grid[i]), infer_params=infer, val_acg=acg,
                 scores=pd.concat(frames, ignore_index=True), seconds=time.perf_counter() - t0)


def refit(method: str, train_table: Any, panel: list[str], train_secs: list[str], tuned: Tuned, *,
          seed: int) -> Any:
    """Retrain the chosen configuration on all training sections (fit + validation).

    No section is left for early stopping, so the model trains for the number of epochs that
    was best on validation (``best_epoch + 1``; SPADE: the largest over its experts). The
    inference settings chosen on validation are applied to the new model.
    """
    import sq_spade as sqs

    n_epochs = max(_best_epoch(tuned.model), 0) + 1
    kw = {**BASE[method], **tuned.train_params, "epochs": n_epochs}
    if method == "spade":
        model = sqs.tl.train_experts(train_table, panel=panel, train_sections=list(train_secs),
                                     validation_sections=None, seed=seed, **kw)
    else:
        model = sqs.tl.train_contrastive(train_table, method="mclstexp", panel=panel,
                                         train_sections=list(train_secs), validation_sections=None, seed=seed,
                                         **kw)
    for key in ("reference_side", "routing_temperature"):
        if key in tuned.infer_params:
            model.config[key] = tuned.infer_params[key]
    return model


def main() -> None:
    """Print every fold's validation grid (exploration; test sections are never loaded)."""
    import torch
    from _data import SPLITS, tables

    import sq_spade as sqs

    ap = argparse.ArgumentParser()
    ap.add_argument("--method", nargs="+", default=["mclstexp", "spade"], choices=["mclstexp", "spade"])
    ap.add_argument("--grid", default="default", choices=["default", "explore", "json"])
    ap.add_argument("--configs", default=None, help="JSON list of training configs (with --grid json)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--folds", nargs="+", type=int, default=None, help="indices into loso + a_heldout")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="CSV of every validation score")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sqs.settings.progress = False
    warnings.simplefilter("ignore", UserWarning)
    folds = SPLITS["loso"] + SPLITS["a_heldout"]
    chosen = range(len(folds)) if args.folds is None else args.folds
    out = []
    for fi in chosen:
        train_secs, _ = folds[fi]
        table = tables(train_secs)  # training sections only
        panel = sqs.pp.select_genes(table, "spade", n_top=50, train_sections=train_secs, inplace=False)
        for method in args.method:
            if args.grid == "json":
                grid = json.loads(args.configs)
            else:
                grid = EXPLORE[method] if args.grid == "explore" else None
            for seed in args.seeds:
                res = tune(method, table, panel, train_secs, seed=seed, grid=grid)
                sc = res.scores
                sc.insert(0, "seed", seed)
                sc.insert(0, "method", method)
                sc.insert(0, "fold", f"{'+'.join(train_secs[:-1])}|{train_secs[-1]}")
                out.append(sc)
                best = sc.loc[sc.groupby("config")["ACG"].idxmax(),
                              ["config", "params", "k", "weighting", "ACG", "HEG", "best_epoch", "train_s"]
                              + (["reference_side"] if method == "spade" else [])]
                print(f"\n[{method}] fit {'+'.join(train_secs[:-1])} val {train_secs[-1]} seed {seed} "
                      f"({res.seconds:.0f}s): chosen {res.train_params} {res.infer_params} ACG {res.val_acg:.3f}")
                print(best.round(3).to_string(index=False), flush=True)
                if args.out:
                    pd.concat(out, ignore_index=True).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
