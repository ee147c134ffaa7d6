"""Localisation and concentration of a heatmap: numbers, not pictures (docs/EVIDENCE.md).

Every function takes plain numpy arrays in bag order (``scores`` [N], one value per patch) and
returns a dict of plain Python numbers and arrays. A metric that is undefined on the input
(one class absent) is NaN, never an error, and a ``note`` says why.

Exact definitions (the tests compare them with hand-computed values):

* :func:`roc_curve`, :func:`auroc`: thresholds at every distinct score, ties grouped, the
  area by the trapezoid rule -- the same numbers as scikit-learn's ``roc_curve`` /
  ``roc_auc_score`` (and the Mann-Whitney U statistic / (n_pos n_neg), ties counted 1/2);
* :func:`pr_curve`, :func:`average_precision`: ``AP = sum_k (R_k - R_{k-1}) P_k`` over the
  distinct thresholds in decreasing order, no interpolation (scikit-learn's
  ``average_precision_score``);
* :func:`topk_precision`: share of positives among the K highest scores (K default: the
  number of positives, i.e. R-precision);
* :func:`otsu_threshold`: Otsu on a 256-bin histogram of the scores (positive = score >=
  the lower edge of the first upper-class bin);
* :func:`dice`: ``2 |P & G| / (|P| + |G|)``;
* :func:`concentration`: entropy ``H = -sum a log a`` (natural log) of the attention
  normalised to sum 1, effective number of instances ``exp(H)``, mass of the top 1 % and of
  the top K.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["DEFAULT_TOPK", "auroc", "average_precision", "concentration", "dice",
           "localisation", "normalise", "otsu_threshold", "pr_curve", "roc_curve",
           "softmax", "topk_precision"]

#: K of the top-K mass (concentration) and of the top-K prediction (faithfulness) when not
#: given: the top-K layer's default elsewhere in napari-milview (GeoJSON, robustness).
DEFAULT_TOPK = 20


def _scores(scores: Any) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("no scores (N = 0)")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{int((~np.isfinite(s)).sum())} non-finite score(s)")
    return s


def _labels(positive: Any, n: int) -> np.ndarray:
    y = np.asarray(positive).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{y.shape[0]} labels for {n} scores")
    return y.astype(bool)


def _counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, tps, fps) at each distinct score, decreasing (scikit-learn's
    ``_binary_clf_curve``): tps[j] = positives with score >= thresholds[j]."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct value
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1) - tps
    return s[last], tps, fps


def roc_curve(scores: Any, positive: Any) -> dict[str, np.ndarray]:
    """ROC curve with one point per distinct score (ties grouped), starting at (0, 0).

    Parameters
    ----------
    scores : array [N]
    positive : array [N] bool

    Returns
    -------
    dict
        ``fpr`` [T + 1], ``tpr`` [T + 1], ``thresholds`` [T + 1] (the first is +inf);
        NaN rates when a class is absent.
    """
    s = _scores(scores)
    y = _labels(positive, s.size)
    thr, tps, fps = _counts(s, y)
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    p, n = tps[-1], fps[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"fpr": fps / n if n else np.full_like(fps, np.nan),
                "tpr": tps / p if p else np.full_like(tps, np.nan),
                "thresholds": np.r_[np.inf, thr]}


def auroc(scores: Any, positive: Any) -> float:
    """Area under the ROC curve (trapezoid over the tie-grouped curve); NaN when a class is
    absent. Equals ``U / (n_pos n_neg)`` of the Mann-Whitney test with ties counted 1/2."""
    roc = roc_curve(scores, positive)
    if np.isnan(roc["fpr"]).any() or np.isnan(roc["tpr"]).any():
        return float("nan")
    return float(np.trapezoid(roc["tpr"], roc["fpr"]))


def pr_curve(scores: Any, positive: Any) -> dict[str, np.ndarray]:
    """Precision-recall curve, one point per distinct score, recall increasing.

    Returns
    -------
    dict
        ``recall`` [T + 1] starting at 0, ``precision`` [T + 1] starting at 1 (the point
        scikit-learn appends), ``thresholds`` [T + 1] (the first is +inf). NaN recall when
        there is no positive.
    """
    s = _scores(scores)
    y = _labels(positive, s.size)
    thr, tps, fps = _counts(s, y)
    p = tps[-1]
    precision = tps / (tps + fps)
    recall = tps / p if p else np.full_like(tps, np.nan)
    return {"recall": np.r_[0.0, recall], "precision": np.r_[1.0, precision],
            "thresholds": np.r_[np.inf, thr]}


def average_precision(scores: Any, positive: Any) -> float:
    """``sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds, decreasing (no
    interpolation); NaN when there is no positive (1.0 when every patch is positive)."""
    pr = pr_curve(scores, positive)
    r, p = pr["recall"], pr["precision"]
    if np.isnan(r).any():
        return float("nan")
    return float(np.sum(np.diff(r) * p[1:]))


def topk_precision(scores: Any, positive: Any, k: int | None = None) -> tuple[float, int]:
    """Share of positives among the ``k`` highest scores (ties broken by bag order).

    ``k`` None: the number of positives (R-precision; NaN when there is none). ``k`` is
    capped at N. Returns ``(precision, k)``.
    """
    s = _scores(scores)
    y = _labels(positive, s.size)
    if k is None:
        k = int(y.sum())
        if k == 0:
            return float("nan"), 0
    k = int(k)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    k = min(k, s.size)
    top = np.argsort(-s, kind="stable")[:k]
    return float(y[top].mean()), k


def otsu_threshold(scores: Any, nbins: int = 256) -> float:
    """Otsu's threshold of the scores: the split of a ``nbins``-bin histogram over [min, max]
    that maximises the between-class variance (the criterion of scikit-image's
    ``threshold_otsu``), returned as the lower edge of the first upper-class bin, so that
    positive = ``score >= threshold`` is exactly the histogram's split (scikit-image returns
    the last lower bin's centre, which puts the top of that bin on the wrong side). A constant
    map returns its value."""
    s = _scores(scores)
    lo, hi = float(s.min()), float(s.max())
    if lo == hi:
        return lo
    hist, edges = np.histogram(s, bins=nbins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    hist = hist.astype(np.float64)
    w1 = np.cumsum(hist)
    w2 = np.cumsum(hist[::-1])[::-1]
    m1 = np.cumsum(hist * centres) / w1
    m2 = (np.cumsum((hist * centres)[::-1]) / w2[::-1])[::-1]
    with np.errstate(invalid="ignore"):
        var = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(edges[int(np.nanargmax(var)) + 1])


def dice(predicted: Any, positive: Any) -> float:
    """``2 |P & G| / (|P| + |G|)``; NaN when both sets are empty."""
    p = np.asarray(predicted, dtype=bool).reshape(-1)
    g = _labels(positive, p.size)
    den = int(p.sum()) + int(g.sum())
    return float("nan") if den == 0 else 2.0 * int((p & g).sum()) / den


def normalise(scores: Any) -> np.ndarray:
    """The scores as a distribution (sum 1): ``s / sum(s)``.

    Raises
    ------
    ValueError
        On a negative score or a zero sum: logits (``raw/...`` sources) must be turned into
        a distribution by the caller (softmax), see :func:`softmax`.
    """
    s = _scores(scores)
    if s.min() < 0:
        raise ValueError("negative scores cannot be normalised to a distribution (pre-softmax "
                         "logits? apply softmax first)")
    total = s.sum()
    if total <= 0:
        raise ValueError("the scores sum to 0")
    return s / total


def softmax(logits: Any) -> np.ndarray:
    """Softmax over the patches, [N] float64 (for ``raw/...`` sources)."""
    s = _scores(logits)
    e = np.exp(s - s.max())
    return e / e.sum()


def _predicted(s: np.ndarray, y: np.ndarray, rule: Any) -> tuple[np.ndarray, float, str]:
    """(predicted [N] bool, threshold, rule name) for the Dice rule."""
    if isinstance(rule, str):
        if rule == "otsu":
            t = otsu_threshold(s)
            return (s >= t) if s.min() < s.max() else np.zeros(s.size, bool), t, "otsu"
        if rule == "top_fraction":
            m = int(y.sum())
            pred = np.zeros(s.size, bool)
            if m:
                top = np.argsort(-s, kind="stable")[:m]
                pred[top] = True
                return pred, float(s[top[-1]]), "top_fraction"
            return pred, float("inf"), "top_fraction"
        raise ValueError(f"dice_rule must be 'otsu', 'top_fraction' or a number, got {rule!r}")
    t = float(rule)
    return s > t, t, "fixed"


def localisation(scores: Any, positive: Any, *, overlap: Any = None, k: int | None = None,
                 dice_rule: str | float = "otsu") -> dict[str, Any]:
    """How well a heatmap finds the annotated patches.

    Parameters
    ----------
    scores : array [N]
        One source's scores (any monotone scale for AUROC/AP/top-K/Dice; non-negative for
        ``mass_inside``, else it is NaN with a note).
    positive : array [N] bool
        Patch labels (``annotations.patch_labels``).
    overlap : array [N] float in [0, 1], optional
        Fraction of each patch inside the annotation; ``mass_inside`` weights by it (default:
        the labels as 0/1).
    k : int, optional
        K of the top-K precision (default: the number of positives).
    dice_rule : "otsu", "top_fraction" or float
        Threshold of the map for Dice: Otsu on the scores (``score >= threshold``; nothing
        on a constant map); the top ``n_positive`` patches; or ``score > value``.

    Returns
    -------
    dict
        ``auroc``, ``average_precision``, ``topk_precision``, ``k``, ``mass_inside``,
        ``dice``, ``dice_threshold``, ``dice_rule``, ``n_positive``, ``n``, ``roc``
        {fpr, tpr}, ``pr`` {precision, recall}, and ``note`` (empty when all is defined).
    """
    s = _scores(scores)
    y = _labels(positive, s.size)
    n_pos = int(y.sum())
    notes = []
    if n_pos == 0 or n_pos == s.size:
        notes.append(f"{'no' if n_pos == 0 else 'only'} positive patches: AUROC undefined"
                     + (", AP and top-K precision undefined" if n_pos == 0 else ""))
    roc = roc_curve(s, y)
    pr = pr_curve(s, y)
    tk, kk = topk_precision(s, y, k)
    w = y.astype(np.float64) if overlap is None else np.asarray(overlap, np.float64).reshape(-1)
    if w.shape[0] != s.size:
        raise ValueError(f"{w.shape[0]} overlap values for {s.size} scores")
    try:
        mass = float(normalise(s) @ w)
    except ValueError as e:
        mass = float("nan")
        notes.append(f"mass inside undefined: {e}")
    pred, thr, rule = _predicted(s, y, dice_rule)
    return {
        "auroc": auroc(s, y), "average_precision": average_precision(s, y),
        "topk_precision": tk, "k": kk, "mass_inside": mass, "dice": dice(pred, y),
        "dice_threshold": thr, "dice_rule": rule, "n_positive": n_pos, "n": int(s.size),
        "roc": {"fpr": roc["fpr"], "tpr": roc["tpr"]},
        "pr": {"precision": pr["precision"], "recall": pr["recall"]},
        "note": "; ".join(notes),
    }


def concentration(attention: Any, k: int | None = None) -> dict[str, Any]:
    """How concentrated an attention map is.

    The map is normalised to a distribution ``a = s / sum(s)`` first (non-negative scores;
    for pre-softmax logits the caller applies :func:`softmax`).

    Parameters
    ----------
    attention : array [N]
    k : int, optional
        K of the top-K mass (default :data:`DEFAULT_TOPK`, capped at N).

    Returns
    -------
    dict
        ``entropy`` H = -sum a_i log a_i (nats, 0 log 0 = 0), ``effective_n`` exp(H) (1 for
        one patch holding all the mass, N for a uniform map), ``normalised_entropy`` H / log N
        (NaN when N = 1), ``top1pct_mass`` (mass of the ceil(N / 100) highest patches),
        ``topk_mass``, ``k``, ``n``.
    """
    a = normalise(attention)
    n = a.size
    nz = a[a > 0]
    h = float(-(nz * np.log(nz)).sum())
    k = DEFAULT_TOPK if k is None else int(k)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    k = min(k, n)
    desc = np.sort(a)[::-1]
    n1 = max(1, math.ceil(n / 100))
    return {"entropy": h, "effective_n": float(math.exp(h)),
            "normalised_entropy": h / math.log(n) if n > 1 else float("nan"),
            "top1pct_mass": float(desc[:n1].sum()), "topk_mass": float(desc[:k].sum()),
            "k": k, "n": int(n)}
