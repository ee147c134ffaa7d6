"""Display normalisations of attention scores, all over [N] arrays in bag order (NaN-safe).

=================  ===========================================================  ==============
method             what                                                         contrast limits
=================  ===========================================================  ==============
``raw``            the scores as they are                                       data range
``softmax``        softmax over the patches (of raw logits, e.g. ``raw/...``)   (0, max)
``minmax``         (s - min) / (max - min); a constant map becomes 0.5          (0, 1)
``rank``           CLAM rank percentile: rank (ties averaged) / N, in (0, 1]    (0, 1)
``attention_x_n``  ACMIL: attention x N x ``zoom``; uniform attention = 1       (0, 1)
``fixed``          clipped to a range shared across slides (``vmin``, ``vmax``)  (vmin, vmax)
=================  ===========================================================  ==============

NaN scores (no value for a patch) stay NaN and are left out of N, the minimum, the ranks, etc.
"""

from __future__ import annotations

import numpy as np

__all__ = ["METHODS", "contrast_limits", "method_name", "normalise"]

#: method -> label for pickers
METHODS: dict[str, str] = {
    "raw": "raw",
    "softmax": "softmax",
    "minmax": "min-max",
    "rank": "rank percentile (CLAM)",
    "attention_x_n": "attention × N (ACMIL)",
    "fixed": "fixed range (shared across slides)",
}
_ALIASES = {"min-max": "minmax", "min_max": "minmax", "percentile": "rank",
            "rank_percentile": "rank", "xn": "attention_x_n", "attention*n": "attention_x_n",
            "attention x n": "attention_x_n", "none": "raw"}


def method_name(method: str) -> str:
    """The :data:`METHODS` key of ``method`` (case and aliases such as ``"min-max"`` resolved).

    Raises
    ------
    ValueError
        An unknown method (the message lists the known ones).
    """
    m = str(method).strip().lower()
    m = _ALIASES.get(m, m)
    if m not in METHODS:
        raise ValueError(f"unknown normalisation {method!r}; choose one of {list(METHODS)}")
    return m


#: the old private name, kept while ``_qt.mil_widget`` still imports it
_method = method_name


def _fixed_range(vmin, vmax) -> tuple[float, float]:
    if vmin is None or vmax is None:
        raise ValueError("normalisation 'fixed' needs vmin and vmax (the range shared across "
                         "slides)")
    lo, hi = float(vmin), float(vmax)
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(f"normalisation 'fixed' needs finite vmin < vmax, got {vmin}, {vmax}")
    return lo, hi


def normalise(scores: np.ndarray, method: str = "raw", *, vmin: float | None = None,
              vmax: float | None = None, zoom: float = 1.0) -> np.ndarray:
    """Normalise attention scores for display.

    Parameters
    ----------
    scores : np.ndarray
        [N] scores in bag order; NaN marks a patch without a score.
    method : str
        One of :data:`METHODS` (see the module doc).
    vmin, vmax : float
        The shared range of ``method="fixed"``.
    zoom : float
        ACMIL's ``zoom_factor`` for ``attention_x_n`` (< 1 de-saturates).

    Returns
    -------
    np.ndarray
        [N] float32, NaN where ``scores`` is NaN (or infinite).
    """
    m = method_name(method)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    ok = np.isfinite(s)
    out = np.full(s.shape, np.nan)
    v = s[ok]
    if v.size == 0:
        return out.astype(np.float32)
    if m == "raw":
        out[ok] = v
    elif m == "softmax":
        e = np.exp(v - v.max())
        out[ok] = e / e.sum()
    elif m == "minmax":
        lo, hi = v.min(), v.max()
        out[ok] = (v - lo) / (hi - lo) if hi > lo else 0.5
    elif m == "rank":
        from scipy.stats import rankdata

        out[ok] = rankdata(v, method="average") / v.size
    elif m == "attention_x_n":
        out[ok] = v * v.size * float(zoom)
    else:  # fixed
        lo, hi = _fixed_range(vmin, vmax)
        out[ok] = np.clip(v, lo, hi)
    return out.astype(np.float32)


def contrast_limits(method: str, values: np.ndarray | None = None, *, vmin: float | None = None,
                    vmax: float | None = None) -> tuple[float, float]:
    """The fixed contrast limits of ``method`` (``values`` = the normalised [N] scores).

    ``raw`` uses the data range, ``softmax`` (0, max); every other method has fixed limits,
    so the colour bar means the same thing on every slide.
    """
    m = method_name(method)
    if m == "fixed":
        return _fixed_range(vmin, vmax)
    if m in ("raw", "softmax"):
        v = np.asarray(values if values is not None else [], dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return (0.0, 1.0)
        lo = 0.0 if m == "softmax" else float(v.min())
        hi = float(v.max())
        return (lo, hi) if hi > lo else (lo, lo + 1.0)
    return (0.0, 1.0)
