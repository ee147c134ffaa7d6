"""Small file helpers the whole package shares (a package-level module: any subpackage may
import it; it imports nothing of ours).

* :func:`atomic_write` - every file the package writes appears complete or not at all;
* :func:`fingerprint` - a cheap identity of a slide or weights file (cohort markers, the
  robustness run's cache keys);
* :func:`decode_attr` - an HDF5 attribute as plain Python (bag and result readers);
* :func:`file_problem` - why a path is not a regular file we may open (a FIFO, a folder, a
  symlink loop ...), found with ``os.stat`` alone: bag and checkpoint readers ask it before
  they open anything, so a named pipe never blocks a reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

_MIB = 1 << 20


class OneLineError(ValueError):
    """An input that cannot be used, as one line ``"<where>: <problem>"``.

    ``where`` names the file (or object); ``problem`` is folded to one line whatever a
    library's message held (napari shows it in a notification, the CLI on stderr).
    Subclasses name their kind (:class:`~napari_milview.features.bag.BagError` ...) and
    ``default_where``, used when ``where`` is empty.
    """

    default_where = ""

    def __init__(self, where: Any, problem: str):
        self.where = str(where) if str(where) else self.default_where
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.where}: {self.problem}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` for a temporary path in ``path``'s folder, flush it to disk, then
    rename it onto ``path``; on any error the temporary file is removed and ``path`` is
    untouched.

    Raises
    ------
    FileNotFoundError
        The folder does not exist (the message names it).
    """
    dest = Path(path)
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"{dest}: folder {dest.parent} does not exist")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:  # the data is on disk before the name points at it
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return dest


def fingerprint(path: str | os.PathLike) -> dict:
    """A cheap identity of a slide (or weights) file: size, mtime and a hash of its ends.

    ``sha256`` covers the size, the first MiB and the last MiB: at most 2 MiB are read, so a
    2 GB slide costs what a 2 MB one does. Any change of size or modification time, or of the
    bytes at either end (where TIFF headers, the first tiles and the last directories live),
    changes the fingerprint; an edit confined to the middle of a file that also keeps its size
    and mtime is not seen. A folder (OME-Zarr) hashes the relative path, size and mtime of
    every file below it.

    Returns
    -------
    dict
        ``{"size": int, "mtime_ns": int, "sha256": str}`` (size and mtime of a folder: total
        and newest).

    Raises
    ------
    FileNotFoundError
        The path does not exist (the message names it).
    """
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        size = mtime = 0
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            st = f.stat()
            size += st.st_size
            mtime = max(mtime, st.st_mtime_ns)
            h.update(f"{f.relative_to(p).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"size": size, "mtime_ns": mtime, "sha256": h.hexdigest()}
    try:
        st = p.stat()
        with open(p, "rb") as fh:
            h = hashlib.sha256(str(st.st_size).encode())
            h.update(fh.read(_MIB))
            if st.st_size > _MIB:
                fh.seek(max(_MIB, st.st_size - _MIB))
                h.update(fh.read(_MIB))
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such file") from None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


_SPECIAL = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def special_kind(mode: int) -> str | None:
    """What a ``stat`` mode that is neither a regular file nor a folder is ("a named pipe
    (FIFO)", "a socket", "a character device", "a block device", else "an unusual file");
    None for regular files and folders. Such a path must never be opened: reading a FIFO
    blocks until someone writes."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((what for test, what in _SPECIAL if test(mode)), "an unusual file")


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a regular, readable file, or None when it is one.

    Only ``os.stat`` / ``os.lstat`` are called: the file is never opened, so a named pipe
    or a device cannot block the caller.

    Returns
    -------
    str or None
        ``"no such file or folder"``, ``"is a broken symlink (its target does not
        exist)"``, ``"is a symlink loop"``, ``"is a folder, not a file"``, ``"is a named pipe
        (FIFO), not a regular file; refused unopened"`` (likewise socket, character and
        block device), ``"cannot be read (permission denied)"``, ``"cannot be examined
        (...)"``; None for a regular file this process may read.
    """
    import errno

    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop (a link that points back at itself), not a file"
        if e.errno == errno.ENOENT:
            if os.path.islink(p):
                return "is a broken symlink (its target does not exist)"
            return "no such file or folder"
        if e.errno == errno.ENAMETOOLONG:
            return "the path is too long"
        if e.errno == errno.ENOTDIR:
            return "no such file or folder (a part of the path is a file, not a folder)"
        if e.errno == errno.EACCES:
            return "cannot be examined (permission denied on its folder)"
        return f"cannot be examined ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a file"
    kind = special_kind(st.st_mode)
    if kind is not None:
        return f"is {kind}, not a regular file; refused unopened"
    if not os.access(p, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def decode_attr(value: Any) -> Any:
    """An HDF5 attribute as plain Python: str for bytes, int/float for numpy scalars."""
    import numpy as np  # here, so that importing this module stays light

    if isinstance(value, bytes | np.bytes_):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return decode_attr(value[()])
        if value.dtype.kind in "SO":
            return [decode_attr(v) for v in value.tolist()]
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value
