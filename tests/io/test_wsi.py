"""io.read_wsi: pyramidal TIFF and OME-TIFF through tifffile, microns per pixel from metadata."""

import numpy as np
import pytest
import tifffile

import sq_spade as sqs
from sq_spade.io._sections import affine_to, image_levels


def _image(h=1200, w=1000):
    img = np.full((h, w, 3), 240, np.uint8)
    img[300:900, 200:800] = (200, 90, 170)
    img[0, 0] = (1, 2, 3)
    return img


def _write(path, img, *, ome=False, mpp=None):
    kw = {"tile": (256, 256), "photometric": "rgb"}
    with tifffile.TiffWriter(path, ome=ome) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if ome and mpp else None
        res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if (mpp and not ome) else {}
        tw.write(img, subifds=2, metadata=meta, **res, **kw)
        tw.write(img[::2, ::2], subfiletype=1, **kw)
        tw.write(img[::4, ::4], subfiletype=1, **kw)


@pytest.mark.parametrize("ome", [False, True])
def test_pyramidal_tiff_reads_lazily_with_its_scale(tmp_path, ome):
    img = _image()
    path = tmp_path / ("slide.ome.tif" if ome else "slide.tif")
    _write(path, img, ome=ome, mpp=0.5)
    sd = sqs.io.read_wsi(path)
    levels = image_levels(sd.images["slide_image"])
    assert [tuple(a.shape) for a in levels] == [(3, 1200, 1000), (3, 600, 500), (3, 300, 250)]
    assert not isinstance(levels[0].data, np.ndarray)  # lazy
    assert np.array_equal(np.moveaxis(levels[0].data[:, :5, :5].compute(), 0, -1), img[:5, :5])
    assert np.array_equal(np.moveaxis(levels[2].data.compute(), 0, -1), img[::4, ::4])
    aff = affine_to(sd.images["slide_image"], "slide_um")
    assert np.allclose(np.diag(aff)[:2], 0.5)
    # the stored coarse level serves tissue detection and tiles
    sqs.pp.detect_tissue(sd, microns_per_pixel=2.0)
    mask = sd.labels["slide_tissue"]
    assert image_levels(mask)[0].shape == (300, 250)
    n = sqs.pp.tile_tissue(sd, tile_um=50)
    assert n == pytest.approx((300 / 50) * (300 / 50), abs=8)


def test_missing_scale_is_an_explicit_error(tmp_path):
    path = tmp_path / "noscale.tif"
    _write(path, _image(), mpp=None)
    with pytest.raises(ValueError, match="microns_per_pixel"):
        sqs.io.read_wsi(path)
    sd = sqs.io.read_wsi(path, microns_per_pixel=0.25, section="s")
    assert np.allclose(np.diag(affine_to(sd.images["s_image"], "s_um"))[:2], 0.25)
    with pytest.raises(FileNotFoundError, match="path"):
        sqs.io.read_wsi(tmp_path / "absent.tif")


def test_windows_read_straight_from_the_file(tmp_path):
    from sq_spade.pp._patches import _source_array

    img = _image()
    _write(tmp_path / "w.tif", img, mpp=0.5)
    sd = sqs.io.read_wsi(tmp_path / "w.tif")
    lv0 = image_levels(sd.images["w_image"])[0].data
    src = _source_array(lv0)
    assert src is not None  # patches slice the file, not a dask graph
    assert np.array_equal(np.moveaxis(src[:, 290:310, 190:210], 0, -1), img[290:310, 190:210])
