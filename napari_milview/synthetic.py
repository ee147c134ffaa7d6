"""Synthetic H&E-like whole-slide images with a planted, known lesion.

:func:`write_synthetic_slide` writes a real pyramidal, JPEG-tiled TIFF laid out like
an Aperio SVS (OpenSlide reports vendor ``aperio``), a binary lesion ground-truth PNG,
a JSON sidecar and, optionally, an OME-Zarr copy of the pyramid. Every test, demo and
benchmark of the project uses these slides.

How the pixels are made
-----------------------
1. *Fields.* Smooth signed-distance-like fields (in level-0 pixels, positive inside)
   are built on a coarse grid (one sample per ``g`` = 16 level-0 pixels; 32 or more
   when the slide is over 32k px): tissue (1-3 irregular pieces covering 35-55 % of
   the slide), lumens (holes), lesion (1-3 irregular regions, 10-22 % of the tissue),
   folds (bands) and blurred areas. The lesion field is clipped to lie at least a
   margin inside the tissue and outside every lumen; folds and blur keep away from it.
2. *Texture canvases.* Periodic texture images of ``P x P`` pixels (``P`` = 2048, or
   less for slides under 4096 px) are rendered once in optical-density space with
   fixed H and E stain vectors: normal tissue (fibrous eosin stroma, scattered
   round/oval/spindle hematoxylin nuclei, small lumens), lesion (same stroma, purple
   cytoplasm, dense, large, dark, pleomorphic nuclei with nucleoli), fold (the normal
   tissue with a second, shifted copy of itself on top: darker, more saturated), blur
   (the normal canvas blurred) and glass background (~240 with slight noise). Fold and
   blur are derived from the normal canvas, so transitions between them are seamless.
   Nuclei lie wholly inside the periodic canvas, so no tile seam cuts one.
3. *Composition.* The slide is cut into super-blocks (``P / 2`` px); each maps its
   pixels into the canvases with its own random offset and one of 4 orientations
   (as is, mirrored, transposed, rotated), so there is no visible repetition. A seam
   between super-blocks runs through the middle of a tile and is joined by image
   quilting (minimum-error cut, feathered): it winds through stroma, around nuclei.
   Where two seams cross the textures are cross-faded over 64 px. An output tile is a
   plain crop of one canvas when it is "pure", else the fields are bilinearly
   upsampled to per-pixel alphas and the canvases blended.
4. *Pyramid.* Level ``k`` (downsample ``4**k``) is a box filter of the rendered,
   pre-JPEG level-0 pixels (level 1 accumulated tile by tile while level 0 is
   written, taken from 4x-reduced canvases for pure tiles; the others reduced from
   level 1), so levels agree up to JPEG noise.
5. *Writing.* Tiles are rendered and JPEG-encoded (libjpeg-turbo via imagecodecs, RGB
   colour space, photometric RGB) by a thread pool in slide order and handed to
   ``tifffile`` as pre-encoded tiles; level 1 is held in memory (``W * H * 3 / 16``
   bytes), nothing of level 0 is. A 50 000 x 40 000 slide takes ~30 s and < 1 GB.

The lesion mask pixel ``(r, c)`` is 255 exactly when the per-pixel lesion alpha used
for rendering is above 0.5 at the centre of the level-0 block it covers.

Randomness comes only from ``numpy.random.default_rng(seed)`` in a fixed order, so the
same arguments give byte-identical files (independent of ``workers``).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont
from scipy import fft as sfft
from scipy import ndimage

__all__ = [
    "SyntheticSlide",
    "write_synthetic_slide",
    "mask_downsample_for",
    "sidecar_paths",
    "default_objective_power",
    "SAMPLE",
    "sample_dir",
    "sample_slide_path",
]

# Optical density of one unit of stain, per R, G, B channel (unit vectors).
_H_OD = np.array([0.650, 0.704, 0.286], np.float32)
_E_OD = np.array([0.10, 0.86, 0.50], np.float32)
_E_OD /= np.linalg.norm(_E_OD)
_I0 = 242.0  # brightest (unstained) transmitted light
_BG_LEVEL = 240.0
_APERIO = "Aperio Image Library v12.0.15"
_FIELD_PAD = 2

# transition half-widths (level-0 px) of the alpha ramps: alpha = clip(S / w + 0.5)
_W_TISSUE = 4.0
_W_HOLE = 4.0
_W_LESION = 16.0
_W_FOLD = 40.0
_W_BLUR = 80.0
_M_AWAY = 64.0  # fold / blur keep this far (px, in field units) from the lesion


@dataclass(frozen=True)
class SyntheticSlide:
    """Paths and geometry of a slide written by :func:`write_synthetic_slide`.

    Attributes
    ----------
    path : Path
        The pyramidal Aperio-style ``.svs`` (or ``.tif``) file.
    mask_path : Path or None
        Lesion ground truth ``OUT.lesion.png`` (mode ``L``, 0/255), shape
        ``(ceil(height / mask_downsample), ceil(width / mask_downsample))``. Always
        written (all zero when ``lesion=False``).
    json_path : Path
        JSON sidecar ``OUT.json`` with the generation parameters and statistics.
    zarr_path : Path or None
        OME-Zarr (NGFF 0.4, zarr format 2) folder ``OUT.ome.zarr`` when requested.
    width, height : int
        Level-0 size in pixels.
    mpp : float
        Microns per level-0 pixel.
    seed : int
        The seed of the random generator.
    mask_downsample : int
        Level-0 pixels per lesion-mask pixel (each axis).
    """

    path: Path
    mask_path: Path | None
    json_path: Path
    zarr_path: Path | None
    width: int
    height: int
    mpp: float
    seed: int
    mask_downsample: int


# ----------------------------------------------------------------------------- helpers


def sidecar_paths(out: str | os.PathLike) -> tuple[Path, Path, Path]:
    """Return ``(mask_png, json, ome_zarr)`` paths for the slide path ``out``.

    The last suffix is stripped: ``/d/slide.svs`` gives ``/d/slide.lesion.png``,
    ``/d/slide.json`` and ``/d/slide.ome.zarr``.
    """
    out = Path(out)
    base = str(out.with_suffix("")) if out.suffix else str(out)
    return Path(base + ".lesion.png"), Path(base + ".json"), Path(base + ".ome.zarr")


def mask_downsample_for(width: int, height: int) -> int:
    """Lesion-mask downsample for a slide of ``width x height`` level-0 pixels.

    Start at 16; double while the longest mask side exceeds 4000 px; halve (down to
    1) while it is below 256 px. Examples: 50000 -> 16 (3125 px), 100000 -> 32,
    2000 -> 4 (500 px), 300 -> 1.
    """
    longest = max(int(width), int(height))
    ds = 16
    while longest / ds > 4000:
        ds *= 2
    while ds > 1 and longest / ds < 256:
        ds //= 2
    return ds


def default_objective_power(mpp: float) -> int:
    """Objective power written as ``AppMag``: 40 if mpp <= 0.3, 20 if <= 0.6, else 10."""
    if mpp <= 0.3:
        return 40
    if mpp <= 0.6:
        return 20
    return 10


def _level_sizes(width: int, height: int, tile: int, levels: int) -> list[tuple[int, int]]:
    """(w, h) of each level: downsample 4**k, stop when a level fits inside one tile."""
    sizes = [(width, height)]
    for k in range(1, levels):
        w, h = width // 4**k, height // 4**k
        if max(w, h) < tile or min(w, h) < 1:
            break
        sizes.append((w, h))
    return sizes


def _validate(width, height, mpp, tile, levels, quality, workers, objective_power):
    for name, v in (("width", width), ("height", height), ("tile", tile), ("levels", levels),
                    ("quality", quality)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16 (JPEG blocks), got {tile}")
    if width < tile or height < tile:
        raise ValueError(f"width and height must be >= tile ({tile}), got {width} x {height}")
    if not 1 <= levels <= 10:
        raise ValueError(f"levels must be between 1 and 10, got {levels}")
    if not (isinstance(mpp, (int, float, np.floating)) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a finite number > 0, got {mpp!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be between 1 and 100, got {quality}")
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise ValueError(f"workers must be None or an integer >= 1, got {workers!r}")
    if objective_power is not None and not (
        isinstance(objective_power, (int, float, np.number)) and objective_power > 0
    ):
        raise ValueError(f"objective_power must be None or > 0, got {objective_power!r}")


def _spectral_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Periodic Gaussian-correlated noise ``shape`` float32 (mean 0, std 1).

    Spectral synthesis (random complex coefficients times the transfer function of a
    Gaussian of ``sigma`` samples). Smooth noise is synthesised on a grid ``step``
    times coarser and upsampled bilinearly (periodically), which changes nothing
    visible for ``sigma / step >= 3``.
    """
    ny, nx = (int(v) for v in shape)
    sigma = max(float(sigma), 0.3)
    step = 1
    while sigma / (2 * step) >= 3 and ny % (2 * step) == 0 and nx % (2 * step) == 0 \
            and min(ny, nx) // (2 * step) >= 16:
        step *= 2
    ly, lx, sg = ny // step, nx // step, sigma / step
    kc = 4.0 / (2 * math.pi * sg)  # filter < exp(-8) beyond
    my = min(ly // 2, int(math.ceil(kc * ly)) + 1)
    mx = min(lx // 2, int(math.ceil(kc * lx)) + 1)
    rows = np.unique(np.r_[0: my + 1, ly - my: ly] % ly)
    ky = sfft.fftfreq(ly)[rows].astype(np.float32)[:, None]
    kx = sfft.rfftfreq(lx)[: mx + 1].astype(np.float32)[None, :]
    filt = np.exp(-2 * np.pi**2 * sg * sg * (ky * ky + kx * kx))
    z = rng.standard_normal((rows.size, mx + 1, 2), dtype=np.float32)
    spec = np.zeros((ly, lx // 2 + 1), np.complex64)
    spec[rows, : mx + 1] = (z[..., 0] + 1j * z[..., 1]) * filt
    f = sfft.irfft2(spec, s=(ly, lx), workers=-1).astype(np.float32, copy=False)
    if step > 1:
        f = np.pad(f, 1, mode="wrap")
        img = Image.fromarray(f).resize((nx, ny), Image.BILINEAR,
                                                   box=(1.0, 1.0, 1.0 + lx, 1.0 + ly))
        f = np.array(img, dtype=np.float32)
    sub = f[:: max(1, ny // 512), :: max(1, nx // 512)]
    f -= sub.mean()
    f /= sub.std() + 1e-20
    return f


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Smooth noise on a field grid ``shape`` (float32, std ~1), features ~``scale`` cells.

    Synthesised on a grid padded to a multiple of 64 (fast, coarse-able), then cropped.
    """
    ny, nx = shape
    big = (-(-ny // 64) * 64, -(-nx // 64) * 64)
    return np.ascontiguousarray(
        _spectral_noise(rng, big, max(float(scale), 1.0) / 2.0)[:ny, :nx])


def _periodic_noise(rng: np.random.Generator, p: int, sigma: float) -> np.ndarray:
    """Periodic ``(p, p)`` float32 Gaussian-filtered noise, std 1, correlation ``sigma`` px."""
    return _spectral_noise(rng, (p, p), sigma)


def _fft_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian blur of a square ``(p, p)`` float32 array (``sigma`` px)."""
    p = x.shape[0]
    ky = sfft.fftfreq(p).astype(np.float32)[:, None]
    kx = sfft.rfftfreq(p).astype(np.float32)[None, :]
    filt = np.exp(-2 * np.pi**2 * sigma * sigma * (ky * ky + kx * kx))
    spec = sfft.rfft2(x, workers=-1)
    spec *= filt
    return sfft.irfft2(spec, s=x.shape, workers=-1).astype(np.float32, copy=False)


def _sdf(u: np.ndarray, g: float) -> np.ndarray:
    """Approximate signed distance (px) of the zero level of ``u`` sampled every ``g`` px."""
    u = np.asarray(u, np.float32)
    gy = np.empty_like(u)
    gx = np.empty_like(u)
    np.subtract(u[2:], u[:-2], out=gy[1:-1])
    gy[0], gy[-1] = gy[1], gy[-2]
    np.subtract(u[:, 2:], u[:, :-2], out=gx[:, 1:-1])
    gx[:, 0], gx[:, -1] = gx[:, 1], gx[:, -2]
    gm = np.hypot(gy, gx, out=gy)
    del gx
    gm *= 0.5 / g
    # near critical points of u the first-order distance is meaningless: bound the
    # gradient from below by a fraction of its typical value (smooth, no speckles)
    floor = 0.3 * float(np.median(gm[::4, ::4])) if gm.size else 0.0
    np.maximum(gm, max(floor, 1e-6), out=gm)
    s = (u / gm).astype(np.float32)
    np.clip(s, -1e5, 1e5, out=s)
    return s


def _is_const(a, value: float) -> bool:
    """True when the alpha ``a`` is the scalar ``value`` (not a per-pixel array)."""
    return isinstance(a, float) and a == value


def _lin_sample(field: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``field`` (ny, nx) at the grid ``ys x xs`` (field coordinates)."""
    y0 = np.floor(ys).astype(np.int64)
    fy = (ys - y0).astype(np.float32)[:, None]
    x0 = np.floor(xs).astype(np.int64)
    fx = (xs - x0).astype(np.float32)[None, :]
    rows = field[y0] * (1 - fy) + field[y0 + 1] * fy
    return rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx


# ------------------------------------------------------------------------------ fields


class _Fields:
    """Coarse signed-distance fields (level-0 px units, positive inside).

    The constructor is long on purpose: one procedural recipe (tissue outline, folds,
    vessels, the planted lesion) whose steps feed each other in order, read top to bottom.

    Each array has shape ``(ny, nx)`` float32, sample ``(i, j)`` sitting at level-0
    pixel ``((j - PAD + 0.5) * g - 0.5, (i - PAD + 0.5) * g - 0.5)`` (x, y). Fields:
    ``tissue``, ``hole``, ``lesion`` (already clipped inside tissue, outside holes),
    ``lesion_raw``, ``fold``, ``blur``.
    """

    def __init__(self, rng, width, height, wp, hp, mpp, ds, lesion):
        g = 16
        while max(wp, hp) / g > 2048:
            g *= 2
        self.g = g
        ny = -(-hp // g) + 2 * _FIELD_PAD
        nx = -(-wp // g) + 2 * _FIELD_PAD
        shape = (ny, nx)
        yy = ((np.arange(ny, dtype=np.float32) - _FIELD_PAD + 0.5) * g - 0.5)[:, None]
        xx = ((np.arange(nx, dtype=np.float32) - _FIELD_PAD + 0.5) * g - 0.5)[None, :]
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        short = min(width, height)
        um = 1.0 / mpp  # px per micron

        # --- tissue: 1-3 irregular pieces
        n_pieces = int(rng.integers(1, 4))
        centers = []
        for _ in range(n_pieces):
            for _try in range(50):
                c = (rng.uniform(0.22, 0.78) * width, rng.uniform(0.22, 0.78) * height)
                if all(math.hypot((c[0] - d[0]) / width, (c[1] - d[1]) / height) > 0.35
                       for d in centers):
                    break
            centers.append(c)
        v = np.full(shape, -np.inf, np.float32)
        for cx, cy in centers:
            rx = rng.uniform(0.22, 0.36) * width / math.sqrt(n_pieces)
            ry = rng.uniform(0.22, 0.36) * height / math.sqrt(n_pieces)
            th = rng.uniform(0, math.pi)
            c, s = math.cos(th), math.sin(th)
            dx, dy = xx - cx, yy - cy
            e = np.sqrt(((dx * c + dy * s) / rx) ** 2 + ((-dx * s + dy * c) / ry) ** 2)
            np.maximum(v, 1 - e, out=v)
        cells = short / g
        v += 0.30 * _smooth_noise(rng, shape, cells / 5)
        v += 0.10 * _smooth_noise(rng, shape, cells / 14)
        border = np.minimum(np.minimum(xx, width - 1 - xx), np.minimum(yy, height - 1 - yy))
        v -= 0.8 * np.clip(1 - border / (0.05 * short), 0, 1)
        target = rng.uniform(0.35, 0.55)
        thr = np.quantile(v[inside][::3], 1 - target)
        self.tissue = _sdf(v - thr, g)
        del v, e

        # --- lesion: 1-3 irregular regions well inside the tissue
        m_in = float(max(2 * ds, 2 * g) + 8)  # margin lesion -> tissue edge / lumens
        self.margin = m_in
        tissue_cells = max(int((self.tissue > 0).sum()), 1)
        self.lesion_raw = np.full(shape, -1e5, np.float32)
        self.n_lesions = 0
        if lesion:
            n_les = int(rng.integers(1, 4))
            self.n_lesions = n_les
            frac = rng.uniform(0.10, 0.22)
            tissue_area = tissue_cells * g * g
            specs = []
            r1 = math.sqrt(frac * tissue_area / n_les / math.pi)
            for _ in range(n_les):
                specs.append({"aspect": rng.uniform(1.0, 1.7), "th": rng.uniform(0, math.pi),
                              "pick": rng.random(),
                              "noise": _smooth_noise(rng, shape, max(r1 / g / 2.5, 1.0))})
            scale = 1.0
            for _attempt in range(10):
                raw = np.full(shape, -1e5, np.float32)
                for sp in specs:
                    area = frac * tissue_area / n_les * scale
                    r = math.sqrt(area / math.pi)
                    # centre: a tissue point deep enough for the region (or the deepest)
                    depth = self.tissue
                    ok = np.flatnonzero((depth > min(0.7 * r, float(depth.max()) * 0.8)) & inside)
                    if ok.size == 0:
                        ok = np.array([int(np.argmax(depth))])
                    idx = ok[int(sp["pick"] * ok.size)]
                    cy, cx = yy[idx // nx, 0], xx[0, idx % nx]
                    rx, ry = r * math.sqrt(sp["aspect"]), r / math.sqrt(sp["aspect"])
                    c, s = math.cos(sp["th"]), math.sin(sp["th"])
                    dx, dy = xx - cx, yy - cy
                    e = np.sqrt(((dx * c + dy * s) / rx) ** 2 + ((-dx * s + dy * c) / ry) ** 2)
                    u = 1 - e + 0.22 * sp["noise"]
                    np.maximum(raw, _sdf(u, g), out=raw)
                eff = np.minimum(raw, self.tissue - m_in)
                # drop fragments (< 5 % of the lesion) that the tissue edge cut off
                lab, nlab = ndimage.label(eff > 0)
                if nlab > 1:
                    sizes = np.bincount(lab.ravel())[1:]
                    small = np.flatnonzero(sizes < 0.05 * sizes.sum()) + 1
                    if small.size:
                        drop = np.isin(lab, small)
                        raw[drop] = np.minimum(raw[drop], -_W_LESION)
                        eff[drop] = np.minimum(eff[drop], -_W_LESION)
                del lab
                got = float(((eff > 0) & inside).sum()) / tissue_cells
                if got >= 0.10:
                    break
                scale *= 1.35
            self.lesion_raw = raw
        self.lesion = np.minimum(self.lesion_raw, self.tissue - m_in)

        # --- lumens (holes), avoiding the lesion
        self.hole = np.full(shape, -1e5, np.float32)
        tissue_mm2 = tissue_cells * (g * mpp / 1000) ** 2
        n_holes = int(rng.poisson(max(tissue_mm2 * 3.0, 2.0)))
        cand = np.flatnonzero(
            (self.tissue > 30 * um + m_in) & (self.lesion_raw < -(60 * um)) & inside)
        if cand.size:
            for _ in range(n_holes):
                idx = cand[int(rng.integers(cand.size))]
                i, j = divmod(int(idx), nx)
                r = rng.uniform(10, 40) * um
                r = min(r, float(self.tissue[i, j]) - m_in - 4,
                        float(-self.lesion_raw[i, j]) - m_in)
                if r < 1.5 * g:
                    continue
                asp = rng.uniform(1.0, 1.8)
                th = rng.uniform(0, math.pi)
                harm = rng.uniform(0, 0.08, 3) * np.array([1.0, 0.8, 0.4])
                ph = rng.uniform(0, 2 * math.pi, 3)
                span = int(r * 1.6 / g) + 3
                i0, i1 = max(i - span, 0), min(i + span + 1, ny)
                j0, j1 = max(j - span, 0), min(j + span + 1, nx)
                dy = yy[i0:i1] - yy[i, 0]
                dx = xx[:, j0:j1] - xx[0, j]
                c, s = math.cos(th), math.sin(th)
                u = (dx * c + dy * s) * math.sqrt(asp)
                w = (-dx * s + dy * c) / math.sqrt(asp)
                d = np.hypot(u, w)
                phi = np.arctan2(w, u)
                rr = r * (1 + sum(harm[k] * np.cos((k + 2) * phi + ph[k]) for k in range(3)))
                sd = (rr - d).astype(np.float32)
                np.maximum(self.hole[i0:i1, j0:j1], sd, out=self.hole[i0:i1, j0:j1])
        self.lesion = np.minimum(self.lesion, -self.hole - m_in)

        # --- folds: bands along a level set of smooth noise, inside a disc
        self.fold = np.full(shape, -1e5, np.float32)
        for _ in range(int(rng.integers(1, 4))):
            rf = rng.uniform(0.08, 0.2) * short
            cand = np.flatnonzero((self.tissue > 0) & inside)
            if not cand.size:
                break
            idx = cand[int(rng.integers(cand.size))]
            i, j = divmod(int(idx), nx)
            u = _smooth_noise(rng, shape, max(rf / g / 1.5, 1.0))
            hw = rng.uniform(25, 90) * um
            band = hw - np.abs(_sdf(u - u[i, j], g))
            disc = rf - np.hypot(xx - xx[0, j], yy - yy[i, 0])
            np.maximum(self.fold, np.minimum(band, disc), out=self.fold)
        self.fold = np.minimum(self.fold, -self.lesion - _M_AWAY)

        # --- blurred (out of focus) areas
        self.blur = np.full(shape, -1e5, np.float32)
        for _ in range(int(rng.integers(1, 3))):
            rb = rng.uniform(0.06, 0.14) * short
            cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
            asp = rng.uniform(1.0, 1.8)
            e = np.sqrt(((xx - cx) / (rb * asp)) ** 2 + ((yy - cy) * asp / rb) ** 2)
            u = 1 - e + 0.15 * _smooth_noise(rng, shape, max(rb / g / 3, 1.0))
            sd = u * (rb / math.sqrt(asp))
            np.maximum(self.blur, sd.astype(np.float32), out=self.blur)
        self.blur = np.minimum(self.blur, -self.lesion - _M_AWAY)

    def sample(self, name: str, px_y: np.ndarray, px_x: np.ndarray) -> np.ndarray:
        """Field ``name`` bilinearly sampled at level-0 pixel coordinates ``py x px``."""
        f = getattr(self, name)
        return _lin_sample(f, (px_y + 0.5) / self.g - 0.5 + _FIELD_PAD,
                           (px_x + 0.5) / self.g - 0.5 + _FIELD_PAD)


# ---------------------------------------------------------------------------- textures


def _od_to_rgb(ch: np.ndarray, ce: np.ndarray, pad: int) -> np.ndarray:
    """RGB uint8 ``(P + pad, P + pad, 3)`` of stain concentrations ``(P, P)``, wrap-padded."""
    p = ch.shape[0]
    out = np.empty((p + pad, p + pad, 3), np.uint8)
    tmp = np.empty((p, p), np.float32)
    for c in range(3):
        np.multiply(ch, -_H_OD[c], out=tmp)
        tmp -= ce * _E_OD[c]
        np.exp(tmp, out=tmp)
        tmp *= _I0
        tmp += 0.5
        out[:p, :p, c] = tmp
    out[p:, :p] = out[:pad, :p]
    out[:, p:] = out[:, :pad]
    return out


def _sprite(a, b, theta, conc, *, edge=0.07, rim=0.0, harm=None) -> np.ndarray:
    """One nucleus: hematoxylin concentration ``(2R+1, 2R+1)`` float32, centred.

    An ellipse with semi-axes ``a``, ``b`` (px) rotated by ``theta``, optionally with
    an irregular outline (``harm = (amplitudes, phases)`` of harmonics 2, 3, 4), a
    soft edge and an optional darker rim (nuclear membrane).
    """
    amp = 0.0 if harm is None else float(np.abs(harm[0]).sum())
    rad = int(math.ceil(max(a, b) * (1 + amp) * (1 + 4 * edge) + 1))
    off = np.arange(-rad, rad + 1, dtype=np.float32)
    dy, dx = off[:, None], off[None, :]
    c, s = math.cos(theta), math.sin(theta)
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    rho = np.sqrt(u * u + v * v)
    if harm is not None:
        amps, phases = harm
        phi = np.arctan2(v, u)
        mod = np.ones_like(rho)
        for k in range(len(amps)):
            mod += amps[k] * np.cos((k + 2) * phi + phases[k])
        rho /= mod
    prof = conc / (1 + np.exp(np.minimum((rho - 1) / edge, 60.0)))
    if rim:
        prof *= 1 + rim * np.exp(-(((rho - 0.88) / 0.1) ** 2))
    return prof.astype(np.float32)


class _Stamper:
    """Max-composites sprites into a periodic ``(P, P)`` canvas through a margin."""

    def __init__(self, base: np.ndarray, texture: np.ndarray, margin: int):
        p = base.shape[0]
        self.p, self.m = p, margin
        self.ext = np.zeros((p + 2 * margin, p + 2 * margin), np.float32)
        self.ext[margin: margin + p, margin: margin + p] = base
        self.tex = np.pad(texture, margin, mode="wrap")

    def stamp(self, y: int, x: int, spr: np.ndarray):
        r = spr.shape[0] // 2
        y0, x0 = y + self.m - r, x + self.m - r
        sl = (slice(y0, y0 + spr.shape[0]), slice(x0, x0 + spr.shape[1]))
        view = self.ext[sl]
        np.maximum(view, spr * self.tex[sl], out=view)

    def result(self) -> np.ndarray:
        e, m, p = self.ext, self.m, self.p
        np.maximum(e[m: 2 * m], e[m + p:], out=e[m: 2 * m])
        np.maximum(e[p: p + m], e[:m], out=e[p: p + m])
        np.maximum(e[:, m: 2 * m], e[:, m + p:], out=e[:, m: 2 * m])
        np.maximum(e[:, p: p + m], e[:, :m], out=e[:, p: p + m])
        return np.ascontiguousarray(e[m: m + p, m: m + p])


def _pick(rng, bank, n):
    """``n`` random sprites of ``bank`` with random 90-degree rotations / flips."""
    idx = rng.integers(0, len(bank), n)
    ops = rng.integers(0, 8, n)
    out = []
    for i, o in zip(idx, ops, strict=True):
        spr = bank[i]
        if o & 4:
            spr = spr.T
        if o & 1:
            spr = spr[::-1]
        if o & 2:
            spr = spr[:, ::-1]
        out.append(spr)
    return out


class _Canvases:
    """Periodic texture canvases, each ``(P + t, P + t, 3)`` uint8 (wrap-padded by ``t``).

    The constructor is long on purpose: one recipe per tissue texture (nuclei, stroma,
    fat, lesion), each a few steps, kept in the order they are painted.

    Kinds: ``normal``, ``lesion``, ``fold``, ``blur``, ``background``.
    """

    def __init__(self, rng: np.random.Generator, p: int, mpp: float, t: int):
        self.p = p
        um = 1.0 / mpp
        area_mm2 = (p * mpp / 1000.0) ** 2

        # fibrous stroma: 3 orientation layers of oriented noise, blended by smooth weights
        white = rng.standard_normal((p, p), dtype=np.float32)
        spec = sfft.rfft2(white, workers=-1)
        del white
        ky = sfft.fftfreq(p).astype(np.float32)[:, None]
        kx = sfft.rfftfreq(p).astype(np.float32)[None, :]
        th0 = rng.uniform(0, math.pi)
        s_along, s_across = 6.0 * um, 1.1 * um
        fib = np.zeros((p, p), np.float32)
        wsum2 = np.zeros((p, p), np.float32)
        dom = np.zeros((p, p), np.uint8)
        wmax = np.zeros((p, p), np.float32)
        thetas = []
        for i in range(3):
            th = th0 + i * math.pi / 3
            thetas.append(th)
            ka = kx * math.cos(th) + ky * math.sin(th)
            kc = -kx * math.sin(th) + ky * math.cos(th)
            filt = np.exp(-2 * np.pi**2 * ((ka * s_along) ** 2 + (kc * s_across) ** 2))
            f = sfft.irfft2(spec * filt, s=(p, p), workers=-1).astype(np.float32, copy=False)
            f /= f[::4, ::4].std() + 1e-12
            w = _periodic_noise(rng, p, 30 * um)
            w *= 2.5
            np.exp(w, out=w)
            f *= w
            fib += f
            better = w > wmax
            dom[better] = i
            np.maximum(wmax, w, out=wmax)
            w *= w
            wsum2 += w
            del f, filt, ka, kc, w, better
        del spec, wmax
        np.sqrt(wsum2, out=wsum2)
        fib /= wsum2
        del wsum2
        gap = _fft_blur(fib, 2.0 * um)
        gap /= gap[::4, ::4].std() + 1e-12
        s = np.tanh(0.9 * fib + 0.3)
        del fib
        s *= 0.5 * 0.80
        s += 0.40 + 0.5 * 0.80  # 0.40 + 0.80 * (0.5 + 0.5 tanh)
        # no variation at scales near the super-block size (it would show as a patchwork)
        base_e = 0.07 * _periodic_noise(rng, p, 20 * um)
        base_e += 0.08 * _periodic_noise(rng, p, 6 * um)
        np.exp(base_e, out=base_e)
        base_e *= 0.40
        ce = base_e * s
        del s, base_e
        gap += 1.5
        gap /= -0.5
        np.clip(gap, 0, 1, out=gap)
        ce *= 1 - 0.6 * gap
        del gap
        ch_bg = 0.05 + 0.015 * _periodic_noise(rng, p, 15 * um)
        chrom = 1 + 0.3 * _periodic_noise(rng, p, 0.5 * um)
        np.clip(chrom, 0.45, 1.7, out=chrom)

        # --- sprite banks (nuclei), then placement
        def r_(n):
            return rng.random(n)

        spindle = [[_sprite((6 + 3 * q[1]) * um, (1.2 + 0.8 * q[2]) * um,
                            th + (q[0] - 0.5) * 0.5, 0.75 + 0.3 * q[3], edge=0.1)
                    for q in rng.random((16, 4))] for th in thetas]
        lympho = [_sprite((2.8 + 0.8 * q[1]) * um, (2.8 + 0.8 * q[1]) * (0.9 + 0.1 * q[2]) * um,
                          q[0] * math.pi, 1.15 + 0.3 * q[3], edge=0.09)
                  for q in rng.random((16, 4))]
        oval = [_sprite((3.5 + 1.5 * q[1]) * um, (3.5 + 1.5 * q[1]) / (1 + 0.4 * q[2]) * um,
                        q[0] * math.pi, 0.6 + 0.3 * q[3], edge=0.08, rim=0.15)
                for q in rng.random((32, 4))]
        tumour = []
        for q in rng.random((160, 12)):
            a = (4.5 + 3.0 * q[0]) * um * (1.55 if q[1] < 0.07 else 1.0)
            b = a / (1.0 + 0.8 * q[2])
            spr = _sprite(a, b, q[9] * math.pi, 1.05 + 0.55 * q[10], edge=0.06, rim=0.3,
                          harm=(0.13 * q[3:6], 2 * math.pi * q[6:9]))
            if q[11] < 0.35:  # nucleolus
                r = 0.9 * um
                nuc = _sprite(r, r, 0.0, 2.0, edge=0.15)
                c = spr.shape[0] // 2
                oy = int(round(0.3 * b * math.sin(q[11] * 40) + c - nuc.shape[0] // 2))
                ox = int(round(0.3 * a * math.cos(q[11] * 40) + c - nuc.shape[0] // 2))
                if oy >= 0 and ox >= 0 and oy + nuc.shape[0] <= spr.shape[0] \
                        and ox + nuc.shape[1] <= spr.shape[1]:
                    v = spr[oy: oy + nuc.shape[0], ox: ox + nuc.shape[1]]
                    np.maximum(v, nuc, out=v)
            tumour.append(spr)
        banks = (*spindle, lympho, oval, tumour)
        margin = max(s_.shape[0] for bank in banks for s_ in bank) // 2 + 2

        # normal tissue: scattered nuclei
        st = _Stamper(ch_bg, chrom, margin)
        dens = _periodic_noise(rng, p, 20 * um)
        n = int(rng.poisson(2200 * area_mm2))
        ys, xs = rng.integers(0, p, n), rng.integers(0, p, n)
        keep = r_(n) < np.clip(0.55 + 0.3 * dens[ys, xs], 0.05, 1)
        del dens
        kind = r_(n)
        spr_sp = [_pick(rng, bank, n) for bank in spindle]
        spr_ly = _pick(rng, lympho, n)
        spr_ov = _pick(rng, oval, n)
        for k in np.flatnonzero(keep):
            y, x = int(ys[k]), int(xs[k])
            if kind[k] < 0.45:  # spindle, along the local fibres
                st.stamp(y, x, spr_sp[dom[y, x]][k])
            elif kind[k] < 0.70:
                st.stamp(y, x, spr_ly[k])
            else:
                st.stamp(y, x, spr_ov[k])
        ch_n = st.result()
        del st, dom, spr_sp, spr_ly, spr_ov

        # lesion: same stroma, purple cytoplasm, dense large dark pleomorphic nuclei
        ce_l = ce * 0.6 + 0.16
        ch_l = ch_bg * 2.5 + 0.04 * _periodic_noise(rng, p, 6 * um)
        np.clip(ch_l, 0.02, None, out=ch_l)
        sp = 10.5 * um
        gy, gx = np.meshgrid(np.arange(0, p, sp), np.arange(0, p, sp * 0.866), indexing="ij")
        gy = gy + (np.arange(gx.shape[1]) % 2)[None, :] * sp / 2
        pts = np.stack([gy.ravel(), gx.ravel()], 1)
        pts += rng.uniform(-0.38, 0.38, pts.shape) * sp
        pts = np.round(pts).astype(np.int64) % p
        pts = pts[r_(len(pts)) > 0.1]
        st = _Stamper(ch_l, chrom, margin)
        for (y, x), spr in zip(pts, _pick(rng, tumour, len(pts)), strict=True):
            st.stamp(int(y), int(x), spr)
        ch_l = st.result()
        del st, chrom, pts

        # small lumens in normal tissue only
        nl = int(rng.poisson(25 * area_mm2))
        lum = np.zeros((p, p), np.float32)
        for _ in range(nl):
            r = rng.uniform(6, 22) * um
            asp = rng.uniform(1.0, 1.7)
            spr = _sprite(r / math.sqrt(asp), r * math.sqrt(asp), rng.uniform(0, math.pi), 0.96,
                          edge=0.6 * um / r)
            rad = spr.shape[0] // 2
            cy, cx = int(rng.integers(p)), int(rng.integers(p))
            rows = (cy + np.arange(-rad, rad + 1)) % p
            cols = (cx + np.arange(-rad, rad + 1)) % p
            ix = np.ix_(rows, cols)
            lum[ix] = np.maximum(lum[ix], spr)
        lum *= -1
        lum += 1
        ch_n *= lum
        ce_n = ce
        ce_n *= lum
        del lum, ce

        self.normal = _od_to_rgb(ch_n, ce_n, t)
        self.lesion = _od_to_rgb(ch_l, ce_l, t)
        del ch_l, ce_l
        # fold: a second, shifted and flipped copy of the tissue on top (doubled section)
        sy, sx = int(rng.integers(p // 5, 4 * p // 5)), int(rng.integers(p // 5, 4 * p // 5))
        ch2 = np.roll(ch_n[::-1], (sy, sx), axis=(0, 1))
        ch2 += ch_n
        ch2 *= 1.3
        ce2 = np.roll(ce_n[::-1], (sy, sx), axis=(0, 1))
        ce2 += ce_n
        ce2 *= 1.5
        self.fold = _od_to_rgb(ch2, ce2, t)
        del ch2, ce2
        sig = 1.6 * um
        self.blur = _od_to_rgb(_fft_blur(ch_n, sig), _fft_blur(ce_n, sig), t)
        del ch_n, ce_n
        bg = _periodic_noise(rng, p, 12 * um)
        bg *= 1.0
        bg += _BG_LEVEL + 0.5
        out = np.empty((p + t, p + t, 3), np.uint8)
        for c in range(3):
            grain = rng.standard_normal((p, p), dtype=np.float32)
            grain *= 0.6
            grain += bg
            if c == 2:
                grain -= 0.5
            out[:p, :p, c] = grain
        del bg, grain
        out[p:, :p] = out[:t, :p]
        out[:, p:] = out[:, :t]
        self.background = out


# ------------------------------------------------------------------------------- scene


class _Scene:
    """Composes level-0 tiles ``(t, t, 3)`` uint8 from fields and canvases (thread-safe)."""

    def __init__(self, rng, width, height, mpp, tile, ds, lesion):
        t = tile
        self.t = t
        self.wp = -(-width // t) * t
        self.hp = -(-height // t) * t
        longest = max(self.wp, self.hp)
        p = 512
        while 2 * p < longest and p < 2048:  # P >= half the slide, at most 2048
            p *= 2
        p = max(p, t)
        self.p = p
        self.sblock = max(t, (min(2048, p // 2) // t) * t)
        self.ramp = float(min(32, t // 4))  # cross-fade half-width at seam crossings
        self.cut = min(48, t // 4)  # half-width of the strip where seams are cut
        self.fields = _Fields(rng, width, height, self.wp, self.hp, mpp, ds, lesion)
        canv = _Canvases(rng, p, mpp, t)
        # each canvas as stored and transposed (contiguous): with row flips that gives
        # 4 orientations per super-block at the cost of a plain (fast) slice copy.
        # Their 4x box reductions give level-1 pixels of pure tiles for free.
        self.canv, self.canv4 = {}, {}
        for k in ("normal", "lesion", "fold", "blur", "background"):
            c0 = getattr(canv, k)
            delattr(canv, k)
            c1 = np.ascontiguousarray(c0.transpose(1, 0, 2))
            self.canv[k] = (c0, c1)
            self.canv4[k] = (_reduce4(c0), _reduce4(c1))
        del canv
        nbx = self.wp // self.sblock + 2
        nby = self.hp // self.sblock + 2
        d = rng.integers(0, 4, (nby, nbx))
        # offsets are multiples of 4 (row-flipped: 3 mod 4) so that every tile's canvas
        # window is aligned with the 4x4 blocks of the reduced canvases
        ox = rng.integers(0, p // 4, (nby, nbx)) * 4
        oy = rng.integers(0, p // 4, (nby, nbx)) * 4 + np.where(d & 1, 3, 0)
        self.maps = np.stack([d, ox, oy], -1)
        i = np.arange(t, dtype=np.float32)
        self.wramp = np.clip((i - t / 2 + 0.5) / (2 * self.ramp) + 0.5, 0, 1).astype(np.float32)
        self._local = threading.local()
        # pure glass tiles come from a few fixed windows of the background canvas
        # (noise of +-2 grey levels: no visible repetition), encoded only once
        bgc = self.canv["background"][0]
        nwin = (p // t) ** 2
        pick = rng.permutation(nwin)[: min(32, nwin)]
        self.bg_tiles = [np.ascontiguousarray(bgc[(k // (p // t)) * t:(k // (p // t) + 1) * t,
                                                  (k % (p // t)) * t:(k % (p // t) + 1) * t])
                         for k in pick]
        self.bg_tiles4 = [np.asarray(Image.fromarray(b).reduce(4)) for b in self.bg_tiles]

    def _buf(self, name, shape):
        b = getattr(self._local, name, None)
        if b is None:
            b = np.empty(shape, np.float32)
            setattr(self._local, name, b)
        return b

    # -- per-pixel alphas
    def _alpha(self, field, w, x0, y0):
        """Alpha ``clip(S / w + 0.5, 0, 1)`` of a field over a tile: 0.0, 1.0 or (t, t)."""
        g, t = self.fields.g, self.t
        fx = x0 / g + _FIELD_PAD - 0.5  # field coordinate of the tile's left pixel edge
        fy = y0 / g + _FIELD_PAD - 0.5
        bx, by = int(math.floor(fx)), int(math.floor(fy))
        kx = int(math.floor(fx + t / g)) - bx + 2
        ky = int(math.floor(fy + t / g)) - by + 2
        patch = field[by: by + ky, bx: bx + kx]
        if patch.min() >= w / 2:
            return 1.0
        if patch.max() <= -w / 2:
            return 0.0
        # PIL's bilinear upsampling (support 1) with an exact source box = bilinear
        # interpolation of the field at every pixel centre, computed in C
        img = Image.fromarray(np.ascontiguousarray(patch, dtype=np.float32))
        box = (fx - bx + 0.5, fy - by + 0.5, fx - bx + 0.5 + t / g, fy - by + 0.5 + t / g)
        a = np.array(img.resize((t, t), Image.BILINEAR, box=box), dtype=np.float32)
        a *= 1.0 / w
        a += 0.5
        np.clip(a, 0.0, 1.0, out=a)
        return a

    # -- canvas crops
    def _blocks(self, x0, t, s):
        if x0 > 0 and x0 % s == 0:
            j = x0 // s
            return [(j - 1, 1.0 - self.wramp), (j, self.wramp)]
        j = max(0, (x0 - t // 2) // s)
        return [(j, None)]

    def _range(self, a0, sgn, o):
        p, t = self.p, self.t
        if sgn > 0:
            r0 = (a0 + o) % p
            return slice(r0, r0 + t)
        end = (o - a0) % p
        start = end - t + 1
        if start < 0:
            start += p
        return slice(start + t - 1, start - 1 if start > 0 else None, -1)

    def _crop_one(self, kind, m, x0, y0, reduced=False):
        d, ox, oy = (int(v) for v in m)
        if reduced:
            canvas = self.canv4[kind][1 if d & 2 else 0]
            ys = self._range(y0, -1 if d & 1 else 1, oy)
            xs = self._range(x0, 1, ox)
            t4 = self.t // 4
            if ys.step == -1:  # aligned: rows end+1-t .. end, reversed
                start = ys.stop + 1 if ys.stop is not None else 0
                ys4 = slice(start // 4 + t4 - 1, start // 4 - 1 if start else None, -1)
            else:
                ys4 = slice(ys.start // 4, ys.start // 4 + t4)
            return canvas[ys4, xs.start // 4: xs.start // 4 + t4]
        canvas = self.canv[kind][1 if d & 2 else 0]
        return canvas[self._range(y0, -1 if d & 1 else 1, oy), self._range(x0, 1, ox)]

    def _seams(self, x0, y0):
        t, s = self.t, self.sblock
        return self._blocks(x0, t, s), self._blocks(y0, t, s)

    def _crop(self, kind, x0, y0, out=None):
        """Canvas ``kind`` over the tile: a uint8 view/array, or float32 into ``out``.

        Across a super-block seam (it runs through the middle of a tile) the two
        mappings are joined along a minimum-error cut (:meth:`_quilt`); where two
        seams cross they are cross-faded over ``2 * ramp`` px. The glass background
        is not joined (its noise shows no seam).
        """
        t = self.t
        bxs, bys = self._seams(x0, y0)
        if kind == "background":
            bxs, bys = bxs[-1:], bys[-1:]
        if len(bxs) == 1 and len(bys) == 1:
            v = self._crop_one(kind, self.maps[bys[0][0], bxs[0][0]], x0, y0)
            if out is None:
                return v
            np.copyto(out, v, casting="unsafe")
            return out
        if len(bxs) == 1 or len(bys) == 1:
            # one seam: cut along the path where the two textures agree best
            if len(bys) == 1:
                (jy, _), (ja, _), (jb, _) = bys[0], bxs[0], bxs[1]
                res = self._quilt(self._crop_one(kind, self.maps[jy, ja], x0, y0),
                                  self._crop_one(kind, self.maps[jy, jb], x0, y0))
            else:
                (jx, _), (ja, _), (jb, _) = bxs[0], bys[0], bys[1]
                res = self._quilt(
                    self._crop_one(kind, self.maps[ja, jx], x0, y0).transpose(1, 0, 2),
                    self._crop_one(kind, self.maps[jb, jx], x0, y0).transpose(1, 0, 2),
                ).transpose(1, 0, 2)
            if out is None:
                return np.ascontiguousarray(res)
            np.copyto(out, res, casting="unsafe")
            return out
        res = np.zeros((t, t, 3), np.float32) if out is None else out
        if out is not None:
            res[...] = 0
        tmp = self._buf("seam", (t, t, 3))
        for jy, wy in bys:
            for jx, wx in bxs:
                np.copyto(tmp, self._crop_one(kind, self.maps[jy, jx], x0, y0), casting="unsafe")
                if wy is None:
                    tmp *= wx[None, :, None]
                elif wx is None:
                    tmp *= wy[:, None, None]
                else:
                    tmp *= (wy[:, None] * wx[None, :])[:, :, None]
                res += tmp
        if out is None:
            res += 0.5
            return res.astype(np.uint8)
        return res

    def _quilt(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Join texture ``a`` (left) and ``b`` (right), both ``(t, t, 3)`` uint8.

        Image quilting (Efros & Freeman 2001): within a strip of ``2 * cut`` px around
        the tile's middle column the boundary follows the minimum-error path between
        the two textures (dynamic programming on 4x4-px cells), so it runs through
        stroma where both look alike and around nuclei. The path starts and ends at
        the middle column, so tiles above and below along the same seam connect. The
        boundary is feathered over a few pixels. Returns ``(t, t, 3)`` uint8.
        """
        t, r, q = self.t, self.cut, 4
        h = t // 2
        sa = a[:, h - r: h + r].astype(np.float32)
        sb = b[:, h - r: h + r].astype(np.float32)
        d = sa - sb
        err = np.einsum("ijc,ijc->ij", d, d)
        n, m = t // q, 2 * r // q
        e = err.reshape(n, q, m, q).mean(axis=(1, 3))
        c0 = m // 2
        cost = np.empty_like(e)
        big = np.float32(1e30)
        prev = np.full(m + 2, big, np.float32)
        prev[1 + c0] = e[0, c0]
        cost[0] = prev[1:-1]
        for i in range(1, n):
            best = np.minimum(np.minimum(prev[:-2], prev[1:-1]), prev[2:])
            prev[1:-1] = best + e[i]
            cost[i] = prev[1:-1]
        path = np.empty(n, np.float32)
        j = c0
        for i in range(n - 1, -1, -1):
            path[i] = j
            if i:
                row = cost[i - 1]
                lo, hi = max(j - 1, 0), min(j + 2, m)
                j = lo + int(np.argmin(row[lo:hi]))
        centres = np.arange(n, dtype=np.float32) * q + (q - 1) / 2
        xb = np.interp(np.arange(t, dtype=np.float32), centres, path * q)  # strip coords
        xs = np.arange(2 * r, dtype=np.float32) + 0.5
        w = np.clip((xs[None, :] - xb[:, None]) / 4.0 + 0.5, 0.0, 1.0)[:, :, None]
        res = np.empty((t, t, 3), np.uint8)
        res[:, : h - r] = a[:, : h - r]
        res[:, h + r:] = b[:, h + r:]
        sb -= sa
        sb *= w
        sa += sb
        sa += 0.5
        res[:, h - r: h + r] = sa
        return res

    def _reduced(self, kind, x0, y0):
        """Level-1 pixels ``(t/4, t/4, 3)`` of a pure, seam-free tile of ``kind``, or None."""
        bxs, bys = self._seams(x0, y0)
        if kind == "background":
            bxs, bys = bxs[-1:], bys[-1:]
        elif len(bxs) > 1 or len(bys) > 1:
            return None
        return self._crop_one(kind, self.maps[bys[0][0], bxs[0][0]], x0, y0, reduced=True)

    def tile(self, x0: int, y0: int):
        """Level-0 tile with top-left ``(x0, y0)`` and, when free, its 4x reduction.

        Returns
        -------
        px : ndarray
            ``(t, t, 3)`` uint8, C-contiguous.
        px4 : ndarray or None
            ``(t/4, t/4, 3)`` uint8 box reduction of ``px`` (exactly what
            ``PIL.Image.reduce(4)`` gives), or None when it must be computed.
        bg : int or None
            Index into ``bg_tiles`` when the tile is pure glass (``px`` is that tile).
        """
        f, t = self.fields, self.t
        a_tis = self._alpha(f.tissue, _W_TISSUE, x0, y0)
        if not _is_const(a_tis, 0.0):
            a_h = self._alpha(f.hole, _W_HOLE, x0, y0)
            if _is_const(a_h, 1.0):
                a_tis = 0.0
            elif not _is_const(a_h, 0.0):
                a_tis = a_tis * (1.0 - a_h)
        if _is_const(a_tis, 0.0):
            k = ((x0 // t) * 73856093 ^ (y0 // t) * 19349663) % len(self.bg_tiles)
            return self.bg_tiles[k], self.bg_tiles4[k], k
        base = "normal"
        layers = []
        for kind, field, w in (("blur", f.blur, _W_BLUR), ("fold", f.fold, _W_FOLD),
                               ("lesion", f.lesion, _W_LESION)):
            a = self._alpha(field, w, x0, y0)
            if _is_const(a, 1.0):
                base, layers = kind, []
            elif not _is_const(a, 0.0):
                layers.append((kind, a))
        if _is_const(a_tis, 1.0) and not layers:
            return (np.ascontiguousarray(self._crop(base, x0, y0)), self._reduced(base, x0, y0),
                    None)
        tex = self._crop(base, x0, y0, self._buf("tex", (t, t, 3)))
        other = self._buf("other", (t, t, 3))
        for kind, a in layers:
            self._crop(kind, x0, y0, other)
            other -= tex
            other *= a[:, :, None]
            tex += other
        if not _is_const(a_tis, 1.0):
            bg = self._crop("background", x0, y0, other)
            tex -= bg
            tex *= a_tis[:, :, None]
            tex += bg
        tex += 0.5
        np.clip(tex, 0, 255, out=tex)
        return tex.astype(np.uint8), None, None

    def lesion_mask(self, width, height, ds):
        """Lesion truth at block centres: bool ``(ceil(H/ds), ceil(W/ds))``."""
        py = np.arange(-(-height // ds)) * ds + (ds - 1) / 2.0
        px = np.arange(-(-width // ds)) * ds + (ds - 1) / 2.0
        return self.fields.sample("lesion", py, px) > 0

    def tissue_mask(self, width, height, ds):
        """Tissue (not background, not lumen) at block centres: bool like lesion_mask."""
        py = np.arange(-(-height // ds)) * ds + (ds - 1) / 2.0
        px = np.arange(-(-width // ds)) * ds + (ds - 1) / 2.0
        return (self.fields.sample("tissue", py, px) > 0) & (self.fields.sample("hole", py, px) < 0)


# ------------------------------------------------------------------------------ writing


def _encode(tile: np.ndarray, quality: int) -> bytes:
    return imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="RGB")


def _ordered(executor, jobs, depth):
    """Submit ``jobs`` (callables) keeping ``depth`` in flight; yield results in order."""
    pending = deque()
    for job in jobs:
        pending.append(executor.submit(job))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _reduce4(img: np.ndarray) -> np.ndarray:
    """Box-filter downsample by 4: ``(h, w, 3)`` -> ``(ceil(h/4), ceil(w/4), 3)`` uint8."""
    out = []
    step = 2048
    for y in range(0, img.shape[0], step):
        out.append(np.asarray(Image.fromarray(np.ascontiguousarray(img[y: y + step])).reduce(4)))
    return np.concatenate(out, 0)


def _label_image(name: str, seed: int, rng: np.random.Generator) -> np.ndarray:
    img = Image.new("RGB", (400, 400), (250, 250, 248))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((20, 20), "napari-milview", fill=(0, 0, 0), font=font)
    d.text((20, 45), "SYNTHETIC H&E", fill=(0, 0, 0), font=font)
    d.text((20, 70), f"{name[:28]}", fill=(0, 0, 0), font=font)
    d.text((20, 95), f"seed {seed}", fill=(0, 0, 0), font=font)
    code = rng.random((16, 16)) < 0.5
    code[0, :] = code[:, 0] = True
    for i, j in zip(*np.nonzero(code), strict=True):
        d.rectangle([140 + 12 * j, 160 + 12 * i, 151 + 12 * j, 171 + 12 * i], fill=(0, 0, 0))
    return np.asarray(img)


def _macro_image(thumb: np.ndarray, label: np.ndarray) -> np.ndarray:
    mh, mw = 431, 1280
    img = Image.new("RGB", (mw, mh), (228, 230, 226))
    lab = Image.fromarray(label).resize((mh - 40, mh - 40), Image.BILINEAR)
    img.paste(lab, (20, 20))
    th = Image.fromarray(thumb)
    box_w, box_h = mw - mh - 40, mh - 40
    f = min(box_w / th.width, box_h / th.height)
    th = th.resize((max(1, int(th.width * f)), max(1, int(th.height * f))), Image.BILINEAR)
    img.paste(th, (mh + 20 + (box_w - th.width) // 2, 20 + (box_h - th.height) // 2))
    return np.asarray(img)


def _fmt(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def write_synthetic_slide(
    out: str | os.PathLike,
    *,
    width: int = 20_000,
    height: int = 15_000,
    mpp: float = 0.25,
    tile: int = 256,
    levels: int = 4,
    seed: int = 0,
    lesion: bool = True,
    quality: int = 85,
    ome_zarr: bool = False,
    objective_power: float | None = None,
    workers: int | None = None,
) -> SyntheticSlide:
    """Write a synthetic H&E slide as an Aperio-style pyramidal SVS plus sidecars.

    Long on purpose: validation, rendering, the TIFF pages (levels, label, macro, thumbnail),
    the optional OME-Zarr and the sidecars are one sequence that shares the tile pool and
    the sizes; the pieces that stand alone (fields, canvases, tiles) are classes of their own.

    Parameters
    ----------
    out : str or PathLike
        Slide path (``.svs`` or ``.tif``); parent folders are created, files replaced.
        Sidecars strip the last suffix: ``OUT.lesion.png``, ``OUT.json``,
        ``OUT.ome.zarr``.
    width, height : int
        Level-0 size in pixels, each >= ``tile``.
    mpp : float
        Microns per level-0 pixel (> 0). Nuclei and lumens have physical sizes.
    tile : int
        JPEG tile edge (multiple of 16) of every pyramid level.
    levels : int
        Requested pyramid levels (1..10), downsample ``4**k``; fewer are written when a
        level would fit inside one tile (``max(w_k, h_k) < tile``), e.g. 2000 x 1500 with
        tile 256 gets 2 levels. The JSON ``levels`` holds the count written.
    seed : int
        Seed of ``numpy.random.default_rng``; equal arguments give identical files.
    lesion : bool
        Plant 1-3 lesion regions (10-22 % of the tissue, at least ~8 %) with dense,
        large, dark, pleomorphic nuclei. When False the mask is all zero.
    quality : int
        JPEG quality (1..100) of the level tiles.
    ome_zarr : bool
        Also write ``OUT.ome.zarr``: OME-NGFF 0.4 multiscales, written as zarr format 2
        (``.zgroup``/``.zattrs``/``.zarray``, ``/`` chunk keys, Blosc-LZ4) with the
        installed zarr 3 package, so NGFF 0.4 readers work. Datasets ``"0"``,
        ``"1"``, ... have shape ``(3, h_k, w_k)`` uint8, chunks ``(3, tile, tile)``,
        axes ``c`` (channel), ``y``, ``x`` (micrometer) and scale
        ``[1, mpp * 4**k, mpp * 4**k]``; ``omero`` holds RGB rendering hints. The
        arrays hold the exact pre-JPEG pixels, so they equal the SVS levels up to JPEG
        noise only (mean absolute difference ~1 grey level at quality 85).
    objective_power : float, optional
        ``AppMag``; default 40 if mpp <= 0.3, 20 if mpp <= 0.6, else 10.
    workers : int, optional
        Threads that render and JPEG-encode tiles (default ``os.cpu_count()``).
        The output does not depend on it.

    Returns
    -------
    SyntheticSlide
        Paths and geometry; ``mask_downsample`` from :func:`mask_downsample_for`.

    Notes
    -----
    File layout (what OpenSlide's Aperio driver expects): page 0 level 0 (tiled,
    JPEG, photometric RGB, Aperio description with ``AppMag`` and ``MPP``); page 1
    stripped JPEG thumbnail; the remaining levels tiled; a stripped LZW ``label``
    page (NewSubfileType 1) and a stripped JPEG ``macro`` page (NewSubfileType 9).
    Written with ``metadata=None``; BigTIFF when the raw level 0 exceeds 2 GiB.
    The lesion mask pixel ``(r, c)`` covers level-0 rows ``r*ds .. (r+1)*ds - 1``
    and columns likewise, and is 255 when the rendered lesion weight at the centre
    of that block is above 0.5; lesion pixels lie at least ``2 * max(ds, 16) + 8``
    level-0 pixels inside the tissue.
    """
    _validate(width, height, mpp, tile, levels, quality, workers, objective_power)
    width, height, tile, levels, quality = (int(v) for v in (width, height, tile, levels, quality))
    mpp = float(mpp)
    seed = int(seed)
    power = default_objective_power(mpp) if objective_power is None else objective_power
    workers = int(workers) if workers is not None else (os.cpu_count() or 1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mask_path, json_path, zarr_path = sidecar_paths(out)
    ds = mask_downsample_for(width, height)
    sizes = _level_sizes(width, height, tile, levels)
    t = tile

    rng = np.random.default_rng(seed)
    scene = _Scene(rng, width, height, mpp, tile, ds, lesion)
    label_rng = np.random.default_rng([seed, 1])
    wp, hp = scene.wp, scene.hp
    ntx, nty = wp // t, hp // t
    t4 = t // 4
    level1 = np.empty((hp // 4, wp // 4, 3), np.uint8)

    zgroup = None
    zarrays = []
    if ome_zarr:
        import shutil

        import zarr

        if zarr_path.exists():
            shutil.rmtree(zarr_path)
        zgroup = zarr.open_group(str(zarr_path), mode="w", zarr_format=2)
        for k, (w, h) in enumerate(sizes):
            zarrays.append(zgroup.create_array(
                str(k), shape=(3, h, w), chunks=(3, t, t), dtype="uint8",
                chunk_key_encoding={"name": "v2", "separator": "/"}))
    bands: dict[int, np.ndarray] = {}
    bg_jpeg = [_encode(b, quality) for b in scene.bg_tiles]

    def level0_job(tx, ty):
        def job():
            x0, y0 = tx * t, ty * t
            px, px4, bg = scene.tile(x0, y0)
            if px4 is None:
                px4 = np.asarray(Image.fromarray(px).reduce(4))
            level1[ty * t4:(ty + 1) * t4, tx * t4:(tx + 1) * t4] = px4
            if zgroup is not None:
                bands[ty][:, :, x0:x0 + t] = px.transpose(2, 0, 1)
            return bg_jpeg[bg] if bg is not None else _encode(px, quality)
        return job

    def level0_jobs():
        for ty in range(nty):
            if zgroup is not None:
                bands[ty] = np.empty((3, t, wp), np.uint8)
            for tx in range(ntx):
                yield level0_job(tx, ty)

    def level0_bytes(executor):
        for n, b in enumerate(_ordered(executor, level0_jobs(), 4 * workers + 4), start=1):
            if n % ntx == 0 and zgroup is not None:  # row complete: store it before the
                ty = n // ntx - 1                      # last yield (tifffile stops pulling)
                y0 = ty * t
                y1 = min(y0 + t, height)
                zarrays[0][:, y0:y1, :] = bands.pop(ty)[:, : y1 - y0, :width]
            yield b

    def level_bytes(executor, arr, w, h):
        def job(x0, y0):
            def run():
                px = arr[y0:y0 + t, x0:x0 + t]
                if px.shape[:2] != (t, t):
                    px = np.pad(px, ((0, t - px.shape[0]), (0, t - px.shape[1]), (0, 0)), "edge")
                return _encode(np.ascontiguousarray(px), quality)
            return run
        jobs = (job(x0, y0) for y0 in range(0, h, t) for x0 in range(0, w, t))
        yield from _ordered(executor, jobs, 4 * workers + 4)

    stem = out.stem
    head = f"{_APERIO} \r\n{width}x{height} [0,0 {width}x{height}] ({t}x{t})"
    tail = (f"|AppMag = {_fmt(power)}|StripeWidth = 2032|ScanScope ID = SYNTH"
            f"|Filename = {stem}|Title = napari-milview synthetic seed {seed}"
            f"|Date = 01/01/26|Time = 00:00:00|MPP = {_fmt(mpp)}"
            f"|OriginalWidth = {width}|OriginalHeight = {height}")
    raw_bytes = width * height * 3
    common = {"photometric": "rgb", "metadata": None, "resolutionunit": "CENTIMETER"}
    tiled = {"tile": (t, t), "compression": "jpeg", "subsampling": (1, 1),
             "compressionargs": {"level": quality, "outcolorspace": "RGB"}, "dtype": np.uint8}

    with ThreadPoolExecutor(max_workers=workers) as ex, \
            tifffile.TiffWriter(out, bigtiff=raw_bytes > 2**31) as tw:
        tw.write(data=level0_bytes(ex), shape=(height, width, 3),
                 description=f"{head} JPEG/RGB Q={quality}{tail}",
                 resolution=(1e4 / mpp, 1e4 / mpp), **tiled, **common)
        arrays = [None, level1[: height // 4, : width // 4]]
        # thumbnail (stripped JPEG), from level 1
        thumb = arrays[1]
        while max(thumb.shape[:2]) > 4096:
            thumb = _reduce4(thumb)
        ti = Image.fromarray(np.ascontiguousarray(thumb))
        f = min(1.0, 1024 / max(ti.size))
        ti = ti.resize((max(1, round(ti.width * f)), max(1, round(ti.height * f))), Image.BOX)
        thumb = np.asarray(ti)
        tw.write(thumb, compression="jpeg", compressionargs={"level": 90, "outcolorspace": "RGB"},
                 subsampling=(1, 1), rowsperstrip=16,
                 description=(f"{_APERIO} \r\n{width}x{height} -> "
                              f"{thumb.shape[1]}x{thumb.shape[0]} - {tail}"),
                 **common)
        for k in range(1, len(sizes)):
            if k >= len(arrays):
                arrays.append(_reduce4(arrays[k - 1])[: sizes[k][1], : sizes[k][0]])
            w, h = sizes[k]
            arr = arrays[k][:h, :w]
            dsk = 4**k
            tw.write(data=level_bytes(ex, arr, w, h), shape=(h, w, 3),
                     description=f"{head} -> {w}x{h} JPEG/RGB Q={quality}{tail}",
                     resolution=(1e4 / (mpp * dsk), 1e4 / (mpp * dsk)), **tiled, **common)
            if zarrays:
                zarrays[k][:] = np.ascontiguousarray(arr.transpose(2, 0, 1))
        label = _label_image(stem, seed, label_rng)
        tw.write(label, compression="lzw", subfiletype=1, rowsperstrip=64,
                 description=f"{_APERIO}\nlabel {label.shape[1]}x{label.shape[0]}", **common)
        macro = _macro_image(thumb, label)
        tw.write(macro, compression="jpeg", compressionargs={"level": 90, "outcolorspace": "RGB"},
                 subsampling=(1, 1), subfiletype=9, rowsperstrip=16,
                 description=f"{_APERIO}\nmacro {macro.shape[1]}x{macro.shape[0]}", **common)
    arrays = level1 = None  # level 1 (W * H * 3 / 16 bytes) is written: free it

    # --- lesion mask, statistics, sidecars
    lesion_mask = scene.lesion_mask(width, height, ds) if lesion else np.zeros(
        (-(-height // ds), -(-width // ds)), bool)
    tissue_mask = scene.tissue_mask(width, height, ds)
    Image.fromarray(np.where(lesion_mask, 255, 0).astype(np.uint8)).save(mask_path)
    n_tissue = int(tissue_mask.sum())
    lab, n_regions = ndimage.label(lesion_mask)
    bboxes = []
    for sl in ndimage.find_objects(lab):
        y0, y1 = sl[0].start * ds, min(sl[0].stop * ds, height)
        x0, x1 = sl[1].start * ds, min(sl[1].stop * ds, width)
        bboxes.append([int(x0), int(y0), int(x1 - x0), int(y1 - y0)])

    if zgroup is not None:
        datasets = [{"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, mpp * 4**k, mpp * 4**k]}]} for k in range(len(sizes))]
        zgroup.attrs.update({
            "multiscales": [{
                "version": "0.4", "name": stem, "type": "box",
                "axes": [{"name": "c", "type": "channel"},
                         {"name": "y", "type": "space", "unit": "micrometer"},
                         {"name": "x", "type": "space", "unit": "micrometer"}],
                "datasets": datasets,
                "metadata": {"method": "box filter (mean of 4x4 blocks per level)"},
            }],
            "omero": {
                "version": "0.4", "name": stem, "rdefs": {"model": "color"},
                "channels": [{"label": lab_, "color": col, "active": True, "coefficient": 1.0,
                              "family": "linear", "inverted": False,
                              "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                             for lab_, col in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))],
            },
        })

    meta = {
        "generator": "napari_milview.synthetic",
        "format": "aperio-svs",
        "file": out.name,
        "width": width, "height": height, "mpp": mpp, "seed": seed,
        "tile": t, "levels": len(sizes), "levels_requested": levels,
        "level_dimensions": [list(s) for s in sizes],
        "level_downsamples": [4**k for k in range(len(sizes))],
        "objective_power": power, "quality": quality,
        "lesion": bool(lesion),
        "lesion_mask": mask_path.name,
        "mask_downsample": ds,
        "mask_shape": list(lesion_mask.shape),
        "lesion_fraction_of_tissue": float(lesion_mask.sum() / max(n_tissue, 1)),
        "tissue_fraction": float(n_tissue / lesion_mask.size),
        "lesion_regions_planted": int(scene.fields.n_lesions),
        "lesion_regions": int(n_regions),
        "lesion_bboxes_xywh": bboxes,
        "ome_zarr": zarr_path.name if ome_zarr else None,
    }
    json_path.write_text(json.dumps(meta, indent=2))
    return SyntheticSlide(
        path=out, mask_path=mask_path, json_path=json_path,
        zarr_path=zarr_path if ome_zarr else None, width=width, height=height, mpp=mpp,
        seed=seed, mask_downsample=ds)


# --------------------------------------------------------------------------------------------
# the bundled sample slide (napari's sample data, ``milview demo``, the responsiveness bench)
# --------------------------------------------------------------------------------------------
#: The bundled default slide: 20x-like, small enough to write in a few seconds.
SAMPLE = {"width": 20_000, "height": 15_000, "mpp": 0.5, "tile": 256, "levels": 3, "seed": 7}


def sample_dir() -> Path:
    """Where generated samples live: ``$MILVIEW_CACHE_DIR/samples``, else ``samples`` in the
    platform's user cache folder (platformdirs: ``$XDG_CACHE_HOME/napari-milview`` or
    ``~/.cache/napari-milview`` on Linux, ``~/Library/Caches/napari-milview`` on macOS,
    ``%LOCALAPPDATA%\\napari-milview\\Cache`` on Windows)."""
    env = os.environ.get("MILVIEW_CACHE_DIR")
    if env:
        return Path(env) / "samples"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-milview", appauthor=False)) / "samples"


def sample_slide_path(lesion: bool = True) -> Path:
    """Path of the sample slide, writing it first if needed (content depends only on SAMPLE)."""
    import tempfile

    tag = "lesion" if lesion else "normal"
    size = f"{SAMPLE['width']}x{SAMPLE['height']}"
    out = sample_dir() / f"synthetic-{tag}-s{SAMPLE['seed']}-{size}.svs"
    if not (out.exists() and out.with_suffix(".json").exists()):
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            res = write_synthetic_slide(Path(tmp) / out.name, lesion=lesion, **SAMPLE)
            # sidecars first, the slide last: a crash never leaves a slide without its truth
            for src in (res.mask_path, res.json_path, res.path):
                os.replace(src, out.parent / src.name)
    return out
