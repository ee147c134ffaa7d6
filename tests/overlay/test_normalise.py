"""Display normalisations: the properties each method promises, NaN handling, errors."""

import numpy as np
import pytest

from napari_milview.overlay.normalise import METHODS, contrast_limits, normalise


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(size=500).astype(np.float32)


def test_rank_percentile_is_uniform(logits):
    p = normalise(logits, "rank")
    n = logits.size
    np.testing.assert_allclose(np.sort(p), np.arange(1, n + 1) / n, rtol=1e-6)
    # order preserved: the highest score gets 1.0, the lowest 1/N
    assert p[np.argmax(logits)] == 1.0
    assert p[np.argmin(logits)] == pytest.approx(1 / n)


def test_rank_percentile_ties_share_the_average_rank():
    p = normalise(np.array([1.0, 2.0, 2.0, 3.0]), "rank")
    np.testing.assert_allclose(p, [0.25, 0.625, 0.625, 1.0])


def test_minmax_spans_zero_to_one(logits):
    p = normalise(logits * 7 + 3, "minmax")
    assert p.min() == 0.0 and p.max() == 1.0
    assert np.argmax(p) == np.argmax(logits)
    assert np.all(normalise(np.full(5, 2.0), "minmax") == 0.5)  # constant map: mid colour


def test_softmax_of_logits_sums_to_one(logits):
    p = normalise(logits, "softmax")
    assert p.sum() == pytest.approx(1.0, rel=1e-5)
    e = np.exp(logits.astype(np.float64))
    np.testing.assert_allclose(p, e / e.sum(), rtol=1e-5)
    # huge logits do not overflow
    assert np.isfinite(normalise(np.array([1000.0, 999.0]), "softmax")).all()


def test_attention_x_n_has_mean_one_for_softmax_attention(logits):
    att = normalise(logits, "softmax")
    xn = normalise(att, "attention_x_n")
    assert xn.mean() == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_allclose(normalise(np.full(8, 1 / 8), "attention_x_n"), 1.0)
    assert normalise(np.full(8, 1 / 8), "xn", zoom=0.5)[0] == pytest.approx(0.5)
    assert contrast_limits("attention_x_n") == (0.0, 1.0)  # ACMIL: uniform = top of the map


def test_fixed_range_clips_and_keeps_values():
    v = normalise(np.array([-1.0, 0.2, 0.5, 3.0]), "fixed", vmin=0.0, vmax=1.0)
    np.testing.assert_allclose(v, [0.0, 0.2, 0.5, 1.0])
    assert contrast_limits("fixed", v, vmin=0.0, vmax=1.0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="vmin and vmax"):
        normalise(np.ones(3), "fixed")
    with pytest.raises(ValueError, match="vmin < vmax"):
        normalise(np.ones(3), "fixed", vmin=1, vmax=1)


@pytest.mark.parametrize("method", list(METHODS))
def test_nan_stays_nan_and_is_left_out(method):
    s = np.array([np.nan, 0.1, 0.3, np.inf, 0.6])
    out = normalise(s, method, vmin=0, vmax=1)
    assert out.dtype == np.float32 and out.shape == (5,)
    assert np.isnan(out[[0, 3]]).all() and np.isfinite(out[[1, 2, 4]]).all()
    ref = normalise(s[[1, 2, 4]], method, vmin=0, vmax=1)
    np.testing.assert_allclose(out[[1, 2, 4]], ref)  # as if the NaNs were not there
    assert np.isnan(normalise(np.full(3, np.nan), method, vmin=0, vmax=1)).all()


def test_unknown_method_is_one_clear_error():
    with pytest.raises(ValueError, match=r"unknown normalisation 'zscore'.*rank"):
        normalise(np.ones(3), "zscore")
    assert np.allclose(normalise(np.array([1.0, 2.0]), "Min-Max"), [0, 1])  # aliases


def test_contrast_limits_per_method():
    v = np.array([-2.0, 1.0, np.nan])
    assert contrast_limits("raw", v) == (-2.0, 1.0)
    assert contrast_limits("softmax", np.array([0.2, 0.8])) == (0.0, 0.8)
    assert contrast_limits("rank", v) == (0.0, 1.0)
    assert contrast_limits("minmax") == (0.0, 1.0)
    lo, hi = contrast_limits("raw", np.array([3.0, 3.0]))
    assert hi > lo  # napari refuses equal limits
