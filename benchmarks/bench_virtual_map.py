"""Virtual expression map versus observed spots, her2st leave one section out.

For each fold of the ``loso`` split (train on three of B4, C2, C3, C4; test on the fourth), ridge
and k-NN are trained on the training spots (Lite0 features, SPADE 50-gene panel). The test
section is then treated as an H&E-only slide: ``detect_tissue`` + ``tile_tissue`` (112 um tiles,
``--stride-um`` apart, 100 um by default: half the spot pitch), and each measured spot is matched
to its nearest tile. The prediction at that tile and the prediction at the spot itself (same
model, same reference) are each correlated with the observed expression (per-gene Pearson r
across the section's spots, mean over the panel). Target: r(tiles) >= 0.9 r(spots).

Only the tiles nearest to a spot are embedded (the others do not enter the metric, and each
tile's prediction depends on its own patch only), which keeps the run CPU-sized.

Run: ``OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_virtual_map.py
[--stride-um 100] [--json out.json]``. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
from _common import DATA_DIR, machine, write_json
from _data import SPLITS, tables


def _mean_r(obs: np.ndarray, pred: np.ndarray) -> float:
    from sq_spade._metrics import gene_correlations

    return float(np.nanmean(gene_correlations(pred, obs)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stride-um", type=float, default=100.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    import sq_spade as sqs
    from sq_spade.io._sections import get_sections, spot_centers_um

    sqs.settings.progress = False
    sqs.settings.data_dir = DATA_DIR
    warnings.simplefilter("ignore")
    print("machine:", machine())
    rows = []
    for train_secs, (test_sec,) in SPLITS["loso"]:
        t0 = time.perf_counter()
        train = tables(train_secs)
        test = tables([test_sec])
        panel = sqs.pp.select_genes(train, "spade", n_top=50, train_sections=train_secs, inplace=False)
        common = [g for g in panel if g in test.var_names]  # panel genes the test section measured
        obs = test[:, common].copy()
        sqs.pp.normalize(obs)
        y = obs.layers["log1p_cp10k"]
        y = y.toarray() if sp.issparse(y) else np.asarray(y)
        # the same section as an H&E-only slide: tiles over its tissue
        sd = sqs.datasets.her2st(test_sec)
        n_tiles = sqs.pp.tile_tissue(sd, tile_um=112, stride_um=args.stride_um)
        (spots,) = get_sections(sd)
        (tiles,) = get_sections(sd, table_key="tiles")
        xy_spots, _ = spot_centers_um(sd, spots)
        xy_tiles, _ = spot_centers_um(sd, tiles, table_key="tiles")
        dist, nearest = cKDTree(xy_tiles).query(xy_spots)
        # spot order of `test` (tables() keeps each section's table order)
        assert list(test.obs_names) == list(sd.tables["table"].obs_names)
        used = np.unique(nearest)
        sub = sd.tables["tiles"][used].copy()
        del sd.tables["tiles"]
        sd.tables["tiles"] = sub
        sqs.pp.compute_features(sd, backbone="efficientnet_lite0", table_key="tiles")
        pos = np.searchsorted(used, nearest)  # row of each spot's nearest tile in the embedded tiles
        for method in ("ridge", "knn"):
            model = sqs.tl.train_baseline(train, method=method, panel=panel, train_sections=train_secs)
            p_spot = np.asarray(sqs.tl.predict_expression(test, model, reference=train)[:, common]
                                .layers["predicted"])
            p_tile = np.asarray(sqs.tl.predict_expression(sd, model, reference=train, table_key="tiles")[:, common]
                                .layers["predicted"])[pos]
            r_spot, r_tile = _mean_r(y, p_spot), _mean_r(y, p_tile)
            rows.append({"test": test_sec, "method": method, "r_spots": r_spot, "r_tiles": r_tile,
                         "ratio": r_tile / r_spot, "n_spots": test.n_obs, "n_tiles": n_tiles,
                         "n_tiles_embedded": len(used), "median_offset_um": float(np.median(dist))})
        print(f"{test_sec}: {n_tiles} tiles ({len(used)} nearest a spot, median offset {np.median(dist):.0f} um); "
              + "; ".join(f"{r['method']} r spots {r['r_spots']:.3f} tiles {r['r_tiles']:.3f} ratio {r['ratio']:.3f}"
                          for r in rows[-2:]) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    res = pd.DataFrame(rows)
    summary = res.groupby("method")[["r_spots", "r_tiles"]].mean()
    summary["ratio"] = summary["r_tiles"] / summary["r_spots"]
    print(res.round(3).to_string(index=False))
    print("mean over folds:\n" + summary.round(3).to_string())
    if args.json:
        write_json(args.json, {"machine": machine(), "stride_um": args.stride_um, "rows": res.to_dict(orient="records"),
                               "summary": summary.reset_index().to_dict(orient="records")})


if __name__ == "__main__":
    main()
