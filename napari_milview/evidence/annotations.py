"""What a pathologist outlined: annotation regions in level-0 pixels, read, written, checked,
and turned into per-patch overlaps.

Coordinates are level-0 pixels, ``x`` = column, ``y`` = row, origin at the image's top-left
corner, pixel ``x`` spanning ``[x, x + 1)`` (the convention of ``Bag.coords``, CLAM, TRIDENT,
QuPath and ASAP). A :class:`Region` is one polygon: an exterior ring and its holes, each an
open ring (the first point is not repeated), with a class ``label``; ``exclude`` marks an
exclusion (an area cut out of every positive region, as CAMELYON16's ``_2`` group).

Formats read (:func:`read_annotations` sniffs the content, not the name)
-------------------------------------------------------------------------
* **QuPath GeoJSON** (File > Export objects as GeoJSON, any version): a FeatureCollection, a
  single Feature, a bare JSON list of Features (QuPath 0.2's export) or a bare geometry.
  ``Polygon`` and ``MultiPolygon`` geometries (inner rings are holes; a MultiPolygon gives one
  region per polygon) and ``GeometryCollection`` members are read. The label is
  ``properties.classification.name`` (QuPath 0.3+), the ``names`` list of a derived class
  joined as QuPath prints it (``"Tumor: Positive"``), or ``classification`` given as a plain
  string (older scripts); none gives ``""``. ``properties.name`` is the region's name and
  ``properties.objectType`` (``annotation``, ``detection``, ``cell``, ``tile``; QuPath 0.2's
  ``"id": "PathAnnotationObject"``) its :attr:`Region.object_type`. Both annotations and
  detections are read: filter on ``object_type`` if a cell export is not what you mean.
  Positions may carry a third value (ignored). GeoJSON closes rings; the closing point is
  dropped. ``properties.exclude: true`` (what :func:`write_geojson` writes for an exclusion)
  or a label named in ``exclude=`` marks an exclusion; no classification is an exclusion by
  default.
* **ASAP XML** as CAMELYON16/17 ship it: ``ASAP_Annotations/Annotations/Annotation`` with
  ``Name``, ``Type``, ``PartOfGroup`` and ``Coordinates/Coordinate`` (``Order``, ``X``,
  ``Y``), points sorted by ``Order``. ``PartOfGroup`` is the label. By default the groups
  ``_2`` (CAMELYON16: a non-tumour area inside a tumour outline), ``Exclusion`` and ``normal``
  (CAMELYON17: ASAP paints it over ``metastases``) are exclusions; ``_0``, ``_1``, ``Tumor``,
  ``metastases`` and any other group are positive. Types: ``Polygon`` and ``Rectangle`` (four
  corners) are regions; ``Spline`` is read as the polygon through its control points (ASAP
  draws a smooth curve through the same points, so the area differs by the curve's bulges
  between clicks); ``Dot``, ``PointSet`` and ``Measurement`` (ruler) are not regions.
  Numbers may use a decimal comma (``"1234,5"``, written by ASAP under some locales) or an
  exponent (``"1.2345e+004"``).

Points and lines are not regions. A file that mixes them with regions is read, and each one
left out is listed in :attr:`Annotations.skipped`; a file whose only geometries are points
or lines is refused ("Point features are not regions"): it is the wrong kind of file (a cell
count, a ruler). A file with no geometry at all (an empty FeatureCollection, an empty
``<Annotations/>``) is read as *no regions*: a pathologist may have found nothing, so the
reader returns an empty :class:`Annotations` and the evaluation decides (it needs positives
for AUROC, and says so there).

Validation
----------
Every problem raises one :class:`AnnotationError` whose one-line message names the file and
the problem: a path that is not a regular file (a folder, a FIFO: refused unopened, by
type), an empty or oversized file (over :data:`MAX_BYTES`, or more than :data:`MAX_POINTS`
points in all), invalid JSON (line and column), XML that is not well-formed (line and
column), any ``<!DOCTYPE``/``<!ENTITY`` (refused before a single entity is expanded: no
billion laughs, no external entities), a root that is not ``ASAP_Annotations`` (an Aperio
ImageScope ``<Annotations>`` file is named as such), a Feature that is not one, a geometry
type that is not known, coordinates that are not finite numbers (which feature, ring and
point), a ``Coordinate`` without ``Order`` or with a repeated one, a ring with fewer than 3
distinct points or no area, a ring that crosses or touches itself (which segments, and where:
an exact orientation test of every pair of segments that share a cell of a grid, vectorised,
so a 10 000-point ring is checked in milliseconds), a hole outside its exterior, and, when
``slide_size`` is given, a point outside the slide by more than :func:`edge_tolerance`.
A hole that crosses its exterior, and two regions that overlap, are not errors: overlapping
positives count once.

Patch overlap
-------------
:func:`patch_overlap` gives the fraction of each square patch inside the positive regions
(holes and exclusions removed). Each patch is cut into ``subrows`` horizontal strips (16 by
default), further cut at the ``y`` of every horizontal edge inside it; along the centre line
of each strip the inside length within the patch is exact (even-odd crossings of every ring,
positive regions united, exclusions subtracted), weighted by the strip's height (the midpoint
rule in ``y``). Outlines made of horizontal and vertical edges (rectangles, traced masks,
pixel brushes) are therefore exact. Elsewhere the inside length is linear across a strip
except where the strip holds a vertex or an edge leaves the patch through its left or right
side; a nearly horizontal edge crossing the patch is the worst case, at most
``1 / (2 * subrows)`` of the patch (0.031 at the default 16). Measured against exact polygon
clipping on smooth random outlines (8 000-point rings, 256 px patches): mean error 3e-4, max
8.5e-3 of a patch (the tests hold it under 0.0125; ``subrows=128`` is ~4x closer). Cost:
100 000 patches on a grid (as a bag's are), all near a 8 000 + 3 000-point region, ~0.6 s on
one core; patches at arbitrary offsets share no scanlines and cost ~4x.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import OneLineError, atomic_write, file_problem

__all__ = [
    "AnnotationError",
    "Annotations",
    "MAX_BYTES",
    "MAX_POINTS",
    "Region",
    "edge_tolerance",
    "from_labels",
    "from_mask",
    "from_polygons",
    "patch_labels",
    "patch_overlap",
    "read_annotations",
    "read_asap_xml",
    "read_geojson",
    "self_intersection",
    "to_mask",
    "write_asap_xml",
    "write_geojson",
]

#: Most points (all rings of all regions together) a file may hold; a file beyond is refused.
MAX_POINTS = 5_000_000
#: Largest annotation file read (bytes); 5 million points of GeoJSON or ASAP XML fit.
MAX_BYTES = 512 << 20
#: ASAP groups (case-insensitive) read as exclusions unless the caller names others.
ASAP_EXCLUDE = frozenset({"_2", "exclusion", "normal"})
#: ASAP annotation types that are regions, and those that are points or lines.
_ASAP_REGION_TYPES = {"polygon": "Polygon", "rectangle": "Rectangle", "spline": "Spline"}
_ASAP_POINT_TYPES = {"dot": "Dot", "pointset": "PointSet", "measurement": "Measurement"}
_NOT_REGIONS = {"Point": "Point", "MultiPoint": "MultiPoint", "LineString": "LineString",
                "MultiLineString": "MultiLineString"}
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_COMMA_NUMBER = re.compile(r"[+-]?\d+,\d+(?:[eE][+-]?\d+)?")


class AnnotationError(OneLineError):
    """An annotation file (or array) cannot be used; one line: ``"<file>: <problem>"``."""

    default_where = "annotations"


@dataclass
class Region:
    """One annotated polygon in level-0 pixels.

    Attributes
    ----------
    exterior : ndarray, float64 [M, 2]
        The outer ring, (x, y), open (first point not repeated), M >= 3.
    holes : list of ndarray, float64 [K, 2]
        Inner rings (areas cut out of this region), open.
    label : str
        The class: QuPath's classification name, ASAP's ``PartOfGroup`` ("_0", "Tumor" ...).
    exclude : bool
        An exclusion: subtracted from every positive region in :func:`patch_overlap`.
    name : str
        The annotation's own name (ASAP ``Name``, QuPath ``properties.name``), may be "".
    object_type : str
        QuPath's ``objectType`` ("annotation", "detection", ...) or "" when not given.
    """

    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)
    label: str = ""
    exclude: bool = False
    name: str = ""
    object_type: str = ""

    def rings(self) -> list[np.ndarray]:
        return [self.exterior, *self.holes]

    def area(self) -> float:
        """Exterior area minus the holes' areas (level-0 px^2)."""
        return abs(_signed_area(self.exterior)) - sum(abs(_signed_area(h)) for h in self.holes)

    @property
    def n_points(self) -> int:
        return int(len(self.exterior) + sum(len(h) for h in self.holes))


@dataclass
class Annotations:
    """The regions of one file (or drawing) and where they came from.

    Attributes
    ----------
    regions : list of Region
    source : str
        The file read, or what made them ("mask", "polygons", "labels").
    slide_size : (int, int) or None
        (width, height) of the slide they were checked against, if any.
    skipped : list of str
        Geometries left out because they are not regions (points, lines), one line each.
    """

    regions: list[Region] = field(default_factory=list)
    source: str = ""
    slide_size: tuple[int, int] | None = None
    skipped: list[str] = field(default_factory=list)

    def positive(self, labels: Iterable[str] | None = None) -> list[Region]:
        """The regions that count as positive: every non-excluded one (``labels=None``), or
        the non-excluded ones whose label is in ``labels`` (compared case-insensitively)."""
        if labels is None:
            return [r for r in self.regions if not r.exclude]
        if isinstance(labels, str):
            labels = [labels]
        want = {str(x).casefold() for x in labels}
        return [r for r in self.regions if not r.exclude and r.label.casefold() in want]

    def exclusions(self) -> list[Region]:
        return [r for r in self.regions if r.exclude]

    @property
    def labels(self) -> list[str]:
        """The distinct labels, in order of first appearance."""
        return list(dict.fromkeys(r.label for r in self.regions))

    def bounds(self) -> tuple[float, float, float, float] | None:
        """(x0, y0, x1, y1) over every region's exterior; None when there are no regions."""
        if not self.regions:
            return None
        lo = np.min([r.exterior.min(axis=0) for r in self.regions], axis=0)
        hi = np.max([r.exterior.max(axis=0) for r in self.regions], axis=0)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])

    def __len__(self) -> int:
        return len(self.regions)


# ============================================================================ geometry


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of an open ring; positive = counter-clockwise in (x, y) (RFC 7946)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _pairs_in_cells(seg_lo: np.ndarray, seg_hi: np.ndarray, n: int):
    """Yield arrays (i, j), i < j, of segments whose boxes share a cell of a uniform grid,
    in chunks of at most a few million pairs (each pair once per shared cell)."""
    lo_all, hi_all = seg_lo.min(axis=0), seg_hi.max(axis=0)
    span = np.maximum(hi_all - lo_all, 1e-9)
    lengths = np.hypot(*(seg_hi - seg_lo).T)
    cell = max(2.0 * float(np.median(lengths)), float(span.max()) / 4096.0, 1e-9)
    while True:
        c0 = np.floor((seg_lo - lo_all) / cell).astype(np.int64)
        c1 = np.floor((seg_hi - lo_all) / cell).astype(np.int64)
        wx = c1[:, 0] - c0[:, 0] + 1
        cnt = wx * (c1[:, 1] - c0[:, 1] + 1)
        if int(cnt.sum()) <= 16 * n + 4096:
            break
        cell *= 2.0
    gx = int(np.floor(span[0] / cell)) + 1
    total = int(cnt.sum())
    seg = np.repeat(np.arange(n), cnt)
    k = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    cx = c0[seg, 0] + k % wx[seg]
    cy = c0[seg, 1] + k // wx[seg]
    cid = cy * gx + cx
    order = np.lexsort((seg, cid))
    cid, seg = cid[order], seg[order]
    starts = np.flatnonzero(np.r_[True, cid[1:] != cid[:-1]])
    ends = np.r_[starts[1:], total]
    size = ends - starts
    grp_end = np.repeat(ends, size)
    pos = np.arange(total)
    npairs = grp_end - pos - 1  # partners after each entry in its cell
    cum = np.cumsum(npairs)
    chunk = 4_000_000
    first = 0
    while first < total:
        base = cum[first - 1] if first else 0
        last = int(np.searchsorted(cum, base + chunk, side="right"))
        last = max(last, first + 1)
        sel = np.arange(first, min(last, total))
        c = npairs[sel]
        if c.sum():
            a = np.repeat(sel, c)
            off = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
            b = a + 1 + off
            i, j = seg[a], seg[b]
            yield np.minimum(i, j), np.maximum(i, j)
        first = int(sel[-1]) + 1


def self_intersection(ring: np.ndarray) -> tuple[int, int, float, float] | None:
    """Where an open ring crosses or touches itself: ``(i, j, x, y)`` for segments ``i``
    (points i -> i+1) and ``j`` and a common point, or None for a simple ring.

    Segments that share a vertex (neighbours) only count when they fold back onto each other.
    Candidate pairs are the segments whose bounding boxes share a cell of a uniform grid
    sized from the segments' lengths (all pairs for small rings); each pair gets an exact
    orientation test. Consecutive repeated points must have been removed.
    """
    p = np.asarray(ring, dtype=np.float64)
    n = len(p)
    if n < 3:
        return None
    q = np.roll(p, -1, axis=0)
    # neighbours folding back: a -> b -> a' with a' on the way back along the same line
    d_in = p - np.roll(p, 1, axis=0)  # segment i-1 direction, at vertex i
    d_out = q - p
    cr = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]
    dot = (d_in * d_out).sum(axis=1)
    spike = np.flatnonzero((cr == 0) & (dot < 0))
    if spike.size:
        v = int(spike[0])
        return (v - 1) % n, v, float(p[v, 0]), float(p[v, 1])
    lo, hi = np.minimum(p, q), np.maximum(p, q)
    if n <= 96:
        ii, jj = np.triu_indices(n, 1)
        chunks: Iterable = [(ii, jj)]
    else:
        chunks = _pairs_in_cells(lo, hi, n)
    best = None
    for ii, jj in chunks:
        keep = (jj - ii > 1) & ~((ii == 0) & (jj == n - 1)) & (ii != jj)
        ii, jj = ii[keep], jj[keep]
        if not ii.size:
            continue
        # boxes overlap (cheap filter), then exact orientations
        ov = ((lo[ii] <= hi[jj]) & (lo[jj] <= hi[ii])).all(axis=1)
        ii, jj = ii[ov], jj[ov]
        if not ii.size:
            continue
        hit, x, y = _segments_meet(p[ii], q[ii], p[jj], q[jj])
        if hit.any():
            k = np.flatnonzero(hit)
            key = ii[k] * n + jj[k]
            m = k[int(np.argmin(key))]
            cand = (int(ii[m]), int(jj[m]), float(x[m]), float(y[m]))
            if best is None or (cand[0], cand[1]) < (best[0], best[1]):
                best = cand
    return best


def _cross(ax, ay, bx, by):
    return ax * by - ay * bx


def _segments_meet(p1, p2, q1, q2):
    """Whether closed segments p1-p2 and q1-q2 share a point, and one such point."""
    rx, ry = (p2 - p1).T
    sx, sy = (q2 - q1).T
    d1 = _cross(sx, sy, *(p1 - q1).T)
    d2 = _cross(sx, sy, *(p2 - q1).T)
    d3 = _cross(rx, ry, *(q1 - p1).T)
    d4 = _cross(rx, ry, *(q2 - p1).T)
    proper = (((d1 > 0) & (d2 < 0)) | ((d1 < 0) & (d2 > 0))) & \
             (((d3 > 0) & (d4 < 0)) | ((d3 < 0) & (d4 > 0)))

    def on(a, b, c):  # c on the closed segment a-b, given collinear
        return ((np.minimum(a, b) <= c) & (c <= np.maximum(a, b))).all(axis=1)

    t1 = (d1 == 0) & on(q1, q2, p1)
    t2 = (d2 == 0) & on(q1, q2, p2)
    t3 = (d3 == 0) & on(p1, p2, q1)
    t4 = (d4 == 0) & on(p1, p2, q2)
    hit = proper | t1 | t2 | t3 | t4
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(proper, d1 / (d1 - d2), 0.0)
    pt = p1 + t[:, None] * (p2 - p1)
    pt = np.where(t1[:, None], p1, pt)
    pt = np.where((t2 & ~t1)[:, None], p2, pt)
    pt = np.where((t3 & ~t1 & ~t2)[:, None], q1, pt)
    pt = np.where((t4 & ~t1 & ~t2 & ~t3)[:, None], q2, pt)
    return hit, pt[:, 0], pt[:, 1]


def _point_in_ring(pts: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Even-odd test of a few points [K, 2] against an open ring."""
    a, b = ring, np.roll(ring, -1, axis=0)
    px, py = pts[:, 0][:, None], pts[:, 1][:, None]
    ay, by = a[:, 1][None], b[:, 1][None]
    ax, bx = a[:, 0][None], b[:, 0][None]
    straddle = (ay <= py) != (by <= py)
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = ax + (py - ay) * (bx - ax) / (by - ay)
    return ((straddle & (px < xc)).sum(axis=1) % 2) == 1


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _clean_ring(points: np.ndarray, where: str, what: str) -> np.ndarray:
    """A validated open ring: finite, consecutive repeats and the closing point removed,
    >= 3 distinct points, non-zero area, not crossing or touching itself."""
    r = np.asarray(points, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] != 2:
        raise AnnotationError(where, f"{what}: points must be (x, y) pairs, got an array of "
                                     f"shape {r.shape}")
    bad = ~np.isfinite(r).all(axis=1)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise AnnotationError(where, f"{what}: point {k} is ({r[k, 0]}, {r[k, 1]}); "
                                     "coordinates must be finite numbers")
    if len(r):
        keep = np.r_[True, (r[1:] != r[:-1]).any(axis=1)]
        r = r[keep]
    if len(r) > 1 and (r[0] == r[-1]).all():
        r = r[:-1]
    if len(r) < 3:
        raise AnnotationError(where, f"{what} has {len(r)} distinct point(s); a region needs "
                                     "at least 3")
    d = r - r[0]
    v = d[np.flatnonzero(d.any(axis=1))[0]]
    if not (d[:, 0] * v[1] - d[:, 1] * v[0]).any():
        raise AnnotationError(where, f"{what} has no area (all {len(r)} points on one line)")
    hit = self_intersection(r)
    if hit is not None:
        i, j, x, y = hit
        raise AnnotationError(where, f"{what} crosses itself: segment {i} (point {i} -> "
                                     f"{(i + 1) % len(r)}) meets segment {j} at "
                                     f"({_fmt(x)}, {_fmt(y)}); a region's outline must be a "
                                     "simple closed curve")
    return np.ascontiguousarray(r)


def _make_region(exterior, holes, where: str, what: str, **kw) -> Region:
    ext = _clean_ring(exterior, where, f"{what}, exterior ring")
    hs = []
    for k, h in enumerate(holes):
        hr = _clean_ring(h, where, f"{what}, hole {k + 1}")
        probe = hr[np.unique(np.linspace(0, len(hr) - 1, 3).astype(int))]
        if not _point_in_ring(probe, ext).any():
            raise AnnotationError(where, f"{what}, hole {k + 1} lies outside its exterior ring "
                                         f"(its point ({_fmt(hr[0, 0])}, {_fmt(hr[0, 1])}))")
        hs.append(hr)
    return Region(ext, hs, **kw)


def edge_tolerance(slide_size: tuple[int, int]) -> float:
    """How far (level-0 px) a point may lie outside the slide: 0.5 % of its longer side, at
    least 4 px (an outline drawn to the edge, a mask's last partial block)."""
    return max(4.0, 0.005 * max(slide_size))


def _check_slide(ann: Annotations, slide_size, where: str) -> None:
    if slide_size is None:
        return
    try:
        w, h = (float(v) for v in slide_size)
    except (TypeError, ValueError):
        raise AnnotationError(where, f"slide_size must be (width, height), got "
                                     f"{slide_size!r}") from None
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        raise AnnotationError(where, f"slide_size must be positive, got {slide_size!r}")
    tol = edge_tolerance((w, h))
    for k, reg in enumerate(ann.regions):
        for ring_no, ring in enumerate(reg.rings()):
            out = ((ring[:, 0] < -tol) | (ring[:, 0] > w + tol)
                   | (ring[:, 1] < -tol) | (ring[:, 1] > h + tol))
            if out.any():
                i = int(np.flatnonzero(out)[0])
                ring_name = "exterior" if ring_no == 0 else f"hole {ring_no}"
                raise AnnotationError(
                    where, f"{_describe(k, reg)}, {ring_name}: point {i} "
                           f"({_fmt(ring[i, 0])}, {_fmt(ring[i, 1])}) lies outside the "
                           f"{int(w)} x {int(h)} slide (tolerance {_fmt(tol)} px); wrong slide, "
                           "or coordinates not in level-0 pixels?")
    ann.slide_size = (int(round(w)), int(round(h)))


def _describe(k: int, reg: Region) -> str:
    bits = [f"region {k}"]
    if reg.name:
        bits.append(f"{reg.name!r}")
    if reg.label:
        bits.append(f"[{reg.label}]")
    return " ".join(bits)


# ============================================================================ reading


def _open_checked(path) -> Path:
    p = Path(path)
    problem = file_problem(p)
    if problem is not None:
        raise AnnotationError(p, problem)
    size = p.stat().st_size
    if size == 0:
        raise AnnotationError(p, "is empty (0 bytes); no annotations in it")
    if size > MAX_BYTES:
        raise AnnotationError(p, f"is {size / 2**20:.0f} MiB, over the {MAX_BYTES >> 20} MiB "
                                 "limit for an annotation file; simplify the outlines")
    return p


def _sniff(p: Path) -> str:
    with open(p, "rb") as fh:
        head = fh.read(4096)
    text = None
    for bom, enc in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"),
                     (b"\xfe\xff", "utf-16-be")):
        if head.startswith(bom):
            text = head[len(bom):].decode(enc, errors="ignore")
            break
    if text is None:
        text = head.decode("utf-8", errors="ignore")
    text = text.lstrip()
    if not text:
        raise AnnotationError(p, "holds only whitespace; no annotations in it")
    if text[0] == "<":
        return "xml"
    if text[0] in "{[":
        return "geojson"
    raise AnnotationError(p, f"is neither GeoJSON nor ASAP XML (it starts with "
                             f"{text[:20]!r})")


def read_annotations(path: str | os.PathLike, *, slide_size: tuple[int, int] | None = None,
                     exclude: Iterable[str] | None = None) -> Annotations:
    """Read a QuPath GeoJSON or ASAP XML file, told apart by content.

    Parameters
    ----------
    path : path-like
    slide_size : (width, height) or None
        Level-0 size of the slide: every point must lie inside it (within
        :func:`edge_tolerance`).
    exclude : iterable of str or None
        Labels (case-insensitive) read as exclusions; None = the format's default (ASAP:
        ``_2``, ``Exclusion``, ``normal``; GeoJSON: none, besides ``properties.exclude``).

    Raises
    ------
    AnnotationError
        One line naming the file and the problem (see the module docstring).
    """
    p = _open_checked(path)
    if _sniff(p) == "xml":
        return read_asap_xml(p, slide_size=slide_size, exclude=exclude)
    return read_geojson(p, slide_size=slide_size, exclude=exclude)


# ---------------------------------------------------------------------------- GeoJSON


def _label_of(props: dict, where: str, what: str) -> str:
    c = props.get("classification")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        name = c.get("name")
        if isinstance(name, str):
            return name
        names = c.get("names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return ": ".join(names)
        if name is None and names is None:
            return ""
    raise AnnotationError(where, f"{what}: properties.classification must be a string or an "
                                 f"object with a 'name', got {json.dumps(c)[:60]}")


def _positions(ring: Any, where: str, what: str) -> np.ndarray:
    """A GeoJSON ring (list of [x, y(, z)] numbers) as float64 [M, 2]."""
    if not isinstance(ring, list):
        raise AnnotationError(where, f"{what} is {type(ring).__name__}, not a list of "
                                     "[x, y] positions")
    try:
        arr = np.array(ring)
    except (ValueError, TypeError):
        arr = None
    if (arr is not None and arr.ndim == 2 and arr.shape[1] == 2 and arr.dtype.kind in "iuf"
            and len(arr)):
        out = arr.astype(np.float64)
    else:
        out = np.empty((len(ring), 2))
        for k, pos in enumerate(ring):
            if (not isinstance(pos, list) or len(pos) < 2 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in pos)):
                raise AnnotationError(where, f"{what}, point {k} is {json.dumps(pos)[:60]}; a "
                                             "position must be [x, y] numbers")
            out[k] = pos[0], pos[1]
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise AnnotationError(where, f"{what}, point {k} is not finite ({out[k, 0]}, "
                                     f"{out[k, 1]})")
    return out


class _Budget:
    def __init__(self, where: str):
        self.where, self.n = where, 0

    def take(self, k: int) -> None:
        self.n += k
        if self.n > MAX_POINTS:
            raise AnnotationError(self.where, f"holds more than {MAX_POINTS:,} points; refused "
                                              "(simplify the outlines before evaluating)")


def _geometry_polygons(geom: Any, where: str, what: str, skipped: list[str]):
    """(rings list) per polygon of a GeoJSON geometry; non-regions noted in ``skipped``."""
    if geom is None:
        skipped.append(f"{what}: no geometry (null)")
        return []
    if not isinstance(geom, dict):
        raise AnnotationError(where, f"{what}: geometry is {type(geom).__name__}, not a "
                                     "GeoJSON geometry object")
    gtype = geom.get("type")
    if gtype in _NOT_REGIONS:
        skipped.append(f"{what}: {gtype} (not a region)")
        return []
    if gtype == "GeometryCollection":
        members = geom.get("geometries")
        if not isinstance(members, list):
            raise AnnotationError(where, f"{what}: GeometryCollection without a 'geometries' "
                                         "list")
        out = []
        for k, g in enumerate(members):
            out += _geometry_polygons(g, where, f"{what}, member {k}", skipped)
        return out
    coords = geom.get("coordinates")
    if gtype == "Polygon":
        polys = [coords]
    elif gtype == "MultiPolygon":
        if not isinstance(coords, list):
            raise AnnotationError(where, f"{what}: MultiPolygon coordinates must be a list of "
                                         "polygons")
        polys = coords
    else:
        raise AnnotationError(where, f"{what}: geometry type {gtype!r} is not a region "
                                     "(expected Polygon or MultiPolygon)")
    out = []
    for k, poly in enumerate(polys):
        pw = what if gtype == "Polygon" else f"{what}, polygon {k}"
        if not isinstance(poly, list) or not poly:
            raise AnnotationError(where, f"{pw}: a polygon must be a non-empty list of rings")
        out.append((pw, [_positions(r, where, f"{pw}, ring {i}") for i, r in enumerate(poly)]))
    return out


def read_geojson(path: str | os.PathLike, *, slide_size: tuple[int, int] | None = None,
                 exclude: Iterable[str] | None = None) -> Annotations:
    """Read QuPath GeoJSON (FeatureCollection, Feature, list of Features, bare geometry);
    see the module docstring for what is read and :func:`read_annotations` for the
    parameters."""
    p = _open_checked(path)
    where = str(p)
    try:
        data = json.loads(p.read_bytes())
    except json.JSONDecodeError as e:
        raise AnnotationError(where, f"invalid JSON: {e.msg} at line {e.lineno}, column "
                                     f"{e.colno}") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(where, f"is not UTF-8/16/32 text ({e.reason} at byte "
                                     f"{e.start})") from None
    except RecursionError:
        raise AnnotationError(where, "JSON nested too deeply to be GeoJSON") from None
    excl = {s.casefold() for s in exclude} if exclude is not None else set()

    if isinstance(data, list):
        features = data
    elif isinstance(data, dict):
        t = data.get("type")
        if t == "FeatureCollection":
            features = data.get("features")
            if not isinstance(features, list):
                raise AnnotationError(where, "FeatureCollection without a 'features' list")
        elif t == "Feature":
            features = [data]
        elif t in ("Polygon", "MultiPolygon", "GeometryCollection", *_NOT_REGIONS):
            features = [{"type": "Feature", "geometry": data, "properties": {}}]
        else:
            raise AnnotationError(where, f"JSON object of type {t!r} is not GeoJSON (expected "
                                         "a FeatureCollection, a Feature or a list of Features)")
    else:
        raise AnnotationError(where, f"JSON {type(data).__name__} is not GeoJSON (expected a "
                                     "FeatureCollection, a Feature or a list of Features)")
    regions: list[Region] = []
    skipped: list[str] = []
    budget = _Budget(where)
    for k, feat in enumerate(features):
        if not isinstance(feat, dict) or feat.get("type") != "Feature":
            got = feat.get("type") if isinstance(feat, dict) else type(feat).__name__
            raise AnnotationError(where, f"feature {k} is {got!r}, not a GeoJSON Feature")
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            raise AnnotationError(where, f"feature {k}: properties must be an object")
        name = props.get("name")
        name = name if isinstance(name, str) else ""
        what = f"feature {k}" + (f" ({name!r})" if name else "")
        if "geometry" not in feat:
            raise AnnotationError(where, f"{what} has no 'geometry'")
        label = _label_of(props, where, what)
        otype = props.get("objectType", props.get("object_type"))
        if not isinstance(otype, str):
            legacy = feat.get("id")
            otype = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
                     "PathCellObject": "cell", "PathTileObject": "tile"}.get(legacy, "")
        is_excl = props.get("exclude") is True or label.casefold() in excl
        for pw, rings in _geometry_polygons(feat["geometry"], where, what, skipped):
            budget.take(sum(len(r) for r in rings))
            regions.append(_make_region(rings[0], rings[1:], where, pw, label=label,
                                        exclude=is_excl, name=name, object_type=otype))
    return _finish(regions, skipped, where, slide_size, "features",
                   f"the file's {len(skipped)} geometries hold no Polygon or MultiPolygon "
                   "(a point or line export?)")


def _finish(regions: list[Region], skipped: list[str], where: str,
            slide_size: tuple[int, int] | None, noun: str, none_held: str) -> Annotations:
    """The readers' last step: refuse a file whose every geometry was skipped (naming their
    kinds), else the :class:`Annotations`, checked against the slide."""
    if not regions and skipped:
        kinds = sorted({s.rsplit(": ", 1)[1].split(" (")[0] for s in skipped})
        raise AnnotationError(where, f"{' and '.join(kinds)} {noun} are not regions: "
                                     f"{none_held}")
    ann = Annotations(regions, source=where, skipped=skipped)
    _check_slide(ann, slide_size, where)
    return ann


# ---------------------------------------------------------------------------- ASAP XML


class _AsapHandler:
    """Streams expat events into annotation records; refuses DTDs and entities."""

    def __init__(self, where: str, parser):
        self.where, self.parser = where, parser
        self.stack: list[str] = []
        self.records: list[dict] = []
        self.cur: dict | None = None
        self.budget = _Budget(where)

    def start(self, tag: str, attrs: dict) -> None:
        depth = len(self.stack)
        if depth == 0 and tag != "ASAP_Annotations":
            hint = (" (an Aperio ImageScope file? convert it to ASAP XML or GeoJSON)"
                    if tag == "Annotations" else "")
            raise AnnotationError(self.where, f"root element is <{tag}>, not <ASAP_Annotations>: "
                                              f"not an ASAP annotation file{hint}")
        path = self.stack[1:]
        if tag == "Annotation" and path == ["Annotations"]:
            self.cur = {"attrs": attrs, "coords": [], "line": self.parser.CurrentLineNumber}
            self.records.append(self.cur)
        elif tag == "Coordinate" and path == ["Annotations", "Annotation", "Coordinates"]:
            self.budget.take(1)
            self.cur["coords"].append((attrs, self.parser.CurrentLineNumber))
        self.stack.append(tag)

    def end(self, tag: str) -> None:
        self.stack.pop()

    def refuse_dtd(self, *args) -> None:
        raise AnnotationError(self.where, "declares a DTD (<!DOCTYPE>) at line "
                                          f"{self.parser.CurrentLineNumber}; refused: ASAP "
                                          "files have none, and entities can explode or reach "
                                          "outside the file")

    def refuse_entity(self, *args) -> None:
        raise AnnotationError(self.where, "declares an XML entity (<!ENTITY>) at line "
                                          f"{self.parser.CurrentLineNumber}; refused")


def _xml_number(s: str | None, where: str, what: str) -> float:
    if s is None:
        raise AnnotationError(where, f"{what} is missing")
    t = s.strip()
    if _COMMA_NUMBER.fullmatch(t):
        t = t.replace(",", ".")
    if not _NUMBER.fullmatch(t):
        raise AnnotationError(where, f"{what} is {s!r}, not a number")
    v = float(t)
    if not math.isfinite(v):
        raise AnnotationError(where, f"{what} is {s!r}, not a finite number")
    return v


def read_asap_xml(path: str | os.PathLike, *, slide_size: tuple[int, int] | None = None,
                  exclude: Iterable[str] | None = None) -> Annotations:
    """Read ASAP XML as CAMELYON16/17 ship it; see the module docstring for what is read and
    :func:`read_annotations` for the parameters. Parsed with expat, streaming; any DTD or
    entity declaration is refused when met, before anything is expanded."""
    from xml.parsers import expat

    p = _open_checked(path)
    where = str(p)
    parser = expat.ParserCreate()
    h = _AsapHandler(where, parser)
    parser.StartElementHandler = h.start
    parser.EndElementHandler = h.end
    parser.StartDoctypeDeclHandler = h.refuse_dtd
    parser.EntityDeclHandler = h.refuse_entity
    parser.UnparsedEntityDeclHandler = h.refuse_entity
    parser.ExternalEntityRefHandler = h.refuse_entity
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        with open(p, "rb") as fh:
            parser.ParseFile(fh)
    except expat.ExpatError as e:
        raise AnnotationError(where, f"not well-formed XML: {expat.ErrorString(e.code)} at line "
                                     f"{e.lineno}, column {e.offset + 1}") from None
    excl = ({s.casefold() for s in exclude} if exclude is not None else set(ASAP_EXCLUDE))
    regions: list[Region] = []
    skipped: list[str] = []
    for k, rec in enumerate(h.records):
        a = rec["attrs"]
        name = a.get("Name", "")
        what = f"annotation {k}" + (f" ({name!r})" if name else "") + f" at line {rec['line']}"
        typ = a.get("Type", "Polygon")
        tkey = typ.strip().casefold()
        if tkey in _ASAP_POINT_TYPES:
            skipped.append(f"{what}: {_ASAP_POINT_TYPES[tkey]} (not a region)")
            continue
        if tkey not in _ASAP_REGION_TYPES:
            raise AnnotationError(where, f"{what}: Type {typ!r} is not a region type (Polygon, "
                                         "Rectangle, Spline; Dot and PointSet are points)")
        orders, pts = [], []
        for attrs, line in rec["coords"]:
            cw = f"{what}, Coordinate at line {line}"
            o = attrs.get("Order")
            if o is None:
                raise AnnotationError(where, f"{cw} has no Order")
            try:
                orders.append(int(o.strip()))
            except ValueError:
                raise AnnotationError(where, f"{cw}: Order {o!r} is not a whole number") from None
            pts.append((_xml_number(attrs.get("X"), where, f"{cw}: X"),
                        _xml_number(attrs.get("Y"), where, f"{cw}: Y")))
        if not pts:
            raise AnnotationError(where, f"{what} has no Coordinates")
        orders_a = np.asarray(orders)
        srt = np.argsort(orders_a, kind="stable")
        dup = np.flatnonzero(np.diff(orders_a[srt]) == 0)
        if dup.size:
            raise AnnotationError(where, f"{what}: Order {orders_a[srt][dup[0]]} appears more "
                                         "than once; the point order is ambiguous")
        ring = np.asarray(pts, dtype=np.float64)[srt]
        group = a.get("PartOfGroup", "")
        regions.append(_make_region(ring, [], where, what, label=group,
                                    exclude=group.casefold() in excl, name=name,
                                    object_type="annotation"))
    return _finish(regions, skipped, where, slide_size, "annotations",
                   f"the file's {len(skipped)} annotations hold no Polygon, Rectangle or "
                   "Spline")


# ============================================================================ writing


def _closed(ring: np.ndarray) -> list[list[float]]:
    r = np.vstack([ring, ring[:1]])
    return [[_num(x), _num(y)] for x, y in r]


def _num(v: float) -> float | int:
    v = float(v)
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


def _oriented(ring: np.ndarray, ccw: bool) -> np.ndarray:
    return ring if (_signed_area(ring) > 0) == ccw else ring[::-1]


_COLOURS = [[200, 0, 0], [0, 160, 0], [0, 0, 220], [200, 140, 0], [140, 0, 200]]


def write_geojson(ann: Annotations, path: str | os.PathLike) -> Path:
    """Write ``ann`` as a QuPath-like FeatureCollection (one ``Polygon`` annotation per region,
    rings closed, exterior counter-clockwise and holes clockwise in (x, y) as RFC 7946 asks,
    ``classification {"name", "color"}``, ``name``, ``exclude: true`` on exclusions), which
    QuPath 0.3+ imports and :func:`read_geojson` reads back unchanged. Atomic."""
    import uuid

    ns = uuid.UUID("3c1d3f8e-7d1e-4e0b-9a52-6576696465ae")
    colours = {lab: _COLOURS[i % len(_COLOURS)] for i, lab in enumerate(ann.labels)}
    feats = []
    for k, r in enumerate(ann.regions):
        rings = [_closed(_oriented(r.exterior, True))]
        rings += [_closed(_oriented(h, False)) for h in r.holes]
        props: dict[str, Any] = {"objectType": r.object_type or "annotation"}
        if r.name:
            props["name"] = r.name
        if r.label:
            props["classification"] = {"name": r.label, "color": colours[r.label]}
        if r.exclude:
            props["exclude"] = True
        fid = str(uuid.uuid5(ns, f"{k}:{r.label}:{r.exterior[0].tolist()}"))
        feats.append({"type": "Feature", "id": fid,
                      "geometry": {"type": "Polygon", "coordinates": rings},
                      "properties": props})
    text = json.dumps({"type": "FeatureCollection", "features": feats}, separators=(",", ":"))
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _xml_attr(s: str) -> str:
    return (s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
            .replace(">", "&gt;"))


def write_asap_xml(ann: Annotations, path: str | os.PathLike) -> Path:
    """Write ``ann`` in the layout CAMELYON16/17 ship (ASAP 1.x): ``<?xml version="1.0"?>``,
    ``ASAP_Annotations/Annotations/Annotation Name Type="Polygon" PartOfGroup Color`` with
    ``Coordinates/Coordinate Order X Y`` (rings open, exact shortest decimals) and an
    ``AnnotationGroups`` list. ASAP has no holes: each hole becomes its own annotation in
    group ``_2`` (an exclusion), so :func:`patch_overlap` gives the same values after
    :func:`read_asap_xml`, except for a positive region lying inside another one's hole: an
    exclusion cuts every positive region (as ASAP's own mask conversion paints ``_2`` last),
    so that island is lost (GeoJSON keeps it). An exclusion keeps its label when it is an
    ASAP exclusion group, else goes to ``_2``. Atomic."""
    out = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    groups: dict[str, str] = {}
    n = 0

    def add(ring: np.ndarray, name: str, group: str) -> None:
        nonlocal n
        groups.setdefault(group, "#ff0000" if group.casefold() not in ASAP_EXCLUDE
                          else "#00ff00")
        out.append(f'\t\t<Annotation Name="{_xml_attr(name or f"Annotation {n}")}" '
                   f'Type="Polygon" PartOfGroup="{_xml_attr(group)}" Color="#F4FA58">')
        out.append("\t\t\t<Coordinates>")
        for i, (x, y) in enumerate(ring):
            out.append(f'\t\t\t\t<Coordinate Order="{i}" X="{_num(x)!r}" Y="{_num(y)!r}" />')
        out.append("\t\t\t</Coordinates>")
        out.append("\t\t</Annotation>")
        n += 1

    for r in ann.regions:
        group = r.label or "_0"
        if r.exclude and group.casefold() not in ASAP_EXCLUDE:
            group = "_2"
        add(r.exterior, r.name, group)
        for h in r.holes:
            add(h, f"{r.name or 'Annotation'} hole", "_2")
    out.append("\t</Annotations>")
    out.append("\t<AnnotationGroups>")
    for g, colour in groups.items():
        out.append(f'\t\t<Group Name="{_xml_attr(g)}" PartOfGroup="None" Color="{colour}">')
        out.append("\t\t\t<Attributes />")
        out.append("\t\t</Group>")
    out.append("\t</AnnotationGroups>")
    out.append("</ASAP_Annotations>")
    text = "\n".join(out) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ============================================================================ from arrays


def from_polygons(polys: Sequence[np.ndarray], label: str = "drawn", *,
                  names: Sequence[str] | None = None,
                  slide_size: tuple[int, int] | None = None) -> Annotations:
    """Regions from drawn polygons (a napari Shapes layer's polygons and rectangles, mapped
    to level-0 (x, y) by the caller; an ellipse must first be turned into its outline, its
    layer data holds only the bounding box's corners).

    Parameters
    ----------
    polys : list of array [M, 2]
        Level-0 (x, y) vertices; closed or open rings both accepted.
    label : str
    names : list of str, optional
        One name per polygon (default "<label> <k>").
    """
    regions = []
    for k, poly in enumerate(polys):
        name = names[k] if names is not None else f"{label} {k + 1}"
        regions.append(_make_region(np.asarray(poly, dtype=np.float64), [], "polygons",
                                    f"polygon {k}", label=label, name=name,
                                    object_type="annotation"))
    ann = Annotations(regions, source="polygons")
    _check_slide(ann, slide_size, "polygons")
    return ann


def _boundary_rings(mask: np.ndarray):
    """Trace the pixel-edge outlines of a boolean mask. Returns (rings, signed areas,
    4-connected component of each ring) with vertices in (col, row) pixel-corner units.

    Each foreground pixel side facing background is a directed edge, foreground on its right
    in screen coordinates (y down). At a vertex where two foreground pixels touch only by a
    corner the trace turns towards the pixel it came along, so foreground is 4-connected and
    every ring is simple; outer rings have positive shoelace area, holes negative. Rings are
    ordered by list ranking (pointer doubling), so the work is vectorised."""
    from scipy import ndimage

    H, W = mask.shape
    p = np.zeros((H + 2, W + 2), bool)
    p[1:-1, 1:-1] = mask
    Hp, Wp = p.shape
    inner = p[1:-1, 1:-1]
    sides = np.zeros((4, Hp, Wp), bool)
    sides[0, 1:-1, 1:-1] = inner & ~p[:-2, 1:-1]  # top
    sides[1, 1:-1, 1:-1] = inner & ~p[1:-1, 2:]  # right
    sides[2, 1:-1, 1:-1] = inner & ~p[2:, 1:-1]  # bottom
    sides[3, 1:-1, 1:-1] = inner & ~p[1:-1, :-2]  # left
    flat = sides.ravel()
    ids = np.flatnonzero(flat)
    n = ids.size
    if n == 0:
        return [], np.zeros(0), np.zeros(0, int)
    lookup = np.full(flat.size, -1, np.int64)
    lookup[ids] = np.arange(n)
    s, rem = np.divmod(ids, Hp * Wp)
    r, c = np.divmod(rem, Wp)
    # candidates: right turn (same pixel), straight, left turn; first existing wins
    cand = {
        0: [(1, 0, 0), (0, 0, 1), (3, -1, 1)],
        1: [(2, 0, 0), (1, 1, 0), (0, 1, 1)],
        2: [(3, 0, 0), (2, 0, -1), (1, 1, -1)],
        3: [(0, 0, 0), (3, -1, 0), (2, -1, -1)],
    }
    succ = np.full(n, -1, np.int64)
    for side, opts in cand.items():
        m = s == side
        rr, cc = r[m], c[m]
        got = np.full(rr.size, -1, np.int64)
        for ns, dr, dc in opts:
            e = lookup[ns * Hp * Wp + (rr + dr) * Wp + (cc + dc)]
            got = np.where(got < 0, e, got)
        succ[m] = got
    if (succ < 0).any():  # cannot happen for a closed boundary
        raise AssertionError("open boundary while tracing the mask")
    # list ranking: head = smallest edge id of each cycle, then distance to it
    steps = max(1, int(np.ceil(np.log2(n))) + 1)
    head = np.arange(n)
    ptr = succ.copy()
    for _ in range(steps):
        head = np.minimum(head, head[ptr])
        ptr = ptr[ptr]
    is_head = head == np.arange(n)
    dist = (~is_head).astype(np.int64)
    nxt = succ.copy()
    nxt[is_head] = np.flatnonzero(is_head)
    for _ in range(steps):
        dist = dist + dist[nxt]
        nxt = nxt[nxt]
    length = np.bincount(head, minlength=n)[head]
    pos = (length - dist) % length
    order = np.lexsort((pos, head))
    pred = np.empty(n, np.int64)
    pred[succ] = np.arange(n)
    corner = s != s[pred]
    order = order[corner[order]]
    # start vertex (row, col) of each edge
    vr = r + (s >= 2)
    vc = c + ((s == 1) | (s == 2))
    xs = (vc[order] - 1).astype(np.float64)
    ys = (vr[order] - 1).astype(np.float64)
    hd = head[order]
    starts = np.flatnonzero(np.r_[True, hd[1:] != hd[:-1]])
    ends = np.r_[starts[1:], hd.size]
    # next vertex within each ring (wrap at the ring's end)
    idx = np.arange(hd.size) + 1
    idx[ends - 1] = starts
    xn, yn = xs[idx], ys[idx]
    cross = xs * yn - xn * ys
    areas = 0.5 * np.add.reduceat(cross, starts)
    comp, _ = ndimage.label(p, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    e0 = order[starts]
    ring_comp = comp[r[e0], c[e0]]
    rings = [np.column_stack([xs[a:b], ys[a:b]]) for a, b in zip(starts, ends)]
    return rings, areas, ring_comp


def _split_pinches(ring: np.ndarray) -> list[np.ndarray]:
    """Cut a traced ring into simple loops at the vertices it visits twice (where background
    reaches in by a corner): the outer loop keeps its orientation, a loop that encloses such
    background comes out negative (a hole touching the outline at one point, as JTS and
    QuPath allow); the areas add up to the ring's."""
    _, inv, cnt = np.unique(ring, axis=0, return_inverse=True, return_counts=True)
    if (cnt == 1).all():
        return [ring]
    loops, path, seen = [], [], {}
    for i, key in enumerate(inv.ravel().tolist()):
        if key in seen:
            j = seen[key]
            loops.append(np.array(path[j:]))
            for q in path[j + 1:]:
                seen.pop(q[2], None)
            del path[j + 1:]
            continue
        seen[key] = len(path)
        path.append((ring[i, 0], ring[i, 1], key))
    loops.append(np.array(path))
    return [lp[:, :2].astype(np.float64) for lp in loops if len(lp) >= 3]


def from_mask(mask: np.ndarray, level0_per_px: float, label: str = "tumor", *,
              origin: tuple[float, float] = (0.0, 0.0),
              slide_size: tuple[int, int] | None = None) -> Annotations:
    """Regions tracing a boolean mask exactly along pixel edges.

    Mask pixel ``(r, c)`` covers level-0 ``[x0 + c*s, x0 + (c+1)*s) x [y0 + r*s, y0 + (r+1)*s)``
    with ``s = level0_per_px`` and ``(x0, y0) = origin``; the synthetic slide's
    ``OUT.lesion.png`` is such a mask with ``s = SyntheticSlide.mask_downsample`` (its pixel is
    the truth at the centre of that block). The polygons' area is exactly ``mask.sum() * s**2``
    and :func:`to_mask` at the same scale gives the mask back. Foreground is 4-connected (two
    pixels touching only at a corner are two regions); each region gets its holes.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise AnnotationError("mask", f"must be 2-D [H, W], got shape {m.shape}")
    s = float(level0_per_px)
    if not (math.isfinite(s) and s > 0):
        raise AnnotationError("mask", f"level0_per_px must be a positive number, got "
                                      f"{level0_per_px!r}")
    rings, _, comp = _boundary_rings(m.astype(bool))
    ox, oy = float(origin[0]), float(origin[1])
    ext: dict[int, list[np.ndarray]] = {}
    holes: dict[int, list[np.ndarray]] = {}
    for ring, k in zip(rings, comp):
        for loop in _split_pinches(ring):
            loop = loop * s + (ox, oy)
            (ext if _signed_area(loop) > 0 else holes).setdefault(int(k), []).append(loop)
    regions = []
    for k in sorted(ext):
        outs, hs = ext[k], holes.get(k, [])
        if len(outs) == 1:
            groups = [hs]
        else:  # lobes that met at a corner: each hole goes to the lobe around it
            groups = [[] for _ in outs]
            for h in hs:
                mid = 0.5 * (h + np.roll(h, -1, axis=0))
                votes = [int(_point_in_ring(mid, o).sum()) for o in outs]
                groups[int(np.argmax(votes))].append(h)
        for o, g in zip(outs, groups):
            regions.append(Region(o, g, label=label, name=f"{label} {len(regions) + 1}",
                                  object_type="annotation"))
    ann = Annotations(regions, source="mask")
    _check_slide(ann, slide_size, "mask")
    return ann


def from_labels(labels: np.ndarray, level0_per_px: float,
                origin: tuple[float, float] = (0.0, 0.0), *,
                names: dict[int, str] | None = None,
                slide_size: tuple[int, int] | None = None) -> Annotations:
    """Regions from an integer label image (a napari Labels layer): each non-zero value gives
    the regions of ``labels == value`` (see :func:`from_mask` for the geometry), labelled
    ``names[value]`` or ``str(value)``. 0 is background."""
    lab = np.asarray(labels)
    if lab.ndim != 2 or lab.dtype.kind not in "iub":
        raise AnnotationError("labels", f"must be a 2-D integer array, got {lab.dtype} "
                                        f"{lab.shape}")
    regions: list[Region] = []
    for v in np.unique(lab):
        if v == 0:
            continue
        name = (names or {}).get(int(v), str(int(v)))
        regions += from_mask(lab == v, level0_per_px, name, origin=origin).regions
    ann = Annotations(regions, source="labels")
    _check_slide(ann, slide_size, "labels")
    return ann


# ============================================================================ overlap


def _edges(regions: list[Region], channel: int, rid0: int):
    out = []
    for k, reg in enumerate(regions):
        for ring in reg.rings():
            b = np.roll(ring, -1, axis=0)
            e = np.column_stack([ring, b, np.full(len(ring), rid0 + k),
                                 np.full(len(ring), channel)])
            out.append(e)
    return out


class _Scan:
    """Inside length along horizontal lines: F(line, x) = length of (-inf, x] inside the
    positive union minus the exclusion union, on each of the sorted lines ``ys``."""

    def __init__(self, pos: list[Region], exc: list[Region], ys: np.ndarray):
        self.ys = ys
        parts = _edges(pos, 0, 0) + _edges(exc, 1, len(pos))
        e = np.concatenate(parts) if parts else np.zeros((0, 6))
        x1, y1, x2, y2, rid, ch = e.T
        keep = y1 != y2
        x1, y1, x2, y2, rid, ch = (a[keep] for a in (x1, y1, x2, y2, rid, ch))
        ylo, yhi = np.minimum(y1, y2), np.maximum(y1, y2)
        lo = np.searchsorted(ys, ylo, "left")
        hi = np.searchsorted(ys, yhi, "left")
        cnt = hi - lo
        total = int(cnt.sum())
        ei = np.repeat(np.arange(cnt.size), cnt)
        si = lo[ei] + np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        yv = ys[si]
        xv = x1[ei] + (yv - y1[ei]) * (x2[ei] - x1[ei]) / (y2[ei] - y1[ei])
        r = rid[ei]
        # even-odd per (line, region): alternate +1 / -1 along x
        o = np.lexsort((xv, r, si))
        grp = np.r_[True, (si[o][1:] != si[o][:-1]) | (r[o][1:] != r[o][:-1])]
        gstart = np.maximum.accumulate(np.where(grp, np.arange(total), 0))
        sign = np.empty(total)
        sign[o] = np.where((np.arange(total) - gstart) % 2 == 0, 1.0, -1.0)
        o2 = np.lexsort((xv, si))
        self.s = si[o2]
        self.x = xv[o2]
        sg, chv = sign[o2], ch[ei][o2]
        cpos = np.cumsum(np.where(chv == 0, sg, 0.0))
        cexc = np.cumsum(np.where(chv == 1, sg, 0.0))
        self.inside = (cpos > 0.5) & (np.abs(cexc) < 0.5)
        same = np.r_[self.s[1:] == self.s[:-1], False]
        seg = np.where(same & self.inside, np.r_[np.diff(self.x), 0.0], 0.0)
        self.L = np.r_[0.0, np.cumsum(seg)]
        if total:
            self.xmin, self.xmax = float(self.x.min()), float(self.x.max())
        else:
            self.xmin = self.xmax = 0.0
        self.span = self.xmax - self.xmin + 4.0
        self.key = self.s * self.span + (self.x - self.xmin)

    def F(self, line: np.ndarray, xq: np.ndarray) -> np.ndarray:
        if not self.x.size:
            return np.zeros(np.shape(xq))
        xc = np.clip(xq, self.xmin - 1.0, self.xmax + 1.0)
        k = np.searchsorted(self.key, line * self.span + (xc - self.xmin), "right") - 1
        valid = k >= 0
        kk = np.maximum(k, 0)
        val = self.L[kk] + np.where(self.inside[kk] & valid, xc - self.x[kk], 0.0)
        return np.where(valid, val, 0.0)

    def intervals(self):
        """(line, x_start, x_end) of every inside stretch."""
        same = np.r_[self.s[1:] == self.s[:-1], False]
        k = np.flatnonzero(self.inside & same)
        return self.s[k], self.x[k], self.x[k + 1]


def patch_overlap(ann: Annotations, coords: np.ndarray, patch_size_level0: int,
                  labels: Iterable[str] | None = None, *, subrows: int = 16) -> np.ndarray:
    """Fraction of each square patch inside the positive regions.

    Parameters
    ----------
    ann : Annotations
    coords : array [N, 2] int
        Level-0 (x, y) of each patch's top-left corner (``Bag.coords``).
    patch_size_level0 : int
        Side of a patch in level-0 pixels.
    labels : iterable of str, optional
        Which labels are positive (see :meth:`Annotations.positive`); exclusions are always
        subtracted, holes always cut out; overlapping positive regions count once.
    subrows : int
        Strips per patch (accuracy: see the module docstring).

    Returns
    -------
    ndarray, float64 [N]
        In [0, 1]; all zero when there is no positive region.
    """
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 2:
        raise AnnotationError("coords", f"must be [N, 2] (x, y), got shape {c.shape}")
    c = c.astype(np.float64)
    P = float(patch_size_level0)
    if not (math.isfinite(P) and P > 0):
        raise AnnotationError("patch_size_level0", f"must be positive, got {patch_size_level0!r}")
    n = len(c)
    out = np.zeros(n)
    pos = ann.positive(labels)
    if not pos or not n:
        return out
    exc = ann.exclusions()
    lo = np.min([r.exterior.min(axis=0) for r in pos], axis=0)
    hi = np.max([r.exterior.max(axis=0) for r in pos], axis=0)
    near = np.flatnonzero((c[:, 0] < hi[0]) & (c[:, 0] + P > lo[0])
                          & (c[:, 1] < hi[1]) & (c[:, 1] + P > lo[1]))
    if not near.size:
        return out
    cx, cy = c[near, 0], c[near, 1]
    exc = [r for r in exc if (r.exterior.max(axis=0) >= lo).all()
           and (r.exterior.min(axis=0) <= hi).all()]
    # strip boundaries of each patch row: the uniform ones, plus the y of every horizontal
    # edge inside the row (where the inside length jumps), so rectilinear outlines are exact
    uy, row_of = np.unique(cy, return_inverse=True)
    flat = [ring for reg in (*pos, *exc) for ring in reg.rings()]
    allp = np.concatenate(flat)
    nxt = np.concatenate([np.roll(r, -1, axis=0) for r in flat])
    hy = np.unique(allp[allp[:, 1] == nxt[:, 1], 1])
    grid = uy[:, None] + np.arange(subrows + 1) * (P / subrows)
    h_lo = np.searchsorted(hy, uy, "right")
    h_cnt = np.searchsorted(hy, uy + P, "left") - h_lo
    h_row = np.repeat(np.arange(uy.size), h_cnt)
    h_y = hy[h_lo[h_row] + np.arange(int(h_cnt.sum())) - np.repeat(np.cumsum(h_cnt) - h_cnt,
                                                                      h_cnt)]
    b_row = np.r_[np.repeat(np.arange(uy.size), subrows + 1), h_row]
    b_y = np.r_[grid.ravel(), h_y]
    o = np.lexsort((b_y, b_row))
    b_row, b_y = b_row[o], b_y[o]
    same = b_row[1:] == b_row[:-1]
    width = np.diff(b_y)
    keep = same & (width > 0)
    i_row = b_row[:-1][keep]
    i_mid = 0.5 * (b_y[:-1] + b_y[1:])[keep]
    i_w = width[keep]
    r_start = np.searchsorted(i_row, np.arange(uy.size), "left")
    r_cnt = np.searchsorted(i_row, np.arange(uy.size), "right") - r_start
    ys, line_of = np.unique(i_mid, return_inverse=True)
    scan = _Scan(pos, exc, ys)
    acc = np.zeros(near.size)
    # every (patch, strip of its row) pair, in chunks of about 4 million
    per = r_cnt[row_of]
    ends = np.cumsum(per)
    first = 0
    while first < near.size:
        last = int(np.searchsorted(ends, (ends[first - 1] if first else 0) + 4_000_000,
                                   "right"))
        last = min(max(last, first + 1), near.size)
        idx = np.arange(first, last)
        cnt = per[idx]
        pi = np.repeat(idx, cnt)
        k = r_start[row_of[pi]] + np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt,
                                                                         cnt)
        li = line_of[k].astype(np.float64)
        part = i_w[k] * (scan.F(li, cx[pi] + P) - scan.F(li, cx[pi]))
        acc[first:last] = np.bincount(pi - first, weights=part, minlength=last - first)
        first = last
    out[near] = np.clip(acc / (P * P), 0.0, 1.0)
    return out


def patch_labels(overlap: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Positive patches: ``overlap >= fraction``; ``fraction=0`` means any overlap (> 0)."""
    ov = np.asarray(overlap, dtype=np.float64)
    f = float(fraction)
    if not (0.0 <= f <= 1.0):
        raise AnnotationError("fraction", f"must be in [0, 1], got {fraction!r}")
    return ov > 0 if f == 0 else ov >= f


def to_mask(ann: Annotations, shape: tuple[int, int], level0_per_px: float,
            origin: tuple[float, float] = (0.0, 0.0),
            labels: Iterable[str] | None = None) -> np.ndarray:
    """Rasterise the positive regions (holes and exclusions removed): pixel ``(r, c)`` is True
    when its centre ``(x0 + (c + 0.5) s, y0 + (r + 0.5) s)`` lies inside. The inverse of
    :func:`from_mask` at the same scale. Returns bool [H, W]."""
    H, W = (int(v) for v in shape)
    s = float(level0_per_px)
    out = np.zeros((H, W + 1), np.int32)
    pos = ann.positive(labels)
    if not pos or H == 0 or W == 0:
        return np.zeros((H, W), bool)
    ys = float(origin[1]) + (np.arange(H) + 0.5) * s
    scan = _Scan(pos, ann.exclusions(), ys)
    line, xa, xb = scan.intervals()
    ca = np.clip(np.ceil((xa - origin[0]) / s - 0.5), 0, W).astype(np.int64)
    cb = np.clip(np.ceil((xb - origin[0]) / s - 0.5), 0, W).astype(np.int64)
    li = line.astype(np.int64)
    np.add.at(out, (li, ca), 1)
    np.add.at(out, (li, cb), -1)
    return np.cumsum(out, axis=1)[:, :W] > 0
