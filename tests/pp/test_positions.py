import numpy as np
import pytest

import sq_spade as sqs
from sq_spade import _constants as K
from sq_spade.pp._positions import spot_positions, tile_ids


def test_grid_pixel_and_tiles():
    sd = sqs.datasets.synthetic_section(n_rows=3, n_cols=4, pitch_px=40.0, microns_per_pixel=0.5)
    t = sd.tables[K.TABLES.DEFAULT]
    grid, none = spot_positions(sd, t, "grid")
    assert none is None and grid.min() == 0
    xy = np.column_stack([t.obs[K.OBS.ARRAY_COL], t.obs[K.OBS.ARRAY_ROW]])
    assert np.array_equal(grid, xy - xy.min(0))
    pixel, bin_um = spot_positions(sd, t, "pixel")
    assert bin_um == pytest.approx(20.0)  # 40 px at 0.5 um/px
    assert np.array_equal(pixel, grid)  # centres on the grid: binned by the pitch, the same integers
    # an AnnData reads centres from obsm['spatial'] and the section's pixel size
    again, _ = spot_positions(t.copy(), t, "pixel")
    assert np.array_equal(again, pixel)
    assert spot_positions(sd, t, None) == (None, None)
    tiles = tile_ids(t, 2)
    assert len(set(tiles)) == 4  # a 3 x 4 grid in 2 x 2 tiles
    ad = t.copy()
    del ad.obs[K.OBS.ARRAY_ROW]
    with pytest.raises(KeyError, match="array_row"):
        tile_ids(ad)
