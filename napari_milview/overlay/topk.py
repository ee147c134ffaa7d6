"""Top-K, bottom-K or score-range instances and their patch rectangles as a Shapes layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..result import Result

__all__ = ["MODES", "patch_rectangles", "select", "topk_layer"]

MODES = ("top", "bottom", "range")


def select(scores: np.ndarray, k: int | None, mode: str = "top", lo: float | None = None,
           hi: float | None = None) -> np.ndarray:
    """Pick instances by score (NaN scores are never picked).

    Parameters
    ----------
    scores : np.ndarray
        [N] scores in bag order.
    k : int or None
        How many (None = all that qualify).
    mode : str
        ``"top"``: the k highest, best first; ``"bottom"``: the k lowest, lowest first;
        ``"range"``: scores in [lo, hi], highest first; when more than k qualify, k of them
        evenly spaced in that order (deterministic, spans the range; CLAM samples at random).
        Ties keep bag order.

    Returns
    -------
    np.ndarray
        [K] int64 indices into the bag.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if mode not in MODES:
        raise ValueError(f"unknown selection mode {mode!r}; choose one of {list(MODES)}")
    if k is not None and (int(k) != k or k < 0):
        raise ValueError(f"k must be a whole number >= 0, got {k!r}")
    ok = np.flatnonzero(np.isfinite(s))
    if mode == "bottom":
        order = ok[np.argsort(s[ok], kind="stable")]
        return order[:k].astype(np.int64)
    if mode == "range":
        if lo is None or hi is None or not lo <= hi:
            raise ValueError(f"mode 'range' needs lo <= hi, got lo={lo}, hi={hi}")
        ok = ok[(s[ok] >= lo) & (s[ok] <= hi)]
    order = ok[np.argsort(-s[ok], kind="stable")]
    if mode == "range" and k is not None and order.size > k:
        order = order[np.unique(np.linspace(0, order.size - 1, int(k)).round().astype(int))]
    return order[:k].astype(np.int64)


def patch_rectangles(coords: np.ndarray, patch_size_level0: int, mpp: float | None
                     ) -> np.ndarray:
    """Patch outlines in world (row, col) units, on the slide layer's pixel-centre convention.

    Parameters
    ----------
    coords : np.ndarray
        [K, 2] level-0 (x, y) top-left corners.
    mpp : float or None
        Microns per level-0 pixel (None: world units are level-0 pixels).

    Returns
    -------
    np.ndarray
        [K, 4, 2] float64 corners (top-left, top-right, bottom-right, bottom-left): a patch
        covering level-0 pixels [x, x + ps) spans world [(x - 1/2) mpp, (x + ps - 1/2) mpp).
    """
    f = 1.0 if mpp is None else float(mpp)
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2) - 0.5
    ps = float(patch_size_level0)
    x0, y0 = c[:, 0], c[:, 1]
    x1, y1 = x0 + ps, y0 + ps
    rect = np.stack([np.stack([y0, x0], -1), np.stack([y0, x1], -1),
                     np.stack([y1, x1], -1), np.stack([y1, x0], -1)], axis=1)
    return rect * f


def topk_layer(result: Result, indices: np.ndarray, source: str | None = None, *,
               mpp: float | None = None, edge_color: str = "cyan", name: str | None = None
               ) -> tuple[np.ndarray, dict, str]:
    """The selected patches as napari Shapes layer data ``(rectangles, kwargs, "shapes")``.

    Parameters
    ----------
    result : Result
        Its ``coords`` [N, 2] and the scores of ``source`` (default source when None).
    indices : np.ndarray
        [K] bag indices, best first (from :func:`select`); rank = position + 1.
    mpp : float, optional
        Microns per level-0 pixel of the slide layer (default ``result.mpp``).

    Returns
    -------
    tuple
        [K, 4, 2] rectangles in world (row, col) units, kwargs (``features`` with ``score``
        (raw score of ``source``), ``rank`` and ``index``, edge colour, no fill, rank as
        text) and ``"shapes"``.
    """
    src = result.default_source if source is None else source
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= result.n):
        raise ValueError(f"top-K indices out of range for {result.n} patches")
    um = result.mpp if mpp is None else float(mpp)
    rects = patch_rectangles(result.coords[idx], result.patch_size_level0, um)
    side = result.patch_size_level0 * (1.0 if um is None else um)
    kwargs: dict[str, Any] = {
        "name": name or f"top-K {src}",
        "shape_type": "rectangle",
        "edge_color": edge_color,
        "face_color": "transparent",
        "edge_width": max(side * 0.03, 1e-9),
        "features": {"score": result.attention(src)[idx].astype(np.float64),
                     "rank": np.arange(1, idx.size + 1, dtype=np.int64),
                     "index": idx},
        "text": {"string": "{rank}", "color": edge_color, "anchor": "upper_left", "size": 10},
        "metadata": {"milview": "topk", "source": src, "mpp": um,
                     "patch_size_level0": result.patch_size_level0},
    }
    if um is not None:
        kwargs["units"] = ("um", "um")
    return rects, kwargs, "shapes"
