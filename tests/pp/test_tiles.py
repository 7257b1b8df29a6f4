"""Tissue masks (pp.detect_tissue) and tiles over tissue (pp.tile_tissue)."""

import numpy as np
import pytest
from scipy.spatial import ConvexHull

import sq_spade as sqs
from sq_spade import _constants as K
from sq_spade.io._sections import get_sections, spot_centers_um
from sq_spade.pp._tiles import _box_fraction
from sq_spade.pp._tissue import read_tissue_mask, tissue_mask_array


def _slide(h=400, w=600, mpp=2.0, box=(100, 300, 150, 450)):
    """An H&E-only slide: white glass with one pink rectangle (rows y0:y1, cols x0:x1) of tissue."""
    img = np.full((h, w, 3), 242, np.uint8)
    y0, y1, x0, x1 = box
    rng = np.random.default_rng(0)
    img[y0:y1, x0:x1] = (np.array([200, 90, 170]) + rng.integers(-20, 20, (y1 - y0, x1 - x0, 3))).astype(np.uint8)
    return sqs.io.section_from_arrays(None, spot_ids=["s"], centers_px=np.array([[w / 2, h / 2]]), image=img,
                                      section="slide", microns_per_pixel=mpp, spot_diameter_um=100.0)


def test_mask_array_finds_the_stain_and_fills_holes():
    img = np.full((120, 120, 3), 240, np.uint8)
    img[20:100, 20:100] = (190, 70, 150)
    img[50:70, 50:70] = 245  # a white lumen inside tissue
    img[2:4, 2:4] = (190, 70, 150)  # a speck
    mask, thr = tissue_mask_array(img, 10.0, min_area_um2=2000, smooth_um=0)
    assert mask[20:100, 20:100].all() and mask.sum() == 80 * 80
    smooth = tissue_mask_array(img, 10.0, min_area_um2=2000)[0]  # rounded corners only
    assert smooth[25:95, 25:95].all() and abs(int(smooth.sum()) - 80 * 80) < 0.08 * 80 * 80
    assert 0 < thr < 1
    assert not tissue_mask_array(img, 10.0, fill_holes=False)[0][55:65, 55:65].any()
    # black masked background is unsaturated too
    dark = np.zeros_like(img)
    dark[20:100, 20:100] = (190, 70, 150)
    assert tissue_mask_array(dark, 10.0, smooth_um=0)[0].sum() == 80 * 80


def test_detect_tissue_writes_a_labels_element_in_microns():
    sd = _slide(h=1100, w=1600, box=(200, 800, 300, 1300))  # a two-level pyramid
    assert sqs.pp.detect_tissue(sd, microns_per_pixel=4.0) == ["slide_tissue"]
    mask, aff = read_tissue_mask(sd, "slide")
    assert mask.shape == (550, 800)  # level 1 of 2 um/px: 4 um/px
    assert np.allclose(np.diag(aff)[:2], 4.0)
    area = mask.sum() * 16.0
    assert area == pytest.approx(600 * 1000 * 4.0, rel=0.03)
    meta = sd.labels["slide_tissue"].attrs[K.UNS.TISSUE]
    assert meta["level"] == 1 and meta["microns_per_pixel"] == pytest.approx(4.0)


def test_detect_tissue_and_tiles_read_a_stored_slide_without_dask_lookups(tmp_path, monkeypatch):
    """On a zarr-backed slide the coarse level is read from storage directly, and any dask
    computation gets the synchronous scheduler as a function.

    Given no scheduler, or one named by a string, dask's first computation in a process imports
    ``distributed`` to look for a client (about half a second, longer than the detection itself).
    """
    import dask.array as da
    import spatialdata

    sd = _slide(h=1100, w=1600, box=(200, 800, 300, 1300))
    sqs.pp.detect_tissue(sd, microns_per_pixel=4.0)
    want = read_tissue_mask(sd, "slide")[0]
    del sd.labels["slide_tissue"]
    sd.write(tmp_path / "slide.zarr")
    back = spatialdata.read_zarr(tmp_path / "slide.zarr")
    computed = []
    compute = da.Array.compute

    def checked(self, **kw):
        assert callable(kw.get("scheduler")), kw  # a string or nothing looks for a distributed client
        computed.append(self.shape)
        return compute(self, **kw)

    monkeypatch.setattr(da.Array, "compute", checked)
    sqs.pp.detect_tissue(back, microns_per_pixel=4.0)
    assert computed == []  # the image's coarse level came straight from the zarr store
    # the stored level 1 (spatialdata's downsampling) vs level 0 read with a stride: the same mask but for edge pixels
    assert (read_tissue_mask(back, "slide")[0] == want).mean() > 0.99 and want.mean() > 0.25
    assert sqs.pp.tile_tissue(back, tile_um=200) > 0


def test_detect_tissue_errors_name_the_argument():
    sd = _slide()
    with pytest.raises(KeyError, match="image_key"):
        sqs.pp.detect_tissue(sd, image_key="nope")
    with pytest.raises(ValueError, match="section='other'"):
        sqs.pp.detect_tissue(sd, section="other")
    with pytest.raises(ValueError, match="`microns_per_pixel`"):
        sqs.pp.detect_tissue(sd, microns_per_pixel=0)
    assert "slide_tissue" not in sd.labels


def test_box_fraction_counts_mask_pixels():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    f = _box_fraction(mask, np.array([0.0, 5.0, 3.0, -5.0]), np.zeros(4), np.array([5.0, 10.0, 7.0, 5.0]),
                      np.full(4, 10.0))
    assert np.allclose(f, [1.0, 0.0, 0.5, 0.5])


def test_tile_tissue_grid_covers_the_tissue_only():
    sd = _slide()  # tissue: x 150..450 px, y 100..300 px at 2 um/px -> 600 x 400 um
    n = sqs.pp.tile_tissue(sd, tile_um=100, stride_um=100, min_tissue=0.5)
    t = sd.tables["tiles"]
    assert n == t.n_obs
    assert "slide_tissue" in sd.labels and "slide_tiles" in sd.shapes
    xy_um = t.obsm["spatial"] * 2.0
    assert xy_um[:, 0].min() >= 300 - 50 and xy_um[:, 0].max() <= 900 + 50
    assert xy_um[:, 1].min() >= 200 - 50 and xy_um[:, 1].max() <= 600 + 50
    # a 600 x 400 um rectangle holds 6 x 4 tiles of 100 um (give or take a row on the edges)
    assert 20 <= n <= 35
    assert (t.obs[K.OBS.TILE_TISSUE] >= 0.5).all()
    assert t.obs[K.OBS.SECTION].astype(str).eq("slide").all()
    # grid indices step with the stride
    r, c = t.obs[K.OBS.TILE_ROW].to_numpy(), t.obs[K.OBS.TILE_COL].to_numpy()
    assert np.allclose(np.diff(np.sort(np.unique(xy_um[:, 0]))), 100.0)
    assert np.allclose((xy_um[:, 0] - xy_um[0, 0]) / 100.0, c - c[0])
    assert np.allclose((xy_um[:, 1] - xy_um[0, 1]) / 100.0, r - r[0])
    # the tiles are a section like spots: centres in um through the shapes' transformation
    (sec,) = get_sections(sd, table_key="tiles")
    got_um, radius = spot_centers_um(sd, sec, table_key="tiles")
    assert np.allclose(got_um, xy_um) and np.allclose(radius, 50.0)


def test_tile_tissue_stride_gives_a_finer_grid_and_patches_of_the_tile():
    sd = _slide()
    n100 = sqs.pp.tile_tissue(sd, tile_um=100, stride_um=100)
    n50 = sqs.pp.tile_tissue(sd, tile_um=100, stride_um=50, key_added="fine")
    assert n50 > 3 * n100
    with pytest.warns(UserWarning, match="upsampled"):  # the slide is 2 um/px
        p = sqs.pp.patches(sd, table_key="fine")
    assert len(p) == n50 and p[0].shape == (200, 200, 3)  # 100 um at 0.5 um/px
    assert sd.tables["fine"].uns[K.UNS.TILES]["stride_um"] == 50.0


def test_tile_tissue_errors_write_nothing():
    sd = _slide()
    with pytest.raises(ValueError, match="min_tissue"):
        sqs.pp.tile_tissue(sd, min_tissue=1.5)
    with pytest.raises(ValueError, match="tile_um"):
        sqs.pp.tile_tissue(sd, tile_um=-1)
    blank = _slide(box=(0, 0, 0, 0))
    with pytest.raises(ValueError, match="no tile"):
        sqs.pp.tile_tissue(blank)
    for s in (sd, blank):
        assert "tiles" not in s.tables and not any(k.endswith("_tiles") for k in s.shapes)
        assert not any(k.endswith("_tissue") for k in s.labels)


def test_tiles_go_through_features_and_prediction(no_progress):
    sd = sqs.datasets.synthetic_section(image="pattern", n_rows=6, n_cols=6, microns_per_pixel=1.0)
    sqs.pp.compute_features(sd, backbone="dummy", patch_size_um=32, microns_per_pixel=1.0, cache=False)
    model = sqs.tl.train_baseline(sd, method="ridge", backbone="dummy", features_key="X_dummy")
    n = sqs.pp.tile_tissue(sd, tile_um=32, stride_um=16, min_tissue=0.0)
    sqs.pp.compute_features(sd, backbone="dummy", table_key="tiles", patch_size_um=32, microns_per_pixel=1.0, cache=False)
    assert sd.tables["tiles"].obsm["X_dummy"].shape[0] == n
    sqs.tl.predict_expression(sd, model, table_key="tiles", features_key="X_dummy")
    pred = sd.tables[K.TABLES.PREDICTED]
    assert pred.n_obs == n and np.isfinite(np.asarray(pred.layers[K.LAYERS.PREDICTED])).all()
    # the virtual map draws over the image like spots
    fig = sqs.pl.spatial(sd, pred.var_names[0], compare=False, show=False, return_fig=True)
    assert len(fig.axes) >= 1


# --- real H&E ------------------------------------------------------------------------------


def _coverage(sd):
    """Share of in-tissue spots under the mask, and mask area / convex hull area of their centres."""
    (sec,) = get_sections(sd)
    t = sd.tables["table"]
    xy_um, _ = spot_centers_um(sd, sec)
    xy_um = xy_um[t.obs[K.OBS.IN_TISSUE].to_numpy(bool)[sec.rows]]
    mask, aff = read_tissue_mask(sd, sec.section)
    inv = np.linalg.inv(aff)
    px = np.floor(xy_um @ inv[:2, :2].T + inv[:2, 2]).astype(int)
    px[:, 0] = px[:, 0].clip(0, mask.shape[1] - 1)
    px[:, 1] = px[:, 1].clip(0, mask.shape[0] - 1)
    covered = mask[px[:, 1], px[:, 0]].mean()
    area = mask.sum() * abs(np.linalg.det(aff[:2, :2]))
    return covered, area / ConvexHull(xy_um).volume


@pytest.mark.realdata
@pytest.mark.parametrize("section", ["A1"])  # B4, C2-C4 (slow to decode): benchmarks/bench_tissue.py
def test_tissue_mask_on_her2st_covers_the_spots(her2st_section, section):
    sd = her2st_section(section)
    sqs.pp.detect_tissue(sd)
    covered, ratio = _coverage(sd)
    assert covered >= 0.95, covered
    assert ratio <= 2.0, ratio


@pytest.mark.realdata
@pytest.mark.parametrize("section", ["MOB1", "MOB3"])
def test_tissue_mask_on_mob(mob_section, section):
    sd = mob_section(section)
    sqs.pp.detect_tissue(sd)
    covered, ratio = _coverage(sd)
    assert covered >= 0.95, covered
    assert ratio <= 2.0, ratio
