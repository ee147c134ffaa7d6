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
from .._io import file_problem
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
    problem = file_problem(p)
    if problem is not None:
        raise BagError(p, "no such file" if problem == "no such file or folder" else problem)
    where = f"{p} ({fmt})"
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


#: No bag needs more rows or bytes than these (a slide at 40x holds < 10^7 patches); a
#: larger declared shape is a damaged or hostile file, refused before anything is allocated.
MAX_ROWS = 2**31 - 1
MAX_BYTES = 16 * 2**30
#: A declared size this many times the file's own is not compression but missing data.
_MAX_RATIO = 1000


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def check_storage(ds: Any, name: str, where: str) -> None:
    """Refuse a dataset whose data is not all in this file, before reading (or allocating) it.

    * a virtual dataset (its data lives in other files, and HDF5 reads a missing source as
      fill values): refused, naming its sources;
    * a declared shape beyond :data:`MAX_ROWS` rows or :data:`MAX_BYTES`, or over
      :data:`_MAX_RATIO` times the file's size;
    * nothing written, or chunks never written (HDF5 would return fill values, zeros).

    Raises
    ------
    BagError
        One line naming the dataset, its declared shape and what is wrong.
    """
    shape = tuple(int(n) for n in (ds.shape or ()))
    if ds.is_virtual:
        try:
            srcs = sorted({str(v.file_name) for v in ds.virtual_sources()})
        except _CORRUPT:  # pragma: no cover - an unreadable mapping
            srcs = ["(unreadable mapping)"]
        folder = Path(ds.file.filename).parent
        missing = [s for s in srcs if s != "." and not (folder / s).is_file()
                   and not Path(s).is_file()]
        why = (f"its source file(s) {', '.join(missing[:3])} are missing, which HDF5 reads "
               "as fill values" if missing else f"its data lives in {', '.join(srcs[:3])}")
        raise BagError(where, f"{name!r} is an HDF5 virtual dataset ({why}); virtual datasets "
                              "are not read: copy the data into the bag file")
    size = int(np.prod(shape, dtype=object)) if shape else 1
    nbytes = size * int(ds.dtype.itemsize)
    declared = f"{name!r} declares shape {list(shape)} ({_gib(nbytes)} of {ds.dtype})"
    if shape and shape[0] > MAX_ROWS:
        raise BagError(where, f"{declared}: more than {MAX_ROWS} rows is no bag (a damaged "
                              "or hostile file); refused before reading")
    if nbytes > MAX_BYTES:
        raise BagError(where, f"{declared}: over the {_gib(MAX_BYTES)} a bag may hold; "
                              "refused before reading")
    if size == 0:
        return
    try:
        stored = int(ds.id.get_storage_size())
        file_size = os.path.getsize(ds.file.filename)
        chunks = ds.chunks
        n_chunks = int(ds.id.get_num_chunks()) if chunks else None
    except _CORRUPT as e:
        raise BagError(where, f"cannot read dataset {name!r} ({e}): corrupt file?") from None
    if stored == 0:
        raise BagError(where, f"{declared} but holds no data (never written; HDF5 would "
                              "read fill values)")
    if nbytes > _MAX_RATIO * file_size + 64 * 2**20:
        raise BagError(where, f"{declared} but the file holds only {file_size} bytes: the "
                              "data is not there")
    if chunks:
        expected = 1
        for n, c in zip(shape, chunks, strict=True):
            expected *= -(-n // c)
        if n_chunks is not None and n_chunks < expected:
            raise BagError(where, f"{declared} but only {n_chunks} of its {expected} chunks "
                                  "were written (HDF5 would read the rest as fill values)")


def read(group: Any, name: str, where: str) -> np.ndarray:
    """Read a whole dataset (bags are small); a read error becomes a BagError.

    :func:`check_storage` runs first: virtual datasets, huge declared shapes and data
    never written are refused before any allocation.
    """
    ds = dataset(group, name, where)
    if ds.dtype.kind not in "fiub":
        raise BagError(where, f"{name!r} holds {ds.dtype}, not numbers")
    check_storage(ds, name, where)
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
