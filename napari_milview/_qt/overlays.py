"""The layers one slide layer's MIL results are drawn with: heatmap and top-K, kept per slide.

A :class:`SlideOverlays` belongs to one slide layer: its runs' heatmap and top-K layers are
named for it (``attention (slide.svs)``), placed on it (its units, and its move through
``place``) and never touched by a run on another slide. It owns the layers' lifecycle:

- at Run, an empty *pending* heatmap layer (one transparent cell, no colour bar) takes the
  GUI cost of creating a layer at the click;
- the first real heatmap turns the colour bar on;
- a run that ends before any heatmap removes the pending layer, on a later turn of the event
  loop (never in the step that shows a notification);
- a run that ends after partial heatmaps keeps that layer, renamed and marked partial.

Why a layer with a colour bar is never removed by this package: under software OpenGL
(Mesa llvmpipe, Xvfb) napari 0.9 / vispy 0.17 crash in ``glDrawArrays`` on the first draw
after an Image layer whose colour bar has been shown is removed (plain napari does the same:
add an image, show its colour bar, remove it, pan -> segmentation fault). A user may still
remove such a layer; our code only renames and marks it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..overlay.heatmap import PENDING
from ._common import slide_mpp

__all__ = ["SlideOverlays", "install_status", "raw_score_at", "remove_later", "same_file"]


def remove_later(viewer, layer) -> None:
    """Remove ``layer`` from ``viewer`` on a later turn of the event loop (if still there).

    Never in the step that handles a run's end, a dock's close or a notification: nothing
    refers to the widget, which may be deleted by then."""
    from qtpy.QtCore import QTimer

    def remove() -> None:
        if layer in viewer.layers:
            viewer.layers.remove(layer)

    QTimer.singleShot(0, remove)


class SlideOverlays:
    """What the MIL dock shows on one slide layer.

    Attributes
    ----------
    slide_layer : napari Image layer or None
        The slide (None: a result opened with no slide layer).
    result : Result or None
        The last complete result on this slide.
    shown : Result or None
        The result drawn now (a partial one while a run streams, or after it was stopped).
    heatmap, topk : napari layers or None
    indices : np.ndarray
        [K] int64, the bag rows the top-K layer shows.
    bag_source : str or None
        Where the result's features came from (for the sidecar).
    ended : str
        Why a partial result stays on screen: ``""`` or "cancelled after 32 of 539 patches".
    restored_from : str
        The sidecar its layers were restored from (``""``: made here).
    bag, model, bag_result : the last run's bag (its cached features), ``(model, card)`` and
        the result they made (the Evidence section re-runs the model on them while
        ``bag_result is result``); None for a result opened from a file.
    """

    def __init__(self, viewer, slide_layer, place: Callable[[Any, Any], None]):
        self.viewer = viewer
        self.slide_layer = slide_layer
        self._place = place  # (overlay layer, slide layer) -> keeps it where the slide is
        self.result = None
        self.shown = None
        self.heatmap = None
        self.topk = None
        self.indices = np.zeros(0, np.int64)
        self.bag_source: str | None = None
        self.ended = ""
        self.restored_from = ""
        self.bag = self.model = self.bag_result = None

    # ------------------------------------------------------------------ names, units
    def name(self, what: str) -> str:
        """``what (slide name)``; ``what`` alone without a slide layer."""
        return f"{what} ({self.slide_layer.name})" if self.slide_layer is not None else what

    def heatmap_name(self) -> str:
        """``attention (slide)``; ``attention, partial: cancelled after ... (slide)`` while a
        stopped run's partial heatmap is shown."""
        return self.name(f"attention, partial: {self.ended}" if self.ended else "attention")

    def units(self) -> dict:
        """The slide's units as layer kwargs: one layer in pixels beside a slide in microns
        turns napari's units off for every layer."""
        return {"units": tuple(self.slide_layer.units)} if self.slide_layer is not None else {}

    def alive(self, layer) -> bool:
        return layer is not None and layer in self.viewer.layers

    def mpp(self) -> float | None:
        """Microns per level-0 pixel the layers are placed with: the slide layer's, else
        (no slide layer) the shown result's."""
        if self.slide_layer is not None:
            return slide_mpp(self.slide_layer)
        return self.shown.mpp if self.shown is not None else None

    def forget_removed(self) -> None:
        """Drop references to layers the user removed."""
        if not self.alive(self.heatmap):
            self.heatmap = None
        if not self.alive(self.topk):
            self.topk = None

    # ------------------------------------------------------------------ heatmap
    def add_heatmap(self, data: np.ndarray, kwargs: dict, pending: bool = False):
        """A new heatmap Image layer (``kwargs`` as ``overlay.heatmap.heatmap_layer`` gives
        them; name and units are ours); its colour bar on unless ``pending``."""
        kwargs = {k: v for k, v in kwargs.items() if k != "name"}
        kwargs.update(self.units())
        layer = self.viewer.add_image(data, name=self.heatmap_name(), **kwargs)
        layer.colorbar.visible = not pending
        install_status(layer)
        self._place(layer, self.slide_layer)
        self.heatmap = layer
        return layer

    def pending(self) -> bool:
        """The heatmap layer is the empty one made at Run."""
        return self.alive(self.heatmap) and self.heatmap.metadata.get("milview") == PENDING

    def set_heatmap(self, data: np.ndarray, kwargs: dict) -> None:
        """Update the existing heatmap layer in place, setting only what changed (each
        setter re-slices the layer on the GUI thread)."""
        layer = self.heatmap
        cl = kwargs["contrast_limits"]
        layer.metadata = kwargs["metadata"]
        for key in ("scale", "translate"):
            if tuple(getattr(layer, key)) != tuple(kwargs[key]):
                setattr(layer, key, kwargs[key])
        units = self.units().get("units")
        if units is not None and tuple(layer.units) != units:
            layer.units = units
        layer.data = data
        if tuple(layer.contrast_limits_range) != tuple(cl):  # each redraws the colour bar
            layer.contrast_limits_range = cl
        if tuple(layer.contrast_limits) != tuple(cl):
            layer.contrast_limits = cl
        for key in ("colormap", "opacity", "interpolation2d"):
            now = getattr(layer, key)
            now = now.name if key == "colormap" else now
            if str(now) != str(kwargs[key]):
                setattr(layer, key, kwargs[key])
        name = self.heatmap_name()
        if layer.name != name:
            layer.name = name
        if self.ended:
            layer.metadata = {**layer.metadata, "partial": self.ended}
        if not layer.colorbar.visible:
            layer.colorbar.visible = True

    def set_topk(self, data, kwargs: dict, name: str) -> None:
        """Show the top-K rectangles (``overlay.topk.topk_layer``'s data and kwargs) as the
        Shapes layer ``name``: updated in place when the count is unchanged, else replaced at
        the same place in the layer list (a Shapes layer has no colour bar: safe to remove),
        the user's active layer kept active."""
        layer = self.topk
        if self.alive(layer) and layer.nshapes == len(data) > 0:
            layer.data = list(data)
            layer.features = kwargs["features"]
            layer.metadata = kwargs["metadata"]
            layer.name = name
            return
        from napari.layers import Shapes

        layers = self.viewer.layers
        active = layers.selection.active
        index = None
        if self.alive(layer):
            index = layers.index(layer)
            layers.remove(layer)
        kwargs = {k: v for k, v in kwargs.items() if k != "name"}
        new = Shapes(data if len(data) else np.zeros((0, 4, 2)), name=name, **kwargs)
        if index is None:
            layers.append(new)
        else:
            layers.insert(index, new)
        self.topk = new
        self._place(new, self.slide_layer)
        keep = active if active is not None and active in layers and active is not layer \
            else self.heatmap
        if keep is not None:
            layers.selection.active = keep

    def drop_pending(self) -> None:
        """Remove the pending heatmap layer (it never showed a colour bar), later."""
        if self.pending():
            layer, self.heatmap = self.heatmap, None
            remove_later(self.viewer, layer)

    def mark_ended(self, why: str) -> None:
        """A run stopped after partial heatmaps: the heatmap stays, named and marked as
        partial (``why``: "cancelled after 32 of 539 patches")."""
        self.ended = why
        if self.alive(self.heatmap) and not self.pending():
            self.heatmap.name = self.heatmap_name()
            self.heatmap.metadata = {**self.heatmap.metadata, "partial": why}


def same_file(a, b) -> bool:
    """Two paths name the same file (None never does)."""
    from pathlib import Path

    if not a or not b:
        return False
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def raw_score_at(layer, position, world: bool = True) -> float | None:
    """The raw score of a heatmap layer's source at a position, None outside the patches.

    Parameters
    ----------
    position : sequence of float
        (row, col) in world (``world=True``) or heatmap data coordinates.
    """
    pos = np.asarray(position, dtype=float)
    data = layer.world_to_data(pos) if world else pos
    raw = layer.metadata.get("raw_grid")
    if raw is None:
        return None
    r, c = (int(np.floor(v + 0.5)) for v in data[-2:])
    if not (0 <= r < raw.shape[0] and 0 <= c < raw.shape[1]):
        return None
    v = float(raw[r, c])
    return v if np.isfinite(v) else None


def install_status(layer) -> None:
    """Make the heatmap layer's status line end with the raw score under the cursor.

    napari builds the status bar from the active layer's ``get_status``; this wraps it for
    this one layer (the Image class is untouched).
    """
    import weakref

    lref = weakref.ref(layer)
    base = type(layer).get_status

    def get_status(position=None, *, view_direction=None, dims_displayed=None, world=False,
                   value=None):
        lyr = lref()
        status = base(lyr, position, view_direction=view_direction,
                      dims_displayed=dims_displayed, world=world, value=value)
        if lyr is None or position is None or not isinstance(status, dict):
            return status
        v = raw_score_at(lyr, position, world=world)
        if v is not None:
            src = lyr.metadata.get("source", "")
            status["coordinates"] = f"{status.get('coordinates', '')}; raw {src} = {v:.6g}"
        return status

    layer.get_status = get_status
