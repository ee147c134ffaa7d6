"""One entry point for every bag file: sniff the content, pick the reader, check the result.

Formats (by content, never by suffix):

============  =========================================================================
``milview``   h5 with root attribute ``format = "napari-milview-bag"``
``trident``   h5 with ``features`` + ``coords``, and TRIDENT attributes (``coords`` has
              ``patch_size_level0`` / ``level0_magnification`` / ``target_magnification``,
              or ``features`` has ``encoder``)
``clam``      h5 with ``features`` + ``coords`` and no TRIDENT attributes
``acmil``     h5 whose root holds groups (one per slide) with ``feat``
``pt``        a torch zip archive or legacy pickle (loaded with ``weights_only=True`` only)
============  =========================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._io import file_problem
from . import _h5
from .acmil import FEATURE_NAMES as ACMIL_FEATURES
from .acmil import read_acmil_h5
from .bag import Bag, BagError
from .clam import read_clam_h5
from .milview_h5 import FORMAT_NAME, read_milview_h5
from .pt import is_pt, read_pt
from .trident import MARKERS as TRIDENT_MARKERS
from .trident import read_trident_h5

__all__ = ["FORMATS", "load_bag", "sniff_bag"]

#: Format key -> human name, as used in messages.
FORMATS = {
    "milview": "napari-milview bag h5",
    "trident": "TRIDENT features h5",
    "clam": "CLAM features h5",
    "acmil": "ACMIL grouped h5",
    "pt": "torch .pt bag",
}


def _sniff_h5(path: Path) -> str:
    import h5py

    with _h5.open_h5(path, "feature file") as f:
        if _h5.attrs(f).get("format") == FORMAT_NAME:
            return "milview"
        feats = f.get("features")
        if isinstance(feats, h5py.Dataset):
            coords = f.get("coords")
            ca = _h5.attrs(coords) if isinstance(coords, h5py.Dataset) else {}
            if any(k in ca for k in TRIDENT_MARKERS) or "encoder" in _h5.attrs(feats):
                return "trident"
            return "clam"
        for i, name in enumerate(f):
            if i >= 20:
                break
            obj = f.get(name)
            if isinstance(obj, h5py.Group) and any(
                    isinstance(obj.get(k), h5py.Dataset) for k in ACMIL_FEATURES):
                return "acmil"
        where = f"{path} (feature file)"
        if isinstance(f.get("coords"), h5py.Dataset):
            raise BagError(where, "a patch-coordinates file (CLAM/TRIDENT patches): it holds "
                                  "no features; pass it as patches_h5 (--patches-h5) with the "
                                  f"feature file. Found: {_h5.members(f)}")
        raise BagError(where, "an HDF5 file but not a feature bag (CLAM, TRIDENT, ACMIL or "
                              f"napari-milview): no 'features' dataset; found: "
                              f"{_h5.members(f)}")


def _sniff(path: Path) -> str:
    problem = file_problem(path)
    if problem == "is a folder, not a file":
        raise BagError(path, "is a folder; pass one feature file (.h5 or .pt)")
    if problem is not None:  # by type, before anything opens it (a FIFO would block)
        raise BagError(path, "no such file" if problem == "no such file or folder" else problem)
    if _h5.is_hdf5(path):
        return _sniff_h5(path)
    if is_pt(path):
        return "pt"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise BagError(path, f"cannot read ({e})") from None
    if not head:
        raise BagError(path, "empty file: not a feature bag")
    raise BagError(path, "not a feature bag: neither an HDF5 file (CLAM, TRIDENT, ACMIL, "
                         f"napari-milview) nor a torch .pt file (it starts with {head!r})")


def sniff_bag(path: str | os.PathLike) -> str | None:
    """Which bag format ``path`` holds (a key of :data:`FORMATS`), or None. Never raises."""
    try:
        return _sniff(Path(os.fspath(path)))
    except Exception:  # noqa: BLE001 - a sniffer answers, it never raises
        return None


def load_bag(path: str | os.PathLike, *, patch_size_level0: int | None = None,
             patches_h5: str | os.PathLike | None = None, slide_id: str | None = None,
             mpp: float | None = None, encoder: str | None = None,
             require_extent: bool = True) -> Bag:
    """Read a bag from any supported feature file, whatever its suffix.

    Parameters
    ----------
    path
        CLAM ``h5_files/{slide}.h5`` or ``pt_files/{slide}.pt``, TRIDENT
        ``features_{enc}/{slide}.h5``, ACMIL ``patch_feats_pretrain_{p}.h5``, a ``.pt``
        bag, or our own h5 (:func:`save_bag`).
    patch_size_level0
        Patch extent in level-0 pixels; wins over anything in the files.
    patches_h5
        A CLAM/TRIDENT patches file giving the extent (CLAM's ``../patches/{slide}.h5`` is
        found automatically).
    slide_id
        Which slide of an ACMIL file; elsewhere it replaces the stored slide id.
    mpp
        Microns per level-0 pixel; wins over a stored value.
    encoder
        Encoder name, when the file does not say.
    require_extent
        Refuse a bag whose extent is unknown (default; DESIGN section 2). False lets
        callers that only need the features (``milview info``) through.

    Returns
    -------
    Bag
        features [N, D] float32, coords [N, 2] int64, with ``source`` naming path and format.

    Raises
    ------
    BagError
        Unknown or corrupt file, missing datasets (named, with what was found), a pickle
        asking to run code, an empty or all-NaN bag, or no extent when required.
    """
    p = Path(os.fspath(path))
    fmt = _sniff(p)
    kw: dict[str, Any] = {"patch_size_level0": patch_size_level0, "patches_h5": patches_h5,
                          "slide_id": slide_id, "mpp": mpp, "encoder": encoder}
    reader = {"milview": read_milview_h5, "trident": read_trident_h5, "clam": read_clam_h5,
              "acmil": read_acmil_h5, "pt": read_pt}[fmt]
    bag = reader(p, **kw)
    if require_extent:
        bag.require_extent()
    return bag
