"""Tiles versus spots on the same zarr-backed slide: tile rate, spot-patch rate, peak memory.

The synthetic H&E-like slides of ``bench_big_slide.py`` (white glass around an elliptical
tissue, 0.5 um/px, spots on a grid) are written to zarr once. A fresh subprocess per slide then
times, on the same image and with the same patches (112 um at 0.5 um/px) and backbone (``dummy``):

- tiles: ``detect_tissue`` + ``tile_tissue`` + ``compute_features(table_key="tiles")``, all
  included in the tile rate (tiles/s), with a stride that gives about as many tiles as spots;
- spots: ``compute_features`` over the spots' patches (patches/s), in a fresh process of its
  own (``--same-process``: in the tiles' process, after them);

and reports the ratio of the two rates (target: at least 0.9) and the peak RSS (``VmHWM``),
next to the RSS after imports and opening the store. Up to 10,000 px each path runs
``--repeat`` times, alternated, and the median rates are reported (a run lasts a few seconds,
so load from other jobs on a shared machine moves single runs by tens of percent). Slides above 10,000 px are written as an
uncompressed tiled pyramidal TIFF (tile by tile, drawn at every level; 4.8 GB at 40,000 px) and
opened with ``sqs.io.read_wsi``: tissue detection reads the file's coarse level, and the tiles'
patches are read window by window from level 0 (larger than ``settings.memory_budget_bytes``);
``--stride-40k`` bounds the number of tiles there (memory does not depend on it).

Run: ``OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_tiles.py [--sizes 10000 40000]
[--spots 2500] [--stride-40k 448] [--workdir /tmp/sq_spade_big_slide] [--keep] [--repeat 5]
[--same-process]``.
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

import numpy as np  # noqa: E402
from _common import machine, run_child  # noqa: E402
from bench_big_slide import BUILD_CHILD, CHUNK, MPP  # noqa: E402

HERE = Path(__file__).resolve().parent

# A big slide as a tiled, uncompressed pyramidal TIFF written tile by tile (never whole in memory):
# H&E-like tiles inside an ellipse, glass outside, every level drawn directly at its own size.
BUILD_TIFF_CHILD = r"""
import json, sys, time, numpy as np, tifffile
side, path, mpp = {side}, {path!r}, {mpp}
T = 256
rng = np.random.default_rng(0)
tissue = np.empty((4, T, T, 3), np.uint8)
for k in range(4):
    base = np.array([225, 140, 195]) + rng.integers(-25, 25, 3)
    t = base + rng.integers(-8, 8, (T, T, 3))
    yy, xx = np.mgrid[:T, :T]
    for cy, cx in rng.integers(0, T, (60, 2)):
        t[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = (90, 60, 160)
    tissue[k] = np.clip(t, 0, 255)
glass = np.full((T, T, 3), 242, np.uint8)

def tiles(n):
    for ty in range(0, n, T):
        for tx in range(0, n, T):
            ry, rx = (ty + T / 2 - n / 2) / (0.48 * n), (tx + T / 2 - n / 2) / (0.48 * n)
            yield tissue[(ty // T + tx // T) % 4] if ry * ry + rx * rx <= 1 else glass

sizes = [side]
while sizes[-1] // 2 >= 1024:
    sizes.append(sizes[-1] // 2)
t0 = time.perf_counter()
with tifffile.TiffWriter(path, bigtiff=True) as tw:
    for i, n in enumerate(sizes):
        kw = dict(subifds=len(sizes) - 1) if i == 0 else dict(subfiletype=1)
        res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if i == 0 else {{}}
        tw.write(tiles(n), shape=(n, n, 3), dtype=np.uint8, tile=(T, T), photometric="rgb", **kw, **res)
print("RESULT", json.dumps({{"write_s": time.perf_counter() - t0, "levels": sizes}}))
"""

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
path = {path!r}
sd = sqs.io.read_wsi(path, section="big") if path.endswith(".tif") else spatialdata.read_zarr(path)
res = {{"rss_after_open_mb": psutil.Process().memory_info().rss / 2**20}}
def spots():
    t = time.perf_counter()
    sqs.pp.compute_features(sd, backbone="dummy", batch_size=64, device="cpu", num_workers=0,
                            patch_size_um=112, mpp=0.5, cache=False)
    dt = time.perf_counter() - t
    n = sd.tables["table"].n_obs
    res.update(n_spots=n, spots_s=dt, spots_per_s=n / dt)
if {spots_only}:
    spots()
else:
    t = time.perf_counter()
    sqs.pp.detect_tissue(sd)
    res["detect_s"] = time.perf_counter() - t
    n = sqs.pp.tile_tissue(sd, tile_um=112, stride_um={stride})
    res["tile_s"] = time.perf_counter() - t
    sqs.pp.compute_features(sd, backbone="dummy", batch_size=64, device="cpu", num_workers=0, table_key="tiles",
                            cache=False)
    dt = time.perf_counter() - t
    res.update(n_tiles=n, tiles_s=dt, tiles_per_s=n / dt,
               tissue_fraction=float(sd.labels["big_tissue"].attrs["sq_spade_tissue"]["fraction"]))
    if {spots_too}:  # same process, after the tiles (--same-process): the spots find imports done, memory mapped
        spots()
res["peak_rss_mb"] = peak_rss_mb()
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
    ap.add_argument("--repeat", type=int, default=5,
                    help="runs of each path up to 10,000 px (medians are reported; the machine may be shared)")
    ap.add_argument("--same-process", action="store_true",
                    help="time the spots in the tiles' process, after them (the earlier protocol: the tiles then "
                         "pay the process's one-time costs alone)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    budget = int(args.budget_mb * 2**20)
    print("machine:", machine())
    rows = []
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for side in args.sizes:
        big = side > 10_000
        path = work / (f"slide_{side}.tif" if big else f"slide_{side}.zarr")
        if big and not path.exists():
            b = run_child(BUILD_TIFF_CHILD.format(side=side, path=str(path), mpp=MPP), env=env)
            print(f"{side:,} px: wrote a pyramidal TIFF, levels {b['levels']}, in {b['write_s']:.0f} s")
        elif not path.exists():
            b = run_child(BUILD_CHILD.format(bench=str(HERE), side=side, chunk=CHUNK, spots=args.spots,
                                             path=str(path), mpp=MPP), env=env)
            print(f"{side:,} px: wrote levels {b['levels']} in {b['write_s']:.0f} s")
        stride = args.stride_40k if big else args.stride_10k
        reps = []
        for _ in range(1 if big else args.repeat):  # alternated, so that load from other jobs hits both alike
            r = run_child(MEASURE_CHILD.format(bench=str(HERE), path=str(path), budget=budget, stride=stride,
                                               spots_too=not big and args.same_process, spots_only=False), env=env)
            if not big and not args.same_process:
                # the spots in a fresh process of their own: each path pays its own one-time costs (imports,
                # first touch of the level's memory), which otherwise fall on whichever runs first
                rs = run_child(MEASURE_CHILD.format(bench=str(HERE), path=str(path), budget=budget, stride=stride,
                                                    spots_too=False, spots_only=True), env=env)
                r.update({k: v for k, v in rs.items() if k.startswith(("n_spots", "spots"))})
            reps.append(r)
        if len(reps) > 1:
            print("  per run: " + "; ".join(f"{x['tiles_per_s']:.0f} tiles/s vs {x['spots_per_s']:.0f} patches/s"
                                            for x in reps))
        # the median run of each path (rates), the largest peak RSS
        r = dict(reps[0])
        for k in ("detect_s", "tile_s", "tiles_s", "tiles_per_s", "spots_s", "spots_per_s"):
            if k in r:
                r[k] = float(np.median([x[k] for x in reps]))
        r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in reps)
        r.update(side=side, stride_um=stride, level_mb=side * side * 3 / 2**20, repeats=len(reps))
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
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    print("JSON", json.dumps(rows))


if __name__ == "__main__":
    main()
