"""Which EfficientNet-Lite0 layers make the best frozen features: final vs intermediate, TTA off vs on.

For every section the pooled outputs of all Lite0 layers (stages ``blocks.0`` .. ``blocks.6`` and
the final 1280-d features) are computed once, raw, and cached (``benchmarks/.cache``, and the
package's feature cache when ``SQ_SPADE_CACHE_DIR`` is set); with ``--tta`` also their mean over
the 8 dihedral views. Each variant slices its layers from them and z-scores every column per
section where it says so (as :func:`sq_spade.pp.compute_features` does with ``zscore="section"``),
then ridge and kNN (``sqs.tl.train_baseline``, their penalty / ``k`` chosen by cross-validation
over the training sections) predict each held-out section. Panels are chosen on each fold's
training sections only (``spade``, 50 genes, as ``bench_accuracy.py``).

Writes ``benchmarks/feature_layers.json`` (mean ACG / HEG per split, variant, TTA and method, the
per-fold ACG, and the seconds the features took). Run:
``OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_feature_layers.py
[--split loso mob] [--tta-split loso] [--out benchmarks/feature_layers.json]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import time
import warnings

import numpy as np
import pandas as pd
from _common import ROOT, machine
from _data import SPLITS, tables

BACKBONE = "efficientnet_lite0"
KEY = f"X_{BACKBONE}"
#: Every layer Lite0 offers, shallow to deep (one forward pass computes them all).
ALL = ("blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6", "final")
#: variant name -> (layers, z-scored per section)
VARIANTS = {
    "final": (("final",), False),
    "final, z": (("final",), True),
    "blocks.5, z": (("blocks.5",), True),
    "blocks.3-5": (("blocks.3", "blocks.4", "blocks.5"), False),
    "blocks.3-5, z": (("blocks.3", "blocks.4", "blocks.5"), True),
    "blocks.4-6, z": (("blocks.4", "blocks.5", "blocks.6"), True),
    "blocks.3-5 + final, z": (("blocks.3", "blocks.4", "blocks.5", "final"), True),
}
TTA_VARIANTS = ("final", "blocks.5, z", "blocks.3-5, z")
METHODS = ("ridge", "knn")


def columns(layers) -> np.ndarray:
    from sq_spade.nn.backbones import get_backbone_spec

    dims = get_backbone_spec(BACKBONE).layers
    start = np.cumsum([0] + [dims[n] for n in ALL])
    return np.concatenate([np.arange(start[ALL.index(n)], start[ALL.index(n) + 1]) for n in layers])


def variant_table(table, layers, z: bool, tta: bool):
    """``table`` with ``obsm[KEY]`` holding the variant (and its provenance)."""
    from sq_spade.pp._features import _section_standardisation

    out = table.copy()
    f = np.asarray(table.obsm[KEY], dtype=np.float32)[:, columns(layers)]
    if z:
        shift, scale = _section_standardisation(f, out.obs["section"].astype(str).to_numpy())
        f = ((f - shift) / scale).astype(np.float32)
    out.obsm[KEY] = f
    out.uns["sq_spade_features"] = {KEY: {"backbone": BACKBONE, "layers": list(layers), "tta": tta,
                                          **({"zscore": "section"} if z else {})}}
    return out


def run_split(split: str, variants, tta: bool) -> dict:
    import sq_spade as sqs

    res: dict = {}
    for train_secs, test_secs in SPLITS[split]:
        train_all = tables(train_secs, layers=ALL, tta=tta, zscore=None)
        test_all = tables(test_secs, layers=ALL, tta=tta, zscore=None)
        panel = sqs.pp.select_genes(train_all, "spade", n_top=50, train_sections=train_secs, inplace=False)
        for name in variants:
            layers, z = VARIANTS[name]
            train, test = variant_table(train_all, layers, z, tta), variant_table(test_all, layers, z, tta)
            for method in METHODS:
                model = sqs.tl.train_baseline(train, method=method, panel=panel, train_sections=train_secs, seed=0)
                pred = sqs.tl.predict_expression(test, model, reference=train)
                r = sqs.tl.evaluate_expression(pred)
                for _, row in r.iterrows():
                    cell = res.setdefault(name, {}).setdefault(method, {"acg": {}, "heg": {}})
                    cell["acg"][str(row["section"])] = float(row["ACG"])
                    cell["heg"][str(row["section"])] = float(row["HEG"])
    for cells in res.values():
        for cell in cells.values():
            cell["mean_acg"] = float(np.mean(list(cell["acg"].values())))
            cell["mean_heg"] = float(np.mean(list(cell["heg"].values())))
    return res


def feature_seconds(sections, tta: bool) -> tuple[int, float]:
    """Spots of ``sections`` and the seconds reading them and computing all layers took (~0 when cached)."""
    t0 = time.perf_counter()
    n = sum(tables([s], layers=ALL, tta=tta, zscore=None).n_obs for s in sections)
    return int(n), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", nargs="+", default=["loso", "mob"], choices=list(SPLITS))
    ap.add_argument("--tta-split", nargs="*", default=["loso"], choices=list(SPLITS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "feature_layers.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    doc: dict = {"machine": machine(), "backbone": BACKBONE, "panel": "spade (50 genes, chosen on training sections)",
                 "variants": {k: {"layers": list(v[0]), "zscore": "section" if v[1] else None}
                              for k, v in VARIANTS.items()}, "feature_seconds": {}, "results": {}}
    for split in args.split:
        sections = sorted({s for tr, te in SPLITS[split] for s in tr + te})
        for tta in (False, True) if split in args.tta_split else (False,):
            n, sec = feature_seconds(sections, tta)
            doc["feature_seconds"][f"{split}{' tta' if tta else ''}"] = {"n_spots": n, "seconds_this_run": round(sec, 1)}
            print(f"{split} tta={tta}: {n} spots, features {sec:.0f} s", flush=True)
            doc["results"][f"{split}{' tta' if tta else ''}"] = run_split(
                split, TTA_VARIANTS if tta else list(VARIANTS), tta)
            print(split, "tta" if tta else "", flush=True)
            rows = [(name, m, c["mean_acg"], c["mean_heg"]) for name, cells in doc["results"][
                f"{split}{' tta' if tta else ''}"].items() for m, c in cells.items()]
            print(pd.DataFrame(rows, columns=["variant", "method", "mean_acg", "mean_heg"]).to_string(index=False),
                  flush=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
