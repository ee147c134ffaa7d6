"""Our own bag file: one slide per h5, every geometry fact stored with the features.

Layout (version 1):

* dataset ``features`` [N, D] float32, dataset ``coords`` [N, 2] int64 (level-0 top-left
  x, y) - the same names as CLAM and TRIDENT, so their readers read it too;
* root attributes ``format = "napari-milview-bag"``, ``version = 1``, ``patch_size_level0``,
  ``mpp``, ``encoder``, ``slide`` (the slide file, when known), ``slide_id``, ``dropped``; an
  attribute whose value is unknown is left out;
* ``patch_size_level0`` is also copied onto ``coords`` (where TRIDENT keeps it).

Writes go to a temporary name in the same folder and are renamed into place (atomic).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._io import atomic_write
from . import _h5
from .bag import Bag, BagError, _as_features
from .patches import resolve_extent, resolve_mpp

__all__ = ["FORMAT", "FORMAT_NAME", "VERSION", "read_milview_h5", "save_bag"]

FORMAT = "napari-milview bag h5"
FORMAT_NAME = "napari-milview-bag"
VERSION = 1


def save_bag(bag: Bag, path: str | os.PathLike, *, slide: str | os.PathLike | None = None
             ) -> Path:
    """Write ``bag`` to ``path`` atomically (temporary file + rename); return the path.

    Parameters
    ----------
    bag
        A valid bag (features [N, D] float32, coords [N, 2] int64).
    path
        Destination ``.h5``; its folder must exist. An existing file is replaced.
    slide
        The slide file the bag was made from (default ``bag.meta["slide"]``).
    """
    import h5py

    bag.validate()
    dest = Path(path)
    if not dest.parent.is_dir():
        raise BagError(dest, f"folder {dest.parent} does not exist")
    slide = slide if slide is not None else bag.meta.get("slide")

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=bag.features.astype("float32", copy=False))
            coords = f.create_dataset("coords", data=bag.coords.astype("int64", copy=False))
            f.attrs["format"] = FORMAT_NAME
            f.attrs["version"] = VERSION
            f.attrs["dropped"] = int(bag.dropped)
            if bag.patch_size_level0 is not None:
                f.attrs["patch_size_level0"] = int(bag.patch_size_level0)
                coords.attrs["patch_size_level0"] = int(bag.patch_size_level0)
            if bag.mpp is not None:
                f.attrs["mpp"] = float(bag.mpp)
            for key, value in (("encoder", bag.encoder), ("slide_id", bag.slide_id),
                               ("slide", None if slide is None else os.fspath(slide))):
                if value is not None:
                    f.attrs[key] = str(value)
            label = bag.meta.get("label")
            if isinstance(label, int | float | str) and not isinstance(label, bool):
                f.attrs["label"] = label

    return atomic_write(dest, write)


def read_milview_h5(path: str | os.PathLike, *, patch_size_level0: int | None = None,
                    mpp: float | None = None, slide_id: str | None = None,
                    encoder: str | None = None,
                    patches_h5: str | os.PathLike | None = None) -> Bag:
    """Read a bag written by :func:`save_bag`; every field comes back.

    Given values override the stored ones (a warning when a given extent contradicts the
    stored extent). A file from a newer version is refused.
    """
    p = Path(path)
    where = f"{p} ({FORMAT})"
    with _h5.open_h5(p, FORMAT) as f:
        a = _h5.attrs(f)
        if a.get("format") != FORMAT_NAME:
            raise BagError(where, f"not a napari-milview bag (format attribute "
                                  f"{a.get('format')!r})")
        try:
            version = int(a.get("version", 0))
        except (TypeError, ValueError):
            version = -1
        if version < 1:
            raise BagError(where, f"unreadable version attribute {a.get('version')!r}")
        if version > VERSION:
            raise BagError(where, f"written by a newer napari-milview (bag version {version}); "
                                  f"this one reads version {VERSION}: upgrade napari-milview")
        feats = _as_features(_h5.read(f, "features", where), where)
        coords = _h5.read(f, "coords", where)
    stored = a.get("patch_size_level0")
    extent, how = resolve_extent(
        where, feats.shape[0], user=patch_size_level0, patches_h5=patches_h5,
        in_file=None if stored is None else (stored, "attribute patch_size_level0"))
    mpp_v, mpp_src = resolve_mpp(where, user=mpp, in_file=a.get("mpp"))
    meta: dict[str, Any] = {"format": FORMAT, "extent_source": how, "mpp_source": mpp_src,
                            "version": version}
    for k in ("slide", "label"):
        if a.get(k) is not None:
            meta[k] = a[k]
    try:
        dropped = max(0, int(a.get("dropped", 0)))
    except (TypeError, ValueError):
        dropped = 0
    return Bag(features=feats, coords=coords, patch_size_level0=extent, mpp=mpp_v,
               encoder=encoder or _h5.text(a.get("encoder")),
               slide_id=slide_id or _h5.text(a.get("slide_id")), source=where,
               dropped=dropped, meta=meta)
