"""How time and memory grow with the work: 1, 4 and 16 times a Visium-sized section's spots.

A synthetic section of ``--base`` spots (about one Visium section under tissue) is enlarged
to 4x and 16x the spots (a larger image with the same spot pitch). Each size runs in a fresh
process (so its peak RSS is its own) through: patch extraction of every spot, SPADE training
(two-stage clustering + 16 experts, ``--epochs`` epochs), embedding every spot, mclSTExp
training on frozen features (same epochs), and prediction of one base-sized query section
from the whole enlarged table as retrieval reference. Frozen features are random stand-ins
(1,280-d, clustered by the hidden tissue type): backbone time is linear in spots and measured
on real images by ``bench_features.py``.

Run: ``.venv/bin/python benchmarks/bench_scaling.py [--factors 1 4 16] [--base 3025]
[--epochs 10] [--json out.json]``. Prints figures; asserts nothing.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import math
import sys
from pathlib import Path

from _common import machine, run_child, write_json

CHILD = r"""
import json, sys, time, warnings
import numpy as np
sys.path.insert(0, {bench!r})
from _common import peak_rss_mb
import scanpy, sklearn.cluster, torch  # noqa: F401  (imports are not part of the work timed)
import sq_spade as sqs

warnings.simplefilter("ignore")
sqs.settings.progress = False
side, base_side, epochs = {side}, {base_side}, {epochs}
out = {{}}

def section(name, n_side, seed):
    sd = sqs.datasets.synthetic_section(section=name, n_rows=n_side, n_cols=n_side, pitch_px=40.0,
                                        microns_per_pixel=2.5, spot_diameter_um=55.0, n_genes=200,
                                        n_types=6, seed=seed)
    t = sd.tables["table"]
    rng = np.random.default_rng(seed)
    types = t.obs["tissue_type"].cat.codes.to_numpy() if hasattr(t.obs["tissue_type"], "cat") \
        else np.asarray(t.obs["tissue_type"], dtype=int)
    centres = np.random.default_rng(7).normal(size=(int(types.max()) + 1, 1280)).astype(np.float32)
    t.obsm["X_synthetic"] = centres[types] + rng.normal(scale=2.0, size=(t.n_obs, 1280)).astype(np.float32)
    return sd

t0 = time.perf_counter()
sd = section("big", side, 0)
table = sd.tables["table"]
out["spots"] = int(table.n_obs)
out["build_s"] = time.perf_counter() - t0

t0 = time.perf_counter()
p = sqs.pp.patches(sd, patch_size_um=100, microns_per_pixel=1.0)
for i in range(len(p)):
    p[i]
out["patches_s"] = time.perf_counter() - t0
del p

t0 = time.perf_counter()
spade = sqs.tl.train_experts(table, features_key="X_synthetic", epochs=epochs, seed=0)
out["spade_train_s"] = time.perf_counter() - t0
t0 = time.perf_counter()
sqs.tl.embed(table, spade, features_key="X_synthetic")
out["spade_embed_s"] = time.perf_counter() - t0

t0 = time.perf_counter()
mcl = sqs.tl.train_contrastive(table, method="mclstexp", features_key="X_synthetic", panel=spade.panel,
                               epochs=epochs, patience=None, seed=0)
out["mclstexp_train_s"] = time.perf_counter() - t0

query = section("query", base_side, 1).tables["table"]
t0 = time.perf_counter()
sqs.tl.predict_expression(query, spade, reference=table, features_key="X_synthetic",
                          reference_features_key="X_synthetic")
out["spade_predict_s"] = time.perf_counter() - t0
out["peak_rss_mb"] = peak_rss_mb()
print("RESULT " + json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--factors", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--base", type=int, default=3025, help="spots of the 1x section (a square grid)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    print("machine:", machine())
    base_side = round(math.sqrt(args.base))
    rows = []
    for f in args.factors:
        side = round(base_side * math.sqrt(f))
        code = CHILD.format(bench=str(Path(__file__).parent), side=side, base_side=base_side,
                            epochs=args.epochs)
        try:
            r = run_child(code)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            raise SystemExit(f"scaling run at {f}x failed") from None
        r["factor"] = f
        rows.append(r)
        print(f"{f:3d}x {r['spots']:7,d} spots: patches {r['patches_s']:6.1f} s, SPADE train "
              f"{r['spade_train_s']:6.1f} s ({args.epochs} epochs), embed {r['spade_embed_s']:5.2f} s, "
              f"mclSTExp train {r['mclstexp_train_s']:6.1f} s, predict {base_side ** 2:,} query spots "
              f"{r['spade_predict_s']:5.2f} s, peak RSS {r['peak_rss_mb']:,.0f} MB", flush=True)
    if args.json:
        write_json(args.json, {"machine": machine(), "epochs": args.epochs, "rows": rows})


if __name__ == "__main__":
    main()
