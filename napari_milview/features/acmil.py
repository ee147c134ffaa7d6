"""ACMIL grouped feature files: ``patch_feats_pretrain_{pretrain}.h5``.

One HDF5 per dataset, one **group per slide** holding ``feat`` [N, D] float16, ``coords``
[N, 2] (level-0 top-left x, y) and an attribute ``label`` (``reference/algorithms.md``
section 1.8). Nothing records the patch extent: ACMIL's Camelyon features used 512-px
level-0 patches, but that is not assumed here - the user supplies it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from . import _h5
from .bag import Bag, BagError, _as_features
from .patches import resolve_extent, resolve_mpp

__all__ = ["FORMAT", "FEATURE_NAMES", "list_acmil_slides", "read_acmil_h5"]

FORMAT = "ACMIL grouped h5"
#: Dataset names a slide group may use for its features.
FEATURE_NAMES = ("feat", "features")

_HINT = ("pass --patch-size-level0 (ACMIL files do not store it; ACMIL's Camelyon features "
         "used 512 px at level 0) or the slide's CLAM patches .h5 (--patches-h5)")


def _slide_groups(f: Any) -> list[str]:
    import h5py

    out = []
    for name in f:
        try:
            if isinstance(f[name], h5py.Group):
                out.append(name)
        except (KeyError, OSError, RuntimeError):
            continue
    return out


def list_acmil_slides(path: str | os.PathLike) -> list[str]:
    """Names of the slide groups in an ACMIL feature file."""
    with _h5.open_h5(path, FORMAT) as f:
        return _slide_groups(f)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:10])
    return shown + (f" (and {len(names) - 10} more)" if len(names) > 10 else "")


def _pick(names: list[str], slide_id: str | None, where: str) -> str:
    if not names:
        raise BagError(where, "holds no slide groups")
    if slide_id is None:
        if len(names) == 1:
            return names[0]
        raise BagError(where, f"holds {len(names)} slides; pass slide_id (--slide-id), one "
                              f"of: {_listing(names)}")
    if slide_id in names:
        return slide_id
    # 'tumor_001.tif' or a different case still find 'tumor_001', when that is unambiguous
    stem = Path(slide_id).stem if Path(slide_id).suffix else slide_id
    matches = [n for n in names if n == stem] or \
        [n for n in names if n.lower() == stem.lower()]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise BagError(where, f"slide_id {slide_id!r} is ambiguous: matches "
                              f"{_listing(matches)}")
    raise BagError(where, f"no slide {slide_id!r}; the file holds {len(names)}: "
                          f"{_listing(names)}")


def read_acmil_h5(path: str | os.PathLike, *, slide_id: str | None = None,
                  patch_size_level0: int | None = None, mpp: float | None = None,
                  encoder: str | None = None,
                  patches_h5: str | os.PathLike | None = None) -> Bag:
    """Read one slide's bag from an ACMIL grouped h5 (only that group is read).

    Parameters
    ----------
    path
        ``patch_feats_pretrain_{pretrain}.h5``.
    slide_id
        The group to read; optional when the file holds exactly one slide.
    patch_size_level0, patches_h5
        The extent (ACMIL does not store it); without either the bag has no extent.
    mpp, encoder
        Not stored; ``encoder`` defaults to ``{pretrain}`` from the file name.

    Returns
    -------
    Bag
        features [N, D] float32 (from float16), ``meta["label"]`` from the group attribute.
    """
    p = Path(path)
    where = f"{p} ({FORMAT})"
    with _h5.open_h5(p, FORMAT) as f:
        name = _pick(_slide_groups(f), slide_id, where)
        g = f[name]
        gwhere = f"{p} ({FORMAT}, slide {name!r})"
        key = next((k for k in FEATURE_NAMES if k in g), "feat")
        feats = _as_features(_h5.read(g, key, gwhere), gwhere)
        n = feats.shape[0]
        coords = _h5.read(g, "coords", gwhere)
        if coords.ndim != 2 or coords.shape[0] != n:
            raise BagError(gwhere, f"{n} feature rows but coords has shape "
                                   f"{tuple(coords.shape)}")
        label = _h5.attrs(g).get("label")
    extent, how = resolve_extent(gwhere, n, user=patch_size_level0, patches_h5=patches_h5)
    mpp_v, mpp_src = resolve_mpp(gwhere, user=mpp)
    m = re.fullmatch(r"patch_feats_pretrain_(.+)", p.stem)
    meta: dict[str, Any] = {"format": FORMAT, "extent_source": how, "mpp_source": mpp_src,
                            "extent_hint": _HINT}
    if label is not None:
        meta["label"] = label
    return Bag(features=feats, coords=coords, patch_size_level0=extent, mpp=mpp_v,
               encoder=encoder or (m.group(1) if m else None), slide_id=name,
               source=gwhere, meta=meta)
