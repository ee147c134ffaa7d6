"""Cheap content sniffing: is this path a slide we can open? Never raises."""

from __future__ import annotations

import configparser
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


def not_regular(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is neither a regular file nor a folder ("a named pipe
    (FIFO)", "a socket", ...), from ``stat`` alone: such a path is never opened (opening a
    FIFO for reading blocks until someone writes). None for files, folders, missing paths."""
    from .._io import special_kind

    try:
        return special_kind(os.stat(path).st_mode)
    except (OSError, ValueError):
        return None


def _json_problem(f: Path) -> tuple[object, str | None]:
    """(the parsed JSON of ``f``, None) or (None, what is wrong with it)."""
    try:
        if f.stat().st_size > 10 * 2**20:
            return None, f"{f.name} is {f.stat().st_size} bytes, too large for metadata"
        return json.loads(f.read_bytes().decode("utf-8")), None
    except UnicodeDecodeError:
        return None, f"{f.name} is not valid JSON (not UTF-8 text)"
    except json.JSONDecodeError as e:
        return None, f"{f.name} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    except OSError as e:
        return None, f"{f.name} cannot be read ({e.strerror or e})"


def diagnose_zarr(path: str | os.PathLike) -> str | None:
    """What is wrong with a folder that looks like zarr (it holds ``.zattrs``, ``.zgroup``
    or ``zarr.json``) but is not an OME-Zarr image, or None when it does not look like zarr
    at all (or is fine). Never raises."""
    try:
        p = Path(os.fspath(path))
        v3, attrs_file, group = p / "zarr.json", p / ".zattrs", p / ".zgroup"
        if v3.is_file():
            doc, why = _json_problem(v3)
            if why:
                return why
            attrs = doc.get("attributes") if isinstance(doc, dict) else None
            where = "zarr.json 'attributes'"
        elif attrs_file.is_file():
            attrs, why = _json_problem(attrs_file)
            if why:
                return why
            where = ".zattrs"
        elif group.is_file() or (p / ".zarray").is_file():
            return ("a zarr folder without attributes (no .zattrs): not an OME-Zarr image "
                    "(no 'multiscales')")
        else:
            return None
        if isinstance(attrs, dict) and isinstance(attrs.get("ome"), dict):
            attrs = attrs["ome"]
        if not isinstance(attrs, dict) or "multiscales" not in attrs:
            return (f"a zarr folder whose {where} has no OME-Zarr 'multiscales': not an image "
                    "pyramid")
        if not isinstance(attrs["multiscales"], list):
            return f"its {where} 'multiscales' is not a list"
        return None
    except Exception:  # noqa: BLE001 - a diagnosis never raises
        return None


def diagnose_mrxs(path: str | os.PathLike) -> str | None:
    """What is wrong with a MIRAX ``.mrxs`` slide, which is only an index: its data live
    in the folder of the same name beside it (``Slidedat.ini``, the index file and the
    ``Data*.dat`` files it lists). None when nothing is seen missing. Never raises."""
    try:
        p = Path(os.fspath(path))
        folder = p.with_suffix("")
        name = folder.name
        if not folder.exists():
            return (f"a MIRAX .mrxs file is only an index: its data folder '{name}' is missing "
                    "(copy it next to the .mrxs)")
        if not folder.is_dir():
            return f"its MIRAX data folder '{name}' is not a folder"
        if not any(folder.iterdir()):
            return f"its MIRAX data folder '{name}' is empty"
        ini = folder / "Slidedat.ini"
        if not ini.is_file():
            return f"its MIRAX data folder '{name}' has no Slidedat.ini"
        if ini.stat().st_size > 10 * 2**20:
            return f"its {name}/Slidedat.ini is too large to be a MIRAX index"
        cp = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            cp.read_string(ini.read_bytes().decode("utf-8-sig", errors="replace"))
        except configparser.MissingSectionHeaderError:
            return (f"its {name}/Slidedat.ini is not a MIRAX index (not an INI file: no "
                    "[section] header at its start)")
        except configparser.Error as e:
            return (f"its {name}/Slidedat.ini is not a MIRAX index (not an INI file: "
                    f"{type(e).__name__})")
        if not cp.has_section("DATAFILE") or not cp.has_section("HIERARCHICAL"):
            return (f"its {name}/Slidedat.ini is not a MIRAX index (no [DATAFILE] or "
                    "[HIERARCHICAL] section)")
        files = [cp.get("DATAFILE", k) for k in cp.options("DATAFILE")
                 if k.startswith("file_") and k != "file_count"]
        index = cp.get("HIERARCHICAL", "INDEXFILE", fallback=None)
        if not files:
            return f"its {name}/Slidedat.ini lists no data files"
        missing = [f for f in ([index] if index else []) + files
                   if not (folder / f.strip()).is_file()]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more"
                                              if len(missing) > 3 else "")
            return f"its MIRAX data folder '{name}' lacks the files Slidedat.ini lists: {shown}"
        return None
    except Exception:  # noqa: BLE001
        return None
