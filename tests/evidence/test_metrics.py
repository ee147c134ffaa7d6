"""Localisation and concentration metrics against hand-computed values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from napari_milview.evidence.metrics import (
    auroc,
    average_precision,
    concentration,
    dice,
    localisation,
    otsu_threshold,
    pr_curve,
    roc_curve,
    topk_precision,
)


def test_auroc_with_ties_by_hand():
    # pairs (pos, neg): 0.4 vs 0.1 -> 1, 0.4 vs 0.4 -> 1/2, 0.8 vs both -> 1: 3.5 / 4
    assert auroc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == pytest.approx(0.875)
    # scikit-learn's documented example: 0.75
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    roc = roc_curve([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1])  # ties grouped: one point for 0.4
    np.testing.assert_allclose(roc["fpr"], [0, 0, 0.5, 1])
    np.testing.assert_allclose(roc["tpr"], [0, 0.5, 1, 1])


@pytest.mark.parametrize("seed", range(5))
def test_auroc_is_mann_whitney_u(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, 300).astype(float)  # many ties
    y = rng.random(300) < 0.3
    u = mannwhitneyu(s[y], s[~y]).statistic
    assert auroc(s, y) == pytest.approx(u / (y.sum() * (~y).sum()), abs=1e-12)


def test_average_precision_by_hand():
    # thresholds 0.8 (P 1, R 1/2), 0.4 (P 2/3, R 1), 0.35/0.1 add no recall
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(
        0.5 * 1 + 0.5 * 2 / 3)
    # tie at the top: one threshold with P = 1/2, R = 1
    assert average_precision([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    # every patch positive: AP 1, AUROC undefined
    assert average_precision([0.2, 0.7], [1, 1]) == 1.0
    assert math.isnan(auroc([0.2, 0.7], [1, 1]))
    pr = pr_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert pr["recall"][0] == 0 and pr["precision"][0] == 1


def test_topk_precision_default_k_is_the_number_of_positives():
    s, y = [0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]
    assert topk_precision(s, y) == (0.5, 2)
    assert topk_precision(s, y, 3) == (pytest.approx(2 / 3), 3)
    assert topk_precision(s, y, 100)[1] == 4


def test_dice_and_otsu_by_hand():
    assert dice([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5
    assert math.isnan(dice([0, 0], [0, 0]))
    s = np.array([0.0, 0.1, 0.05, 1.0, 0.95, 0.9])
    t = otsu_threshold(s)
    assert 0.1 < t < 0.9
    loc = localisation(s, [0, 0, 0, 1, 1, 1])
    assert loc["dice"] == 1.0 and loc["dice_rule"] == "otsu"
    top = localisation(s, [0, 0, 0, 1, 1, 0], dice_rule="top_fraction")  # top 2 = 3, 4
    assert top["dice"] == 1.0
    fixed = localisation(s, [0, 0, 0, 1, 1, 0], dice_rule=0.92)  # predicts 3, 4
    assert fixed["dice"] == 1.0 and fixed["dice_threshold"] == 0.92


def test_mass_inside_weights_by_overlap():
    loc = localisation([1.0, 1.0, 2.0], [0, 1, 1], overlap=[0.0, 0.5, 1.0])
    assert loc["mass_inside"] == pytest.approx((1 * 0.5 + 2 * 1.0) / 4)
    assert localisation([1.0, 1.0, 2.0], [0, 1, 1])["mass_inside"] == pytest.approx(3 / 4)
    neg = localisation([-1.0, 2.0], [0, 1])  # logits: no distribution, NaN with a note
    assert math.isnan(neg["mass_inside"]) and "softmax" in neg["note"]


def test_one_class_absent_gives_nan_and_a_note():
    loc = localisation([0.3, 0.2, 0.1], [0, 0, 0])
    assert math.isnan(loc["auroc"]) and math.isnan(loc["average_precision"])
    assert math.isnan(loc["topk_precision"]) and loc["n_positive"] == 0
    assert "no positive" in loc["note"]


def test_concentration_uniform_and_one_hot():
    n = 250
    c = concentration(np.full(n, 3.0))
    assert c["entropy"] == pytest.approx(math.log(n))
    assert c["effective_n"] == pytest.approx(n)
    assert c["normalised_entropy"] == pytest.approx(1.0)
    assert c["top1pct_mass"] == pytest.approx(3 / n)  # ceil(2.5) = 3 patches
    assert c["topk_mass"] == pytest.approx(20 / n) and c["k"] == 20
    one = concentration(np.eye(1, n, 7).ravel(), k=5)
    assert one["entropy"] == 0 and one["effective_n"] == 1 and one["topk_mass"] == 1
    with pytest.raises(ValueError, match="softmax"):
        concentration([-1.0, 1.0])
