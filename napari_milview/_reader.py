"""npe2 reader: OpenSlide formats and OME-Zarr folders -> one multiscale RGB layer; a
napari-milview sidecar (``*.milview.json``) -> slide, heatmap and top-K layers.

``napari_get_reader`` only sniffs content (cheap, never raises, None when not a slide or a
sidecar); the returned reader opens the file and raises one clear error if it cannot.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .slide.sniff import sniff

#: How much of a ``.json`` file is read to recognise a sidecar (its ``format`` comes first).
SIDECAR_SNIFF_BYTES = 4096


def napari_get_reader(path: Any):
    """The reader for ``path`` when it is a slide or a sidecar, else None."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        if not isinstance(path, (str, os.PathLike)):
            return None
        if is_sidecar(path):
            return read_sidecar_layers
        return read_slide if sniff(path) else None
    except Exception:  # noqa: BLE001 - get_reader never raises
        return None


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
    return layers_from_sidecar(path)


def is_slide_layer(layer) -> bool:
    """True for a layer made by :func:`layer_data`: its ``metadata["slide"]`` is the live
    :class:`~napari_milview.slide.Slide`."""
    from .slide.core import Slide

    return isinstance(getattr(layer, "metadata", {}).get("slide"), Slide)


def layer_data(slide) -> tuple[list, dict, str]:
    """The (data, kwargs, 'image') tuple napari adds for an opened :class:`Slide`."""
    info = slide.info
    data = slide.to_dask()
    w, h = info.dimensions
    metadata = {
        "path": info.path,
        "vendor": info.vendor,
        "level_dimensions": [(lv.shape[1], lv.shape[0]) for lv in info.levels],
        "level_downsamples": [lv.downsample for lv in info.levels],
        "level_tiles": [(lv.tile[1], lv.tile[0]) for lv in info.levels],
        "derived_levels": [i for i, lv in enumerate(info.levels) if lv.derived],
        "objective_power": info.objective_power,
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "units": info.units,
        "associated_images": list(info.associated),
        "notes": list(info.notes),
        # the live object: slide.associated_image('label'), slide.bad_tiles, slide.read_region
        "slide": slide,
    }
    kwargs = {
        "name": os.path.basename(os.path.normpath(info.path)),
        "rgb": True,
        "multiscale": True,
        "scale": info.scale(0),
        "units": (info.units, info.units) if info.mpp else None,
        "contrast_limits": (0, 255),
        # our bounded TileCache already holds decoded tiles: no second (napari) dask cache
        "cache": False,
        "metadata": metadata,
    }
    if kwargs["units"] is None:
        del kwargs["units"]
    return (data, kwargs, "image")


def read_slide(path: Any) -> list[tuple]:
    """Open ``path`` and return its layer; raises :class:`SlideError` with a clear message."""
    import warnings

    from .slide import open_slide

    if isinstance(path, (list, tuple)):
        path = path[0]
    slide = open_slide(path)
    for note in slide.info.notes:
        warnings.warn(f"{slide.path}: {note}", stacklevel=2)
    return [layer_data(slide)]
