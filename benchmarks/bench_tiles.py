"""Tiles versus spots on the same zarr-backed slide: tile rate, spot-patch rate, peak memory.

The synthetic H&E-like slides of ``bench_big_slide.py`` (white glass around an elliptical
tissue, 0.5 um/px, spots on a grid) are written to zarr once. A fresh subprocess per slide then
times, on the same image and with the same patches (112 um at 0.5 um/px) and backbone (``dummy``):

- tiles: ``detect_tissue`` + ``tile_tissue`` + ``compute_features(table_key="tiles")``, all
  included in the tile rate (tiles/s), with a stride that gives about as many tiles as spots;
- spots (after the tiles): ``compute_features`` over the spots' patches (patches/s);

and reports the ratio of the two rates (target: at least 0.9) and the peak RSS (``VmHWM``),
next to the RSS after imports and opening the store. On the 40,000 px slide the level is larger
than ``settings.memory_budget_bytes`` and read window by window; ``--tile-stride-um`` there
bounds the number of tiles (memory does not depend on it).

Run: ``OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_tiles.py [--sizes 10000 40000]
[--spots 2500] [--stride-40k 448] [--workdir /tmp/sq_spade_big_slide] [--keep]``.
Prints figures; asserts nothing.
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
from bench_big_slide import BUILD_CHILD, CHUNK, MPP  # noqa: E402

HERE = Path(__file__).resolve().parent

MEASURE_CHILD = r"""
import json, sys, time, warnings, numpy as np, psutil
sys.path.insert(0, {bench!r})
from _common import peak_rss_mb
import spatialdata, torch
import sq_spade as sqs
sqs.settings.progress = False
sqs.settings.cache_dir = None
sqs.settings.memory_budget_bytes = {budget}
torch.set_num_threads(1)
warnings.simplefilter("ignore")
sd = spatialdata.read_zarr({path!r})
res = {{"rss_after_open_mb": psutil.Process().memory_info().rss / 2**20}}
def spots():
    t = time.perf_counter()
    sqs.pp.compute_features(sd, backbone="dummy", batch_size=64, device="cpu", num_workers=0,
                            patch_size_um=112, mpp=0.5, cache=False)
    dt = time.perf_counter() - t
    n = sd.tables["table"].n_obs
    res.update(n_spots=n, spots_s=dt, spots_per_s=n / dt)
t = time.perf_counter()
sqs.pp.detect_tissue(sd)
res["detect_s"] = time.perf_counter() - t
n = sqs.pp.tile_tissue(sd, tile_um=112, stride_um={stride})
res["tile_s"] = time.perf_counter() - t
sqs.pp.compute_features(sd, backbone="dummy", batch_size=64, device="cpu", num_workers=0, table_key="tiles",
                        cache=False)
dt = time.perf_counter() - t
res.update(n_tiles=n, tiles_s=dt, tiles_per_s=n / dt, peak_rss_mb=peak_rss_mb(),
           tissue_fraction=float(sd.labels["big_tissue"].attrs["sq_spade_tissue"]["fraction"]))
if {spots_too}:  # after the tiles: the page cache then favours the spots, not the tiles
    spots()
print("RESULT", json.dumps(res))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000])
    ap.add_argument("--spots", type=int, default=2500)
    ap.add_argument("--stride-10k", type=float, default=84.0,
                    help="tile stride (um) up to 10,000 px (84 um: about as many tiles as spots, so both pay the "
                         "same fixed costs over the same number of patches)")
    ap.add_argument("--stride-40k", type=float, default=448.0, help="tile stride (um) on slides above 10,000 px")
    ap.add_argument("--budget-mb", type=float, default=2048)
    ap.add_argument("--workdir", default="/tmp/sq_spade_big_slide")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    budget = int(args.budget_mb * 2**20)
    print("machine:", machine())
    rows = []
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for side in args.sizes:
        path = work / f"slide_{side}.zarr"
        if not path.exists():
            b = run_child(BUILD_CHILD.format(bench=str(HERE), side=side, chunk=CHUNK, spots=args.spots,
                                             path=str(path), mpp=MPP), env=env)
            print(f"{side:,} px: wrote levels {b['levels']} in {b['write_s']:.0f} s")
        big = side > 10_000
        stride = args.stride_40k if big else args.stride_10k
        r = run_child(MEASURE_CHILD.format(bench=str(HERE), path=str(path), budget=budget, stride=stride,
                                           spots_too=not big), env=env)
        r.update(side=side, stride_um=stride, level_mb=side * side * 3 / 2**20)
        rows.append(r)
        line = (f"{side:,} px (level 0 = {r['level_mb']:,.0f} MiB): {r['n_tiles']} tiles of 112 um, stride "
                f"{stride:g} um (tissue {r['tissue_fraction']:.2f} of the slide): detect {r['detect_s']:.1f} s, "
                f"tile {r['tile_s']:.1f} s, tiles+features {r['tiles_per_s']:,.1f} tiles/s; peak RSS "
                f"{r['peak_rss_mb']:,.0f} MB (after open {r['rss_after_open_mb']:,.0f} MB)")
        if "spots_per_s" in r:
            line += (f"; spots: {r['n_spots']} patches, {r['spots_per_s']:,.1f} patches/s; "
                     f"tile rate / spot rate = {r['tiles_per_s'] / r['spots_per_s']:.3f}")
        print(line, flush=True)
        if not args.keep:
            shutil.rmtree(path)
    print("JSON", json.dumps(rows))


if __name__ == "__main__":
    main()
