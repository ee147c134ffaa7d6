"""A slide as napari layer data (Qt-free; napari is never imported here).

:func:`layer_data` is what the reader returns for a slide and what a sidecar restores;
:func:`is_slide_layer` recognises such a layer (its ``metadata["slide"]`` is the live
:class:`~napari_milview.slide.Slide`).
"""

from __future__ import annotations

import os

__all__ = ["is_slide_layer", "layer_data"]


def is_slide_layer(layer) -> bool:
    """True for a layer made by :func:`layer_data`: its ``metadata["slide"]`` is the live
    :class:`~napari_milview.slide.Slide`."""
    from ..slide import Slide

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
