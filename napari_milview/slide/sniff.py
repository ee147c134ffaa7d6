"""Cheap content sniffing: is this path a slide we can open? Never raises."""

from __future__ import annotations

import json
import os
from pathlib import Path

#: Suffixes OpenSlide reads; used only to pick which check to run, never to accept.
OPENSLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
)

#: Suffixes that only slides use: a TIFF with one of these is ours even when broken.
SLIDE_ONLY_SUFFIXES = (".svs", ".ndpi", ".scn", ".svslide", ".bif")

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in _TIFF_MAGICS


def _detect(path: Path) -> str | None:
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - a sniffer answers, it never raises
        return None


def _is_ome_zarr(path: Path) -> bool:
    """A folder whose root attributes hold NGFF ``multiscales`` (zarr v2 or v3)."""
    for name, key in ((".zattrs", None), ("zarr.json", "attributes")):
        f = path / name
        if not f.is_file():
            continue
        try:
            if f.stat().st_size > 10 * 2**20:
                return False
            attrs = json.loads(f.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return False
        if key is not None:
            attrs = attrs.get(key, {}) if isinstance(attrs, dict) else {}
        if isinstance(attrs, dict) and "ome" in attrs and isinstance(attrs["ome"], dict):
            attrs = attrs["ome"]  # NGFF 0.5 nests under "ome"
        if isinstance(attrs, dict) and isinstance(attrs.get("multiscales"), list):
            return True
    return False


def sniff(path: str | os.PathLike) -> str | None:
    """Which backend would open ``path``: 'openslide', 'ome-zarr' or None.

    Looks at content, not the suffix: a PNG renamed ``.svs`` gives None. Cheap (reads a
    few bytes, or asks OpenSlide's format detector for non-TIFF vendor formats) and never
    raises.
    """
    try:
        p = Path(os.fspath(path))
        if p.is_dir():
            return "ome-zarr" if _is_ome_zarr(p) else None
        if not p.is_file():
            return None
        suffix = p.suffix.lower()
        if _is_tiff(p):
            # a tiled TIFF OpenSlide recognises, or a broken file with a slide-only suffix
            # (claimed so the reader can explain what is wrong with it); an ordinary
            # stripped .tif photo is left to napari's own readers.
            return "openslide" if (_detect(p) or suffix in SLIDE_ONLY_SUFFIXES) else None
        if suffix in OPENSLIDE_SUFFIXES:
            # MRXS / VMS / VMU are not TIFFs: OpenSlide's detector reads their headers only.
            return "openslide" if _detect(p) else None
        return None
    except Exception:  # noqa: BLE001
        return None
