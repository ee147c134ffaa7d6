"""User overrides of microns-per-pixel, remembered per slide file.

Stored as JSON in ``$MILVIEW_CONFIG_DIR`` (default ``~/.config/napari-milview``), keyed by
the file's real path and size, so a copy with the same name elsewhere is not confused.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def config_dir() -> Path:
    env = os.environ.get("MILVIEW_CONFIG_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "napari-milview"


def _store() -> Path:
    return config_dir() / "mpp_overrides.json"


def _key(path: str | os.PathLike) -> str:
    p = Path(path).resolve()
    size = p.stat().st_size if p.is_file() else 0
    return f"{p}|{size}"


def _load() -> dict[str, float]:
    try:
        data = json.loads(_store().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recall_mpp(path: str | os.PathLike) -> float | None:
    """The remembered override for ``path``, or None."""
    try:
        v = _load().get(_key(path))
    except OSError:
        return None
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


def remember_mpp(path: str | os.PathLike, mpp: float | None) -> None:
    """Remember (or, with None, forget) an override; written atomically."""
    data = _load()
    key = _key(path)
    if mpp is None:
        data.pop(key, None)
    else:
        data[key] = float(mpp)
    store = _store()
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=store.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, store)
    except OSError:
        pass  # a read-only home must not stop anyone from viewing a slide
