"""Per-pixel stain perturbations and the lazy preview pyramid.

A :class:`Perturbation` is a pure function of one pixel's RGB value, with all its
parameters fixed in advance from the slide (its :class:`~.estimate.SlideStain`) and the
condition. Nothing depends on neighbours, on the tile or on image statistics, so:

* perturbing a region in one go or chunk by chunk gives identical pixels (no seams in the
  lazy preview, :func:`lazy_preview`);
* the same object perturbs a viewport ``[h, w, 3]``, a batch of encoder patches
  ``[B, H, W, 3]`` for a robustness run, or a pixel list ``[N, 3]``.

Pixels are processed in blocks of :data:`BLOCK` (cache-sized float32 scratch); no 256^3
look-up table is built.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ._common import as_i0, check_rgb, comb, od_lut, planar_lookup, unmix_matrix

__all__ = ["BLOCK", "Perturbation", "StainPerturbation", "lazy_preview"]

#: pixels per processing block (64 k pixels: ~0.8 MB of float32 scratch per array)
BLOCK = 1 << 16


class Perturbation:
    """The identity; subclasses override :meth:`_apply`.

    Parameters
    ----------
    name : str
        Condition name (shown in the GUI, written in tables).
    params : dict
        JSON-able description of the parameters (for docs, notes, the dask token).
    """

    def __init__(self, name: str = "reference", params: dict | None = None):
        self.name = name
        self.params = dict(params or {})

    @property
    def is_identity(self) -> bool:
        return type(self) is Perturbation

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Perturb RGB pixels.

        Parameters
        ----------
        rgb : np.ndarray
            [..., 3] uint8 (a tile [H, W, 3], patches [B, H, W, 3], pixels [N, 3]).

        Returns
        -------
        np.ndarray
            New array, same shape, uint8.
        """
        rgb = check_rgb(rgb, f"perturbation {self.name!r}")
        if self.is_identity:
            return rgb.copy()
        flat = np.ascontiguousarray(rgb).reshape(-1, 3)
        out = np.empty_like(flat)
        for s in range(0, flat.shape[0], BLOCK):
            out[s:s + BLOCK] = self._apply(flat[s:s + BLOCK])
        return out.reshape(rgb.shape)

    def _apply(self, px: np.ndarray) -> np.ndarray:  # [n, 3] uint8 -> [n, 3] uint8
        return px

    @property
    def token(self) -> str:
        """Stable short hash of the name and parameters (dask graph names, caches)."""
        h = hashlib.sha1(type(self).__name__.encode())
        h.update(json.dumps([self.name, self.params], sort_keys=True, default=str).encode())
        for a in self._arrays():
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return ()

    def __dask_tokenize__(self):
        return ("milview-perturbation", self.token)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.params})"


def _to_uint8(x: np.ndarray, out: np.ndarray) -> None:
    """Write float32 ``x`` [n] (any range) into uint8 ``out`` [n], rounded half up, clipped."""
    x += 0.5
    np.clip(x, 0.0, 255.0, out=x)
    out[...] = x


def _scale_pixels(px: np.ndarray, log_factor: np.ndarray) -> np.ndarray:
    """``px * exp(log_factor)`` as uint8: px [n, 3] uint8, log_factor [3, n] float32
    (overwritten)."""
    out = np.empty_like(px)
    np.exp(log_factor, out=log_factor)
    for c in range(3):
        log_factor[c] *= px[:, c]
        _to_uint8(log_factor[c], out[:, c])
    return out


class StainPerturbation(Perturbation):
    """Change H and E in optical-density space: ``C -> ratio * C`` and ``(h, e) -> target``.

    For a pixel with optical density ``OD`` (relative to the slide's ``i0``) and
    concentrations ``C = OD @ unmix`` (H, E, residual; exact 3 x 3 inverse), the H and E
    parts are replaced while the residual part stays::

        OD' = OD + max(C_H, 0) (r_H t_H - s_H) + max(C_E, 0) (r_E t_E - s_E)
        I'  = I * exp(-(OD' - OD))                       (rounded, clipped to uint8)

    ``s`` = the slide's (source) H and E vectors, ``t`` = the target vectors (``s`` for an
    intensity-only change), ``r`` = the concentration ratios. Consequences: re-unmixing
    ``I'`` with the source matrix gives exactly ``r * C`` for H and E (up to uint8
    rounding) when ``t = s``; a pixel with no stain (``C <= 0``, white background, or a
    white tile) is returned unchanged; ``r = 1, t = s`` is the exact identity. Negative
    concentrations (noise, least-squares artefacts) are not rescaled (CTPLab clamps them
    for the same reason); the residual is kept rather than damped as CTPLab does, so the
    colours a 2-stain model does not explain are preserved.

    Parameters
    ----------
    name : str
    source : array-like
        [2, 3] the slide's stain matrix (rows H, E).
    i0 : float or array-like
        The slide's background intensity, scalar or [3].
    ratio : array-like
        [2] concentration ratios (H, E).
    target : array-like, optional
        [2, 3] target stain vectors (rows H, E); default ``source``.
    params : dict, optional
        Extra description for :attr:`params`.
    """

    def __init__(self, name: str, source, i0=255.0, ratio=(1.0, 1.0), target=None,
                 params: dict | None = None):
        src = np.asarray(source, np.float64)
        tgt = src if target is None else np.asarray(target, np.float64)
        r = np.asarray(ratio, np.float64).reshape(2)
        if not np.all(np.isfinite(r)) or np.any(r < 0):
            raise ValueError(f"perturbation {name!r}: ratios must be finite and >= 0, got {r}")
        self.unmix = unmix_matrix(src)[:, :2]  # [3, 2]: OD -> (C_H, C_E)
        unmix_matrix(tgt)  # validates the target
        # -delta: [2, 3], so that exp(C+ @ neg_delta) multiplies I
        self.neg_delta = -(r[:, None] * tgt - src)
        self.i0 = as_i0(i0)
        self.lut = od_lut(self.i0)
        p = {"ratio": r.round(6).tolist(), "source": src.round(6).tolist(),
             "target": tgt.round(6).tolist(), "i0": self.i0.round(3).tolist()}
        p.update(params or {})
        super().__init__(name, p)

    def _arrays(self):
        return (self.unmix, self.neg_delta, self.i0)

    def _apply(self, px: np.ndarray) -> np.ndarray:
        conc = comb(planar_lookup(self.lut, px), self.unmix)  # [2, n]
        np.maximum(conc, 0.0, out=conc)
        return _scale_pixels(px, comb(conc, self.neg_delta))


def lazy_preview(levels: list, perturbation: Perturbation) -> list:
    """Lazily perturbed copy of a multiscale pyramid (napari's preview layer data).

    Parameters
    ----------
    levels : list of dask arrays
        [h_l, w_l, 3] uint8 per level (e.g. ``Slide.to_dask()``).
    perturbation : Perturbation

    Returns
    -------
    list of dask arrays
        Same shapes and chunks; only the chunks that are computed (those on screen) are
        perturbed. Chunks cannot show seams because the perturbation is per-pixel.
    """
    import dask.array as da

    out = []
    for i, lv in enumerate(levels):
        if lv.ndim != 3 or lv.shape[-1] != 3 or lv.dtype != np.uint8:
            raise ValueError(f"lazy_preview: level {i} must be [h, w, 3] uint8, got "
                             f"{lv.shape} {lv.dtype}")
        if perturbation.is_identity:
            out.append(lv)
            continue
        out.append(da.map_blocks(perturbation, lv, dtype=np.uint8,
                                 name=f"milview-stain-{perturbation.token}-{lv.name}",
                                 meta=np.empty((0, 0, 3), np.uint8)))
    return out
