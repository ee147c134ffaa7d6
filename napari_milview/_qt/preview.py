"""The staining dock's Preview box: a lazily recoloured copy of the slide under a condition,
on top of the slide (toggle *Visible* to compare) or side by side, placed on the slide's own
world and moved with it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QCheckBox, QComboBox, QGridLayout, QGroupBox, QLabel, QPushButton

__all__ = ["GAP", "PLACEMENTS", "PreviewBox"]

#: side by side: gap between the slide and its preview, as a fraction of the slide's width
GAP = 0.05
#: preview placements: key -> label
PLACEMENTS = {"overlay": "On top", "side": "Side by side"}


class PreviewBox(QGroupBox):
    """Show preview, *Visible*, placement, and the preview layer itself (``layer``).

    ``wanted`` fires when the user asks for a preview; ``shown`` with the layer once it is
    drawn. ``place(overlay, slide_layer)`` (the dock's) keeps a layer on a moved slide.
    """

    wanted = Signal()
    shown = Signal(object)

    def __init__(self, viewer, place: Callable, parent=None):
        super().__init__("Preview", parent)
        self.viewer = viewer
        self._place_on = place
        self.layer = None
        self.slide_layer = None
        self.placement_combo = QComboBox()
        for key, label in PLACEMENTS.items():
            self.placement_combo.addItem(label, key)
        self.placement_combo.setToolTip("On top: toggle 'Visible' to compare with the slide")
        self.visible_check = QCheckBox("Visible")
        self.visible_check.setChecked(True)
        self.visible_check.setToolTip("On top: unchecked shows the original slide")
        self.button = QPushButton("Show preview")
        self.info = QLabel("")
        self.info.setWordWrap(True)
        g = QGridLayout(self)
        g.addWidget(self.button, 0, 0, 1, 2)
        g.addWidget(self.visible_check, 0, 2)
        g.addWidget(QLabel("Place"), 1, 0)
        g.addWidget(self.placement_combo, 1, 1, 1, 2)
        g.addWidget(self.info, 2, 0, 1, 3)
        self.placement_combo.currentIndexChanged.connect(self.place)
        self.visible_check.toggled.connect(self._on_visible)
        self.button.clicked.connect(self.wanted)

    def alive(self) -> bool:
        return self.layer is not None and self.layer in self.viewer.layers

    def show(self, pert, slide_layer) -> None:
        """Draw ``slide_layer``'s slide under the perturbation ``pert`` (only the chunks on
        screen are computed), in a new layer or the existing one."""
        from ..stain import lazy_preview

        self.slide_layer = slide_layer
        slide = slide_layer.metadata["slide"]
        data = lazy_preview(slide.to_dask(), pert)
        name = f"{pert.name} preview ({slide_layer.name})"
        meta = {"milview": "stain-preview", "condition": pert.name, "params": pert.params,
                "token": pert.token, "slide_path": str(slide.path)}
        if not self.alive():
            # perturbed chunks are not in the slide's tile cache: napari's dask cache keeps them
            self.layer = self.viewer.add_image(
                data, rgb=True, multiscale=True, scale=tuple(slide_layer.scale),
                units=tuple(slide_layer.units), contrast_limits=(0, 255), metadata=meta,
                name=name, cache=True)
        else:
            prev = self.layer
            prev.data = data
            prev.scale = tuple(slide_layer.scale)
            prev.units = tuple(slide_layer.units)  # the slide picked now may be another one
            prev.metadata = meta
            prev.name = name
        self.place()
        self.layer.visible = self.visible_check.isChecked()
        self.shown.emit(self.layer)

    def shift(self) -> float:
        """How far right "side by side" moves the preview, in world units (level-0 width x
        scale x (1 + :data:`GAP`))."""
        layer = self.slide_layer
        return float(layer.level_shapes[0][1] * layer.scale[-1] * (1 + GAP))

    def place(self, *_) -> None:
        """Put the preview on top of its slide or right of it, and say where."""
        layer = self.slide_layer
        if layer is None:
            self.info.setText("")
            return
        side = self.placement_combo.currentData() == "side"
        units = str(layer.units[-1]) if layer.units is not None else "pixel"
        units = "\u00b5m" if units in ("micrometer", "um") else units
        self.info.setText(
            f"Preview right of the slide, moved by {self.shift():,.1f} {units} (slide width + "
            f"{GAP:.0%} gap, world units)." if side else
            "Preview exactly over the slide: untick 'Visible' to see the original.")
        if not self.alive():
            return
        t = np.zeros(len(self.layer.translate))  # on the slide's own world, moved with it
        if side:
            t[-1] += self.shift()
        self.layer.translate = tuple(t)
        self._place_on(self.layer, layer)

    def _on_visible(self, checked: bool) -> None:
        if self.alive():
            self.layer.visible = checked
