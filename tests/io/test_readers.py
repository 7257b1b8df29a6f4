import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from spatialdata.models import TableModel

import sq_spade as sqs
from sq_spade import _constants as K
from tests.conftest import require_data


def _mpp(sd, section):
    return sd.tables["table"].uns["sq_spade_sections"][section]["microns_per_pixel"]


def _check_layout(sd, section):
    t = sd.tables["table"]
    TableModel().validate(t)
    assert t.uns["spatialdata_attrs"]["region"] in ([f"{section}_spots"], f"{section}_spots", section, [section])
    assert set(t.obs[K.SECTION_KEY].astype(str)) == {section}
    assert K.microns_cs(section) in sd.coordinate_systems
    import scipy.sparse as sp

    assert sp.issparse(t.X)
    # every table row points to a circle of the shapes element
    shapes_key = t.obs[K.REGION_KEY].iloc[0]
    assert t.obs[K.INSTANCE_KEY].isin(sd.shapes[shapes_key].index).all()


@pytest.mark.realdata
@pytest.mark.parametrize(("section", "n_spots", "mpp"), [("C2", 187, 0.69), ("A1", 346, 3.2)])
def test_her2st_sections(her2st_section, section, n_spots, mpp):
    sd = her2st_section(section)
    t = sd.tables["table"]
    assert t.n_obs == n_spots
    assert _mpp(sd, section) == pytest.approx(mpp, rel=0.02)
    _check_layout(sd, section)
    assert (t.obs[K.PATIENT_KEY] == section[0]).all()
    # the spot radius is 50 um in the micrometre system
    xy, r = sqs.io.spot_centers_um(sd, sqs.io.get_sections(sd)[0])
    assert np.allclose(r, 50.0)
    # one array unit is 200 um on the 1k array
    ac = t.obs[[K.ARRAY_COL, K.ARRAY_ROW]].to_numpy(float)
    design = np.column_stack([ac, np.ones(len(ac))])
    coef, *_ = np.linalg.lstsq(design, xy, rcond=None)
    assert np.hypot(*coef[0]) == pytest.approx(200.0, rel=0.03)
    assert np.hypot(*coef[1]) == pytest.approx(200.0, rel=0.03)


@pytest.mark.realdata
def test_mob_section(mob_section):
    sd = mob_section("MOB1")
    t = sd.tables["table"]
    assert t.n_obs == 379
    assert t.uns["sq_spade_sections"]["MOB1"]["array_kind"] == "2k"
    assert _mpp(sd, "MOB1") == pytest.approx(4.45, rel=0.05)
    assert "Gapdh" in t.var_names or "Actb" in t.var_names  # Ensembl ids mapped to symbols
    _check_layout(sd, "MOB1")


@pytest.mark.realdata
def test_mob_keeps_off_tissue_spots_when_asked():
    require_data("stutility/inst/extdata/counts/MOB1.tsv")
    sd = sqs.datasets.stutility_mob("MOB1", in_tissue_only=False)
    t = sd.tables["table"]
    assert t.n_obs > 379
    assert t.obs[K.IN_TISSUE].sum() == 379


@pytest.mark.realdata
def test_visium_mini():
    require_data("giottodata/inst/Mini_datasets/Visium/Raw/visium_DG_expr.txt.gz")
    sd = sqs.datasets.visium_mini()
    assert sd.tables["table"].n_obs == 624
    _check_layout(sd, "visium_mini")
    # the image extent covers the spots: patches sit on tissue
    sqs.pp.extract_patches(sd)
    assert np.median(sd.tables["table"].obs[K.PATCH_TISSUE]) > 0.5


@pytest.mark.realdata
def test_visium_fixture_spaceranger_layout():
    require_data("scanpy/tests/_data/visium_data/1.0.0/filtered_feature_bc_matrix.h5")
    sd = sqs.datasets.visium_fixture()
    t = sd.tables["table"]
    assert t.n_obs == 100
    assert _mpp(sd, "visium_fixture") == pytest.approx(55 / 89.42751063343188)
    _check_layout(sd, "visium_fixture")
    # radius is 27.5 um
    _, r = sqs.io.spot_centers_um(sd, sqs.io.get_sections(sd)[0])
    assert np.allclose(r, 27.5)


VISIUM_DIR = "scanpy/tests/_data/visium_data/1.0.0"


@pytest.mark.realdata
def test_read_visium_names_the_section_after_the_library_id():
    root = require_data(f"{VISIUM_DIR}/filtered_feature_bc_matrix.h5")
    sd = sqs.io.read_visium(root / VISIUM_DIR)
    # the counts file's library id ("custom"), not the folder name ("1.0.0")
    assert set(sd.tables["table"].obs[K.SECTION_KEY].astype(str)) == {"custom"}
    _check_layout(sd, "custom")


@pytest.mark.realdata
def test_from_spatialdata_adopts_a_spatialdata_io_visium_object(tmp_path):
    import shutil

    import spatialdata_io

    root = require_data(f"{VISIUM_DIR}/filtered_feature_bc_matrix.h5")
    folder = tmp_path / "outs"
    shutil.copytree(root / VISIUM_DIR, folder)
    hires = folder / "spatial" / "tissue_lowres_image.png"
    Image.open(hires).convert("RGBA").save(hires)  # Space Ranger sometimes writes RGBA
    raw = spatialdata_io.visium(folder, dataset_id="V1")
    assert raw["V1_lowres_image"].sizes["c"] == 4
    sd = sqs.io.from_spatialdata(raw, patient="P1")
    t = sd.tables["table"]
    _check_layout(sd, "V1")
    assert _mpp(sd, "V1") == pytest.approx(55 / 89.42751063343188)  # from the spot radius
    assert all(img.sizes["c"] == 3 for img in (sqs.io._sections.image_levels(v)[0] for v in sd.images.values()))
    assert (t.obs[K.PATIENT_KEY] == "P1").all()
    _, r = sqs.io.spot_centers_um(sd, sqs.io.get_sections(sd)[0])
    assert np.allclose(r, 27.5)
    sqs.pp.extract_patches(sd, image_key="V1_lowres_image", tissue=False)
    with pytest.raises(ValueError, match="microns_per_pixel"):
        sqs.io.from_spatialdata(raw, microns_per_pixel=-1)
    with pytest.raises(TypeError, match="sdata"):
        sqs.io.from_spatialdata(t)


# --- read_st from arbitrary files -------------------------------------------------------------


def _write_st(tmp_path, *, mode="RGB", dtype=np.uint8, ids_offset=0, n=5, empty=False, pitch_px=50.0):
    xs = np.arange(1, n + 1)
    ys = np.full(n, 2)
    spots = pd.DataFrame({"x": xs, "y": ys, "new_x": xs.astype(float), "new_y": ys.astype(float),
                          "pixel_x": 20 + xs * pitch_px, "pixel_y": 20 + ys * pitch_px, "selected": 1})
    spots.to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    rng = np.random.default_rng(0)
    counts = pd.DataFrame(rng.poisson(3, size=(0 if empty else n, 4)),
                          index=[f"{x + ids_offset}x{y}" for x, y in zip(xs, ys, strict=True)][: 0 if empty else n],
                          columns=["G1", "G2", "MT-CO1", "RPL3"])
    counts.to_csv(tmp_path / "counts.tsv.gz", sep="\t")
    w = int(40 + (n + 1) * pitch_px)
    if dtype == np.uint16:
        Image.fromarray(np.full((200, w), 1000, np.uint16)).save(tmp_path / "img.png")
    else:
        arr = np.full((200, w, 4 if mode == "RGBA" else 3), 200, np.uint8)
        img = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
        img.save(tmp_path / "img.png")
    return tmp_path / "counts.tsv.gz", tmp_path / "spots.tsv", tmp_path / "img.png"


def test_read_st_any_section_from_paths(tmp_path):
    c, s, i = _write_st(tmp_path)
    sd = sqs.io.read_st(c, s, i, sample_id="X1")
    t = sd.tables["table"]
    assert t.n_obs == 5 and t.n_vars == 4
    assert _mpp(sd, "X1") == pytest.approx(200 / 50.0)
    assert t.uns["sq_spade_sections"]["X1"]["microns_per_pixel_source"].startswith("inferred from the 1k")
    _check_layout(sd, "X1")
    sd2 = sqs.io.read_st(c, s, i, sample_id="X1", microns_per_pixel=2.0, image_scale=0.5)
    assert _mpp(sd2, "X1") == pytest.approx(4.0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "L"}, "grayscale"),
    ({"mode": "RGBA"}, "RGBA"),
    ({"dtype": np.uint16}, "16-bit|32-bit"),
    ({"ids_offset": 100}, "No spot id of `counts`"),
    ({"empty": True}, "empty|no spots"),
])
def test_read_st_bad_input(tmp_path, kwargs, match):
    c, s, i = _write_st(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=match):
        sqs.io.read_st(c, s, i, sample_id="X1")


def test_read_st_missing_columns_and_files(tmp_path):
    c, s, i = _write_st(tmp_path)
    pd.DataFrame({"x": [1], "y": [2]}).to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="`spots`.*lacks columns"):
        sqs.io.read_st(c, tmp_path / "bad.tsv", i, sample_id="X1")
    with pytest.raises(FileNotFoundError, match="`image`"):
        sqs.io.read_st(c, s, tmp_path / "nope.png", sample_id="X1")
    with pytest.raises(ValueError, match="sample_id"):
        sqs.io.read_st(c, s, i, sample_id="")


def test_spots_outside_image_refused():
    img = np.full((100, 100, 3), 200, np.uint8)
    with pytest.raises(ValueError, match="outside the image"):
        sqs.io.section_from_arrays(np.ones((2, 2)), genes=["a", "b"], spot_ids=["1", "2"],
                                   centers_px=np.array([[500.0, 500], [600, 600]]), image=img,
                                   section="s", microns_per_pixel=1.0, spot_diameter_um=55)


def test_image_only_section_is_a_query_for_prediction():
    sd = sqs.datasets.synthetic_section()
    t = sd.tables["table"]
    img = np.asarray(sd.images["synth_image"].values).transpose(1, 2, 0)  # (c, y, x) -> (y, x, c)
    q = sqs.io.section_from_arrays(None, spot_ids=t.obs[K.INSTANCE_KEY].astype(str), centers_px=t.obsm["spatial"],
                                   image=img, section="q", microns_per_pixel=1.0, spot_diameter_um=30.0)
    qt = q.tables["table"]
    assert qt.shape == (t.n_obs, 0)
    model = sqs.tl.train_baseline(sd, method="ridge", backbone="dummy", panel=list(t.var_names[:5]))
    pred = sqs.tl.predict_expression(q, model, reference=sd)
    assert pred.shape == (t.n_obs, 5) and np.isfinite(pred.layers["predicted"]).all()
    with pytest.raises(ValueError, match="`genes` were given without `counts`"):
        sqs.io.section_from_arrays(None, genes=["a"], spot_ids=["1"], centers_px=np.array([[5.0, 5.0]]), image=img,
                                   section="q", microns_per_pixel=1.0, spot_diameter_um=30.0)


def test_read_hest_fixture(tmp_path):
    import anndata as ad
    import tifffile

    rng = np.random.default_rng(0)
    n = 6
    adata = ad.AnnData(X=rng.poisson(2, (n, 5)).astype(np.float32))
    adata.obs_names = [f"bc{i}" for i in range(n)]
    adata.var_names = [f"g{i}" for i in range(5)]
    adata.obsm["spatial"] = np.column_stack([100 + 80 * np.arange(n), np.full(n, 300.0)])
    adata.obs["in_tissue"] = 1
    adata.obs["array_row"], adata.obs["array_col"] = 0, np.arange(n)
    for d in ("st", "wsis", "metadata"):
        (tmp_path / d).mkdir()
    adata.write_h5ad(tmp_path / "st" / "TENX1.h5ad")
    img = np.full((2048, 1024, 3), 180, np.uint8)
    img[:, :, 1] = 60
    with tifffile.TiffWriter(tmp_path / "wsis" / "TENX1.tif") as tw:
        tw.write(img, subifds=1, tile=(256, 256), photometric="rgb")
        tw.write(img[::2, ::2], subfiletype=1, tile=(256, 256), photometric="rgb")
    (tmp_path / "metadata" / "TENX1.json").write_text(json.dumps({"pixel_size_um_estimated": 0.25, "patient": "P7"}))
    sd = sqs.io.read_hest("TENX1", tmp_path)
    t = sd.tables["table"]
    assert t.n_obs == n
    assert _mpp(sd, "TENX1") == pytest.approx(0.25)
    assert (t.obs[K.PATIENT_KEY] == "P7").all()
    _check_layout(sd, "TENX1")
    p = sqs.pp.extract_patches(sd, patch_size_um=32, microns_per_pixel=0.5)
    assert p[0].shape == (64, 64, 3)
    assert np.allclose(p[0][..., 1], 60)  # the image content, not padding


@pytest.mark.realdata
def test_combine_sections(her2st_section):
    sd = sqs.io.combine_sections([her2st_section("C2"), her2st_section("A1")])
    t = sd.tables["table"]
    TableModel().validate(t)
    assert t.n_obs == 187 + 346
    assert set(t.obs[K.REGION_KEY]) == {"C2_spots", "A1_spots"}
    assert set(t.obs[K.SECTION_KEY]) == {"C2", "A1"}
    present = t.varm[K.GENES_PRESENT]
    assert list(present.columns) == ["C2", "A1"]
    # genes only in one section are flagged and zero elsewhere
    only_c2 = present.index[present["C2"] & ~present["A1"]]
    if len(only_c2):
        g = t.var_names.get_loc(only_c2[0])
        assert t[t.obs[K.SECTION_KEY] == "A1"].X[:, g].sum() == 0
    secs = sqs.io.get_sections(sd)
    assert [s.image_key for s in secs] == ["C2_image", "A1_image"]
    with pytest.raises(ValueError, match="unique"):
        sqs.io.combine_sections([her2st_section("C2"), her2st_section("C2")])
