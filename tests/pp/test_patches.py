import warnings

import numpy as np
import pytest
import spatialdata as sd_mod

import sq_spade as sqs
from sq_spade import _constants as K


def _pattern(**kw):
    return sqs.datasets.synthetic_section(image="pattern", **kw)


def _image(sd):
    return np.moveaxis(np.asarray(sqs.io._sections.image_levels(next(iter(sd.images.values())))[0]), 0, -1)


def test_native_patch_centre_is_the_spot_pixel():
    sd = _pattern(n_rows=3, n_cols=3, pitch_px=37, margin_px=30)
    img = _image(sd)
    p = sqs.pp.extract_patches(sd, patch_px=33)
    xy = sd.tables["table"].obsm["spatial"]
    for i in range(len(p)):
        x, y = (int(np.floor(v)) for v in xy[i])
        assert np.array_equal(p[i][16, 16], img[y, x])


def test_resampled_patch_centre_is_the_spot_pixel():
    sd = _pattern(n_rows=3, n_cols=3, pitch_px=60, margin_px=50, microns_per_pixel=1.0)
    img = _image(sd)
    # 64 um at 0.5 um/px: 128 px, upsampled 2x from the 1 um/px image
    with pytest.warns(UserWarning, match="upsampled"):
        p = sqs.pp.extract_patches(sd, patch_size_um=64, microns_per_pixel=0.5)
    xy = sd.tables["table"].obsm["spatial"]
    for i in range(len(p)):
        x, y = (int(np.floor(v)) for v in xy[i])
        got = p[i][63:65, 63:65].astype(float).mean((0, 1))
        assert np.abs(got - img[y, x]).max() <= 1.5


def test_corner_spot_is_padded_to_full_size():
    sd = sqs.datasets.synthetic_section(n_rows=2, n_cols=2, margin_px=0, pitch_px=40)
    p = sqs.pp.extract_patches(sd, patch_px=20, fill=7)
    first = p[0]  # spot at pixel (0, 0)
    assert first.shape == (20, 20, 3)
    assert (first[:10, :, :] == 7).all() and (first[:, :10, :] == 7).all()
    assert not (first[10:, 10:] == 7).all()
    padded = sd.tables["table"].obs[K.PATCH_PADDED].to_numpy()
    assert padded[0] == pytest.approx(0.75)


def test_same_patch_from_two_pyramid_levels():
    # a smooth image large enough for a 2-level pyramid
    h = w = 2200
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(xx / 90), 128 + 100 * np.cos(yy / 70), 128 + 60 * np.sin((xx + yy) / 120)],
                   -1).astype(np.uint8)
    centers = np.array([[500.0, 600.0], [1500.3, 1200.7], [1000.0, 1800.0]])
    sd = sqs.io.section_from_arrays(np.ones((3, 2)), genes=["a", "b"], spot_ids=["1", "2", "3"],
                                    centers_px=centers, image=img, section="big", microns_per_pixel=1.0,
                                    spot_diameter_um=55)
    levels = sqs.io._sections.image_levels(sd.images["big_image"])
    assert len(levels) >= 2
    auto = sqs.pp.patches(sd, patch_size_um=256, microns_per_pixel=2.0)
    assert auto.geometry.sections["big"]["level"] == 1
    fine = sqs.pp.patches(sd, patch_size_um=256, microns_per_pixel=2.0, level=0)
    for i in range(3):
        diff = np.abs(auto[i].astype(float) - fine[i].astype(float))
        assert diff.mean() < 3 and np.percentile(diff, 99) < 12


def test_patches_are_lazy_and_dataloader_friendly():
    torch = pytest.importorskip("torch")
    sd = sqs.datasets.synthetic_section(n_rows=4, n_cols=4)
    p = sqs.pp.extract_patches(sd, patch_size_um=32, microns_per_pixel=1.0, tissue=False)
    loader = torch.utils.data.DataLoader(p, batch_size=5, num_workers=2)
    batches = list(loader)
    assert sum(b.shape[0] for b in batches) == 16
    assert batches[0].dtype == torch.uint8 and tuple(batches[0].shape[1:]) == (32, 32, 3)
    assert np.array_equal(batches[1][0].numpy(), p[5])


def test_geometry_recorded_and_reused(synth):
    sqs.pp.extract_patches(synth, patch_size_um=48, microns_per_pixel=1.5)
    g = synth.tables["table"].uns[K.PATCHES_UNS]
    assert g["patch_px"] == 32 and g["mpp"] == 1.5
    assert g["sections"]["synth"]["level"] == 0
    assert sqs.pp.patches(synth)[0].shape == (32, 32, 3)


@pytest.mark.realdata
def test_her2st_c2_patches_sit_on_tissue(her2st_section):
    sd = sqs.io.combine_sections([her2st_section("C2")])  # a copy of the table: no mutation of the cache
    with pytest.warns(UserWarning, match="upsampled"):
        p = sqs.pp.extract_patches(sd)
    assert len(p) == 187 and p[0].shape == (224, 224, 3)
    tissue = sd.tables["table"].obs[K.PATCH_TISSUE]
    assert tissue.median() > 0.8
    assert (tissue > 0.3).mean() > 0.95
    # native crops are the mclSTExp geometry: 224 px at ~0.69 um/px
    nat = sqs.pp.patches(sd, patch_px=224)
    assert nat.geometry.mode == "native"
    assert nat.geometry.sections["C2"]["patch_size_um"] == pytest.approx(224 * 0.688, rel=0.01)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"image_key": "nope"}, KeyError, "image_key='nope'"),
    ({"shapes_key": "nope"}, KeyError, "shapes_key='nope'"),
    ({"table_key": "nope"}, KeyError, "table_key='nope'"),
    ({"patch_px": 0}, ValueError, "patch_px"),
    ({"mpp": -1.0}, ValueError, "mpp"),
    ({"fill": 300}, ValueError, "fill"),
    ({"patch_size_um": 10, "mpp": 1.0, "patch_px": 12}, ValueError, "patch_size_um"),
])
def test_bad_arguments_leave_object_unchanged(synth, kwargs, exc, match):
    before = set(synth.tables["table"].obs.columns), set(synth.tables["table"].uns)
    with pytest.raises(exc, match=match):
        sqs.pp.extract_patches(synth, **kwargs)
    assert (set(synth.tables["table"].obs.columns), set(synth.tables["table"].uns)) == before


def test_image_without_physical_scale_refused(synth):
    from spatialdata.transformations import remove_transformation

    remove_transformation(synth.shapes["synth_spots"], "synth_um")
    with pytest.raises(ValueError, match="no physical scale"):
        sqs.pp.extract_patches(synth)


@pytest.mark.parametrize(("channels", "dtype", "match"), [(1, np.uint8, "grayscale"), (4, np.uint8, "RGBA"),
                                                           (3, np.uint16, "uint16")])
def test_non_rgb8_images_refused(synth, channels, dtype, match):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    tr = get_transformation(synth.images["synth_image"], get_all=True)
    arr = np.zeros((channels, 50, 50), dtype)
    synth.images["synth_image"] = Image2DModel.parse(arr, dims=("c", "y", "x"), transformations=tr)
    with pytest.raises(ValueError, match=match):
        sqs.pp.extract_patches(synth)


def test_anndata_input_refused(synth):
    with pytest.raises(TypeError, match="SpatialData"):
        sqs.pp.extract_patches(synth.tables["table"])


def test_written_and_read_back(tmp_path, synth):
    synth.write(tmp_path / "s.zarr")
    back = sd_mod.read_zarr(tmp_path / "s.zarr")
    a = sqs.pp.patches(synth, patch_size_um=32, microns_per_pixel=1.0)
    b = sqs.pp.patches(back, patch_size_um=32, microns_per_pixel=1.0)
    assert np.array_equal(a[3], b[3])


@pytest.mark.parametrize("kw", [{"patch_px": 16}, {"patch_size_um": 24, "mpp": 1.5}], ids=["native", "resampled"])
def test_patches_are_writable_copies(kw):
    # torch's default collate warns on (and may later refuse) read-only arrays
    sd = sqs.datasets.synthetic_section()
    p = sqs.pp.patches(sd, **kw)
    a = p[0]
    assert a.flags.writeable
    a[:] = 0
    assert p[0].any()  # writing into a served patch does not touch the image
def _chunked_section(chunk: int = 24):
    """A 'pattern' section (spots on the image edge too) whose image is a dask array of small chunks."""
    import dask.array as da

    base = _pattern(n_rows=4, n_cols=5, pitch_px=37, margin_px=0)
    t = base.tables["table"]
    img = da.from_array(_image(base), chunks=(chunk, chunk, 3))
    return sqs.io.section_from_arrays(t.X, genes=list(t.var_names), spot_ids=list(t.obs["spot_id"]),
                                      centers_px=t.obsm["spatial"], image=img, section="chunky",
                                      microns_per_pixel=1.0, spot_diameter_um=30)


@pytest.mark.parametrize("geometry", [{"patch_px": 33}, {"patch_size_um": 40, "mpp": 1.25}])
def test_windowed_reads_equal_whole_level_reads(tmp_path, monkeypatch, geometry):
    """Above the memory budget a level is read window by window, with the very same pixels."""
    from sq_spade.pp._patches import _source_array

    sd = _chunked_section()
    sd.write(tmp_path / "s.zarr")
    back = sd_mod.read_zarr(tmp_path / "s.zarr")
    whole = sqs.pp.patches(sd, **geometry)
    assert whole._levels[0].in_memory
    monkeypatch.setattr(sqs.settings, "memory_budget_bytes", 1)
    for obj, direct in ((sd, False), (back, True)):  # dask compute / straight from the zarr array
        win = sqs.pp.patches(obj, **geometry)
        level = win._levels[0]
        assert not level.in_memory and (level._source is not None) == direct
        assert (_source_array(level.data) is not None) == direct
        for i in range(len(whole)):
            assert np.array_equal(win[i], whole[i]), i
    # windows that straddle chunks and the image's edge (padded) were both exercised
    assert (sd.tables["table"].obsm["spatial"] == 0).any()
    assert (whole.padded_fraction() > 0).any() and (whole.padded_fraction() == 0).any()


def test_level_is_loaded_only_where_patches_fall(tmp_path, monkeypatch):
    """A level that fits the budget is read only in the storage blocks that some patch touches."""
    import dask.array as da

    sd = _chunked_section()  # 24 px blocks; spots on a 4 x 5 grid, 37 px apart
    t = sd.tables["table"]
    xy = t.obsm["spatial"]
    keep = np.flatnonzero(xy[:, 1] <= xy[:, 1].min())  # the first row of spots only
    sd.tables["table"] = t[keep].copy()
    sd.write(tmp_path / "s.zarr")
    back = sd_mod.read_zarr(tmp_path / "s.zarr")
    img = _image(sd)
    p = sqs.pp.patches(back, patch_px=33)
    level = p._levels[0]
    assert level.in_memory and level._loaded is not None
    assert level._loaded.any() and not level._loaded.all()  # the lower rows of blocks were never read
    ys, xs = level._bounds
    r = int(np.flatnonzero(~level._loaded.any(axis=1))[0])
    assert not level.data[:, ys[r]: ys[r + 1]].any()  # unread blocks hold no pixels (zero pages)
    padded = np.pad(img, ((40, 40), (40, 40), (0, 0)), constant_values=255)  # the fill outside the image
    for i in range(len(p)):  # the patches are the image's own pixels
        x, y = (int(np.floor(v - 16.5 + 0.5)) + 40 for v in xy[keep[i]])
        assert np.array_equal(p[i], padded[y: y + 33, x: x + 33]), i
    # a window outside the loaded blocks is read from storage, not served as zeros
    y1 = int(ys[r])
    assert np.array_equal(level.read(y1, y1 + 10, 0, 10, 255), img[y1: y1 + 10, :10])
    # loading reads the zarr store directly: no dask computation (whose first call imports `distributed`)
    monkeypatch.setattr(da.Array, "compute", lambda *a, **k: pytest.fail("dask compute"))
    assert np.array_equal(sqs.pp.patches(back, patch_px=33)[0], p[0])


def test_lazy_patches_resolve_and_split_by_section(monkeypatch):
    a = sqs.datasets.synthetic_section(section="a", n_rows=2, n_cols=3, seed=0)
    b = sqs.datasets.synthetic_section(section="b", n_rows=3, n_cols=2, seed=1)
    sd = sqs.io.combine_sections([a, b])
    ref = sqs.pp.patches(sd, patch_size_um=32, microns_per_pixel=1.0)
    from sq_spade.pp._patches import _build_patches

    lazy = _build_patches(sd, table_key="table", image_key=None, shapes_key=None, patch_size_um=32, mpp=1.0,
                          patch_px=None, fill=255, level=None, load=False)
    assert not any(lv.in_memory for lv in lazy._levels)
    parts = lazy.by_section()
    assert [list(p.geometry.sections) for p in parts] == [["a"], ["b"]]
    assert np.array_equal(np.sort(np.concatenate([p.rows for p in parts])), ref.rows)
    for p in parts:
        loaded = p.resolved()
        assert loaded._levels[0].in_memory
        pos = np.searchsorted(ref.rows, p.rows)
        for j, i in enumerate(pos):
            assert np.array_equal(loaded[j], ref[int(i)])
    assert not parts[0].resolved(memory_budget_bytes=1)._levels[0].in_memory


# --- patch-centre geometry to a tenth of a pixel: resampled levels, non-square images ------------------------------
_SPOTS = np.array([[270.3, 231.4], [676.7, 675.2], [1079.1, 918.6], [1520.9, 472.3]])


def _ramp_section():
    """A non-square image (1,100 x 1,700 px, two levels) whose colours are steep linear ramps of the position.

    Red and green step by 8 every 2 px along x and y, so level 1 (the 2x2 means) ramps by 8 per
    pixel exactly; blue ramps by 4 per pixel along x on level 0. Each ramp restarts every 50
    px of level 0, and every spot sits 18-32 px into a period, so the centre of each of its
    patches lies well inside one ramp (steep ramps: uint8 rounding stays far below 0.1 px).
    """
    h, w = 1100, 1700
    x, y = np.arange(w), np.arange(h)
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = (20 + 8 * ((x // 2) % 25))[None, :]
    img[..., 1] = (20 + 8 * ((y // 2) % 25))[:, None]
    img[..., 2] = (20 + 4 * (x % 50))[None, :]
    sd = sqs.io.section_from_arrays(np.ones((len(_SPOTS), 2)), genes=["a", "b"],
                                    spot_ids=[f"s{i}" for i in range(len(_SPOTS))], centers_px=_SPOTS, image=img,
                                    section="ramp", microns_per_pixel=1.0, spot_diameter_um=55)
    return sd, [np.asarray(a) for a in sqs.io._sections.image_levels(sd.images["ramp_image"])]


def _centre_value(values):
    """The value at the centre of a patch, by a line through its central columns (or rows)."""
    out = len(values)
    j = np.arange(out // 4, out - out // 4)  # the resampling filter of these never reaches a ramp's restart
    beta, alpha = np.polyfit(j, values[j], 1)
    return alpha + beta * (out / 2 - 0.5)


def _level_position(value, ramp, near):
    """Continuous position u on the level (pixel i spans [i, i + 1)) where its ramp takes ``value``."""
    i = np.arange(int(near) - 4, int(near) + 5)
    a, c = np.polyfit(i, ramp[i].astype(float), 1)
    assert np.abs(ramp[i] - (a * i + c)).max() < 1e-6  # the ramp is exactly linear there
    return (value - c) / a + 0.5


def test_resampled_patch_centres_from_a_coarser_level_within_a_tenth_of_a_pixel():
    sd, levels = _ramp_section()
    assert levels[0].shape[1:] == (1100, 1700) and levels[1].shape[1:] == (550, 850)
    p = sqs.pp.patches(sd, patch_size_um=40, microns_per_pixel=2.5)  # 20 level-1 pixels resampled to 16
    assert p.geometry.sections["ramp"]["level"] == 1 and p.patch_px == 16
    red_x, green_y = levels[1][0, 0, :], levels[1][1, :, 0]
    for i, (x0, y0) in enumerate(_SPOTS):
        patch = p[i].astype(float)
        assert _level_position(_centre_value(patch[..., 0].mean(0)), red_x, x0 / 2) == pytest.approx(x0 / 2, abs=0.1)
        assert _level_position(_centre_value(patch[..., 1].mean(1)), green_y, y0 / 2) == pytest.approx(y0 / 2, abs=0.1)


@pytest.mark.parametrize("mpp", [1.25, 0.8])
def test_resampled_patch_centres_on_the_full_resolution_level_within_a_tenth_of_a_pixel(mpp):
    sd, levels = _ramp_section()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 0.8 um/px upsamples the 1 um/px image
        p = sqs.pp.patches(sd, patch_size_um=20, microns_per_pixel=mpp, level=0)  # 20 level-0 pixels resampled to 16 or 25
    blue_x = levels[0][2, 0, :]
    for i, (x0, _) in enumerate(_SPOTS):
        got = _level_position(_centre_value(p[i][..., 2].astype(float).mean(0)), blue_x, x0)
        assert got == pytest.approx(x0, abs=0.1)


def test_native_patch_centre_on_a_non_square_image():
    sd = _pattern(n_rows=2, n_cols=5, pitch_px=37, margin_px=30)
    img = _image(sd)
    assert img.shape[0] != img.shape[1]
    p = sqs.pp.extract_patches(sd, patch_px=33)
    xy = sd.tables["table"].obsm["spatial"]
    for i in range(len(p)):
        x, y = (int(np.floor(v)) for v in xy[i])
        assert np.array_equal(p[i][16, 16], img[y, x])


@pytest.mark.parametrize("where", ["right", "bottom"])
def test_padded_fraction_clips_each_axis_against_its_own_side(where):
    # wide image (300 x 200): a spot near the right edge; tall (200 x 300): near the bottom edge
    wide = where == "right"
    h, w = (200, 300) if wide else (300, 200)
    centre = np.array([[290.0, 100.0]]) if wide else np.array([[100.0, 290.0]])
    sd = sqs.io.section_from_arrays(np.ones((1, 2)), genes=["a", "b"], spot_ids=["s"], centers_px=centre,
                                    image=np.full((h, w, 3), 200, np.uint8), section="edge", microns_per_pixel=1.0,
                                    spot_diameter_um=55)
    sqs.pp.extract_patches(sd, patch_px=40)
    # the 40 px window reaches 10 px past the edge: a quarter of it is padding
    assert sd.tables["table"].obs[K.PATCH_PADDED].iloc[0] == pytest.approx(0.25)
