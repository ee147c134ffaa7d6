"""The direct TIFF tile path (``slide/tiff_tiles.py``): its checks of each JPEG tile.

The damaged-file cases (cut streams, markers in the scan, a scan that ends early) are in
``test_corpus.py``; here, what the checks must let through.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_milview.slide import open_slide
from napari_milview.slide.tiff_tiles import TiffTiles


@pytest.mark.parametrize("grey", [128, 127])
def test_a_truly_grey_tile_is_read_not_counted_bad(tmp_path, grey):
    """A tile of exactly mid-grey (what libjpeg draws where a scan ends early, with a
    warning) is read like any other: the right pixels, no placeholder, no warning; the
    strict decoder tells damage by libjpeg's warning, not by the pixels."""
    path = tmp_path / "grey.tif"
    img = np.full((256, 384, 3), grey, np.uint8)
    img[:, 256:] = (200, 120, 160)  # a second tile column of another colour
    tifffile.imwrite(path, img, tile=(128, 128), compression="jpeg", photometric="rgb",
                     metadata=None)
    tiles = TiffTiles(str(path), [((256, 384), (128, 128))])
    try:
        if tiles.pages[0].strict_prefix is not None:  # simplejpeg installed: the direct path
            assert (tiles.read_tile(0, 0, 0, 128, 128) == grey).all()
    finally:
        tiles.close()
    with open_slide(path) as s:
        px = s.read(0, 0, 0, 256, 384)
        assert s.bad_tiles == 0
    assert (px[:, :256] == grey).all()
    assert np.abs(px[:, 256:].astype(int) - (200, 120, 160)).max() <= 3
