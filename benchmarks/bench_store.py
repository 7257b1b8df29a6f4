"""Feature store at HEST-1k scale: write rate, then streaming spots/s and peak RSS under a budget.

Builds a synthetic :class:`sq_spade.pp.FeatureStore` of ~300 sections x ~3,300 spots (about 1M
spots; 1280-d float16 features, a 300-gene float32 panel of zero-inflated log1p expression:
about 2.6 GB of features on disk), section by section as a real build would (one section in
memory at a time), and reports the write rate. A fresh subprocess then streams the store with
``FeatureStore.iter_windows`` under a 1 GiB budget (without and with prefetch), touching every
value, and reports spots/s and its peak RSS (``VmHWM``, see ``_common.peak_rss_mb``) next to its
RSS after imports.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_store.py [--sections 300] [--spots 3300]
[--dim 1280] [--genes 300] [--budget-mb 1024] [--scale 1.0] [--workdir /tmp/sq_spade_store] [--keep]
[--train-epochs 1]``. With ``--train-epochs`` (default 1) a third subprocess trains SPADE from the store
with ``sq_spade.tl.train_experts_from_store`` under the same budget: clustering section by section,
then the experts window by window; it reports the time and the peak RSS.
``--scale`` shrinks the number of sections (it is lowered automatically when the disk is short).
The store just written sits in the page cache when memory allows: read rates are then those of
memory, not of the disk. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _common import machine, run_child  # noqa: E402

HERE = Path(__file__).resolve().parent

BUILD_CHILD = r"""
import json, sys, time, numpy as np
sys.path.insert(0, {bench!r})
from _common import peak_rss_mb
from sq_spade.pp import FeatureStore

n_sec, n_spots, dim, n_genes, path = {sections}, {spots}, {dim}, {genes}, {path!r}
genes = [f"g{{i}}" for i in range(n_genes)]
store = FeatureStore.create(path, genes=genes, dim=dim, backbone="efficientnet_lite0",
                            weights_sha256="0" * 64, dtype="float16", chunk_rows=4096)
rng = np.random.default_rng(0)
t_gen = t_write = 0.0
total = 0
for s in range(n_sec):
    t = time.perf_counter()
    n = int(n_spots * rng.uniform(0.7, 1.3))  # sections differ in size, as HEST's do
    feats = np.abs(rng.standard_normal((n, dim), dtype=np.float32))  # post-ReLU-like features
    counts = rng.poisson(rng.gamma(0.5, 1.0, size=n_genes), size=(n, n_genes)).astype(np.float32)
    lib = np.maximum(counts.sum(1, keepdims=True), 1)
    expr = np.log1p(counts / lib * 1e4)
    ids = [f"sec{{s:04d}}_{{i}}" for i in range(n)]
    t_gen += time.perf_counter() - t
    t = time.perf_counter()
    store.write_section(f"sec{{s:04d}}", feats, expr, ids, provenance={{"synthetic": True}})
    t_write += time.perf_counter() - t
    total += n
print("RESULT", json.dumps({{"spots": total, "write_s": t_write, "generate_s": t_gen,
                            "write_peak_rss_mb": peak_rss_mb()}}))
"""

STREAM_CHILD = r"""
import json, sys, time, numpy as np, psutil
sys.path.insert(0, {bench!r})
from _common import peak_rss_mb
from sq_spade.pp import FeatureStore
store = FeatureStore({path!r})
base = psutil.Process().memory_info().rss / 2**20
t = time.perf_counter()
plan = store.plan_windows(store.window_bytes({budget}), shuffle=True, seed=0)
t_plan = time.perf_counter() - t
t = time.perf_counter()
n = 0
acc = 0.0
biggest = 0
for w in store.iter_windows({budget}, shuffle=True, seed=0, prefetch={prefetch}):
    acc += float(w.features.sum(dtype=np.float64)) + float(w.expression.sum(dtype=np.float64))  # touch it all
    n += w.n_spots
    biggest = max(biggest, w.nbytes)
dt = time.perf_counter() - t
print("RESULT", json.dumps({{"spots": n, "windows": len(plan), "plan_s": t_plan, "stream_s": dt,
                            "spots_per_s": n / dt, "rss_after_open_mb": base, "peak_rss_mb": peak_rss_mb(),
                            "largest_window_mb": biggest / 2**20}}))
"""

TRAIN_CHILD = r"""
import json, sys, time, warnings, numpy as np, psutil
sys.path.insert(0, {bench!r})
from _common import peak_rss_mb
import torch
import sq_spade as sqs
from sq_spade.pp import FeatureStore
warnings.simplefilter("ignore")
sqs.settings.progress = False
torch.set_num_threads({threads})
store = FeatureStore({path!r})
n = sum(store.n_spots().values())
base = psutil.Process().memory_info().rss / 2**20
t = time.perf_counter()
model = sqs.tl.train_experts_from_store(store, n_fine=16, n_experts=16, epochs={epochs}, memory_budget_bytes={budget},
                                        seed=0, device="cpu")
dt = time.perf_counter() - t
print("RESULT", json.dumps({{"spots": n, "epochs": {epochs}, "train_s": dt, "rss_after_open_mb": base,
                            "peak_rss_mb": peak_rss_mb(), "n_experts": model.n_experts}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", type=int, default=300)
    ap.add_argument("--spots", type=int, default=3300, help="mean spots per section (each 0.7x to 1.3x)")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--genes", type=int, default=300)
    ap.add_argument("--budget-mb", type=float, default=1024)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of --sections to build")
    ap.add_argument("--workdir", default="/tmp/sq_spade_store")
    ap.add_argument("--keep", action="store_true", help="keep the store (reused by the next run)")
    ap.add_argument("--train-epochs", type=int, default=1,
                    help="then train SPADE from the store (tl.train_experts_from_store) for this many epochs; 0: skip")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sections = max(1, int(round(args.sections * args.scale)))
    need = sections * args.spots * (2 * args.dim + 4 * args.genes)
    free = shutil.disk_usage(work).free
    if need * 1.5 > free:  # keep a margin for the rest of the machine
        sections = max(1, int(sections * free / (1.5 * need)))
        print(f"disk: {free / 1e9:.1f} GB free under {work}, {need / 1e9:.1f} GB needed: scaled down to "
              f"{sections} sections")
    print("machine:", machine())
    path = work / f"store_{sections}x{args.spots}x{args.dim}.zarr"
    if not path.exists():
        b = run_child(BUILD_CHILD.format(bench=str(HERE), sections=sections, spots=args.spots, dim=args.dim,
                                     genes=args.genes, path=str(path)))
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"write: {b['spots']:,} spots in {sections} sections, {size / 1e9:.2f} GB on disk, in "
              f"{b['write_s']:.0f} s = {b['spots'] / b['write_s']:,.0f} spots/s, {size / 1e6 / b['write_s']:,.0f} MB/s "
              f"(+{b['generate_s']:.0f} s generating the data); writer peak RSS {b['write_peak_rss_mb']:,.0f} MB")
    budget = int(args.budget_mb * 2**20)
    rows = []
    for prefetch in (False, True):
        r = run_child(STREAM_CHILD.format(bench=str(HERE), path=str(path), budget=budget, prefetch=prefetch))
        r["prefetch"] = prefetch
        rows.append(r)
        print(f"stream (budget {args.budget_mb:,.0f} MiB, prefetch={prefetch}): {r['spots']:,} spots in "
              f"{r['windows']} windows (largest {r['largest_window_mb']:,.0f} MiB), {r['stream_s']:.1f} s = "
              f"{r['spots_per_s']:,.0f} spots/s; peak RSS {r['peak_rss_mb']:,.0f} MB (after imports + open "
              f"{r['rss_after_open_mb']:,.0f} MB; +{r['peak_rss_mb'] - r['rss_after_open_mb']:,.0f} MB); "
              f"planning {r['plan_s']:.1f} s")
    if args.train_epochs:
        r = run_child(TRAIN_CHILD.format(bench=str(HERE), path=str(path), budget=budget, epochs=args.train_epochs,
                                     threads=args.threads))
        print(f"train SPADE from the store (16 fine centroids per section, 16 experts, {r['epochs']} epoch(s), "
              f"budget {args.budget_mb:,.0f} MiB): {r['spots']:,} spots, clustering + training {r['train_s']:.0f} s = "
              f"{r['spots'] * r['epochs'] / r['train_s']:,.0f} spot-epochs/s; peak RSS {r['peak_rss_mb']:,.0f} MB "
              f"(after imports + open {r['rss_after_open_mb']:,.0f} MB)")
        r["train"] = True
        rows.append(r)
    if not args.keep:
        shutil.rmtree(path)
    print("JSON", json.dumps(rows))


if __name__ == "__main__":
    main()
