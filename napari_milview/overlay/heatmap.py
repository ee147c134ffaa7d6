"""Attention heatmaps as small grid images placed on the slide's world coordinates.

A heatmap is never a full-resolution canvas: one grid cell per patch step (finer when patches
overlap: cell = gcd of step, patch size and the patch offsets), placed with napari's
``scale`` and ``translate`` on the same world coordinates as the slide layer.

Geometry (one rule, DESIGN.md section 2): the slide layer has scale ``mpp`` and no translate,
so napari puts the *centre* of level-0 pixel (x, y) at world (row, col) = (y, x) * mpp and the
pixel spans [x - 1/2, x + 1/2) * mpp. A patch with top-left ``(x, y)`` and side ``ps``
covers level-0 pixels [x, x + ps), i.e. world [(x - 1/2) mpp, (x + ps - 1/2) mpp). A grid
cell (row i, col j) covers level-0 pixels [x0 + j c, x0 + (j + 1) c), so the heatmap layer
gets ``scale = c mpp`` and ``translate = (x0 + c/2 - 1/2) mpp`` (per axis). Without an mpp
everything is in level-0 pixels (mpp = 1), as the slide layer is.

That is the slide layer as opened. When the user moves it (translate, rotate, shear, affine),
the docks give each overlay the slide's placement as its ``affine``
(``_qt._common.slide_frame``): the ``scale`` and ``translate`` made here stay as they are.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from .normalise import contrast_limits, method_name, normalise

if TYPE_CHECKING:
    from ..result import Result

__all__ = ["PENDING", "heatmap_grid", "heatmap_layer", "level0_to_world", "value_at",
           "world_to_level0"]

#: ``metadata["milview"]`` of a heatmap layer made for a run that has no result yet (the
#: dock makes it at Run); a finished heatmap has ``"heatmap"``.
PENDING = "heatmap (pending)"

#: Largest grid (cells) drawn exactly; a grid that would be larger is coarsened (with a warning).
MAX_CELLS = 2**22


def world_to_level0(world_yx, mpp: float | None) -> tuple[float, float]:
    """A world (row, col) point -> continuous level-0 (x, y), pixel (x, y) spanning [x, x+1).

    ``mpp`` None means the layers are in level-0 pixels.
    """
    m = 1.0 if mpp is None else float(mpp)
    return (float(world_yx[-1]) / m + 0.5, float(world_yx[-2]) / m + 0.5)


def level0_to_world(level0_xy, mpp: float | None) -> tuple[float, float]:
    """Continuous level-0 (x, y) (pixel x spans [x, x+1)) -> world (row, col)."""
    m = 1.0 if mpp is None else float(mpp)
    return ((float(level0_xy[1]) - 0.5) * m, (float(level0_xy[0]) - 0.5) * m)


def _check_coords(coords: Any, patch_size_level0: Any) -> tuple[np.ndarray, int]:
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 2 or c.shape[0] == 0:
        raise ValueError(f"coords must be [N, 2] level-0 (x, y) with N > 0, got shape "
                         f"{list(c.shape)}")
    ps = int(patch_size_level0)
    if ps <= 0 or ps != patch_size_level0:
        raise ValueError(f"patch_size_level0 must be a positive whole number, got "
                         f"{patch_size_level0!r}")
    return c.astype(np.int64, copy=False), ps


def heatmap_grid(coords: np.ndarray, patch_size_level0: int, step_level0: int | None = None,
                 values: np.ndarray | None = None, *, origin_level0: tuple[int, int] | None = None,
                 max_cells: int = MAX_CELLS) -> tuple[np.ndarray, tuple[int, int], int]:
    """Paint per-patch values onto a grid with one cell per patch step.

    Parameters
    ----------
    coords : np.ndarray
        [N, 2] int level-0 (x, y) of each patch's top-left corner.
    patch_size_level0 : int
        Patch side in level-0 pixels.
    step_level0 : int, optional
        Patch step (stride) in level-0 pixels; inferred from the coords when None.
    values : np.ndarray, optional
        [N] values (NaN = no value); None paints 1 (a coverage map).
    origin_level0 : (int, int), optional
        Level-0 (x0, y0) of cell (0, 0), at or above-left of every patch (default: the
        top-left-most patch corner). ``(0, 0)`` makes the grid start at the slide's origin.
    max_cells : int
        A grid that would have more cells is coarsened: the patches are snapped to the
        coarser cells (a warning says by how much).

    Returns
    -------
    grid : np.ndarray
        [H, W] float32: the mean value of the patches covering each cell, NaN where none.
    origin_level0 : tuple[int, int]
        Level-0 (x0, y0) of the top-left corner of cell (0, 0).
    cell_level0 : int
        Cell side in level-0 pixels. Cell (i, j) covers level-0 pixels
        x in [x0 + j cell, x0 + (j + 1) cell), y in [y0 + i cell, y0 + (i + 1) cell).
    """
    c, ps = _check_coords(coords, patch_size_level0)
    n = c.shape[0]
    v = np.ones(n) if values is None else np.asarray(values, dtype=np.float64).reshape(-1)
    if v.shape[0] != n:
        raise ValueError(f"{v.shape[0]} values for {n} patches")
    x0, y0 = (int(a) for a in c.min(axis=0))
    if origin_level0 is not None:
        if int(origin_level0[0]) > x0 or int(origin_level0[1]) > y0:
            raise ValueError(f"heatmap origin {tuple(origin_level0)} is right of or below the "
                             f"first patch ({x0}, {y0})")
        x0, y0 = int(origin_level0[0]), int(origin_level0[1])
    off = c - np.array([x0, y0], dtype=np.int64)
    cell = math.gcd(int(np.gcd.reduce(off.ravel())), ps, int(step_level0 or 0))
    ext_x, ext_y = int(off[:, 0].max()) + ps, int(off[:, 1].max()) + ps
    if -(-ext_x // cell) * -(-ext_y // cell) > max_cells:
        exact = cell
        cell = max(exact, math.ceil(math.sqrt(ext_x * ext_y / max_cells)))
        while -(-ext_x // cell) * -(-ext_y // cell) > max_cells:
            cell += 1
        err = max(int(np.abs(off - np.rint(off / cell) * cell).max()),
                  abs(ps - max(1, round(ps / cell)) * cell))
        warnings.warn(f"heatmap: patch positions share only a {exact}-pixel lattice; drawn on "
                      f"{cell}-pixel cells instead (edges up to {err} level-0 pixels off)",
                      stacklevel=2)
    cx = np.rint(off[:, 0] / cell).astype(np.int64)
    cy = np.rint(off[:, 1] / cell).astype(np.int64)
    k = max(1, round(ps / cell))
    w = int(cx.max()) + k
    h = int(cy.max()) + k
    ok = np.isfinite(v)
    # 2-D difference arrays: +v at each patch's top-left, -v past its right and bottom edges,
    # +v past its bottom-right; two cumulative sums give every cell the sum over its patches
    shape = (h + 1, w + 1)
    acc = np.zeros(shape)
    cnt = np.zeros(shape, dtype=np.int64)
    vv, xx, yy = v[ok], cx[ok], cy[ok]
    for dy, dx, sign in ((0, 0, 1), (0, k, -1), (k, 0, -1), (k, k, 1)):
        flat = (yy + dy) * (w + 1) + (xx + dx)
        acc += sign * np.bincount(flat, weights=vv, minlength=acc.size).reshape(shape)
        cnt += sign * np.bincount(flat, minlength=cnt.size).reshape(shape)
    acc = acc.cumsum(0).cumsum(1)[:h, :w]
    cnt = cnt.cumsum(0).cumsum(1)[:h, :w]
    grid = np.full((h, w), np.nan, dtype=np.float32)
    has = cnt > 0
    grid[has] = acc[has] / cnt[has]
    return grid, (x0, y0), int(cell)


def heatmap_layer(result: Result, source: str | None = None, method: str = "raw", *,
                  mpp: float | None = None, colormap: str = "inferno", opacity: float = 0.5,
                  interpolation: str = "nearest", vmin: float | None = None,
                  vmax: float | None = None, zoom: float = 1.0,
                  step_level0: int | None = None, name: str | None = None
                  ) -> tuple[np.ndarray, dict, str]:
    """The heatmap of one attention source as napari layer data ``(grid, kwargs, "image")``.

    Parameters
    ----------
    result : Result
        Its ``coords`` [N, 2], ``patch_size_level0`` and ``sources``.
    source : str, optional
        Attention source (default: ``result.default_source``).
    method : str
        Normalisation (:data:`~napari_milview.overlay.normalise.METHODS`); ``vmin``/``vmax``
        for ``"fixed"``, ``zoom`` for ``"attention_x_n"``.
    mpp : float, optional
        Microns per level-0 pixel of the slide layer (default ``result.mpp``); when both are
        None the layer is placed in level-0 pixels, as the slide layer then is.
    colormap, opacity : napari Image settings (``"inferno"``, ``"turbo"``, ...).
    interpolation : str
        ``"nearest"`` (blocky) or ``"linear"`` (smooth).

    Returns
    -------
    tuple
        ``grid`` [H, W] float32 (NaN = no patch, drawn transparent), the Image kwargs
        (``scale``/``translate`` in world units, fixed ``contrast_limits`` per method,
        ``metadata`` with the raw-score grid ``raw_grid`` [H, W], the geometry and the
        ``result`` itself) and
        ``"image"``.
    """
    src = result.default_source if source is None else source
    m = method_name(method)
    raw = result.attention(src)
    shown = normalise(raw, m, vmin=vmin, vmax=vmax, zoom=zoom)
    grid, (x0, y0), cell = heatmap_grid(result.coords, result.patch_size_level0,
                                        step_level0, shown)
    raw_grid = grid if m == "raw" else heatmap_grid(result.coords, result.patch_size_level0,
                                                    step_level0, raw)[0]
    um = result.mpp if mpp is None else float(mpp)
    f = 1.0 if um is None else um
    kwargs: dict[str, Any] = {
        "name": name or f"attention {src} ({m})",
        "scale": (cell * f, cell * f),
        "translate": ((y0 + cell / 2 - 0.5) * f, (x0 + cell / 2 - 0.5) * f),
        "colormap": colormap,
        "opacity": float(opacity),
        "contrast_limits": contrast_limits(m, shown, vmin=vmin, vmax=vmax),
        "interpolation2d": interpolation,
        "blending": "translucent",
        "metadata": {
            "milview": "heatmap", "source": src, "method": m, "zoom": float(zoom), "mpp": um,
            "origin_level0": (x0, y0), "cell_level0": cell,
            "patch_size_level0": result.patch_size_level0, "raw_grid": raw_grid,
            "slide_path": result.slide, "slide_id": result.slide_id,
            "result": result,  # the whole Result: what the npe2 writers export
        },
    }
    if um is not None:
        kwargs["units"] = ("um", "um")
    return grid, kwargs, "image"


def value_at(result: Result, source: str | None, level0_xy) -> float | None:
    """The raw score under a level-0 point: the mean over the patches containing it.

    Parameters
    ----------
    level0_xy : (float, float)
        Level-0 (x, y), pixel x spanning [x, x + 1) (see :func:`world_to_level0`).

    Returns
    -------
    float or None
        None where no patch (with a finite score) covers the point.
    """
    x, y = float(level0_xy[0]), float(level0_xy[1])
    c = result.coords
    ps = result.patch_size_level0
    inside = (c[:, 0] <= x) & (x < c[:, 0] + ps) & (c[:, 1] <= y) & (y < c[:, 1] + ps)
    s = result.attention(source)[inside]
    s = s[np.isfinite(s)]
    return float(s.mean()) if s.size else None
