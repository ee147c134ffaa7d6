"""Vahadane stain-vector estimation (sparse non-negative dictionary learning), optional.

Needs the optional dependency ``spams`` (``pip install napari-milview[vahadane]``, which
installs the ``spams-bin`` wheel; unmaintained upstream). Recipe as staintools / TIAToolbox
(``reference/algorithms.md`` 5.3): tissue ODs (``|OD| > beta``), a
2-atom non-negative dictionary with L1 penalty ``lambda1 = 0.1``, atoms ordered H first
(larger red/blue OD ratio) and normalised. Dictionary learning is stochastic: estimate once
per slide and reuse the matrix (a :class:`~.perturb.StainPerturbation` applies it).
"""

from __future__ import annotations

import numpy as np

from ._common import StainEstimateError, as_i0, check_rgb, od_lut
from .macenko import order_he

__all__ = ["vahadane"]


def vahadane(rgb: np.ndarray, *, i0=255.0, beta: float = 0.15, lambda1: float = 0.1,
             min_pixels: int = 500, max_pixels: int = 200_000, seed: int = 0) -> np.ndarray:
    """Estimate H and E stain vectors with Vahadane's method.

    Parameters
    ----------
    rgb : np.ndarray
        [..., 3] uint8 tissue pixels (tiles or a pixel list).
    i0 : float or array-like
        Background intensity, scalar or [3].
    beta : float
        OD threshold (tissue = ``|OD| > beta``).
    lambda1 : float
        L1 penalty of the sparse codes.
    min_pixels : int
        Fewer tissue pixels raise :class:`StainEstimateError`.
    max_pixels : int
        Sub-sample (seeded) to at most this many tissue pixels.
    seed : int

    Returns
    -------
    np.ndarray
        [2, 3] float64, rows H, E, unit OD vectors.
    """
    try:
        import spams
    except ImportError:
        raise ImportError("Vahadane stain estimation needs the optional dependency 'spams' "
                          "(pip install napari-milview[vahadane]); use the Macenko estimator "
                          "otherwise") from None
    px = check_rgb(rgb, "vahadane").reshape(-1, 3)
    lut = od_lut(as_i0(i0))
    od = np.stack([lut[c][px[:, c]] for c in range(3)], axis=1).astype(np.float64)
    # tissue: |OD| > beta (not OD > beta in every channel, which drops pure eosin: its red
    # OD is a few hundredths; the same rule as the Macenko default here)
    od = od[np.linalg.norm(od, axis=1) > beta]
    if od.shape[0] < min_pixels:
        raise StainEstimateError(f"too little tissue for Vahadane: {od.shape[0]} pixels with "
                                 f"OD > {beta:g}, {min_pixels} needed")
    if od.shape[0] > max_pixels:
        od = od[np.random.default_rng(seed).choice(od.shape[0], max_pixels, replace=False)]
    d = spams.trainDL(X=np.asfortranarray(od.T), K=2, lambda1=lambda1, mode=2, modeD=0,
                      posAlpha=True, posD=True, verbose=False).T
    if not np.all(np.isfinite(d)) or np.any(np.linalg.norm(d, axis=1) < 1e-9):
        raise StainEstimateError("Vahadane dictionary learning gave degenerate atoms")
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    return order_he(d[0], d[1])
