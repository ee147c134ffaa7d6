"""TRIDENT feature files: ``.../features_{encoder}/{slide}.h5``.

Layout (``reference/algorithms.md`` section 6.3; TRIDENT is CC BY-NC-ND, nothing copied):

* dataset ``features`` [N, D], attributes ``encoder`` (and ``name``, ``savetodir``);
* dataset ``coords`` [N, 2] int64, level-0 top-left (x, y), carrying the attributes of the
  patching run: ``patch_size_level0`` (the extent we need), ``patch_size`` (at the target
  magnification), ``level0_magnification``, ``target_magnification``, ``overlap``, ``name``,
  ``savetodir``, ``level0_width``, ``level0_height``.

Assumptions where the reference is silent: ``name`` (on ``coords`` or ``features``) is the
slide name, else the file stem is; the encoder is the ``encoder`` attribute of ``features``
(then of the file root), else a ``features_{encoder}`` parent folder name. mpp is not stored
(magnifications are binned, so mpp is not derived from them): it comes from the user.
Legacy CLAM geometry attributes on ``coords`` (``patch_size``/``patch_level``/
``downsample``) are honoured when ``patch_size_level0`` is absent.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from . import _h5
from .bag import Bag, BagError, BagWarning, _as_features
from .patches import extent_from_coords_attrs, find_patches_h5, resolve_extent, resolve_mpp

__all__ = ["FORMAT", "MARKERS", "read_trident_h5"]

FORMAT = "TRIDENT features h5"

#: Attributes on ``coords`` that only TRIDENT writes (used by the sniffer).
MARKERS = ("patch_size_level0", "level0_magnification", "target_magnification")


def _check_magnification(a: dict[str, Any], extent: int | None, where: str) -> None:
    """Warn when patch_size_level0 contradicts patch_size x level0_mag / target_mag."""
    try:
        ps, src, dst = (float(a[k]) for k in ("patch_size", "level0_magnification",
                                              "target_magnification"))
    except (KeyError, TypeError, ValueError):
        return
    if extent is None or dst <= 0 or ps <= 0 or src <= 0:
        return
    expected = ps * src / dst
    if abs(expected - extent) > max(1.0, 0.01 * extent):
        warnings.warn(f"{where}: patch_size_level0={extent} but patch_size {ps:g} at "
                      f"{dst:g}x on a {src:g}x slide gives {expected:g}; using {extent}",
                      BagWarning, stacklevel=3)


def read_trident_h5(path: str | os.PathLike, *, patches_h5: str | os.PathLike | None = None,
                    patch_size_level0: int | None = None, mpp: float | None = None,
                    slide_id: str | None = None, encoder: str | None = None) -> Bag:
    """Read a TRIDENT patch-feature h5.

    Parameters
    ----------
    path
        h5 with ``features`` [N, D] and ``coords`` [N, 2] (attributes on ``coords`` give
        ``patch_size_level0``).
    patches_h5, patch_size_level0, mpp, slide_id, encoder
        Overrides / what the file lacks; the user's values win (a warning when the given
        extent contradicts the file's).

    Returns
    -------
    Bag
        ``meta`` keeps ``level0_magnification``, ``target_magnification``, ``patch_size``,
        ``overlap``, ``level0_width``, ``level0_height`` when present.
    """
    p = Path(path)
    where = f"{p} ({FORMAT})"
    with _h5.open_h5(p, FORMAT) as f:
        feats = _as_features(_h5.read(f, "features", where), where)
        n = feats.shape[0]
        coords = _h5.read(f, "coords", where)
        if coords.ndim != 2 or coords.shape[0] != n:
            raise BagError(where, f"{n} feature rows but coords has shape "
                                  f"{tuple(coords.shape)}")
        ca = _h5.attrs(f["coords"])
        fa = _h5.attrs(f["features"])
        ra = _h5.attrs(f)
    in_file = extent_from_coords_attrs(ca, where)
    auto = None
    if patch_size_level0 is None and patches_h5 is None and in_file is None:
        auto = find_patches_h5(p)
    extent, how = resolve_extent(where, n, user=patch_size_level0, patches_h5=patches_h5,
                                 in_file=in_file, auto_patches=auto)
    if in_file is not None and in_file[1] == "attribute patch_size_level0":
        _check_magnification(ca, in_file[0], where)
    enc = encoder or _h5.text(fa.get("encoder")) or _h5.text(ra.get("encoder"))
    if enc is None and p.parent.name.startswith("features_"):
        enc = p.parent.name[len("features_"):] or None
    sid = slide_id or _h5.text(ca.get("name")) or _h5.text(fa.get("name")) or p.stem
    mpp_v, mpp_src = resolve_mpp(where, user=mpp)
    meta: dict[str, Any] = {"format": FORMAT, "extent_source": how, "mpp_source": mpp_src,
                            "extent_hint": "pass --patch-size-level0 or the TRIDENT/CLAM "
                                           "patches .h5 (--patches-h5)"}
    for k in ("level0_magnification", "target_magnification", "patch_size", "overlap",
              "level0_width", "level0_height"):
        if k in ca:
            meta[k] = ca[k]
    return Bag(features=feats, coords=coords, patch_size_level0=extent, mpp=mpp_v,
               encoder=enc, slide_id=sid, source=where, meta=meta)
