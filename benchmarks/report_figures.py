"""Figures of one held-out section for the results page, drawn with ``sq_spade.pl``.

Leave-one-section-out fold "C4": SPADE (16 experts, defaults) trained on B4 and C2 with C3 for
validation, reference B4 + C2 + C3, C4 predicted from its H&E alone. Writes to ``--out``:
``spatial_C4.png`` (observed next to predicted for C4's four best-predicted genes),
``experts_C4.png`` (each spot's expert on the tissue), ``embedding.png`` (UMAP of the SPADE
embedding of all four sections), ``history.png`` (SPADE's training and validation loss) and
``figures.json`` (the genes drawn and their Pearson r).

Run: ``.venv/bin/python benchmarks/report_figures.py --out docs/_static/results``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import warnings
from pathlib import Path

from _common import DATA_DIR, machine, write_json
from _data import CACHE


def _with_cached_features(sd, section: str) -> None:
    """Put the accuracy benchmark's cached Lite0 features into the section's table."""
    import numpy as np

    import sq_spade as sqs

    path = CACHE / f"{section}_efficientnet_lite0.npy"
    if path.exists():
        sd.tables["table"].obsm["X_efficientnet_lite0"] = np.load(path, allow_pickle=False)
        sd.tables["table"].uns["sq_spade_features"] = {"X_efficientnet_lite0": {"backbone": "efficientnet_lite0"}}
    else:
        sqs.pp.compute_features(sd, backbone="efficientnet_lite0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/_static/results")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import sq_spade as sqs

    sqs.settings.progress = False
    sqs.settings.data_dir = DATA_DIR
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("machine:", machine())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        secs = {s: sqs.datasets.her2st(s) for s in ("B4", "C2", "C3", "C4")}
        for s, sd in secs.items():
            _with_cached_features(sd, s)
        train = sqs.io.combine_sections([secs["B4"], secs["C2"], secs["C3"]])
        query = secs["C4"]
        model = sqs.tl.train_experts(train, train_sections=["B4", "C2"], validation_sections=["C3"],
                                     seed=args.seed)
        sqs.tl.predict_expression(query, model, reference=train)
        _, per_gene = sqs.tl.evaluate_expression(query, return_per_gene=True)
        best = per_gene.sort_values("pearson_r", ascending=False).head(4)
        genes = best["gene"].tolist()
        sqs.pl.spatial(query, genes, ncols=4, save=out / "spatial_C4.png", show=False, dpi=110)
        sqs.tl.embed(query, model)
        sqs.pl.experts(query, save=out / "experts_C4.png", show=False, dpi=110)
        sqs.tl.embed(train, model)
        both = sqs.io.combine_sections([train, query])
        sqs.pl.embedding(both, color=["section"], save=out / "embedding.png", show=False, dpi=110)
        sqs.pl.training_history(model, save=out / "history.png", show=False, dpi=110)
    write_json(out / "figures.json", {"fold": "train B4+C2 (C3 validation) -> test C4", "seed": args.seed,
                                      "genes": genes, "pearson_r": best["pearson_r"].round(3).tolist(),
                                      "model": repr(model)})
    print("wrote", ", ".join(sorted(p.name for p in out.glob("*.png"))))


if __name__ == "__main__":
    main()
