"""Real sections with cached Lite0 features, shared by the accuracy benchmarks."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
from _common import DATA_DIR, ROOT

CACHE = ROOT / "benchmarks" / ".cache"
HER2ST = ("B4", "C2", "C3", "C4", "A1", "A2")
MOB = ("MOB1", "MOB2", "MOB3")


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


__all__ = ["CACHE", "HER2ST", "MOB", "Path", "section_table", "tables"]
