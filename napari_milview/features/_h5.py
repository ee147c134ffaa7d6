"""Small h5py helpers shared by the bag readers: open, list, read, decode attributes.

Every failure becomes a :class:`BagError` naming the file, its format and what is missing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .._io import decode_attr as decode
from .bag import BagError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: What h5py raises on a damaged file, wherever in the file the damage is.
_CORRUPT = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def is_hdf5(path: Path) -> bool:
    """The HDF5 signature at offset 0 or at a user-block offset (512, 1024, 2048, ...)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            offset = 0
            while offset + 8 <= size:
                f.seek(offset)
                if f.read(8) == HDF5_MAGIC:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False
    return False


@contextlib.contextmanager
def open_h5(path: str | os.PathLike, fmt: str) -> Iterator[Any]:
    """Open ``path`` read-only; a file that is not HDF5 or is corrupt gives a BagError."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise BagError(p, "no such file" if not p.exists() else "not a file")
    where = f"{p} ({fmt})"
    if not os.access(p, os.R_OK):
        raise BagError(where, "cannot read the file (permission denied)")
    try:
        # no HDF5 file locks: reading only, and they fail on many network file systems
        # (NFS "unable to lock file"); our own writes are atomic renames
        f = h5py.File(p, "r", locking=False)
    except Exception as e:  # noqa: BLE001 - h5py raises OSError, RuntimeError, ...
        what = "not an HDF5 file" if not is_hdf5(p) else "a corrupt or truncated HDF5 file"
        raise BagError(where, f"{what} ({e})") from None
    try:
        yield f
    except BagError:
        raise
    except _CORRUPT as e:
        # HDF5 reports a damaged heap, B-tree or link table as one of these, at any access
        raise BagError(where, f"a corrupt or truncated HDF5 file ({type(e).__name__}: {e})"
                       ) from None
    finally:
        f.close()


def members(group: Any) -> str:
    """'coords (dataset [120, 2] int32), slide_1 (group)' - what a group holds, for messages."""
    import h5py

    out = []
    for i, name in enumerate(group):
        if i == 10:
            out.append(f"... ({len(group) - 10} more)")
            break
        try:
            obj = group[name]
        except _CORRUPT:
            out.append(f"{name} (unreadable)")
            continue
        if isinstance(obj, h5py.Dataset):
            out.append(f"{name} (dataset {list(obj.shape)} {obj.dtype})")
        else:
            out.append(f"{name} (group)")
    return ", ".join(out) if out else "nothing"


def dataset(group: Any, name: str, where: str) -> Any:
    """``group[name]`` as an h5py Dataset, or a BagError listing what the group holds."""
    import h5py

    try:
        obj = group.get(name)
    except _CORRUPT as e:
        raise BagError(where, f"cannot read {name!r} ({e})") from None
    if obj is None:
        loc = "" if group.name == "/" else f" in group {group.name!r}"
        raise BagError(where, f"no {name!r} dataset{loc}; found: {members(group)}")
    if not isinstance(obj, h5py.Dataset):
        raise BagError(where, f"{name!r} is a group, not a dataset; it holds: {members(obj)}")
    return obj


def read(group: Any, name: str, where: str) -> np.ndarray:
    """Read a whole dataset (bags are small); a read error becomes a BagError."""
    ds = dataset(group, name, where)
    if ds.dtype.kind not in "fiub":
        raise BagError(where, f"{name!r} holds {ds.dtype}, not numbers")
    try:
        return ds[()]
    except _CORRUPT as e:
        raise BagError(where, f"cannot read dataset {name!r} ({e}): corrupt file?") from None


def attrs(obj: Any) -> dict[str, Any]:
    """All attributes of an h5py object, decoded; unreadable ones are skipped."""
    out: dict[str, Any] = {}
    try:
        keys = list(obj.attrs.keys())
    except _CORRUPT:
        return out
    for k in keys:
        try:
            out[k] = decode(obj.attrs[k])
        except _CORRUPT:
            continue
    return out


def text(value: Any) -> str | None:
    """A string attribute, or None when absent or empty."""
    if value is None:
        return None
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None
        if value is None:
            return None
    s = str(value).strip()
    return s or None
