"""The README's main job: SPADE on real her2st tissue, end to end.

``python -m sq_spade.demo --out results`` reads her2st sections C2, C3 and C4 from
``SQ_SPADE_DATA_DIR`` (downloading them from their pinned public origin when the folder lacks
them and the network allows), computes frozen EfficientNet-Lite0 features of 112 um patches,
trains SPADE with ``train_experts`` defaults on C2 and C3, predicts C4's expression from its
H&E image alone, does the same with the k-nearest-neighbour baseline on the same fold and says
which wins, and writes to ``--out``: the metrics table (both methods), a figure of four
well-predicted genes (observed next to predicted on the tissue), the saved model and a patch
montage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from sq_spade import _constants as K
from sq_spade import datasets, io, pl, pp, tl
from sq_spade._utils import atomic_path
from sq_spade._version import __version__
from sq_spade.datasets import DataUnavailableError


def _montage(patches, rows: np.ndarray, ncols: int = 8) -> np.ndarray:
    tiles = [patches[int(i)] for i in rows]
    h = tiles[0].shape[0]
    nrows = int(np.ceil(len(tiles) / ncols))
    canvas = np.full((nrows * (h + 4), ncols * (h + 4), 3), 255, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, ncols)
        canvas[r * (h + 4): r * (h + 4) + h, c * (h + 4): c * (h + 4) + h] = t
    return canvas


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    parser = argparse.ArgumentParser(prog="python -m sq_spade.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="folder for the outputs (default: results)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="SPADE training epochs (default: the small-data recipe's choice)")
    parser.add_argument("--experts", default="auto",
                        help="number of experts (default: auto, sized to the data; 16 is the published count)")
    parser.add_argument("--k", type=int, default=50, help="reference spots retrieved per query (default: 50)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    say(f"sq_spade {__version__}; data folder {datasets.data_dir()}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sections = {s: datasets.her2st(s) for s in ("C2", "C3", "C4")}
    except DataUnavailableError as e:
        print(f"\nThe demo needs the her2st data.\n{e}\n\nExample: export SQ_SPADE_DATA_DIR=/path/to/shared/data",
              file=sys.stderr)
        return 2
    train = io.combine_sections([sections["C2"], sections["C3"]])
    query = sections["C4"]
    for name, sd in (("C2+C3", train), ("C4", query)):
        t = sd.tables[K.TABLES.DEFAULT]
        say(f"{name}: {t.n_obs} spots, {t.n_vars} genes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # her2st is 0.69 um/px: patches are upsampled to 0.5
        for name, sd in (("C2+C3", train), ("C4", query)):
            pp.extract_patches(sd)
            pp.compute_features(sd, backbone="efficientnet_lite0")
            say(f"{name}: EfficientNet-Lite0 features of 112 um patches at 0.5 um/px")
    n_experts = args.experts if args.experts == "auto" else int(args.experts)
    model = tl.train_experts(train, n_top=50, n_experts=n_experts, epochs=args.epochs, seed=0)
    say(f"trained {model} on C2 and C3")
    # the k-NN baseline on the same fold, panel and features
    knn = tl.train_baseline(train, method="knn", panel=model.panel)
    tl.predict_expression(query, knn, reference=train, key_added="predicted_knn")
    knn_metrics = tl.evaluate_expression(query, layer="predicted_knn")
    tl.predict_expression(query, model, reference=train, k=args.k)
    metrics, per_gene = tl.evaluate_expression(query, return_per_gene=True)
    metrics.insert(0, "method", "spade")
    knn_metrics.insert(0, "method", "knn")
    spade_acg, knn_acg = float(metrics["ACG"].iloc[0]), float(knn_metrics["ACG"].iloc[0])
    winner = "SPADE" if spade_acg > knn_acg else ("k-NN" if knn_acg > spade_acg else "neither (a tie)")
    verdict = f"C4 ACG: SPADE {spade_acg:.3f}, k-NN {knn_acg:.3f}: {winner} wins on this fold"
    metrics = pd.concat([metrics, knn_metrics], ignore_index=True)
    for name, df in (("metrics.csv", metrics), ("per_gene.csv", per_gene)):
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=False)
    say("C4 predicted from its image alone by SPADE: " + ", ".join(
        f"{c} {metrics[c].iloc[0]:.3f}" for c in ("ACG", "HEG", "MSE", "MAE")))
    say(verdict)
    best = per_gene.sort_values("pearson_r", ascending=False)["gene"].head(4).tolist()
    fig_path = out / "C4_predicted_vs_observed.png"
    pl.spatial(query, best, ncols=2, save=fig_path, show=False, dpi=110)
    model_path = model.save(out / "spade_model")
    table = query.tables[K.TABLES.DEFAULT]
    order = np.argsort(-table.obs[K.OBS.PATCH_TISSUE].to_numpy())
    pick = order[np.linspace(0, len(order) - 1, 16).astype(int)]
    from PIL import Image

    with atomic_path(out / "C4_patches.png") as tmp:
        Image.fromarray(_montage(pp.patches(query), pick)).save(tmp, format="PNG")
    summary = {"train": "C2 + C3", "query": "C4", "model": repr(model),
               "panel_size": len(model.panel), "metrics": metrics.to_dict(orient="records")[0],
               "knn_metrics": knn_metrics.to_dict(orient="records")[0], "verdict": verdict,
               "best_genes": best, "seconds": round(time.perf_counter() - t0, 1)}
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str))
    say(f"wrote {out / 'metrics.csv'}, {fig_path}, {model_path}/ and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
