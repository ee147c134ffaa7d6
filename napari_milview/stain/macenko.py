"""Macenko stain-vector estimation (Macenko et al. 2009), with guards.

Recipe (``reference/algorithms.md`` 5.2, 5.6):

1. ``OD = -ln(max(I, 1) / I0)`` per channel (``I0``: the slide's background, [3]).
2. Tissue = pixels whose OD vector is longer than ``beta`` (``rule="norm"``, the default).
   Macenko's own rule, OD > ``beta`` in **every** channel (``rule="all"``), drops pale
   eosin (eosin hardly absorbs red): on our synthetic slide it tilts E ~10 degrees towards
   H, on CMU-1-Small-Region it raises E's red component from ~0.1 to ~0.2.
   **Guard**: fewer than ``max(min_pixels, min_fraction * N)`` tissue pixels -> retry once
   with ``beta_fallback`` (0.1, for pale slides) and say so in ``notes``; still too few ->
   :class:`StainEstimateError` naming the counts. A white tile therefore never yields NaN
   vectors; per-slide estimation (:mod:`.estimate`) skips such tiles, and applying a
   perturbation never estimates anything, so a white tile is simply left unchanged there.
3. The two top eigenvectors of the OD covariance span the stain plane; each is flipped to a
   positive sum (the sign of an eigenvector is arbitrary; OD is positive).
4. Angles ``phi = atan2(t1, t0)`` of the projected ODs; the ``alpha``-th and
   ``(100 - alpha)``-th percentiles give the two extreme stain directions, mapped back to
   OD space, flipped to positive and normalised.
5. **Order**: H is the vector with the larger red/blue OD ratio (haematoxylin absorbs red
   strongly, eosin hardly at all). Degenerate cases (the two vectors within 1 degree) raise.
6. Concentrations use the exact 3 x 3 inverse of ``[H; E; H x E]``; ``max_conc`` is their
   99th percentile over all pixels given (Macenko's ``maxC``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._common import StainEstimateError, angle_deg, as_i0, check_rgb, comb, od_lut, unmix_matrix

__all__ = ["MacenkoFit", "fit_macenko", "order_he"]


@dataclass(frozen=True)
class MacenkoFit:
    """Result of :func:`fit_macenko`.

    Attributes
    ----------
    matrix : np.ndarray
        [2, 3] float64, rows H and E, unit OD vectors in (R, G, B) order.
    max_conc : np.ndarray
        [2] float64, 99th percentile of the H and E concentrations.
    n_pixels : int
        Pixels used (after sub-sampling).
    n_tissue : int
        Of those, pixels that passed the OD threshold.
    beta : float
        OD threshold actually used.
    notes : tuple[str, ...]
    """

    matrix: np.ndarray
    max_conc: np.ndarray
    n_pixels: int
    n_tissue: int
    beta: float
    notes: tuple[str, ...] = ()


def order_he(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[2, 3]`` rows (H, E) of two stain vectors: H has the larger red/blue OD ratio."""
    ratio = [v[0] / max(v[2], 1e-6) for v in (a, b)]
    return np.vstack([a, b] if ratio[0] >= ratio[1] else [b, a])


def fit_macenko(rgb: np.ndarray, *, i0=255.0, mask: np.ndarray | None = None,
                beta: float = 0.15, beta_fallback: float = 0.1, alpha: float = 1.0,
                min_pixels: int = 500, min_fraction: float = 0.02, max_pixels: int = 1_000_000,
                rule: str = "norm", seed: int = 0) -> MacenkoFit:
    """Estimate H and E stain vectors and maximum concentrations from RGB pixels.

    Parameters
    ----------
    rgb : np.ndarray
        [..., 3] uint8: one tile [H, W, 3], several [B, H, W, 3] or pixels [N, 3].
    i0 : float or array-like
        Background intensity, scalar or [3] (the slide's; 255 when unknown).
    mask : np.ndarray, optional
        [...] bool of ``rgb.shape[:-1]``: only these pixels are considered.
    beta : float
        OD threshold of the tissue rule.
    beta_fallback : float
        Threshold tried once when too few pixels pass ``beta`` (pale slides).
    alpha : float
        Angle percentile (1 = Macenko's default; 1-5 resists outliers).
    min_pixels, min_fraction : int, float
        Needed tissue pixels: ``max(min_pixels, min_fraction * N)``.
    max_pixels : int
        Larger inputs are sub-sampled to this many pixels (seeded, deterministic).
    rule : str
        ``"norm"``: tissue has ``|OD| > beta``; ``"all"``: OD > beta in every channel.
    seed : int
        Seed of the sub-sampling.

    Returns
    -------
    MacenkoFit

    Raises
    ------
    StainEstimateError
        Too few tissue pixels (white or pale input) or degenerate stain vectors.
    """
    rgb = check_rgb(rgb, "macenko")
    px = rgb.reshape(-1, 3)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != rgb.shape[:-1]:
            raise ValueError(f"macenko: mask shape {mask.shape} does not match the image "
                             f"{rgb.shape[:-1]}")
        px = px[mask.reshape(-1)]
    if rule not in ("norm", "all"):
        raise ValueError(f"macenko: rule must be 'norm' or 'all', got {rule!r}")
    if not 0 <= alpha < 50:
        raise ValueError(f"macenko: alpha must be within [0, 50), got {alpha!r}")
    if px.shape[0] > max_pixels:
        idx = np.random.default_rng(seed).choice(px.shape[0], max_pixels, replace=False)
        px = px[np.sort(idx)]
    n = px.shape[0]
    lut = od_lut(as_i0(i0))
    od = np.stack([lut[c][px[:, c]] for c in range(3)]).astype(np.float64)  # [3, n]
    need = max(int(min_pixels), int(np.ceil(min_fraction * n)))
    notes: list[str] = []
    used = beta
    low = np.sqrt((od * od).sum(axis=0)) if rule == "norm" else od.min(axis=0)
    tissue = low > beta
    if tissue.sum() < need and beta_fallback < beta:
        used = beta_fallback
        tissue = low > used
        if tissue.sum() >= need:
            notes.append(f"pale tissue: OD threshold lowered from {beta:g} to {used:g}")
    k = int(tissue.sum())
    if k < need:
        raise StainEstimateError(
            f"too little tissue to estimate stains: {k} of {n} pixels have OD above {used:g} "
            f"({rule} rule), {need} needed (white or very pale pixels)")
    t_od = od[:, tissue]
    cen = t_od - t_od.mean(axis=1, keepdims=True)
    cov = np.array([[float((cen[i] * cen[j]).sum()) for j in range(3)] for i in range(3)])
    cov /= max(k - 1, 1)
    if not np.all(np.isfinite(cov)):
        raise StainEstimateError("the OD covariance is not finite")
    _, vec = np.linalg.eigh(cov)
    plane = vec[:, [2, 1]]  # largest eigenvalue first
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    proj = comb(t_od, plane)  # [2, k]
    phi = np.arctan2(proj[1], proj[0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    vs = []
    for a in (lo, hi):
        v = plane @ np.array([np.cos(a), np.sin(a)])
        v = -v if v.sum() < 0 else v
        vs.append(v / np.linalg.norm(v))
    if angle_deg(*vs) < 1.0:
        raise StainEstimateError(
            f"degenerate stains: the two extreme OD directions are {angle_deg(*vs):.2f} "
            "degrees apart (one stain only?)")
    matrix = order_he(*vs)
    conc = comb(od, unmix_matrix(matrix)[:, :2])  # [2, n]
    max_conc = np.array([np.percentile(c, 99) for c in conc])
    return MacenkoFit(matrix=matrix, max_conc=max_conc, n_pixels=n, n_tissue=k, beta=used,
                      notes=tuple(notes))
