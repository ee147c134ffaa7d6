"""Macenko estimation: known stain vectors come back; guards for white and pale input."""

from __future__ import annotations

import numpy as np
import pytest
from stain_synth import MACENKO_REF, RUIFROK, he_concentrations, render, unit

from napari_milview.stain import StainEstimateError, fit_macenko
from napari_milview.stain._common import angle_deg


@pytest.mark.parametrize("matrix", [RUIFROK, MACENKO_REF], ids=["ruifrok", "macenko-ref"])
@pytest.mark.parametrize("i0", [240.0, 255.0])
def test_known_vectors_within_5_degrees(matrix, i0):
    rgb = render(he_concentrations(200, 200, seed=3), matrix, i0, seed=3)
    fit = fit_macenko(rgb, i0=i0)
    truth = unit(matrix)
    assert angle_deg(fit.matrix[0], truth[0]) < 5.0
    assert angle_deg(fit.matrix[1], truth[1]) < 5.0
    assert np.allclose(np.linalg.norm(fit.matrix, axis=1), 1.0)
    assert fit.matrix.min() > -1e-9  # signs fixed: positive OD


def test_order_does_not_depend_on_input_order(he_tile):
    rgb, conc, matrix, i0 = he_tile
    swapped = render(conc[..., ::-1], matrix[::-1], i0, seed=1)  # same image, stains relabelled
    a, b = fit_macenko(rgb, i0=i0), fit_macenko(swapped, i0=i0)
    np.testing.assert_allclose(a.matrix, b.matrix, atol=1e-6)
    assert a.matrix[0, 0] / a.matrix[0, 2] > a.matrix[1, 0] / a.matrix[1, 2]  # H first


def test_max_concentrations_are_the_99th_percentile(he_tile):
    rgb, conc, _, i0 = he_tile
    fit = fit_macenko(rgb, i0=i0)
    np.testing.assert_allclose(fit.max_conc, np.percentile(conc.reshape(-1, 2), 99, axis=0),
                               rtol=0.08)


def test_white_tile_raises_a_clear_error():
    white = np.full((128, 128, 3), 240, np.uint8)
    with pytest.raises(StainEstimateError, match="too little tissue"):
        fit_macenko(white, i0=240.0)
    few = white.copy()
    few[:4, :4] = (120, 60, 150)  # 16 stained pixels out of 16384
    with pytest.raises(StainEstimateError, match="16 of 16384"):
        fit_macenko(few, i0=240.0)


def test_pale_tile_falls_back_to_a_lower_threshold():
    conc = he_concentrations(200, 200, seed=4) * 0.06  # |OD| at most 0.15, often > 0.1
    rgb = render(conc, RUIFROK, 250.0, noise=0.3, seed=4)
    fit = fit_macenko(rgb, i0=250.0)
    assert fit.beta == 0.1 and any("pale" in n for n in fit.notes)


def test_single_stain_is_degenerate():
    conc = np.zeros((150, 150, 2))
    conc[..., 0] = np.random.default_rng(0).uniform(0.3, 2.0, (150, 150))
    rgb = render(conc, RUIFROK, 240.0, noise=0.0)
    with pytest.raises(StainEstimateError, match="degenerate"):
        fit_macenko(rgb, i0=240.0)


def test_mask_and_bad_arguments(he_tile):
    rgb, _, matrix, i0 = he_tile
    mask = np.zeros(rgb.shape[:2], bool)
    mask[:128] = True
    fit = fit_macenko(rgb, i0=i0, mask=mask)
    assert fit.n_pixels == 128 * 256
    with pytest.raises(ValueError, match="mask shape"):
        fit_macenko(rgb, mask=mask[:10])
    with pytest.raises(ValueError, match="RGB uint8"):
        fit_macenko(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="rule"):
        fit_macenko(rgb, rule="any")
