"""Real sections with cached Lite0 features and the accuracy splits, shared by the accuracy benchmarks."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
from _common import DATA_DIR, ROOT

CACHE = ROOT / "benchmarks" / ".cache"
HER2ST = ("B4", "C2", "C3", "C4", "A1", "A2")
MOB = ("MOB1", "MOB2", "MOB3")

#: The accuracy splits: name -> folds ``(training sections, test sections)``. The last training
#: section of a fold validates (early stopping, SPADE's reference side, tuning).
SPLITS = {
    "loso": [(["C2", "C3", "C4"], ["B4"]), (["B4", "C3", "C4"], ["C2"]), (["B4", "C2", "C4"], ["C3"]),
             (["B4", "C2", "C3"], ["C4"])],
    # every patient held out in turn (A: A1, A2; B: B4; C: C2-C4); the last training section validates
    "patient": [(["B4", "C2", "C3", "C4"], ["A1", "A2"]), (["A1", "A2", "C2", "C3", "C4"], ["B4"]),
                (["A1", "A2", "B4"], ["C2", "C3", "C4"])],
    "a_heldout": [(["B4", "C2", "C3", "C4"], ["A1", "A2"])],
    # STUtility mouse olfactory bulb, three serial sections of one animal
    "mob": [(["MOB2", "MOB3"], ["MOB1"]), (["MOB1", "MOB3"], ["MOB2"]), (["MOB1", "MOB2"], ["MOB3"])],
}
#: Titles of the splits on the results page (the ones ``run_all.py`` runs), in page order.
SPLIT_TITLES = {"loso": "her2st, leave one section out (B4, C2, C3, C4)",
                "patient": "her2st, one patient out (A, B, C)",
                "mob": "mouse olfactory bulb, leave one section out (MOB1-3)"}


def section_table(section: str, backbone: str = "efficientnet_lite0"):
    """AnnData of one section with ``obsm['X_<backbone>']`` (features cached on disk); a copy."""
    return _section_table(section, backbone).copy()


@functools.cache
def _section_table(section: str, backbone: str):
    # reading a section decodes its full-resolution JPEG (~10 s); a run reads each one many times
    import sq_spade as sqs

    sqs.settings.data_dir = DATA_DIR
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sd = sqs.datasets.stutility_mob(section) if section.startswith("MOB") else sqs.datasets.her2st(section)
        t = sd.tables["table"]
        key = f"X_{backbone}"
        path = CACHE / f"{section}_{backbone}.npy"
        if path.exists():
            f = np.load(path, allow_pickle=False)
            t.obsm[key] = f
            t.uns["sq_spade_features"] = {key: {"backbone": backbone}}
        else:
            sqs.pp.compute_features(sd, backbone=backbone)
            CACHE.mkdir(parents=True, exist_ok=True)
            np.save(path, t.obsm[key])
    t = t.copy()
    t.uns.pop("spatialdata_attrs", None)
    return t


def tables(sections, backbone: str = "efficientnet_lite0"):
    """Concatenate sections' tables (inner join of genes) into one AnnData."""
    import anndata as ad
    import pandas as pd

    parts = [section_table(s, backbone) for s in sections]
    out = ad.concat(parts, join="inner", merge="same")
    for c in ("section", "region", "patient"):
        out.obs[c] = pd.Categorical(out.obs[c].astype(str))
    out.uns["sq_spade_features"] = {f"X_{backbone}": {"backbone": backbone}}
    return out


__all__ = ["CACHE", "HER2ST", "MOB", "SPLITS", "SPLIT_TITLES", "Path", "section_table", "tables"]
