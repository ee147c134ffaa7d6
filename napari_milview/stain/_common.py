"""Shared optical-density helpers of the stain package (numpy only).

Conventions used everywhere in :mod:`napari_milview.stain`:

* RGB pixels are uint8 ``[..., 3]``; a stain vector is a unit optical-density (OD) vector in
  (R, G, B) order; a stain matrix is ``[2, 3]``, rows H then E.
* ``OD = -ln(max(I, 1) / I0)`` clipped at 0, with ``I0`` the slide's background intensity
  per channel (``[3]``; 255 when unknown). Pixels brighter than ``I0`` have OD 0.
* Concentrations come from the exact 3 x 3 inverse of ``[H; E; res]`` with
  ``res = H x E`` normalised (CTPLab's unmixing, ``reference/algorithms.md`` 5.1), not from
  least squares: the same linear map for every pixel, so concentrations are per-pixel.
"""

from __future__ import annotations

import numpy as np

#: pixels whose largest OD is below this are background (weight 0) ...
TISSUE_OD_LOW = 0.05
#: ... and above this are tissue (weight 1); linear in between (Macenko's beta).
TISSUE_OD_HIGH = 0.15


class StainEstimateError(ValueError):
    """Stain vectors cannot be estimated from these pixels (too little tissue, degenerate)."""


def as_i0(i0) -> np.ndarray:
    """Background intensity as ``[3]`` float32 in [1, 255] (a scalar is broadcast)."""
    a = np.broadcast_to(np.asarray(i0, np.float32), (3,)).astype(np.float32)
    if not np.all(np.isfinite(a)) or np.any(a < 1) or np.any(a > 255):
        raise ValueError(f"I0 must be within [1, 255] per channel, got {np.asarray(i0)!r}")
    return a


def od_lut(i0) -> np.ndarray:
    """``[3, 256]`` float32 table: ``lut[c, v]`` = OD of value ``v`` in channel ``c``."""
    v = np.maximum(np.arange(256, dtype=np.float64), 1.0)
    lut = -np.log(v[None, :] / as_i0(i0)[:, None].astype(np.float64))
    return np.maximum(lut, 0.0).astype(np.float32)


def rgb_to_od(rgb: np.ndarray, i0=255.0) -> np.ndarray:
    """Optical density of RGB pixels.

    Parameters
    ----------
    rgb : np.ndarray
        [..., 3] uint8.
    i0 : float or array-like
        Background intensity, scalar or [3].

    Returns
    -------
    np.ndarray
        [..., 3] float32, >= 0.
    """
    rgb = check_rgb(rgb)
    lut = od_lut(i0)
    return np.stack([lut[c][rgb[..., c]] for c in range(3)], axis=-1)


def check_rgb(rgb, what: str = "image") -> np.ndarray:
    """``rgb`` as a uint8 ndarray ``[..., 3]``, or a clear ValueError."""
    a = np.asarray(rgb)
    if a.dtype != np.uint8 or a.ndim < 1 or a.shape[-1] != 3:
        raise ValueError(f"{what}: expected RGB uint8 pixels [..., 3], got {a.dtype} "
                         f"array of shape {a.shape}")
    return a


def check_matrix(matrix, what: str = "stain matrix") -> np.ndarray:
    """A ``[2, 3]`` stain matrix (rows H, E) as float64, rows finite and not parallel."""
    m = np.asarray(matrix, np.float64)
    if m.shape != (2, 3) or not np.all(np.isfinite(m)):
        raise ValueError(f"{what}: expected 2 x 3 finite values (rows H, E), got shape "
                         f"{m.shape}")
    n = np.linalg.norm(m, axis=1)
    if np.any(n < 1e-6) or np.linalg.norm(np.cross(m[0] / n[0], m[1] / n[1])) < 1e-3:
        raise ValueError(f"{what}: H and E vectors are zero or parallel: {m.tolist()}")
    return m


def full_matrix(matrix) -> np.ndarray:
    """``[3, 3]`` rows H, E, residual (the normalised ``H x E``) of a ``[2, 3]`` matrix."""
    m = check_matrix(matrix)
    res = np.cross(m[0], m[1])
    return np.vstack([m, res / np.linalg.norm(res)])


def unmix_matrix(matrix) -> np.ndarray:
    """``[3, 3]`` map from OD rows to concentrations: ``C = OD @ unmix_matrix(m)``.

    ``C[..., 0]`` is H, ``C[..., 1]`` E, ``C[..., 2]`` the residual; exact inverse of
    :func:`full_matrix`, so ``C @ full_matrix(m) == OD``.
    """
    return np.linalg.inv(full_matrix(matrix))


def concentrations(rgb: np.ndarray, matrix, i0=255.0) -> np.ndarray:
    """H, E and residual concentrations of RGB pixels.

    Parameters
    ----------
    rgb : np.ndarray
        [..., 3] uint8.
    matrix : array-like
        [2, 3] stain matrix, rows H, E.
    i0 : float or array-like
        Background intensity, scalar or [3].

    Returns
    -------
    np.ndarray
        [..., 3] float32 (H, E, residual); may be negative.
    """
    od = np.moveaxis(rgb_to_od(rgb, i0), -1, 0)
    return np.moveaxis(comb(od, unmix_matrix(matrix)), 0, -1)


def comb(rows: np.ndarray, m) -> np.ndarray:
    """Small linear map over the first axis, without BLAS.

    ``out[j] = sum_i m[i, j] * rows[i]``. OpenBLAS runs ``[n, 3] @ [3, 3]`` on all its
    threads, which on a busy machine (or inside dask's own threads) costs up to 100x the
    single-thread time; k x j ufunc passes over contiguous rows are predictable.

    Parameters
    ----------
    rows : np.ndarray
        [k, ...] float.
    m : array-like
        [k, j].

    Returns
    -------
    np.ndarray
        [j, ...], the dtype of ``rows`` (float32 stays float32).
    """
    m = np.asarray(m, np.float64)
    out = np.empty((m.shape[1],) + rows.shape[1:], rows.dtype)
    tmp = np.empty(rows.shape[1:], rows.dtype)
    coef = m.tolist()
    for j in range(m.shape[1]):
        np.multiply(rows[0], coef[0][j], out=out[j])
        for i in range(1, m.shape[0]):
            np.multiply(rows[i], coef[i][j], out=tmp)
            out[j] += tmp
    return out


def planar_lookup(lut: np.ndarray, px: np.ndarray) -> np.ndarray:
    """``[3, n]`` float32: ``lut[c][px[:, c]]`` for pixels ``px`` [n, 3] uint8."""
    out = np.empty((3, px.shape[0]), np.float32)
    for c in range(3):
        np.take(lut[c], px[:, c], out=out[c])
    return out


def tissue_weight(wlut: np.ndarray, px: np.ndarray) -> np.ndarray:
    """``[n]`` float32 tissue weight of pixels ``px`` [n, 3] (``wlut``:
    :func:`tissue_weight_lut`): the largest of the per-channel weights."""
    w = np.take(wlut[0], px[:, 0])
    for c in (1, 2):
        np.maximum(w, np.take(wlut[c], px[:, c]), out=w)
    return w


def tissue_weight_lut(i0) -> np.ndarray:
    """``[3, 256]`` float32: per-channel OD mapped to the tissue weight ramp, so that a
    pixel's weight is the max over its channels (weight is monotonic in OD)."""
    lut = od_lut(i0)
    return np.clip((lut - TISSUE_OD_LOW) / (TISSUE_OD_HIGH - TISSUE_OD_LOW), 0.0, 1.0
                   ).astype(np.float32)


def angle_deg(u, v) -> float:
    """Angle in degrees between two vectors."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    c = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))
