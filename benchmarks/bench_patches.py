"""Patch extraction speed on her2st C2 and peak memory on a 12,000 x 12,000 synthetic level.

Run: ``.venv/bin/python benchmarks/bench_patches.py``. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import warnings

import numpy as np
from _common import DATA_DIR, machine, write_json

RSS_CHILD = r"""
import sys, time, warnings
import numpy as np, dask.array as da
sys.path.insert(0, {bench!r})
from _common import peak_rss_mb
import sq_spade as sqs
sqs.settings.progress = False
side = 12000
def block(b, block_info=None):
    (y0, _), (x0, _), _ = block_info[None]["array-location"]
    yy = np.arange(y0, y0 + b.shape[0], dtype=np.int32)[:, None]
    xx = np.arange(x0, x0 + b.shape[1], dtype=np.int32)[None, :]
    out = np.empty(b.shape, np.uint8)
    out[..., 0] = (xx * 7) % 251
    out[..., 1] = (yy * 5) % 241
    out[..., 2] = (xx + yy) % 239
    return out
img = da.zeros((side, side, 3), dtype=np.uint8, chunks=(2048, 2048, 3)).map_blocks(block, dtype=np.uint8)
g = np.arange(200, side - 200, 400.0)
xy = np.array([(x, y) for y in g for x in g])
sd = sqs.io.section_from_arrays(np.ones((len(xy), 2)), genes=["a", "b"], spot_ids=[str(i) for i in range(len(xy))],
    centers_px=xy, image=img, section="big", microns_per_pixel=0.5, spot_diameter_um=55)
import psutil
base = psutil.Process().memory_info().rss / 2**20  # current, not peak: imports may have peaked higher
t = time.perf_counter()
p = sqs.pp.patches(sd, patch_size_um=112, microns_per_pixel=0.5)
load = time.perf_counter() - t
t = time.perf_counter()
for i in range(len(p)):
    p[i]
rate = len(p) / (time.perf_counter() - t)
level_mb = side * side * 3 / 2**20
print(f"{{peak_rss_mb() - base:.0f}} {{level_mb:.0f}} {{load:.1f}} {{rate:.0f}} {{len(p)}}")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    import sq_spade as sqs

    figs = {"machine": machine()}

    sqs.settings.progress = False
    sqs.settings.data_dir = DATA_DIR
    print("machine:", machine())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        sd = sqs.datasets.her2st("C2")
        print(f"her2st C2 read: {time.perf_counter() - t:.1f} s, {sd.tables['table'].n_obs} spots")
        for key, label, kw in (("resampled", "224 px at 0.5 um/px (resampled)", {"patch_size_um": 112, "mpp": 0.5}),
                               ("native", "224 px native (~0.69 um/px)", {"patch_px": 224})):
            t = time.perf_counter()
            p = sqs.pp.patches(sd, **kw)
            load = time.perf_counter() - t
            n = 2000
            idx = np.arange(n) % len(p)
            t = time.perf_counter()
            for i in idx:
                p[int(i)]
            dt = time.perf_counter() - t
            figs[f"c2_{key}_patches_per_s"] = n / dt
            figs[f"c2_{key}_level_load_s"] = load
            print(f"C2 {label}: level load {load:.2f} s; {n / dt:,.0f} patches/s once the level is in memory "
                  f"(target >= 1,000)")
    out = subprocess.run([sys.executable, "-c", RSS_CHILD.format(bench=str(__import__('pathlib').Path(__file__).parent))],
                         capture_output=True, text=True, check=True)
    rss, level, load, rate, n = out.stdout.split()[-5:]
    print(f"12,000 x 12,000 synthetic level ({level} MB): peak RSS increase {rss} MB = "
          f"{float(rss) / float(level):.2f} x the level (target <= 1.5 x); level load {load} s; "
          f"{float(rate):,.0f} patches/s over {n} spots")
    figs.update(synthetic_level_mb=float(level), synthetic_rss_increase_mb=float(rss),
                synthetic_patches_per_s=float(rate))
    if args.json:
        write_json(args.json, figs)


if __name__ == "__main__":
    main()
