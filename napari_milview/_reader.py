"""npe2 reader: OpenSlide formats and OME-Zarr folders -> one multiscale RGB layer; a
napari-milview sidecar (``*.milview.json``) -> slide, heatmap and top-K layers; a heatmap
OME-TIFF written by :func:`~napari_milview.overlay.export.write_heatmap_tiff` -> its float grid.

``napari_get_reader`` only sniffs content (cheap, never raises). For a path with a slide
extension (:data:`SLIDE_PATTERNS`) it always answers: a plain TIFF goes to napari's own reader,
anything else that is not a slide gets a reader that raises one clear error naming the file and
what it is. Other paths that are not slides or sidecars give None.
"""

from __future__ import annotations

import os
import re
from fnmatch import fnmatch
from typing import Any

from .overlay.slide_layer import is_slide_layer, layer_data
from .slide.sniff import sniff

# napari layer data of a slide live in the core (``overlay.slide_layer``): the sidecar reader
# and the docks share them; these names stay here for callers of the reader
__all__ = ["SIDECAR_PATTERN", "SLIDE_FILE_PATTERNS", "SLIDE_PATTERNS", "content_kind",
           "has_slide_extension", "is_heatmap_tiff", "is_sidecar", "is_slide_layer",
           "layer_data", "napari_get_reader", "read_heatmap_tiff_layer", "read_plain_tiff",
           "read_sidecar_layers", "read_slide"]

#: How much of a ``.json`` file is read to recognise a sidecar (its ``format`` comes first).
SIDECAR_SNIFF_BYTES = 4096
#: The reader's ``filename_patterns`` for slide files (napari.yaml lists these, in this order,
#: then the folders and the sidecar); the patterns "Use napari-milview for slide files" sets.
SLIDE_FILE_PATTERNS = ("*.svs", "*.tif", "*.tiff", "*.ndpi", "*.vms", "*.vmu", "*.scn",
                       "*.mrxs", "*.svslide", "*.bif")
#: Every slide pattern of the manifest: the files and OME-Zarr folders.
SLIDE_PATTERNS = (*SLIDE_FILE_PATTERNS, "*.zarr")
SIDECAR_PATTERN = "*.milview.json"
#: Leading bytes of files people give a slide extension by mistake, and what the error calls
#: them (TIFF is not here: a TIFF with a slide extension is the slide backend's to explain).
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"), (b"GIF89a", "a GIF image"), (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "a gzip archive"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
)


def napari_get_reader(path: Any):
    """The reader for ``path`` (never raises).

    - a sidecar -> :func:`read_sidecar_layers`;
    - a heatmap OME-TIFF of ours -> :func:`read_heatmap_tiff_layer`;
    - a slide (by content) -> :func:`read_slide`;
    - a plain TIFF named ``.tif``/``.tiff`` -> :func:`read_plain_tiff` (napari's own reader);
    - any other existing path with a slide extension -> :func:`read_slide`, which raises one
      :class:`~napari_milview.slide.SlideError` saying what the file is;
    - anything else -> None.
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        if not isinstance(path, (str, os.PathLike)):
            return None
        if is_sidecar(path):
            return read_sidecar_layers
        if is_heatmap_tiff(path):
            return read_heatmap_tiff_layer
        if sniff(path):
            return read_slide
        if not (has_slide_extension(path) and os.path.exists(path)):
            return None
        if has_slide_extension(path, ("*.tif", "*.tiff")) and _is_readable_tiff(path):
            return read_plain_tiff
        return read_slide
    except Exception:  # noqa: BLE001 - get_reader never raises
        return None


def has_slide_extension(path: str | os.PathLike, patterns=SLIDE_PATTERNS) -> bool:
    """True when the name of ``path`` matches one of ``patterns`` (case-insensitive)."""
    name = os.path.basename(os.path.normpath(os.fspath(path))).lower()
    return any(fnmatch(name, pat) for pat in patterns)


def content_kind(path: str | os.PathLike) -> str | None:
    """What a file that is not a slide holds, for an error: "a PNG image", "a text file", ...

    None for folders, pipes and other non-regular files (never opened: a pipe would block),
    empty or unreadable files and unrecognised content. Reads 4 KB.
    """
    if not os.path.isfile(os.fspath(path)):
        return None
    try:
        with open(os.fspath(path), "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return None
    if not head:
        return None
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at 4 KB is still text
        if e.start < len(head) - 3:
            return None
        text = head[: e.start].decode("utf-8")
    if "\x00" not in text and all(c.isprintable() or c in "\t\r\n\f" for c in text):
        return "a text file"
    return None


def _is_readable_tiff(path: str | os.PathLike) -> bool:
    """True when tifffile can parse ``path`` and it has at least one image page."""
    try:
        import tifffile

        with tifffile.TiffFile(os.fspath(path)) as tf:
            return len(tf.pages) > 0
    except Exception:  # noqa: BLE001 - a sniffer answers, it never raises
        return False


def is_heatmap_tiff(path: str | os.PathLike) -> bool:
    """True for a heatmap OME-TIFF written by napari-milview (never raises)."""
    try:
        p = os.fspath(path)
        if not os.path.isfile(p):
            return False
        from .overlay.export import heatmap_tiff_info

        return heatmap_tiff_info(p) is not None
    except Exception:  # noqa: BLE001
        return False


def is_sidecar(path: str | os.PathLike) -> bool:
    """True when ``path`` is a ``.json`` file whose ``format`` is the sidecar's.

    Reads at most :data:`SIDECAR_SNIFF_BYTES` bytes: :func:`~napari_milview.overlay.export.
    write_sidecar` writes ``format`` as the first key. Never raises.
    """
    try:
        p = os.fspath(path)
        if not p.lower().endswith(".json") or not os.path.isfile(p):
            return False
        with open(p, "rb") as fh:
            head = fh.read(SIDECAR_SNIFF_BYTES).decode("utf-8", errors="replace")
    except (OSError, TypeError, ValueError):
        return False
    from .overlay.export import SIDECAR_FORMAT

    key = r'\s*\{\s*"format"\s*:\s*"' + re.escape(SIDECAR_FORMAT) + '"'
    return re.match(key, head) is not None


def read_sidecar_layers(path: Any) -> list[tuple]:
    """The slide, heatmap and top-K layers a sidecar restores (errors name the file)."""
    from .overlay.export import layers_from_sidecar

    if isinstance(path, (list, tuple)):
        path = path[0]
    layers = layers_from_sidecar(path)
    _colour_bar_when_added(str(path))
    return layers


def _colour_bar_when_added(where: str) -> None:
    """Turn the colour bar of the heatmap restored from sidecar ``where`` on once napari has
    added it (a reader returns layer data; an Image's colour bar is no constructor argument).
    """
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # noqa: BLE001 - no viewer (headless use): nothing to show
        return
    if viewer is None:
        return

    def on_inserted(event) -> None:
        layer = event.value
        md = getattr(layer, "metadata", {}) or {}
        if md.get("restored_from") == where and md.get("milview") == "heatmap":
            viewer.layers.events.inserted.disconnect(on_inserted)
            layer.colorbar.visible = True

    viewer.layers.events.inserted.connect(on_inserted)


def _one(path: Any) -> str:
    return os.fspath(path[0] if isinstance(path, (list, tuple)) else path)


def read_slide(path: Any) -> list[tuple]:
    """Open ``path`` and return its layer.

    Raises
    ------
    SlideError
        One line naming the file and the problem: what :func:`~napari_milview.slide.
        open_slide` says, or, for a file that is plainly something else, "not a
        whole-slide image: it is a PNG image" (a JPEG, a text file, ...).
    """
    import logging
    import warnings

    from .slide import SlideError, open_slide

    p = _one(path)
    if sniff(p) is None and (what := content_kind(p)) is not None:
        raise SlideError(p, f"not a whole-slide image: it is {what}")
    slide = open_slide(p)
    data, kwargs, kind = layer_data(slide)
    # notes that only inform (the slide says which) are logged; all stay in metadata["notes"]
    info = list(slide.info.info_notes)
    kwargs["metadata"]["info_notes"] = info
    for note in slide.info.notes:
        if note in info:
            logging.getLogger(__name__).info("%s: %s", slide.path, note)
        else:  # napari shows it as a toast: something the user can act on or should know
            warnings.warn(f"{slide.path}: {note}", stacklevel=2)
    return [(data, kwargs, kind)]


def read_plain_tiff(path: Any) -> list[tuple]:
    """A TIFF that is neither a slide nor our heatmap: read by napari's own (builtin) reader,
    so making napari-milview the reader for ``*.tif`` never stops other TIFFs from opening."""
    from napari_builtins.io import napari_get_reader as builtin_get_reader  # napari's manifest

    p = _one(path)
    return builtin_get_reader(p)(p)


def read_heatmap_tiff_layer(path: Any) -> list[tuple]:
    """A heatmap OME-TIFF of ours as one float image layer placed on its slide.

    Returns
    -------
    list[tuple]
        ``[(grid, kwargs, "image")]``: ``grid`` [H, W] float32 (NaN = no patch, drawn
        transparent); ``scale`` = cell x mpp µm (cell level-0 px without mpp) and ``translate``
        = the centre of cell (0, 0), as the slide layer places level-0 pixels; inferno, contrast
        limits from the finite values; ``metadata`` names the file and what it shows.
    """
    import numpy as np

    from .overlay.export import read_heatmap_tiff

    p = _one(path)
    grid, info = read_heatmap_tiff(p)
    cell, mpp = info["cell_level0"], info["mpp"]
    f = 1.0 if mpp is None else mpp
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    kwargs = {
        "name": os.path.basename(p),
        "scale": (cell * f, cell * f),
        "translate": ((cell / 2 - 0.5) * f, (cell / 2 - 0.5) * f),
        "colormap": "inferno",
        "contrast_limits": (lo, hi if hi > lo else lo + 1.0),
        "opacity": 0.5,
        "blending": "translucent",
        "interpolation2d": "nearest",
        "metadata": {"milview": "heatmap_tiff", "path": p, **info},
    }
    if mpp is not None:
        kwargs["units"] = ("um", "um")
    return [(grid, kwargs, "image")]
