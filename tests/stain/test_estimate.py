"""Per-slide estimation on synthetic and real slides; the blank-slide guard; the cache."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_milview.slide import open_slide
from napari_milview.stain import DEFAULT_REFERENCE, StainEstimateError, estimate_slide
from napari_milview.stain._common import angle_deg
from napari_milview.stain.estimate import clear_cache, estimate_tiles, is_swapped, tile_qc

# the synthetic generator's stain vectors (napari_milview.synthetic)
SYN_H = np.array([0.650, 0.704, 0.286])
SYN_E = np.array([0.10, 0.86, 0.50])


def test_synthetic_slide_gives_its_stain_vectors_back(svs):
    clear_cache()
    with open_slide(svs.path) as s:
        st = estimate_slide(s)
        assert not st.fallback and st.path == str(svs.path)
        # JPEG (4:2:0 chroma) and blur mix the stains at nuclear borders: 6 degrees
        assert angle_deg(st.matrix[0], SYN_H) < 6.0
        assert angle_deg(st.matrix[1], SYN_E) < 6.0
        np.testing.assert_allclose(st.i0, 241, atol=3)  # the generator's glass is 240-242
        assert st.tiles.shape[0] >= 3
        w0, h0 = s.info.dimensions
        x, y, w, h = st.tiles.T
        assert np.all((x >= 0) & (y >= 0) & (x + w <= w0) & (y + h <= h0))
        assert np.all(st.intensity_95 > 0.1) and np.all(st.max_conc > 0.1)
        assert estimate_slide(s) is st  # cached per file and parameters
    assert estimate_slide(svs.path) is st  # a path of the same file hits the cache too


@pytest.fixture(scope="module")
def blank_tif(tmp_path_factory):
    img = (240 + np.random.default_rng(0).integers(-3, 4, (768, 1024, 3))).astype(np.uint8)
    path = tmp_path_factory.mktemp("blank") / "blank.tif"
    tifffile.imwrite(path, img, tile=(256, 256), compression="jpeg", photometric="rgb",
                     metadata=None, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    return path


def test_blank_slide_falls_back_to_the_reference(blank_tif):
    st = estimate_slide(blank_tif, cache=False)
    assert st.fallback and st.tiles.shape == (0, 4)
    np.testing.assert_allclose(st.matrix, DEFAULT_REFERENCE.matrix)
    assert any("stain estimation failed" in n for n in st.notes)


def test_white_tiles_cannot_be_estimated():
    with pytest.raises(StainEstimateError, match="no tile gave stain vectors"):
        estimate_tiles(np.full((2, 64, 64, 3), 250, np.uint8), i0=250.0)
    with pytest.raises(ValueError, match="uint8 tiles"):
        estimate_tiles(np.zeros((64, 64), np.uint8))


def test_qc_and_swap_rules():
    rng = np.random.default_rng(0)
    white = np.full((64, 64, 3), 245, np.uint8)
    q = tile_qc(white)
    assert q["ok"] == 0 and q["frac_sat"] == 0
    green = np.zeros((64, 64, 3), np.uint8)
    green[..., 1] = rng.integers(100, 255, (64, 64))
    assert tile_qc(green)["frac_green"] > 0.9
    h, e = SYN_H / np.linalg.norm(SYN_H), SYN_E / np.linalg.norm(SYN_E)
    assert not is_swapped(np.vstack([h, e])) and is_swapped(np.vstack([e, h]))


@pytest.mark.realdata
def test_real_slide_reproduces_the_default_reference(real_svs):
    st = estimate_slide(real_svs, cache=False)
    assert not st.fallback
    np.testing.assert_allclose(st.matrix, DEFAULT_REFERENCE.matrix, atol=2e-3)
    np.testing.assert_allclose(st.max_conc, DEFAULT_REFERENCE.max_conc, rtol=1e-2)
    np.testing.assert_allclose(st.intensity_95, DEFAULT_REFERENCE.intensity_95, rtol=1e-2)
    np.testing.assert_allclose(st.lab_mean, DEFAULT_REFERENCE.lab_mean, atol=0.05)
    np.testing.assert_allclose(st.lab_std, DEFAULT_REFERENCE.lab_std, atol=0.05)
