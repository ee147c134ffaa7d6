"""QuPath-shaped GeoJSON: one detection per patch with its score, the top-K as annotations.

The layout is what QuPath 0.4+ writes and reads (File > Import objects): a FeatureCollection
whose Features have a ``Polygon`` in level-0 pixel coordinates (x, y; origin at the image's
top-left corner, pixel x spanning [x, x + 1)) and ``properties`` with ``objectType``
(``"detection"`` or ``"annotation"``), optional ``name`` and ``classification``
``{"name", "color": [r, g, b]}``, and ``measurements`` as a name -> number object. Each ring is
closed (5 points for a patch) and counter-clockwise in (x, y) (RFC 7946; QuPath accepts
either order). QuPath's "Measure > Show measurement maps" then colours the detections by
``attention``. A patch without a finite score has no ``attention`` measurement (QuPath: NaN).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import TYPE_CHECKING

import numpy as np

from .normalise import normalise
from .topk import select

if TYPE_CHECKING:
    from ..result import Result

__all__ = ["to_geojson"]

_NS = uuid.UUID("6f1c2a4e-2b52-4d1e-9c4a-6d696c766965")  # fixed: same file -> same ids
TOPK_CLASS = {"name": "Attention top-K", "color": [255, 64, 0]}


def _ring(x: int, y: int, ps: int) -> list[list[int]]:
    return [[x, y], [x + ps, y], [x + ps, y + ps], [x, y + ps], [x, y]]


def _num(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def to_geojson(result: Result, path: str | os.PathLike | None = None,
               source: str | None = None, top_k: int = 20, *,
               all_sources: bool = False) -> dict:
    """The result as a QuPath FeatureCollection; written (atomically) when ``path`` is given.

    Parameters
    ----------
    result : Result
        ``coords`` [N, 2] level-0 (x, y), ``patch_size_level0``, the scores of ``source``.
    source : str, optional
        Attention source for the ``attention`` measurement (default source when None).
    top_k : int
        How many top-scoring patches also become annotations (0 for none).
    all_sources : bool
        Also add every other source as a measurement named ``"source <name>"``.

    Returns
    -------
    dict
        ``{"type": "FeatureCollection", "features": [N detections, then top_k annotations]}``.
        Measurements: ``attention`` (raw score), ``attention percentile`` (CLAM rank
        percentile, 0..1), ``index`` (bag order); annotations add ``rank``.
    """
    src = result.default_source if source is None else source
    scores = result.attention(src)
    pct = normalise(scores, "rank")
    ps = int(result.patch_size_level0)
    coords = result.coords.tolist()
    others = [k for k in result.sources if k != src] if all_sources else []
    tag = result.slide_id or result.slide or ""
    features = []
    for i, (x, y) in enumerate(coords):
        meas = {}
        if np.isfinite(scores[i]):
            meas["attention"] = float(scores[i])
            meas["attention percentile"] = float(pct[i])
        meas["index"] = i
        for k in others:
            v = _num(result.sources[k][i])
            if v is not None:
                meas[f"source {k}"] = v
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_NS, f"{tag}/detection/{i}")),
            "geometry": {"type": "Polygon", "coordinates": [_ring(x, y, ps)]},
            "properties": {"objectType": "detection", "measurements": meas},
        })
    for rank, i in enumerate(select(scores, int(top_k), "top"), start=1):
        x, y = coords[i]
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_NS, f"{tag}/annotation/{rank}")),
            "geometry": {"type": "Polygon", "coordinates": [_ring(x, y, ps)]},
            "properties": {
                "objectType": "annotation",
                "name": f"top {rank} (patch {int(i)})",
                "classification": dict(TOPK_CLASS),
                "measurements": {"attention": float(scores[i]), "rank": rank,
                                 "index": int(i)},
            },
        })
    fc = {"type": "FeatureCollection", "features": features}
    if path is not None:
        from .export import atomic_write

        text = json.dumps(fc, separators=(",", ":"), allow_nan=False)
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return fc
