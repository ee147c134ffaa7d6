"""Agreement of several checkpoints' maps and predictions."""

from __future__ import annotations

import numpy as np
import pytest

from napari_milview.evidence.disagreement import disagreement, percentile_ranks


def test_percentile_ranks_with_ties():
    np.testing.assert_allclose(percentile_ranks([3.0, 1.0, 2.0]), [100, 0, 50])
    np.testing.assert_allclose(percentile_ranks([1.0, 1.0, 5.0]), [25, 25, 100])
    assert percentile_ranks([7.0]).tolist() == [50.0]


def test_identical_maps_agree():
    m = np.array([0.1, 0.5, 0.2, 0.2])
    d = disagreement([m, m * 2, m + 1], [[0.2, 0.8]] * 3)  # same ranking, other scales
    np.testing.assert_allclose(d["rank_spread"], 0)
    assert d["spearman_mean"] == pytest.approx(1.0)
    np.testing.assert_allclose(d["prediction_std"], 0, atol=1e-12)
    np.testing.assert_allclose(d["mean"], m * 4 / 3 + 1 / 3)


def test_reversed_maps_disagree_by_hand():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])
    d = disagreement([a, b], [[0.9, 0.1], [0.3, 0.7]])
    np.testing.assert_allclose(d["rank_spread"], [100, 0, 100])
    assert d["spearman_mean"] == pytest.approx(-1.0)
    np.testing.assert_allclose(d["std"], [1, 0, 1])
    np.testing.assert_allclose(d["prediction_mean"], [0.6, 0.4])
    np.testing.assert_allclose(d["prediction_std"], [0.3, 0.3])
    np.testing.assert_allclose(d["prediction_range"], [0.6, 0.6])


def test_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match="at least 2"):
        disagreement([np.ones(3)])
    with pytest.raises(ValueError, match="different lengths"):
        disagreement([np.ones(3), np.ones(4)])
    with pytest.raises(ValueError, match="predictions"):
        disagreement([np.ones(3), np.ones(3)], [[1.0]])
