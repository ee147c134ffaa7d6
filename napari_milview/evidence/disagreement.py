"""Do several checkpoints of one model (cross-validation folds, an ensemble) agree on a slide?

Per patch: mean and standard deviation of the maps, and the spread of their percentile ranks
(a patch ranked in the top 1 % by one fold and in the bottom half by another has a large
spread even when the raw values are all tiny); per slide: the spread of the predictions and
the mean pairwise Spearman correlation of the maps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["disagreement", "percentile_ranks"]


def percentile_ranks(scores: Any) -> np.ndarray:
    """[N] float64 in [0, 100]: ``100 (rank - 1) / (N - 1)`` with average ranks for ties
    (0 = lowest score, 100 = highest; 50 everywhere when N = 1)."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 1:
        return np.array([50.0])
    return 100.0 * (rankdata(s, method="average") - 1.0) / (s.size - 1)


def disagreement(maps: list[Any], probabilities: list[Any] | None = None) -> dict[str, Any]:
    """Agreement of M maps of the same bag (same patches, same order).

    Parameters
    ----------
    maps : list of M arrays [N]
        One source of each checkpoint (e.g. each fold's default source), M >= 2.
    probabilities : list of M arrays [C], optional
        Each checkpoint's slide probabilities.

    Returns
    -------
    dict
        ``mean`` [N], ``std`` [N] (population, ddof 0) over the maps; ``rank_spread`` [N]
        (max - min of the percentile ranks, :func:`percentile_ranks`, in points 0-100);
        ``rank_spread_mean``, ``rank_spread_p95``; ``spearman_mean`` (mean over the
        M (M - 1) / 2 pairs of the Pearson correlation of the percentile ranks; NaN when a map
        is constant); ``prediction_mean``, ``prediction_std`` [C] and ``prediction_range``
        [C] (max - min) when ``probabilities`` are given; ``m``, ``n``.
    """
    if len(maps) < 2:
        raise ValueError(f"disagreement needs at least 2 maps, got {len(maps)}")
    a = np.stack([np.asarray(m, dtype=np.float64).reshape(-1) for m in maps]) \
        if len({np.asarray(m).size for m in maps}) == 1 else None
    if a is None:
        raise ValueError("the maps have different lengths: " +
                         ", ".join(str(np.asarray(m).size) for m in maps))
    if not np.all(np.isfinite(a)):
        raise ValueError("non-finite values in the maps")
    ranks = np.stack([percentile_ranks(m) for m in a])
    spread = ranks.max(axis=0) - ranks.min(axis=0)
    rhos = []
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            x, y = ranks[i] - ranks[i].mean(), ranks[j] - ranks[j].mean()
            den = np.sqrt((x * x).sum() * (y * y).sum())
            rhos.append(float((x * y).sum() / den) if den > 0 else float("nan"))
    out: dict[str, Any] = {
        "mean": a.mean(axis=0), "std": a.std(axis=0), "rank_spread": spread,
        "rank_spread_mean": float(spread.mean()),
        "rank_spread_p95": float(np.percentile(spread, 95)),
        "spearman_mean": float(np.mean(rhos)), "m": int(a.shape[0]), "n": int(a.shape[1]),
    }
    if probabilities is not None:
        if len(probabilities) != len(maps):
            raise ValueError(f"{len(probabilities)} predictions for {len(maps)} maps")
        p = np.stack([np.asarray(q, dtype=np.float64).reshape(-1) for q in probabilities])
        out.update(prediction_mean=p.mean(axis=0), prediction_std=p.std(axis=0),
                   prediction_range=p.max(axis=0) - p.min(axis=0))
    return out
