"""A validated description of a slide's pyramid, shared by every backend.

Backends (one per module: ``openslide_backend``, ``zarr_backend``) describe what the
file says; :func:`validate_levels` turns that into levels napari can display
(strictly shrinking, no empty level, sane sizes) and says what it had to drop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .._io import OneLineError

#: A side longer than this (in pixels) is not a slide but a broken header.
MAX_SIDE = 2**31 - 1
#: More level-0 pixels than this (a 1,000,000 x 1,000,000 image) is refused outright.
MAX_PIXELS = 10**12
#: A tile (or chunk) of more pixels than this is a corrupt header: decoding one would
#: allocate gigabytes, and OpenSlide aborts the whole process when an allocation fails.
MAX_TILE_PIXELS = 2**26
#: Dask chunks are at least this many pixels a side (a whole multiple of a smaller native
#: tile): a file claiming 1 x 1 tiles must not turn one viewport into 10^5 reads.
MIN_TILE = 64

MPP_SOURCES = ("vendor", "tiff-resolution", "user", "none")


class SlideError(OneLineError):
    """A slide cannot be opened or read; the message names the file and the problem."""

    @property
    def path(self) -> str:
        """The slide's path (``where``)."""
        return self.where


@dataclass(frozen=True)
class Level:
    """One pyramid level.

    Attributes
    ----------
    shape : (int, int)
        (height, width) in pixels of this level.
    downsample : float
        Level-0 pixels per pixel of this level (1.0 for level 0).
    tile : (int, int)
        (tile_height, tile_width): the file's native tile, used as the dask chunk.
    derived : bool
        True for a level we compute lazily from a finer one (the file has no such level).
    """

    shape: tuple[int, int]
    downsample: float
    tile: tuple[int, int]
    derived: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of tiles covering the level, edge tiles included."""
        return (-(-self.shape[0] // self.tile[0]), -(-self.shape[1] // self.tile[1]))


@dataclass(frozen=True)
class SlideInfo:
    """Everything napari and the engine need to know about a slide, without pixels.

    Attributes
    ----------
    path : str
    vendor : str
        'aperio', 'hamamatsu', 'generic-tiff', 'ome-zarr', ...
    levels : tuple[Level, ...]
        Strictly shrinking; ``levels[0]`` is full resolution.
    mpp : (float, float) or None
        Microns per level-0 pixel (y, x); None when unknown.
    mpp_source : str
        One of :data:`MPP_SOURCES`.
    objective_power : float or None
    associated : tuple[str, ...]
        Names of associated images ('label', 'macro', 'thumbnail', ...).
    notes : tuple[str, ...]
        Human-readable warnings found while opening (dropped levels, missing mpp ...).
    info_notes : tuple[str, ...]
        Those of ``notes`` that only inform (lower levels built lazily): nothing to act on,
        so a viewer logs them instead of warning.
    properties : dict
        The backend's raw key/value metadata.
    """

    path: str
    vendor: str
    levels: tuple[Level, ...]
    mpp: tuple[float, float] | None
    mpp_source: str
    objective_power: float | None
    associated: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    info_notes: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height), as OpenSlide spells it."""
        h, w = self.levels[0].shape
        return (w, h)

    def scale(self, level: int) -> tuple[float, float]:
        """napari layer scale (row, col) of ``level``: microns when mpp is known, else pixels."""
        ds = self.levels[level].downsample
        if self.mpp is None:
            return (ds, ds)
        return (self.mpp[0] * ds, self.mpp[1] * ds)

    @property
    def units(self) -> str:
        return "um" if self.mpp is not None else "pixel"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (what ``milview info --json`` prints)."""
        return {
            "path": self.path,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "levels": [
                {
                    "dimensions": [lv.shape[1], lv.shape[0]],
                    "downsample": lv.downsample,
                    "tile": [lv.tile[1], lv.tile[0]],
                    "derived": lv.derived,
                }
                for lv in self.levels
            ],
            "mpp": list(self.mpp) if self.mpp else None,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "associated_images": list(self.associated),
            "notes": list(self.notes),
        }


def parse_mpp(value: Any) -> float | None:
    """A positive finite float, or None for anything else (missing, zero, NaN, text)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def validate_levels(
    path: Any, raw: list[tuple[tuple[int, int], float, tuple[int, int]]]
) -> tuple[list[tuple[int, Level]], list[str]]:
    """Keep the levels napari can show, and say why others were dropped.

    Parameters
    ----------
    path : the file, for messages.
    raw : list of ((height, width), downsample, (tile_h, tile_w)) in file order.

    Returns
    -------
    kept : list of (file_level_index, Level), strictly shrinking.
    notes : messages about dropped levels.

    Raises
    ------
    SlideError
        No usable level, an empty or absurdly large level 0.
    """
    notes: list[str] = []
    if not raw:
        raise SlideError(path, "the file has no image levels")
    (h0, w0), _, _ = raw[0]
    if h0 <= 0 or w0 <= 0:
        raise SlideError(path, f"level 0 has zero size ({w0} x {h0} px)")
    if h0 > MAX_SIDE or w0 > MAX_SIDE or h0 * w0 > MAX_PIXELS:
        raise SlideError(
            path, f"absurd dimensions {w0} x {h0} px (more than {MAX_PIXELS:.0e} pixels); "
            "the header is probably corrupt"
        )
    kept: list[tuple[int, Level]] = []
    for i, ((h, w), ds, (th, tw)) in enumerate(raw):
        if h <= 0 or w <= 0:
            notes.append(f"level {i} has zero size ({w} x {h} px) and was skipped")
            continue
        if int(th) * int(tw) > MAX_TILE_PIXELS:
            problem = f"level {i} claims tiles of {tw} x {th} px, too large to decode"
            if i == 0:
                raise SlideError(path, f"{problem}; the header is probably corrupt")
            notes.append(f"{problem}, and was skipped")
            continue
        if kept and not (h < kept[-1][1].shape[0] or w < kept[-1][1].shape[1]):
            notes.append(f"level {i} ({w} x {h} px) does not shrink and was skipped")
            continue
        if kept and (h > kept[-1][1].shape[0] or w > kept[-1][1].shape[1]):
            notes.append(f"level {i} ({w} x {h} px) is out of order and was skipped")
            continue
        th = min(-(-MIN_TILE // int(th)) * int(th), h) if th > 0 else min(512, h)
        tw = min(-(-MIN_TILE // int(tw)) * int(tw), w) if tw > 0 else min(512, w)
        ds = float(ds) if ds and math.isfinite(ds) and ds >= 1 else max(h0 / h, w0 / w)
        kept.append((i, Level((int(h), int(w)), ds, (th, tw))))
    return kept, notes


def derived_levels(last: Level, min_side: int = 1024) -> list[Level]:
    """Levels to build lazily by 2x box downsampling below the file's smallest level.

    A slide whose smallest stored level is still large (a single-level giant, a
    shallow pyramid) would make napari read thousands of tiles to draw the
    overview. We add halving levels until the longer side is <= ``min_side``.
    """
    out: list[Level] = []
    cur = last
    while max(cur.shape) > min_side:
        h, w = -(-cur.shape[0] // 2), -(-cur.shape[1] // 2)
        cur = Level((h, w), cur.downsample * 2, cur.tile, derived=True)
        out.append(cur)
    return out
