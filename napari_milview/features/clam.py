"""CLAM feature files: ``h5_files/{slide}.h5`` and ``pt_files/{slide}.pt``.

``extract_features_fp.py`` writes datasets ``features`` [N, D] float32 and ``coords``
[N, 2] int32 (level-0 top-left x, y) and **no attributes**: the patch extent comes from the
patching run's ``patches/{slide}.h5`` (``patches_h5=``, or found at ``../patches/{slide}.h5``)
or from the user. The ``.pt`` twin is a bare [N, D] tensor: its coords come from the
matching h5 (``../h5_files/{slide}.h5`` or ``{slide}.h5`` beside it).

Any h5 with ``features`` + ``coords`` datasets reads here (ours and TRIDENT's too); CLAM-style
geometry attributes on ``coords`` (``patch_size``, ``patch_level``, ``downsample``), when a
fork wrote them, are used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from . import _h5
from .bag import Bag, BagError, _as_features
from .patches import extent_from_coords_attrs, find_patches_h5, resolve_extent, resolve_mpp

__all__ = ["FORMAT", "FORMAT_PT", "read_clam_h5", "read_clam_pt", "find_companion_h5"]

FORMAT = "CLAM features h5"
FORMAT_PT = "CLAM features .pt"

_HINT = "pass --patch-size-level0 or the CLAM patches .h5 (--patches-h5)"


def _hint(path: Path) -> str:
    folder = path.absolute().parent.parent / "patches"
    return f"{_HINT}; no patches file found at {folder / (path.stem + '.h5')}"


def _geometry(f: Any, path: Path, where: str, n: int, *, patch_size_level0: Any,
              patches_h5: Any) -> tuple[np.ndarray, int | None, str | None]:
    """Read ``coords`` [n, 2] and settle the extent for the open CLAM-like h5 ``f``."""
    coords = _h5.read(f, "coords", where)
    if coords.ndim != 2 or coords.shape[0] != n:
        raise BagError(where, f"{n} feature rows but coords has shape {tuple(coords.shape)}")
    in_file = extent_from_coords_attrs(_h5.attrs(f["coords"]), where)
    auto = None
    if patch_size_level0 is None and patches_h5 is None and in_file is None:
        auto = find_patches_h5(path)
    extent, how = resolve_extent(where, n, user=patch_size_level0, patches_h5=patches_h5,
                                 in_file=in_file, auto_patches=auto)
    return coords, extent, how


def read_clam_h5(path: str | os.PathLike, *, patches_h5: str | os.PathLike | None = None,
                 patch_size_level0: int | None = None, mpp: float | None = None,
                 slide_id: str | None = None, encoder: str | None = None) -> Bag:
    """Read a CLAM ``h5_files/{slide}.h5`` feature file.

    Parameters
    ----------
    path
        h5 with datasets ``features`` [N, D] and ``coords`` [N, 2] (level-0 x, y).
    patches_h5
        CLAM ``patches/{slide}.h5`` giving the extent; default: ``../patches/{stem}.h5``
        when it exists.
    patch_size_level0, mpp, slide_id, encoder
        What the file does not store (the user's values win over anything found).

    Returns
    -------
    Bag
        ``patch_size_level0`` None when no source gave it (``Bag.require_extent`` then says
        what to supply); ``slide_id`` defaults to the file stem.
    """
    p = Path(path)
    where = f"{p} ({FORMAT})"
    with _h5.open_h5(p, FORMAT) as f:
        feats = _as_features(_h5.read(f, "features", where), where)
        n = feats.shape[0]
        coords, extent, how = _geometry(f, p, where, n, patch_size_level0=patch_size_level0,
                                        patches_h5=patches_h5)
    mpp_v, mpp_src = resolve_mpp(where, user=mpp)
    meta = {"format": FORMAT, "extent_source": how, "mpp_source": mpp_src,
            "extent_hint": _hint(p)}
    return Bag(features=feats, coords=coords, patch_size_level0=extent, mpp=mpp_v,
               encoder=encoder, slide_id=slide_id or p.stem, source=where, meta=meta)


def find_companion_h5(pt_path: str | os.PathLike) -> tuple[Path | None, list[Path]]:
    """The CLAM h5 holding the coords of ``pt_files/{slide}.pt``: (found or None, looked at)."""
    p = Path(pt_path).absolute()
    looked = [p.parent.parent / "h5_files" / f"{p.stem}.h5", p.with_suffix(".h5")]
    for cand in looked:
        if cand.is_file() and _h5.is_hdf5(cand):
            return cand, looked
    return None, looked


def read_clam_pt(path: str | os.PathLike, *, patches_h5: str | os.PathLike | None = None,
                 patch_size_level0: int | None = None, mpp: float | None = None,
                 slide_id: str | None = None, encoder: str | None = None,
                 contents: Any = None) -> Bag:
    """Read a CLAM ``pt_files/{slide}.pt`` (a bare [N, D] tensor) with coords from its h5.

    Loaded only through ``torch.load(weights_only=True)`` (see :mod:`.pt`). Coords and
    extent come from ``../h5_files/{stem}.h5`` (or ``{stem}.h5`` beside the .pt) and its
    patches file; only the h5's ``coords`` are read, not its features.

    Parameters
    ----------
    contents : PtContents, optional
        Already-loaded contents of ``path`` (the dispatcher passes them; not loaded twice).
    """
    from .pt import load_pt_contents

    p = Path(path)
    where = f"{p} ({FORMAT_PT})"
    if contents is None:
        contents = load_pt_contents(p)
    if contents.coords is not None:  # a dict bag with its own coords: nothing to look up
        from .pt import bag_from_contents

        return bag_from_contents(p, contents, patches_h5=patches_h5,
                                 patch_size_level0=patch_size_level0, mpp=mpp,
                                 slide_id=slide_id, encoder=encoder)
    a = contents.attrs
    feats = _as_features(contents.features, where)
    n = feats.shape[0]
    h5, looked = find_companion_h5(p)
    if h5 is None:
        raise BagError(where, "holds features but no coords, and no matching CLAM h5 was "
                              f"found (looked at {', '.join(str(x) for x in looked)}); put "
                              "h5_files/{slide}.h5 beside pt_files/, or load the .h5")
    user_extent = patch_size_level0 if patch_size_level0 is not None else \
        a.get("patch_size_level0")
    h5_where = f"{h5} ({FORMAT}, coords for {p.name})"
    with _h5.open_h5(h5, FORMAT) as f:
        coords, extent, how = _geometry(f, h5, h5_where, n, patch_size_level0=user_extent,
                                        patches_h5=patches_h5)
    if how == "user" and patch_size_level0 is None:
        how = "pt entry patch_size_level0"
    mpp_v, mpp_src = resolve_mpp(where, user=mpp, in_file=a.get("mpp"))
    meta = {"format": FORMAT_PT, "extent_source": how, "mpp_source": mpp_src,
            "extent_hint": _hint(h5), "coords_from": str(h5)}
    return Bag(features=feats, coords=coords, patch_size_level0=extent, mpp=mpp_v,
               encoder=encoder or a.get("encoder"),
               slide_id=slide_id or a.get("slide_id") or p.stem, source=where, meta=meta)
