"""The README's main job: a demo on real her2st tissue.

``python -m sq_spade.demo --out results`` reads her2st sections from ``SQ_SPADE_DATA_DIR``
(downloading them from their pinned public origin when the folder lacks them and the
network allows), cuts physical patches around every spot and writes to ``--out``: a montage
of patches, the gene panel, and a summary. Later stages (models, predictions, figures) add
their outputs as they land.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np


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
    parser.add_argument("--section", default="C2", help="her2st section (default: C2)")
    args = parser.parse_args(argv)

    import sq_spade as sqs
    from sq_spade.datasets import DataUnavailableError

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"sq_spade {sqs.__version__}: data folder {sqs.datasets.data_dir()}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sd = sqs.datasets.her2st(args.section)
    except DataUnavailableError as e:
        print(f"\nThe demo needs the her2st data.\n{e}\n\nExample: export SQ_SPADE_DATA_DIR=/path/to/shared/data",
              file=sys.stderr)
        return 2
    table = sd.tables["table"]
    meta = table.uns["sq_spade_sections"][args.section]
    print(f"read her2st {args.section}: {table.n_obs} spots x {table.n_vars} genes, "
          f"{meta['microns_per_pixel']:.3f} um/px ({meta['microns_per_pixel_source']})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        patches = sqs.pp.extract_patches(sd)
    sqs.pp.select_genes(sd, "spade", n_top=50)
    sqs.pp.normalize(sd)
    from PIL import Image

    order = np.argsort(-table.obs["patch_tissue_fraction"].to_numpy())
    pick = order[np.linspace(0, len(order) - 1, 24).astype(int)]
    montage_path = out / f"her2st_{args.section}_patches.png"
    Image.fromarray(_montage(patches, pick)).save(montage_path)
    summary = {
        "section": args.section, "n_spots": int(table.n_obs), "n_genes": int(table.n_vars),
        "microns_per_pixel": float(meta["microns_per_pixel"]),
        "patch_geometry": {k: v for k, v in table.uns["sq_spade_patches"].items() if k != "sections"},
        "median_tissue_fraction": float(np.median(table.obs["patch_tissue_fraction"])),
        "panel": table.uns["sq_spade_panel"]["genes"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    print(f"wrote {montage_path} and {summary_path} in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
