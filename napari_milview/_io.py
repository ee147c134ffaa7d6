"""Atomic file writes: every file the package writes appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
