"""Tissue masks of ``sqs.pp.detect_tissue`` against the spots recorded under tissue.

For each real section (her2st B4, C2, C3, C4 at about 0.69 um/px; A1, A2 dark-background PNGs at
about 3.2 um/px; STUtility MOB1-3), the mask is computed from the H&E alone and compared with the
spots that the assay recorded under tissue (her2st: every spot of the spot files; MOB:
``selected == 1``): the share of those spots whose centre lies in the mask (target >= 0.95) and
the mask's area over the area of the convex hull of their centres (target <= about 2).

Run: ``OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_tissue.py [--sections A1 MOB1]
[--json out.json]``. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from _common import DATA_DIR, machine, write_json

SECTIONS = ("B4", "C2", "C3", "C4", "A1", "A2", "MOB1", "MOB2", "MOB3")


def coverage(sd) -> dict:
    from scipy.spatial import ConvexHull

    from sq_spade import _constants as K
    from sq_spade.io._sections import get_sections, spot_centers_um
    from sq_spade.pp._tissue import read_tissue_mask

    (sec,) = get_sections(sd)
    t = sd.tables["table"]
    xy, _ = spot_centers_um(sd, sec)
    xy = xy[t.obs[K.OBS.IN_TISSUE].to_numpy(bool)[sec.rows]]
    mask, aff = read_tissue_mask(sd, sec.section)
    inv = np.linalg.inv(aff)
    px = np.floor(xy @ inv[:2, :2].T + inv[:2, 2]).astype(int)
    inside = (px[:, 0] >= 0) & (px[:, 1] >= 0) & (px[:, 0] < mask.shape[1]) & (px[:, 1] < mask.shape[0])
    hit = np.zeros(len(px), bool)
    hit[inside] = mask[px[inside, 1], px[inside, 0]]
    area = float(mask.sum() * abs(np.linalg.det(aff[:2, :2])))
    hull = float(ConvexHull(xy).volume)
    return {"n_spots": len(xy), "covered": float(hit.mean()), "area_mm2": area / 1e6, "hull_mm2": hull / 1e6,
            "area_over_hull": area / hull, "mask_um_per_px": float(abs(aff[0, 0]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import sq_spade as sqs

    sqs.settings.data_dir = DATA_DIR
    sqs.settings.progress = False
    warnings.simplefilter("ignore")
    print("machine:", machine())
    rows = []
    for s in args.sections:
        sd = sqs.datasets.stutility_mob(s) if s.startswith("MOB") else sqs.datasets.her2st(s)
        t = time.perf_counter()
        sqs.pp.detect_tissue(sd)
        r = {"section": s, "detect_s": time.perf_counter() - t, **coverage(sd)}
        rows.append(r)
        print(f"{s}: {r['covered']:.3f} of {r['n_spots']} spots under the mask; mask {r['area_mm2']:.1f} mm2 = "
              f"{r['area_over_hull']:.2f} x the spots' hull ({r['mask_um_per_px']:.1f} um/px, {r['detect_s']:.1f} s)",
              flush=True)
    if args.json:
        write_json(args.json, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
