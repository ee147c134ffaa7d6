"""Reinhard: numpy LAB equals scikit-image's; tissue statistics are transferred; glass kept."""

from __future__ import annotations

import numpy as np
import pytest
from stain_synth import RUIFROK, he_concentrations, render

from napari_milview.stain import Reinhard, StainEstimateError, lab_stats
from napari_milview.stain.reinhard import lab_to_rgb, rgb_to_lab

skcolor = pytest.importorskip("skimage.color")  # test-only reference implementation


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)


def test_lab_equals_skimage(rgb):
    np.testing.assert_allclose(rgb_to_lab(rgb), skcolor.rgb2lab(rgb), atol=2e-3)
    lab = skcolor.rgb2lab(rgb)
    np.testing.assert_allclose(lab_to_rgb(lab), skcolor.lab2rgb(lab) * 255, atol=0.06)
    assert np.abs(lab_to_rgb(rgb_to_lab(rgb)) - rgb).max() < 0.06


def test_stats_ignore_background():
    tile = render(he_concentrations(100, 100, seed=2), RUIFROK, 240.0, seed=2)
    glass = np.full((100, 300, 3), 240, np.uint8)
    m1, s1, n1 = lab_stats(tile, i0=240.0)
    m2, s2, n2 = lab_stats(np.concatenate([tile, glass], axis=1), i0=240.0)
    assert n1 == n2 < tile.shape[0] * tile.shape[1]
    np.testing.assert_allclose(m1, m2)
    np.testing.assert_allclose(s1, s2)
    with pytest.raises(StainEstimateError, match="too little tissue"):
        lab_stats(glass, i0=240.0)


def test_transfer_reaches_the_target_statistics():
    src = render(he_concentrations(160, 160, seed=5), RUIFROK, 240.0, seed=5)
    tgt = render(he_concentrations(160, 160, seed=6) * 0.7, [[0.55, 0.75, 0.36],
                                                           [0.25, 0.80, 0.55]], 240.0, seed=6)
    sm, ss, _ = lab_stats(src, i0=240.0)
    tm, ts, _ = lab_stats(tgt, i0=240.0)
    out = Reinhard(sm, ss, tm, ts, i0=240.0)(src)
    om, os_, _ = lab_stats(out, i0=240.0)
    # the tissue set shifts a little with the colours, and uint8 clips: a few units
    assert np.abs(om - tm).max() < 3.0 and np.abs(os_ - ts).max() < 3.0
    assert np.abs(om - sm).max() > 5.0


def test_identity_and_glass():
    src = render(he_concentrations(64, 64, seed=7), RUIFROK, 240.0, seed=7)
    m, s, _ = lab_stats(src, i0=240.0)
    same = Reinhard(m, s, m, s, i0=240.0)(src)
    assert np.abs(same.astype(int) - src).max() <= 1
    shift = Reinhard(m, s, m + [10, 5, -5], s * 1.2, i0=240.0)
    glass = np.full((16, 16, 3), 240, np.uint8)
    np.testing.assert_array_equal(shift(glass), glass)
    with pytest.raises(ValueError, match="positive standard deviations"):
        Reinhard(m, [0, 1, 1], m, s)
