"""Reinhard colour transfer (Reinhard et al. 2001) in CIE LAB, with a tissue mask.

``x' = (x - mean_src) * std_tgt / std_src + mean_tgt`` per LAB channel
(``reference/algorithms.md`` 5.4).

* LAB is CIE L*a*b* of sRGB under D65 (2 degrees), as ``skimage.color.rgb2lab`` (tested
  against it); computed in numpy float32 (scikit-image and OpenCV are not dependencies;
  OpenCV's 8-bit LAB, which TIAToolbox uses, differs slightly).
* Statistics are taken over **tissue** pixels only (largest OD relative to the slide's
  ``i0`` above 0.1), per slide (:mod:`.estimate`), so white background does not dilute them.
* Applying blends the transfer with the per-pixel tissue weight (0 below OD 0.05, 1 above
  0.15): plain Reinhard also shifts the white background, which this avoids. It stays a
  per-pixel function, so the lazy preview has no seams.
"""

from __future__ import annotations

import numpy as np

from ._common import (
    TISSUE_OD_HIGH,
    TISSUE_OD_LOW,
    StainEstimateError,
    as_i0,
    check_rgb,
    comb,
    od_lut,
    planar_lookup,
    tissue_weight,
    tissue_weight_lut,
)
from .perturb import Perturbation, _to_uint8

__all__ = ["Reinhard", "lab_stats", "lab_to_rgb", "rgb_to_lab"]

_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE = np.array([0.95047, 1.0, 1.08883])  # D65, 2 degrees
_EPS, _KAPPA = 0.008856, 7.787


def _srgb_to_linear_lut() -> np.ndarray:
    c = np.arange(256) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


_LIN = np.repeat(_srgb_to_linear_lut()[None, :], 3, axis=0)  # [3, 256] for planar_lookup
_GAMMA_N = 1 << 16  # linear -> sRGB table size (step 0.05 of an 8-bit unit at worst)
_lin = np.arange(_GAMMA_N) / (_GAMMA_N - 1)
_GAMMA = (255.0 * np.where(_lin <= 0.0031308, 12.92 * _lin,
                           1.055 * _lin ** (1 / 2.4) - 0.055)).astype(np.float32)
del _lin
# linear RGB -> XYZ / white, and back: out[j] = sum_i M[i, j] * rows[i]
_M_FWD = (_XYZ_FROM_RGB / _WHITE[:, None]).T
_M_INV = (_RGB_FROM_XYZ * _WHITE[None, :]).T


def _lab_planar(lin: np.ndarray) -> np.ndarray:
    """[3, n] float32 linear RGB -> [3, n] LAB (in place where possible)."""
    f = comb(lin, _M_FWD)  # XYZ / white
    small = f <= _EPS
    t = f[small] if small.any() else None
    np.cbrt(f, out=f)
    if t is not None:
        f[small] = _KAPPA * t + 16 / 116
    lab = np.empty_like(f)
    np.multiply(f[1], 116, out=lab[0])
    lab[0] -= 16
    np.subtract(f[0], f[1], out=lab[1])
    lab[1] *= 500
    np.subtract(f[1], f[2], out=lab[2])
    lab[2] *= 200
    return lab


def _rgb_planar(lab: np.ndarray) -> np.ndarray:
    """[3, n] float32 LAB -> [3, n] sRGB in [0, 255] (not rounded)."""
    f = np.empty_like(lab)
    np.add(lab[0], 16, out=f[1])
    f[1] /= 116
    np.multiply(lab[1], 1 / 500, out=f[0])
    f[0] += f[1]
    np.multiply(lab[2], -1 / 200, out=f[2])
    f[2] += f[1]
    np.maximum(f[2], 0, out=f[2])
    t = f * f
    t *= f
    small = t <= _EPS
    if small.any():
        t[small] = (f[small] - 16 / 116) / _KAPPA
    lin = comb(t, _M_INV)
    np.clip(lin, 0.0, 1.0, out=lin)
    lin *= _GAMMA_N - 1
    lin += 0.5
    return np.take(_GAMMA, lin.astype(np.int32))


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE LAB of sRGB pixels (D65), as ``skimage.color.rgb2lab``.

    Parameters
    ----------
    rgb : np.ndarray
        [..., 3] uint8.

    Returns
    -------
    np.ndarray
        [..., 3] float32: L in [0, 100], a, b.
    """
    rgb = check_rgb(rgb, "rgb_to_lab")
    lab = _lab_planar(planar_lookup(_LIN, rgb.reshape(-1, 3)))
    return np.ascontiguousarray(lab.T).reshape(rgb.shape)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """sRGB of CIE LAB values (D65), as ``skimage.color.lab2rgb`` times 255.

    Parameters
    ----------
    lab : np.ndarray
        [..., 3] float.

    Returns
    -------
    np.ndarray
        [..., 3] float32 in [0, 255] (not rounded).
    """
    lab = np.asarray(lab, np.float32)
    rgb = _rgb_planar(np.ascontiguousarray(lab.reshape(-1, 3).T))
    return np.ascontiguousarray(rgb.T).reshape(lab.shape)


def lab_stats(rgb: np.ndarray, *, i0=255.0, min_pixels: int = 500
              ) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and standard deviation of LAB over the tissue pixels.

    Parameters
    ----------
    rgb : np.ndarray
        [..., 3] uint8 (tiles or pixels).
    i0 : float or array-like
        Background intensity, scalar or [3].
    min_pixels : int
        Fewer tissue pixels raise :class:`StainEstimateError`.

    Returns
    -------
    mean : np.ndarray
        [3] float64 (L, a, b).
    std : np.ndarray
        [3] float64.
    n : int
        Tissue pixels used (largest OD above the midpoint of the tissue ramp).
    """
    px = check_rgb(rgb, "lab_stats").reshape(-1, 3)
    lut = od_lut(as_i0(i0))
    odmax = np.max(np.stack([lut[c][px[:, c]] for c in range(3)]), axis=0)
    tissue = px[odmax > (TISSUE_OD_LOW + TISSUE_OD_HIGH) / 2]
    if tissue.shape[0] < min_pixels:
        raise StainEstimateError(f"too little tissue for LAB statistics: {tissue.shape[0]} of "
                                 f"{px.shape[0]} pixels, {min_pixels} needed")
    lab = rgb_to_lab(tissue).astype(np.float64)
    return lab.mean(axis=0), lab.std(axis=0), int(tissue.shape[0])


class Reinhard(Perturbation):
    """LAB mean/std transfer from the slide's statistics to a target's, on tissue only.

    Parameters
    ----------
    src_mean, src_std : array-like
        [3] LAB statistics of the slide's tissue.
    tgt_mean, tgt_std : array-like
        [3] target statistics.
    i0 : float or array-like
        The slide's background intensity (tissue weight).
    name : str
    params : dict, optional
    """

    def __init__(self, src_mean, src_std, tgt_mean, tgt_std, *, i0=255.0,
                 name: str = "reinhard", params: dict | None = None):
        vals = [np.asarray(v, np.float64).reshape(3) for v in (src_mean, src_std, tgt_mean,
                                                                tgt_std)]
        if not all(np.all(np.isfinite(v)) for v in vals) or np.any(vals[1] <= 0) \
                or np.any(vals[3] <= 0):
            raise ValueError(f"perturbation {name!r}: LAB statistics must be finite with "
                             f"positive standard deviations, got {[v.tolist() for v in vals]}")
        sm, ss, tm, ts = vals
        self.scale = (ts / ss).tolist()
        self.shift = (tm - sm * ts / ss).tolist()
        self.i0 = as_i0(i0)
        self.wlut = tissue_weight_lut(self.i0)
        p = {"src_mean": sm.round(4).tolist(), "src_std": ss.round(4).tolist(),
             "tgt_mean": tm.round(4).tolist(), "tgt_std": ts.round(4).tolist(),
             "i0": self.i0.round(3).tolist()}
        p.update(params or {})
        super().__init__(name, p)

    def _arrays(self):
        return (np.asarray(self.scale), np.asarray(self.shift), self.i0)

    def _apply(self, px: np.ndarray) -> np.ndarray:
        w = tissue_weight(self.wlut, px)
        lab = _lab_planar(planar_lookup(_LIN, px))
        for c in range(3):
            lab[c] *= self.scale[c]
            lab[c] += self.shift[c]
        new = _rgb_planar(lab)
        out = np.empty_like(px)
        for c in range(3):
            new[c] -= px[:, c]
            new[c] *= w
            new[c] += px[:, c]
            _to_uint8(new[c], out[:, c])
        return out
