"""Peak RSS and patches/s of extract_patches + compute_features on zarr-backed big slides.

For each slide side (10,000 and 40,000 px by default) a synthetic H&E-like RGB image is written
block by block to a SpatialData zarr store (a multiscale image, never whole in memory), with
spots on a regular grid over the whole slide. A fresh subprocess then reads the store back
(lazy, zarr-backed), runs ``sqs.pp.extract_patches`` (reading every patch for its tissue
fraction) and ``sqs.pp.compute_features`` with the ``dummy`` backbone (and optionally Lite0 on a
subset of spots), and reports its peak RSS (``VmHWM``, see ``_common.peak_rss_mb``) next to the
RSS after imports and opening the store. The level patches are cut from is read whole when it fits in
``settings.memory_budget_bytes`` (2 GiB by default) and window by window otherwise.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_big_slide.py [--sizes 10000 40000]
[--spots 2500] [--lite0 64] [--budget-mb 2048] [--workdir /tmp/sq_spade_big_slide] [--keep]``.
Prints figures; asserts nothing. The 40,000 px store takes about 4 GB of disk (removed at the end
unless ``--keep``).
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
MPP = 0.5  # um/px of the full-resolution level: patches (112 um at 0.5 um/px) come from level 0
CHUNK = 1024  # dask block side of the generated image (spatialdata writes it as 256 px zarr chunks)

# Written into the child processes; ``{...}`` are filled in by ``str.format``.
BUILD_CHILD = r"""
import json, sys, time, numpy as np, dask, dask.array as da
sys.path.insert(0, {bench!r})
from _common import peak_rss_mb
import sq_spade as sqs

side, chunk, n_spots, path = {side}, {chunk}, {spots}, {path!r}

def he_block(b, block_info=None):
    # H&E-like: pink stroma with low-frequency variation, purple nuclei on a jittered 18 px
    # lattice, white glass outside an elliptical tissue region; a pure function of (y, x)
    (y0, _), (x0, _), _ = block_info[None]["array-location"]
    y = np.arange(y0, y0 + b.shape[0], dtype=np.int64)[:, None]
    x = np.arange(x0, x0 + b.shape[1], dtype=np.int64)[None, :]
    cy, cx = y // 18, x // 18
    h = (cy * 73856093) ^ (cx * 19349663)
    jy, jx = (h % 7) - 3, ((h // 7) % 7) - 3
    dy, dx = y - (cy * 18 + 9 + jy), x - (cx * 18 + 9 + jx)
    nucleus = (dy * dy + dx * dx) <= 16 + (h % 20)
    wave = (np.sin(y / 700.0) * np.cos(x / 900.0) * 25).astype(np.int16)
    noise = (((y * 2654435761) ^ (x * 40503)) >> 7) % 13 - 6  # pixel texture: compresses like H&E
    out = np.empty(b.shape, np.uint8)
    out[..., 0] = np.where(nucleus, 90, 225 + wave // 3) + noise
    out[..., 1] = np.where(nucleus, 60, 140 + wave) + noise
    out[..., 2] = np.where(nucleus, 160, 195 + wave // 2) + noise
    ry, rx = (y - side / 2) / (0.48 * side), (x - side / 2) / (0.48 * side)
    glass = np.broadcast_to((ry * ry + rx * rx) > 1, b.shape[:2])
    out[glass] = 242
    return out

img = da.zeros((side, side, 3), dtype=np.uint8, chunks=(chunk, chunk, 3)).map_blocks(he_block, dtype=np.uint8)
k = int(round(n_spots ** 0.5))
pitch = side / k
g = (np.arange(k) + 0.5) * pitch
xy = np.array([(x, y) for y in g for x in g])
rng = np.random.default_rng(0)
counts = rng.poisson(2.0, size=(len(xy), 20)).astype(np.float32)
t = time.perf_counter()
sd = sqs.io.section_from_arrays(counts, genes=[f"g{{i}}" for i in range(20)],
                                spot_ids=[str(i) for i in range(len(xy))], centers_px=xy, image=img,
                                section="big", microns_per_pixel={mpp}, spot_diameter_um=55.0)
with dask.config.set(scheduler="threads", num_workers=2):
    sd.write(path)
levels = [tuple(a.shape) for a in sqs.io._sections.image_levels(sd.images["big_image"])]
print("RESULT", json.dumps({{"write_s": time.perf_counter() - t, "write_peak_rss_mb": peak_rss_mb(),
                            "levels": levels, "n_spots": len(xy), "pitch_px": pitch}}))
"""

MEASURE_CHILD = r"""
import json, sys, time, warnings, numpy as np, psutil
sys.path.insert(0, {bench!r})
from _common import peak_rss_mb
import spatialdata, torch
import sq_spade as sqs
sqs.settings.progress = False
sqs.settings.cache_dir = None  # the feature cache would re-read every patch to hash it
sqs.settings.memory_budget_bytes = {budget}
torch.set_num_threads(1)
warnings.simplefilter("ignore")
sd = spatialdata.read_zarr({path!r})
lv0 = sqs.io._sections.image_levels(sd.images["big_image"])[0]
assert not isinstance(lv0.data, np.ndarray), "the image must be lazy"
res = {{"rss_after_open_mb": psutil.Process().memory_info().rss / 2**20, "lazy_level_type": type(lv0.data).__name__}}
t = time.perf_counter()
p = sqs.pp.extract_patches(sd, patch_size_um=112, microns_per_pixel=0.5)  # reads every patch (tissue fraction)
dt = time.perf_counter() - t
res.update(n=len(p), windowed=not p._levels[0].in_memory, extract_s=dt, extract_patches_per_s=len(p) / dt,
           tissue_median=float(np.median(sd.tables["table"].obs["patch_tissue_fraction"])),
           rss_after_extract_mb=psutil.Process().memory_info().rss / 2**20)
del p
t = time.perf_counter()
sqs.pp.compute_features(sd, backbone="dummy", batch_size=64, device="cpu", num_workers=0)
dt = time.perf_counter() - t
res.update(dummy_s=dt, dummy_patches_per_s=res["n"] / dt, peak_rss_mb=peak_rss_mb())
n_lite = {lite0}
if n_lite:
    from sq_spade.nn.backbones import get_backbone
    from sq_spade.nn.inference import embed_batches
    model = get_backbone("efficientnet_lite0")
    p = sqs.pp.patches(sd)
    idx = np.linspace(0, len(p) - 1, n_lite).astype(int)
    t = time.perf_counter()
    f = embed_batches(model, p.iter_batches(32, idx), device="cpu", progress=False)
    dt = time.perf_counter() - t
    res.update(lite0_n=len(f), lite0_patches_per_s=len(f) / dt, lite0_peak_rss_mb=peak_rss_mb())
print("RESULT", json.dumps(res))
"""


def child(code: str) -> dict:
    return run_child(code, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000])
    ap.add_argument("--spots", type=int, default=2500, help="spots on a square grid over the slide")
    ap.add_argument("--lite0", type=int, default=0, help="also embed this many patches with Lite0")
    ap.add_argument("--budget-mb", type=float, default=2048, help="settings.memory_budget_bytes in MiB")
    ap.add_argument("--workdir", default="/tmp/sq_spade_big_slide")
    ap.add_argument("--keep", action="store_true", help="keep the zarr stores (reused by the next run)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    budget = int(args.budget_mb * 2**20)
    print("machine:", machine())
    print(f"settings.memory_budget_bytes = {budget / 2**20:.0f} MiB; {MPP} um/px; 256 px zarr chunks; "
          "patches 112 um at 0.5 um/px (224 px) from level 0")
    rows = []
    for side in args.sizes:
        path = work / f"slide_{side}.zarr"
        build = None
        if not path.exists():
            build = child(BUILD_CHILD.format(bench=str(HERE), side=side, chunk=CHUNK, spots=args.spots,
                                             path=str(path), mpp=MPP))
            size_gb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9
            print(f"{side:,} px: wrote levels {build['levels']} in {build['write_s']:.0f} s "
                  f"(writer peak RSS {build['write_peak_rss_mb']:.0f} MB, {size_gb:.2f} GB on disk)")
        r = child(MEASURE_CHILD.format(bench=str(HERE), path=str(path), budget=budget, lite0=args.lite0))
        level_mb = side * side * 3 / 2**20
        r.update(side=side, level_mb=level_mb)
        rows.append(r)
        lite = (f"; Lite0 {r['lite0_patches_per_s']:.1f} patches/s over {r['lite0_n']} (peak RSS then "
                f"{r['lite0_peak_rss_mb']:,.0f} MB, the model's activations included)" if args.lite0 else "")
        print(f"{side:,} px (level 0 = {level_mb:,.0f} MiB, {'windowed' if r['windowed'] else 'in memory'}): "
              f"{r['n']} spots; peak RSS {r['peak_rss_mb']:,.0f} MB (after imports + open "
              f"{r['rss_after_open_mb']:,.0f} MB; +{r['peak_rss_mb'] - r['rss_after_open_mb']:,.0f} MB); "
              f"extract_patches {r['extract_patches_per_s']:,.0f} patches/s; compute_features(dummy) "
              f"{r['dummy_patches_per_s']:,.0f} patches/s{lite}; median tissue fraction {r['tissue_median']:.2f}")
        if not args.keep:
            shutil.rmtree(path)
    print("JSON", json.dumps(rows))


if __name__ == "__main__":
    main()
