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


def _recipe_tag(layers, tta: bool) -> str:
    """File-name tag of a feature recipe (``default``: the backbone's default layers)."""
    tag = "default" if layers is None else "+".join([layers] if isinstance(layers, str) else layers)
    return tag + ("_tta" if tta else "")


def section_table(section: str, backbone: str = "efficientnet_lite0", *, layers=None, tta: bool = False,
                  zscore="auto"):
    """AnnData of one section with ``obsm['X_<backbone>']`` (features cached on disk); a copy.

    ``layers``, ``tta`` and ``zscore`` go to :func:`sq_spade.pp.compute_features` (its defaults:
    the backbone's default layers, no TTA); the provenance it records is kept.
    """
    return _section_table(section, backbone, layers if layers is None or isinstance(layers, str) else tuple(layers),
                          tta, zscore).copy()


@functools.cache
def _section_table(section: str, backbone: str, layers, tta: bool, zscore):
    # reading a section decodes its full-resolution JPEG (~10 s); a run reads each one many times
    import json

    import sq_spade as sqs

    sqs.settings.data_dir = DATA_DIR
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sd = sqs.datasets.stutility_mob(section) if section.startswith("MOB") else sqs.datasets.her2st(section)
        t = sd.tables["table"]
        key = f"X_{backbone}"
        path = CACHE / f"{section}_{backbone}_{_recipe_tag(layers, tta)}_z{zscore}.npy"
        meta = path.with_suffix(".json")
        prov = json.loads(meta.read_text()) if path.exists() and meta.exists() else None
        # the patch geometry is part of what the features are: features computed later on the same
        # sections' tiles (bench_virtual_map.py) are checked against it; older entries lack it
        if prov is not None and "patch_geometry" in prov:
            t.obsm[key] = np.load(path, allow_pickle=False)
            t.uns["sq_spade_features"] = {key: prov}
        else:
            sqs.pp.compute_features(sd, backbone=backbone, layers=layers, tta=tta, zscore=zscore)
            CACHE.mkdir(parents=True, exist_ok=True)
            np.save(path, t.obsm[key])
            prov = dict(t.uns["sq_spade_features"][key])
            # `sections` says where (this section's image and level), not how: tables() concatenates
            prov["patch_geometry"] = {k: v for k, v in prov["patch_geometry"].items() if k != "sections"}
            meta.write_text(json.dumps(prov, default=str))
            t.uns["sq_spade_features"] = {key: prov}
    t = t.copy()
    t.uns.pop("spatialdata_attrs", None)
    return t


def tables(sections, backbone: str = "efficientnet_lite0", **recipe):
    """Concatenate sections' tables (inner join of genes) into one AnnData (``recipe``: see :func:`section_table`)."""
    import anndata as ad
    import pandas as pd

    parts = [section_table(s, backbone, **recipe) for s in sections]
    out = ad.concat(parts, join="inner", merge="same")
    for c in ("section", "region", "patient"):
        out.obs[c] = pd.Categorical(out.obs[c].astype(str))
    key = f"X_{backbone}"
    out.uns["sq_spade_features"] = {key: dict(parts[0].uns["sq_spade_features"][key])}
    return out


__all__ = ["CACHE", "HER2ST", "MOB", "SPLITS", "SPLIT_TITLES", "Path", "section_table", "tables"]
