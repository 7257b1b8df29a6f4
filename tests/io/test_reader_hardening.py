"""Readers refuse malformed inputs with an error naming the argument or file and what was expected."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import sq_spade as sqs
from tests.conftest import DATA_DIR, require_data
from tests.io.test_readers import _write_st

VISIUM = "scanpy/tests/_data/visium_data/1.0.0"


# --- sample ids -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sid", "match"), [("A/1", "slashes"), ("A\\1", "slashes"), ("slide_um", "_um"),
                                            ("", "non-empty"), ("  ", "non-empty")])
def test_section_ids_that_would_break_element_names_are_refused(sid, match):
    img = np.full((40, 40, 3), 200, np.uint8)
    with pytest.raises(ValueError, match=f"`section`.*{match}"):
        sqs.io.section_from_arrays(np.ones((1, 1)), genes=["a"], spot_ids=["1"], centers_px=np.array([[10.0, 10.0]]),
                                   image=img, section=sid, microns_per_pixel=1.0, spot_diameter_um=55.0)


@pytest.mark.parametrize("sid", ["A/1", "V1_um"])
def test_read_st_and_hest_refuse_bad_sample_ids(tmp_path, sid):
    c, s, i = _write_st(tmp_path)
    with pytest.raises(ValueError, match="`sample_id`"):
        sqs.io.read_st(c, s, i, sample_id=sid)
    with pytest.raises(ValueError, match="`sample_id`"):
        sqs.io.read_hest(sid, tmp_path)


# --- Visium scale factors -----------------------------------------------------------------------------
def _visium(tmp_path, **scalef):
    require_data(f"{VISIUM}/filtered_feature_bc_matrix.h5")
    out = shutil.copytree(DATA_DIR / VISIUM, tmp_path / "outs")
    sf = out / "spatial" / "scalefactors_json.json"
    doc = json.loads(sf.read_text())
    doc.update(scalef)
    sf.write_text(json.dumps(doc))
    return out


@pytest.mark.realdata
@pytest.mark.parametrize("value", [0, -89.4, "89", None, True, float("nan")])
def test_read_visium_refuses_a_bad_spot_diameter(tmp_path, value):
    out = _visium(tmp_path, spot_diameter_fullres=value)
    with pytest.raises(ValueError, match="spot_diameter_fullres.*positive number"):
        sqs.io.read_visium(out, sample_id="V1", counts_file="filtered_feature_bc_matrix.h5")


@pytest.mark.realdata
@pytest.mark.parametrize("sid", ["V1_um", "A/1"])
def test_read_visium_refuses_sample_ids_that_would_clash(tmp_path, sid):
    out = _visium(tmp_path)
    with pytest.raises(ValueError, match="`sample_id`"):
        sqs.io.read_visium(out, sample_id=sid, counts_file="filtered_feature_bc_matrix.h5")


# --- HEST --------------------------------------------------------------------------------------------------
def _hest(tmp_path, meta=None, X=None, array_nan=False, xy_nan=False):
    import anndata as ad
    import tifffile

    rng = np.random.default_rng(0)
    n = 6
    adata = ad.AnnData(X=rng.poisson(2, (n, 5)).astype(np.float32) if X is None else X)
    adata.obs_names = [f"bc{i}" for i in range(n)]
    adata.var_names = [f"g{i}" for i in range(5)]
    xy = np.column_stack([100 + 80 * np.arange(n), np.full(n, 300.0)])
    if xy_nan:
        xy[2, 0] = np.nan
    adata.obsm["spatial"] = xy
    adata.obs["array_row"], adata.obs["array_col"] = 0.0, np.arange(n, dtype=float)
    if array_nan:
        adata.obs.loc["bc1", "array_col"] = np.nan
    for d in ("st", "wsis", "metadata"):
        (tmp_path / d).mkdir(exist_ok=True)
    adata.write_h5ad(tmp_path / "st" / "T1.h5ad")
    tifffile.imwrite(tmp_path / "wsis" / "T1.tif", np.full((1024, 1024, 3), 180, np.uint8), photometric="rgb")
    (tmp_path / "metadata" / "T1.json").write_text(json.dumps({"pixel_size_um_estimated": 0.5, **(meta or {})}))
    return tmp_path


@pytest.mark.parametrize(("kw", "match"), [
    ({"meta": {"spot_diameter": 0}}, "'spot_diameter'.*positive number, got 0"),
    ({"meta": {"spot_diameter": -55}}, "'spot_diameter'.*positive number"),
    ({"meta": {"spot_diameter": "n/a"}}, "'spot_diameter'.*positive number"),
    ({"meta": {"pixel_size_um_estimated": 0}}, "pixel_size_um_estimated.*positive number"),
    ({"meta": {"pixel_size_um_estimated": "n/a"}}, "pixel_size_um_estimated.*positive number"),
    ({"X": np.log1p(np.random.default_rng(0).poisson(2, (6, 5))).astype(np.float32)}, "`h5ad`.*raw counts"),
    ({"array_nan": True}, "`h5ad`.*array_col"),
    ({"xy_nan": True}, "`h5ad`.*obsm\\['spatial'\\]"),
])
def test_read_hest_refuses_bad_metadata_and_tables(tmp_path, kw, match):
    root = _hest(tmp_path, **kw)
    with pytest.raises(ValueError, match=match):
        sqs.io.read_hest("T1", root)


def test_read_hest_spot_diameter_defaults_only_when_absent(tmp_path):
    sd = sqs.io.read_hest("T1", _hest(tmp_path, meta={"spot_diameter": 100.0}))
    assert sd.tables["table"].uns["sq_spade_sections"]["T1"]["spot_diameter_um"] == 100.0


# --- ST counts files ------------------------------------------------------------------------------------
def _rewrite_counts(c, text=None, raw=None):
    path = c.with_name("counts.tsv")
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(text)
    return path


def test_read_st_refuses_duplicate_gene_columns(tmp_path):
    c, s, i = _write_st(tmp_path)
    df = pd.read_csv(c, sep="\t", index_col=0)
    lines = ["\t" + "\t".join(["G1", "G2", "G1", "RPL3"])]
    lines += [f"{idx}\t" + "\t".join(map(str, row)) for idx, row in zip(df.index, df.to_numpy(), strict=True)]
    path = _rewrite_counts(c, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="`counts`.*duplicated gene columns: \\['G1'\\]"):
        sqs.io.read_st(path, s, i, sample_id="X1")


@pytest.mark.parametrize(("raw", "match"), [(b"", "empty"), (b"\tG\xe91\n1x2\t3\n", "not UTF-8"),
                                            (b"\tG1\tG2\n1x2\t3\n2x2\t1\t4\t5\n", "tab-separated")])
def test_read_st_names_the_counts_file_when_it_cannot_be_parsed(tmp_path, raw, match):
    c, s, i = _write_st(tmp_path)
    path = _rewrite_counts(c, raw=raw)
    with pytest.raises(ValueError, match=f"`counts` file 'counts.tsv'.*{match}|`counts` file 'counts.tsv' is {match}"):
        sqs.io.read_st(path, s, i, sample_id="X1")


def test_sixteen_bit_rgb_tiff_is_refused(tmp_path):
    import tifffile

    from sq_spade.io._images import read_rgb

    tifffile.imwrite(tmp_path / "img.tif", np.full((16, 16, 3), 40000, np.uint16), photometric="rgb")
    with pytest.raises(ValueError, match="`image`.*16-bit"):
        read_rgb(tmp_path / "img.tif")
