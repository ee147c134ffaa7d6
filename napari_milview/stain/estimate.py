"""Per-slide stain estimation: once per slide, reused for every tile.

Recipe (CTPLab's slide characterisation, ``reference/algorithms.md`` 5.1 step 2, with our
own tissue mask):

1. **Background** ``i0``: per channel, the 90th percentile of the non-tissue pixels of the
   tissue-mask level (:func:`napari_milview.tissue.tissue_mask`), clipped to [128, 255].
   A per-slide ``i0`` (not CTPLab's per-tile maximum) keeps the perturbation a pure
   per-pixel function, so neighbouring tiles match. No background at all: 255, noted.
2. **Candidate tiles**: :func:`~napari_milview.tissue.patch_grid` tiles of
   ``tile_px`` pixels at ``target_mpp`` (default 448 px at 0.5 um/px = 224 um, CTPLab's
   tile) with >= 90 % tissue (50 % when none has), shuffled with ``seed`` (42).
3. **Quality check** (:func:`tile_qc`, CTPLab's ``config.thresholds`` in HSV). The first
   ``n_tiles`` (10) that pass are used; when fewer than ``min_tiles`` pass, the best
   remaining tissue tiles (most checks passed) fill up, with a note.
4. Per tile, :func:`~.macenko.fit_macenko`; tiles that raise (too little tissue) or look
   swapped (H's spherical angles both larger than E's, CTPLab's rule) are skipped.
5. Slide values: element-wise **median** over the valid tiles of the stain matrix (rows
   re-normalised) and of each tile's 99th-percentile concentrations (``max_conc``); the
   95th percentile of concentrations > 0.1 (CTPLab's ``H_95th``, ``E_95th``), taken with
   the slide matrix, median over tiles; LAB mean/std over all their tissue pixels.
6. **Guard**: no valid tile (blank or unstained slide) -> the default reference's values
   (:data:`~.conditions.DEFAULT_REFERENCE`) with ``fallback=True`` and a note; never an
   exception, so a preview always works.

Results are cached in memory per slide path, size, modification time and parameters.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ._common import StainEstimateError, as_i0, comb, concentrations, unmix_matrix
from .macenko import fit_macenko
from .reinhard import lab_stats

__all__ = ["QC_THRESHOLDS", "SlideStain", "clear_cache", "estimate_slide", "estimate_tiles",
           "is_swapped", "tile_qc"]

#: CTPLab's tile quality checks (``config.thresholds``): name -> (min, max)
QC_THRESHOLDS = {
    "frac_sat": (0.6, None),          # fraction of pixels with HSV saturation > 0.2
    "entropy": (6.4, None),           # Shannon entropy (bits) of the grey-level histogram
    "colourfulness": (0.008, None),   # circular hue variance x mean S, pixels with S > 0.1
    "laplacian_var": (100.0, None),   # variance of the Laplacian of grey (blur check)
    "frac_red_brown": (None, 0.2),    # hue 0-60 deg with S > 0.4, V > 0.3 (blood, pigment)
    "frac_green": (None, 0.01),       # hue 75-165 deg with S > 0.2 (ink)
}
_CACHE_SIZE = 32


@dataclass(frozen=True)
class SlideStain:
    """A slide's staining, estimated once and reused for every tile.

    Attributes
    ----------
    matrix : np.ndarray
        [2, 3] float64, rows H and E, unit OD vectors (R, G, B).
    i0 : np.ndarray
        [3] float32, background (unstained) intensity per channel.
    max_conc : np.ndarray
        [2] 99th-percentile H and E concentrations (Macenko's ``maxC``).
    intensity_95 : np.ndarray
        [2] 95th percentile of H and E concentrations above 0.1 (CTPLab's ``H_95th``,
        ``E_95th``): the intensities the protocol's intensity conditions rescale.
    lab_mean, lab_std : np.ndarray
        [3] LAB statistics of the tissue (Reinhard).
    tiles : np.ndarray
        [K, 4] int64, level-0 (x, y, w, h) of the tiles used (empty for a fallback).
    level : int
        Pyramid level the tiles were read from (-1 when not from a slide).
    path : str
        The slide ('' when estimated from tiles).
    fallback : bool
        True when nothing could be estimated and the default reference was used.
    notes : tuple[str, ...]
    """

    matrix: np.ndarray
    i0: np.ndarray
    max_conc: np.ndarray
    intensity_95: np.ndarray
    lab_mean: np.ndarray
    lab_std: np.ndarray
    tiles: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    level: int = -1
    path: str = ""
    fallback: bool = False
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-able summary."""
        def r(a, k):
            return np.round(np.asarray(a, np.float64), k).tolist()

        return {"path": self.path, "matrix": r(self.matrix, 5), "i0": r(self.i0, 2),
                "max_conc": r(self.max_conc, 4), "intensity_95": r(self.intensity_95, 4),
                "lab_mean": r(self.lab_mean, 3), "lab_std": r(self.lab_std, 3),
                "n_tiles": int(self.tiles.shape[0]), "level": self.level,
                "fallback": self.fallback, "notes": list(self.notes)}


# --------------------------------------------------------------------------------- QC
def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] of [..., 3] uint8."""
    x = rgb.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(axis=-1), x.min(axis=-1)
    d = mx - mn
    s = np.where(mx > 0, d / np.maximum(mx, 1e-12), 0.0)
    dd = np.maximum(d, 1e-12)
    h = np.where(mx == r, (g - b) / dd % 6, np.where(mx == g, (b - r) / dd + 2,
                                                      (r - g) / dd + 4)) * 60.0
    h = np.where(d > 0, h, 0.0) % 360.0
    return h, s, mx


def tile_qc(rgb: np.ndarray) -> dict[str, float]:
    """Quality metrics of one tile (CTPLab's, see :data:`QC_THRESHOLDS`).

    Parameters
    ----------
    rgb : np.ndarray
        [H, W, 3] uint8.

    Returns
    -------
    dict
        Metric name -> value, plus ``"passed"`` (number of checks passed) and ``"ok"``
        (1.0 when all pass).
    """
    from scipy import ndimage

    h, s, v = _hsv(rgb)
    grey = comb(np.moveaxis(rgb.astype(np.float32), -1, 0), [[0.299], [0.587], [0.114]])[0]
    hist = np.bincount(np.clip(grey + 0.5, 0, 255).astype(np.uint8).ravel(), minlength=256)
    p = hist[hist > 0] / hist.sum()
    colourful = s > 0.1
    if colourful.any():
        ang = np.radians(h[colourful])
        circ_var = 1.0 - float(np.hypot(np.cos(ang).mean(), np.sin(ang).mean()))
        colourfulness = circ_var * float(s[colourful].mean())
    else:
        colourfulness = 0.0
    m = {
        "frac_sat": float((s > 0.2).mean()),
        "entropy": float(-(p * np.log2(p)).sum()),
        "colourfulness": colourfulness,
        "laplacian_var": float(ndimage.laplace(grey).var()),
        "frac_red_brown": float(((h < 60) & (s > 0.4) & (v > 0.3)).mean()),
        "frac_green": float(((h >= 75) & (h <= 165) & (s > 0.2)).mean()),
    }
    passed = sum((lo is None or m[k] >= lo) and (hi is None or m[k] <= hi)
                 for k, (lo, hi) in QC_THRESHOLDS.items())
    m["passed"] = float(passed)
    m["ok"] = float(passed == len(QC_THRESHOLDS))
    return m


def is_swapped(matrix) -> bool:
    """CTPLab's swap test: H's spherical angles (theta = atan2(g, r), phi = atan2(b,
    hypot(r, g))) are both larger than E's. ``matrix``: [2, 3] rows H, E."""
    m = np.asarray(matrix, np.float64)
    theta = np.arctan2(m[:, 1], m[:, 0])
    phi = np.arctan2(m[:, 2], np.hypot(m[:, 0], m[:, 1]))
    return bool(theta[0] > theta[1] and phi[0] > phi[1])


# ------------------------------------------------------------------------- estimation
def estimate_tiles(tiles, *, i0=255.0, beta: float = 0.15, alpha: float = 1.0
                   ) -> tuple[SlideStain, np.ndarray]:
    """Slide-level staining from a stack of tissue tiles (steps 4-5 of the module recipe).

    Parameters
    ----------
    tiles : np.ndarray
        [K, H, W, 3] uint8 (or one tile [H, W, 3]).
    i0 : float or array-like
        Background intensity, scalar or [3].
    beta, alpha : float
        Macenko's OD threshold and angle percentile.

    Returns
    -------
    stain : SlideStain
        ``path`` '' and ``level`` -1; ``tiles`` empty (the caller fills them).
    valid : np.ndarray
        [K] bool, the tiles that contributed.

    Raises
    ------
    StainEstimateError
        No tile gave plausible stain vectors.
    """
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8 or not len(tiles):
        raise ValueError(f"estimate_tiles: expected [K, H, W, 3] uint8 tiles, got "
                         f"{tiles.dtype} {tiles.shape}")
    i0 = as_i0(i0)
    fits, valid, notes = [], np.zeros(len(tiles), bool), []
    reasons: list[str] = []
    for k, t in enumerate(tiles):
        try:
            fit = fit_macenko(t, i0=i0, beta=beta, alpha=alpha)
        except StainEstimateError as e:
            reasons.append(f"tile {k}: {e}")
            continue
        if is_swapped(fit.matrix):
            reasons.append(f"tile {k}: H and E look swapped")
            continue
        fits.append(fit)
        valid[k] = True
        notes.extend(n for n in fit.notes if n not in notes)
    if not fits:
        raise StainEstimateError("no tile gave stain vectors (" + "; ".join(reasons[:3])
                                 + ("; ..." if len(reasons) > 3 else "") + ")")
    if reasons:
        notes.append(f"{len(reasons)} of {len(tiles)} tiles skipped ({reasons[0]}"
                     + (", ..." if len(reasons) > 1 else "") + ")")
    matrix = np.median(np.stack([f.matrix for f in fits]), axis=0)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    max_conc = np.median(np.stack([f.max_conc for f in fits]), axis=0)
    good = tiles[valid]
    i95 = []
    for t in good:
        c = concentrations(t, matrix, i0)[..., :2].reshape(-1, 2)
        i95.append([np.percentile(c[c[:, j] > 0.1, j], 95) if (c[:, j] > 0.1).any() else 0.0
                    for j in range(2)])
    intensity_95 = np.median(np.asarray(i95, np.float64), axis=0)
    try:
        lab_mean, lab_std, _ = lab_stats(good, i0=i0)
    except StainEstimateError:  # cannot happen after Macenko passed; keep identity stats
        lab_mean, lab_std = np.array([50.0, 0.0, 0.0]), np.ones(3)
    unmix_matrix(matrix)  # validates (non-parallel rows)
    return SlideStain(matrix=matrix, i0=i0, max_conc=max_conc, intensity_95=intensity_95,
                      lab_mean=lab_mean, lab_std=lab_std, notes=tuple(notes)), valid


def _background_i0(slide, mask) -> tuple[np.ndarray, str | None]:
    from scipy import ndimage

    h, w = mask.mask.shape
    rgb = slide.read(mask.level, 0, 0, h, w)
    bg = ~ndimage.binary_dilation(mask.mask, iterations=2) if mask.mask.any() \
        else np.ones((h, w), bool)
    bg &= rgb.min(axis=2) > 100  # not pen, padding or placeholder tiles
    px = rgb[bg]
    if px.shape[0] < max(100, 0.01 * h * w):
        return as_i0(255.0), f"too little background ({px.shape[0]} px) to measure I0: 255"
    return as_i0(np.clip(np.percentile(px, 90, axis=0), 128, 255)), None


_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every cached :class:`SlideStain`."""
    with _cache_lock:
        _cache.clear()


def estimate_slide(slide, *, n_tiles: int = 10, min_tiles: int = 3, tile_px: int = 448,
                   target_mpp: float = 0.5, seed: int = 42, beta: float = 0.15,
                   alpha: float = 1.0, max_candidates: int = 60, cache: bool = True
                   ) -> SlideStain:
    """Estimate a slide's stain vectors, intensities and LAB statistics once.

    Parameters
    ----------
    slide : Slide or path
        An opened :class:`~napari_milview.slide.Slide` or a slide path (opened and closed).
    n_tiles : int
        Quality-checked tissue tiles to use (CTPLab: 10).
    min_tiles : int
        Fewer tiles passing QC are topped up with the best remaining tissue tiles.
    tile_px : int
        Tile side in pixels at ``target_mpp``.
    target_mpp : float
        Microns per pixel of the tiles (slides without mpp: level-0 pixels, noted).
    seed : int
        Shuffle seed of the candidate tiles (CTPLab: 42).
    beta, alpha : float
        Macenko's OD threshold and angle percentile.
    max_candidates : int
        At most this many candidate tiles are read.
    cache : bool
        Reuse (and store) the result for the same file, modification time and parameters.

    Returns
    -------
    SlideStain
        ``fallback`` True (with a note) when nothing could be estimated.
    """
    if not isinstance(slide, (str, os.PathLike)):
        return _estimate_cached(slide, n_tiles, min_tiles, tile_px, target_mpp, seed, beta,
                                alpha, max_candidates, cache)
    from ..slide import open_slide

    with open_slide(slide, remember_mpp=False) as s:
        return _estimate_cached(s, n_tiles, min_tiles, tile_px, target_mpp, seed, beta,
                                alpha, max_candidates, cache)


def _estimate_cached(slide, *args) -> SlideStain:
    *params, use_cache = args
    try:
        st = os.stat(slide.path)
        key = (os.path.realpath(slide.path), st.st_size, st.st_mtime_ns, slide.info.mpp,
               tuple(params))
    except OSError:
        key, use_cache = None, False
    if use_cache:
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
    res = _estimate(slide, *params)
    if use_cache:
        with _cache_lock:
            _cache[key] = res
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return res


def _estimate(slide, n_tiles, min_tiles, tile_px, target_mpp, seed, beta, alpha,
              max_candidates) -> SlideStain:
    from ..tissue import patch_grid, read_patches, tissue_mask

    path = str(slide.path)
    if n_tiles < 1 or min_tiles < 1 or tile_px < 16 or not target_mpp > 0:
        raise ValueError(f"{path}: need n_tiles >= 1, min_tiles >= 1, tile_px >= 16 and "
                         f"target_mpp > 0 (got {n_tiles}, {min_tiles}, {tile_px}, "
                         f"{target_mpp})")
    notes: list[str] = []
    mask = tissue_mask(slide)
    i0, note = _background_i0(slide, mask)
    if note:
        notes.append(note)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # mpp unknown: noted below
        grid = patch_grid(slide, patch_px=tile_px, patch_um=tile_px * target_mpp,
                          min_tissue=0.9, mask=mask)
        if len(grid) == 0:
            grid = patch_grid(slide, patch_px=tile_px, patch_um=tile_px * target_mpp,
                              min_tissue=0.5, mask=mask)
    if slide.info.mpp is None:
        notes.append(f"microns per pixel unknown: tiles are {tile_px} level-0 px")
    order = np.random.default_rng(seed).permutation(len(grid))[:max_candidates]
    chosen: list[int] = []
    spare: list[tuple[float, float, int]] = []
    tiles: dict[int, np.ndarray] = {}
    for s in range(0, len(order), n_tiles):
        idx = order[s:s + n_tiles]
        for i, t in zip(idx, read_patches(slide, grid, idx)):
            q = tile_qc(t)
            tiles[int(i)] = t
            if q["ok"] and len(chosen) < n_tiles:
                chosen.append(int(i))
            else:
                spare.append((-q["passed"], -q["frac_sat"], int(i)))
        if len(chosen) >= n_tiles:
            break
    if len(chosen) < min_tiles and spare:
        extra = [i for *_, i in sorted(spare)[:n_tiles - len(chosen)]]
        notes.append(f"only {len(chosen)} tiles passed the quality checks; {len(extra)} more "
                     "tissue tiles used")
        chosen += extra
    if not chosen:
        return _fallback(path, i0, [*notes, *mask.notes[:1], "no tissue tiles"])
    try:
        stain, valid = estimate_tiles(np.stack([tiles[i] for i in chosen]), i0=i0, beta=beta,
                                      alpha=alpha)
    except StainEstimateError as e:
        return _fallback(path, i0, notes + [str(e)])
    side = grid.patch_size_level0
    boxes = np.array([[*grid.coords[i], side, side] for i, ok in zip(chosen, valid) if ok],
                     np.int64).reshape(-1, 4)
    return SlideStain(matrix=stain.matrix, i0=i0, max_conc=stain.max_conc,
                      intensity_95=stain.intensity_95, lab_mean=stain.lab_mean,
                      lab_std=stain.lab_std, tiles=boxes, level=grid.read_level, path=path,
                      notes=tuple(notes) + stain.notes)


def _fallback(path: str, i0: np.ndarray, notes: list[str]) -> SlideStain:
    from .conditions import DEFAULT_REFERENCE as ref

    notes = [*notes, f"stain estimation failed; using the reference {ref.name!r} values "
                     "(perturbations leave unstained pixels unchanged)"]
    return SlideStain(matrix=ref.matrix, i0=i0, max_conc=ref.max_conc,
                      intensity_95=ref.intensity_95, lab_mean=ref.lab_mean,
                      lab_std=ref.lab_std, path=path, fallback=True, notes=tuple(notes))
