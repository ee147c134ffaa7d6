"""Patch extent in level-0 pixels: from coords attributes, patch-coordinate files, or the user.

CLAM feature files carry no geometry: the extent lives in the patching run's
``patches/{slide}.h5`` (dataset ``coords`` with attributes ``patch_size`` at ``patch_level``
and ``downsample``). TRIDENT writes ``patch_size_level0`` on ``coords`` directly, in its
patches file ``{slide}_patches.h5`` and copied into its feature files.

Rules (``reference/algorithms.md`` sections 2.6, 6.3, 6.4):

* ``patch_size_level0`` present -> that.
* else ``patch_size x downsample[patch_level] x custom_downsample`` (the last when present),
  rounded to whole pixels. ``downsample`` may be CLAM's ``(dx, dy)`` of the patch level, a
  per-level table ``[[dx, dy], ...]`` or per-level scalars, or one number.
* A user-given extent always wins (a warning when it contradicts the file).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import _h5
from .bag import BagError, BagWarning, _positive_float, _positive_int

__all__ = ["PATCHES_FORMAT", "extent_from_coords_attrs", "find_patches_h5", "resolve_mpp",
           "read_patches_extent", "resolve_extent"]

PATCHES_FORMAT = "patch-coordinates h5"


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise BagError(where, f"attribute {what}={value!r} is not a number") from None
    if not math.isfinite(x) or x <= 0:
        raise BagError(where, f"attribute {what}={value!r} must be positive")
    return x


def _level_downsample(ds: Any, level: int | None, where: str) -> tuple[float, float]:
    """(dx, dy) of the patch level from CLAM's ``downsample`` attribute in its many shapes."""
    try:
        arr = np.asarray(ds, dtype=np.float64)
    except (TypeError, ValueError):
        raise BagError(where, f"attribute downsample={ds!r} is not numeric") from None
    if arr.ndim == 0:
        pair = (float(arr), float(arr))
    elif arr.ndim == 1 and arr.size == 2:
        dx, dy = float(arr[0]), float(arr[1])
        if abs(dx - dy) <= 0.05 * max(dx, dy):
            pair = (dx, dy)  # CLAM: the patch level's (dx, dy)
        elif dx == 1.0 and level in (0, 1):
            pair = (float(arr[level]),) * 2  # per-level scalars of a two-level slide
        else:
            raise BagError(where, f"attribute downsample={arr.tolist()} is neither a square "
                                  "(dx, dy) pair nor a per-level list")
    elif arr.ndim == 1 and arr.size > 2:
        if level is None:
            raise BagError(where, "attribute downsample is a per-level list but patch_level "
                                  "is missing")
        if not 0 <= level < arr.size:
            raise BagError(where, f"patch_level {level} but downsample lists {arr.size} levels")
        pair = (float(arr[level]),) * 2
    elif arr.ndim == 2 and arr.shape[1] == 2:
        if level is None:
            raise BagError(where, "attribute downsample is a per-level table but patch_level "
                                  "is missing")
        if not 0 <= level < arr.shape[0]:
            raise BagError(where, f"patch_level {level} but downsample lists "
                                  f"{arr.shape[0]} levels")
        pair = (float(arr[level, 0]), float(arr[level, 1]))
    else:
        raise BagError(where, f"attribute downsample has an unexpected shape {arr.shape}")
    for v in pair:
        if not math.isfinite(v) or v <= 0:
            raise BagError(where, f"attribute downsample={arr.tolist()} must be positive")
    return pair


def extent_from_coords_attrs(attrs: dict[str, Any], where: str) -> tuple[int, str] | None:
    """Level-0 patch extent from the attributes on a ``coords`` dataset, or None.

    Returns
    -------
    (int, str) or None
        The extent in level-0 pixels and how it was derived (for messages), or None when
        the attributes do not say (no ``patch_size_level0``, no CLAM ``patch_size``).

    Raises
    ------
    BagError
        Attributes that are present but contradictory or malformed.
    """
    if attrs.get("patch_size_level0") is not None:
        v = _number(attrs["patch_size_level0"], "patch_size_level0", where)
        if v != int(v):
            raise BagError(where, f"attribute patch_size_level0={v} is not a whole number")
        return int(v), "attribute patch_size_level0"
    if attrs.get("patch_size") is None:
        return None
    ps = _number(attrs["patch_size"], "patch_size", where)
    level_raw = attrs.get("patch_level")
    level: int | None = None
    if level_raw is not None:
        try:
            level = int(np.asarray(level_raw).reshape(()))
        except (TypeError, ValueError):
            raise BagError(where, f"attribute patch_level={level_raw!r} is not an integer"
                           ) from None
        if level < 0:
            raise BagError(where, f"attribute patch_level={level} is negative")
    ds = attrs.get("downsample")
    if ds is None:
        if level == 0:
            dx = dy = 1.0
        elif level is None:
            # a bare patch_size (TRIDENT's is at the target magnification): not level 0
            return None
        else:
            raise BagError(where, f"patch_level {level} but no 'downsample' attribute: the "
                                  "level-0 extent cannot be derived")
    else:
        dx, dy = _level_downsample(ds, level, where)
    custom = attrs.get("custom_downsample")
    factor = _number(custom, "custom_downsample", where) if custom is not None else 1.0
    ex, ey = ps * dx * factor, ps * dy * factor
    if abs(ex - ey) > 0.01 * max(ex, ey):
        raise BagError(where, f"patches are not square at level 0 ({ex:g} x {ey:g} px)")
    extent = int(round((ex + ey) / 2))
    how = (f"patch_size {ps:g} at level {level if level is not None else '?'} x downsample "
           f"{(dx + dy) / 2:g}")
    if factor != 1.0:
        how += f" x custom_downsample {factor:g}"
    return extent, how


def read_patches_extent(path: str | os.PathLike, expect_n: int | None = None
                        ) -> tuple[int, str]:
    """Extent recorded by a patch-coordinates file (CLAM ``patches/{slide}.h5``, TRIDENT
    ``{slide}_patches.h5``).

    Parameters
    ----------
    path
        The patches file: dataset ``coords`` [M, 2] with geometry attributes.
    expect_n
        Number of patches of the bag it is meant for; a different M is refused (a patches
        file of another slide or another run would place the heatmap wrongly).

    Returns
    -------
    (int, str)
        Extent in level-0 pixels and a description naming the file.
    """
    p = Path(path)
    where = f"{p} ({PATCHES_FORMAT})"
    with _h5.open_h5(p, PATCHES_FORMAT) as f:
        ds = _h5.dataset(f, "coords", where)
        found = extent_from_coords_attrs(_h5.attrs(ds), where)
        if found is None:
            have = ", ".join(sorted(_h5.attrs(ds))) or "none"
            raise BagError(where, "no patch geometry on 'coords' (need patch_size_level0, or "
                                  f"patch_size with patch_level and downsample); attributes "
                                  f"found: {have}")
        m = int(ds.shape[0]) if ds.ndim else 0
    if expect_n is not None and m != expect_n:
        raise BagError(where, f"lists {m} patches but the features have {expect_n}: not the "
                              "same slide or patching run (pass --patch-size-level0 to "
                              "override)")
    return found[0], f"{p.name}: {found[1]}"


def find_patches_h5(features_path: str | os.PathLike) -> Path | None:
    """The patches file CLAM's layout puts next to a feature file, or None.

    ``.../h5_files/{slide}.h5`` or ``.../pt_files/{slide}.pt`` -> ``.../patches/{slide}.h5``
    (or TRIDENT's ``{slide}_patches.h5`` there).
    """
    p = Path(features_path).absolute()
    folder = p.parent.parent / "patches"
    for name in (f"{p.stem}.h5", f"{p.stem}_patches.h5"):
        cand = folder / name
        try:
            if cand.is_file() and cand.resolve() != p.resolve():
                return cand
        except OSError:
            continue
    return None


def resolve_extent(where: str, n: int, *, user: Any = None,
                   patches_h5: str | os.PathLike | None = None,
                   in_file: tuple[int, str] | None = None,
                   auto_patches: Path | None = None) -> tuple[int | None, str | None]:
    """Pick the extent: user > explicit patches file > the file's own attributes > a
    patches file found next to it. Returns (extent or None, where it came from)."""
    candidates: list[tuple[int, str]] = []
    if patches_h5 is not None:
        candidates.append(read_patches_extent(patches_h5, expect_n=n))
    if in_file is not None:
        candidates.append(in_file)
    if user is not None:
        value = _positive_int(user, "the given patch_size_level0", where)
        for ext, how in candidates:
            if ext != value:
                warnings.warn(f"{where}: using the given patch extent {value} px, not {ext} px "
                              f"({how})", BagWarning, stacklevel=3)
        return value, "user"
    if candidates:
        chosen = candidates[0]
        for ext, how in candidates[1:]:
            if ext != chosen[0]:
                warnings.warn(f"{where}: using {chosen[0]} px ({chosen[1]}), not {ext} px "
                              f"({how})", BagWarning, stacklevel=3)
        return chosen
    if auto_patches is not None:
        return read_patches_extent(auto_patches, expect_n=n)
    return None, None


def resolve_mpp(where: str, *, user: Any = None, in_file: Any = None
                ) -> tuple[float | None, str | None]:
    """Microns per level-0 pixel: the user's value, else the file's; (value, source).

    A stored mpp that is zero, negative or not a number is ignored with a warning (the bag
    stays usable in pixel units); a bad user value is a BagError.
    """
    if user is not None:
        return _positive_float(user, "the given mpp", where), "user"
    if in_file is None:
        return None, None
    try:
        return _positive_float(in_file, "mpp", where), "file"
    except BagError:
        warnings.warn(f"{where}: ignoring stored mpp={in_file!r} (not a positive number)",
                      BagWarning, stacklevel=3)
        return None, None
