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


@pytest.mark.parametrize("kw", [
    dict(photometric="rgb"),  # tifffile stores YCbCr JPEG (photometric 6, JFIF)
    dict(photometric="rgb", compressionargs={"outcolorspace": "rgb"}),  # RGB, no JFIF: Aperio's
    dict(photometric="ycbcr"),
], ids=["rgb-as-ycbcr", "rgb-no-transform", "ycbcr"])
def test_strict_decode_gives_tifffiles_pixels(tmp_path, kw):
    """The strict decoder (an Adobe marker for RGB without JFIF, as tifffile's colour-space
    rules say) gives exactly tifffile's pixels, whatever the JPEG's colour layout."""
    pytest.importorskip("simplejpeg")
    path = tmp_path / "tiles.tif"
    rng = np.random.default_rng(0)
    img = np.clip(np.cumsum(rng.integers(0, 40, (256, 384, 3)), 1) // 20, 0, 255).astype(np.uint8)
    tifffile.imwrite(path, img, tile=(128, 128), compression="jpeg", metadata=None, **kw)
    with tifffile.TiffFile(path) as tf:
        ref = tf.pages[0].asarray()
    tiles = TiffTiles(str(path), [((256, 384), (128, 128))])
    try:
        assert tiles.pages[0].strict_prefix is not None
        for r in range(2):
            for c in range(3):
                np.testing.assert_array_equal(tiles.read_tile(0, r, c, 128, 128),
                                              ref[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128])
    finally:
        tiles.close()
