"""The MIL dock's Display box: which attention source, how it is normalised and coloured, and
which patches the top-K layer shows. It owns its controls and says what changed; the dock
redraws its slides' layers (``SlideOverlays``) on the signals.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QStandardItemModel
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QSpinBox,
    QWidget,
)

from ._common import spin
from .parts import combo_data, pick_data
from .prediction import source_groups

__all__ = ["COLORMAPS", "INTERPOLATIONS", "DisplayBox"]

#: Heatmap colormaps offered (napari names).
COLORMAPS = ("inferno", "magma", "viridis", "plasma", "turbo")
#: Interpolation choices: label -> napari ``interpolation2d``.
INTERPOLATIONS = {"blocky": "nearest", "smooth": "linear"}
#: Top-K modes: label -> ``overlay.topk.select`` mode.
TOPK_MODES = {"top K": "top", "bottom K": "bottom", "score range": "range"}


def _pair(a: QWidget, b: QWidget) -> QWidget:
    """``a to b`` in one row."""
    w = QWidget()
    row = QHBoxLayout(w)
    row.setContentsMargins(0, 0, 0, 0)
    row.addWidget(a)
    row.addWidget(QLabel("to"))
    row.addWidget(b)
    return w


class DisplayBox(QGroupBox):
    """Source, normalisation (fixed range, attention x N zoom), colormap, opacity, look, and
    the top-K selection (mode, K, score range) with the Gallery button.

    Signals: ``heatmap_changed`` (the heatmap must be recomputed), ``look_changed``
    (colormap or opacity only), ``topk_changed`` (the top-K selection), ``gallery_wanted``.
    ``shown_scores`` (set by the dock) gives the scores [N] of the source shown now, for the
    fixed range's first guess.
    """

    heatmap_changed = Signal()
    look_changed = Signal()
    topk_changed = Signal()
    gallery_wanted = Signal()

    source = combo_data("source_combo", "The attention source shown (None before a result).")
    method = combo_data("method_combo", "The normalisation shown (a key of "
                                        "``overlay.normalise.METHODS``).")

    def __init__(self, parent: QWidget | None = None):
        from ..overlay.normalise import METHODS

        super().__init__("Display", parent)
        self.shown_scores: Callable[[], np.ndarray | None] = lambda: None
        self._fixed_set = False
        self.source_combo = QComboBox()
        self.source_combo.setToolTip("Which attention the heatmap shows (class, branch, head, "
                                     "layer, mean, pre-softmax logits)")
        self.method_combo = QComboBox()
        for key, label in METHODS.items():
            self.method_combo.addItem(label, key)
        self.vmin = spin(-1e9, 1e9, 0.0, decimals=6, step=0.001)
        self.vmax = spin(-1e9, 1e9, 1.0, decimals=6, step=0.001)
        for s in (self.vmin, self.vmax):
            s.setToolTip("The range shared across slides (normalisation 'fixed')")
        self.range_row = _pair(self.vmin, self.vmax)
        self.zoom = spin(0.001, 1000.0, 1.0, decimals=3, step=0.1)
        self.zoom.setToolTip("ACMIL's zoom factor for 'attention \u00d7 N': uniform attention "
                             "shows as this value (below 1 de-saturates)")
        self.cmap_combo = QComboBox()
        self.cmap_combo.addItems(COLORMAPS)
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(50)
        self.interp_combo = QComboBox()
        for label, key in INTERPOLATIONS.items():
            self.interp_combo.addItem(label, key)
        self.topk_mode = QComboBox()
        for label, key in TOPK_MODES.items():
            self.topk_mode.addItem(label, key)
        self.k_spin = QSpinBox()
        self.k_spin.setRange(0, 10000)
        self.k_spin.setValue(20)
        self.k_spin.setKeyboardTracking(False)
        self.lo = spin(-1e9, 1e9, 0.9, decimals=4, step=0.05)
        self.hi = spin(-1e9, 1e9, 1.0, decimals=4, step=0.05)
        for s in (self.lo, self.hi):
            s.setToolTip("Score range in the normalised (colour-bar) units")
        self.topk_range = _pair(self.lo, self.hi)
        self.gallery_button = QPushButton("Gallery")
        self.gallery_button.setToolTip("Thumbnails of the top-K patches; click one to go there")
        krow = QHBoxLayout()
        for w in (self.topk_mode, QLabel("K"), self.k_spin, self.gallery_button):
            krow.addWidget(w)
        form = QFormLayout(self)
        for label, w in (("Source", self.source_combo), ("Normalise", self.method_combo),
                         ("Fixed range", self.range_row), ("\u00d7 N zoom", self.zoom),
                         ("Colormap", self.cmap_combo), ("Opacity", self.opacity),
                         ("Look", self.interp_combo), ("Patches", krow),
                         ("Range", self.topk_range)):
            form.addRow(label, w)
        self.source_combo.currentIndexChanged.connect(self._on_source)
        self.method_combo.currentIndexChanged.connect(self._on_method)
        for s in (self.vmin, self.vmax):
            s.valueChanged.connect(self._on_fixed_range)
        self.zoom.valueChanged.connect(self._on_zoom)
        self.cmap_combo.currentTextChanged.connect(self.look_changed)
        self.opacity.valueChanged.connect(self.look_changed)
        self.interp_combo.currentIndexChanged.connect(self.heatmap_changed)
        self.topk_mode.currentIndexChanged.connect(self._on_topk)
        for s in (self.k_spin, self.lo, self.hi):
            s.valueChanged.connect(self._on_topk)
        self.gallery_button.clicked.connect(self.gallery_wanted)
        self._enable_rows()

    # ------------------------------------------------------------------ what is shown
    def set_source(self, name: str) -> None:
        """Show another attention source (no re-run)."""
        pick_data(self.source_combo, name, "attention source")

    def set_method(self, method: str) -> None:
        """Show another normalisation (no re-run)."""
        from ..overlay.normalise import method_name

        self.method_combo.setCurrentIndex(self.method_combo.findData(method_name(method)))

    def source_of(self, result) -> str:
        """The source picked, or ``result``'s default when it lacks that one."""
        src = self.source
        return src if src in result.sources else result.default_source

    def fill_sources(self, result) -> None:
        """The source picker for ``result``'s sources, grouped, the current one kept."""
        current = self.source
        self.source_combo.blockSignals(True)
        self.source_combo.clear()
        model: QStandardItemModel = self.source_combo.model()
        groups = source_groups(list(result.sources), result.default_source)
        for title, names in groups:
            if len(groups) > 1:
                self.source_combo.addItem(f"\u2014 {title} \u2014", None)
                model.item(self.source_combo.count() - 1).setEnabled(False)
            for n in names:
                self.source_combo.addItem(n, n)
        pick = current if current in result.sources else result.default_source
        self.source_combo.setCurrentIndex(self.source_combo.findData(pick))
        self.source_combo.blockSignals(False)

    def norm_kw(self) -> dict:
        """The normalisation's parameters: the fixed range and the attention x N zoom."""
        return {"vmin": self.vmin.value(), "vmax": self.vmax.value(),
                "zoom": self.zoom.value()}

    def used_norm_kw(self) -> dict:
        """Only what the normalisation shown uses of :meth:`norm_kw` (for exports)."""
        kw = self.norm_kw()
        return ({k: kw[k] for k in ("vmin", "vmax")} if self.method == "fixed" else
                {"zoom": kw["zoom"]} if self.method == "attention_x_n" else {})

    def heatmap_kwargs(self) -> dict:
        """``overlay.heatmap.heatmap_layer``'s look arguments."""
        return {"colormap": self.cmap_combo.currentText(),
                "opacity": self.opacity.value() / 100,
                "interpolation": self.interp_combo.currentData(), **self.norm_kw()}

    def topk_settings(self) -> dict:
        """The top-K selection as a sidecar stores it."""
        topk = {"k": self.k_spin.value(), "mode": self.topk_mode.currentData()}
        if topk["mode"] == "range":
            topk.update(lo=self.lo.value(), hi=self.hi.value())
        return topk

    def selection(self, result) -> np.ndarray:
        """[K] bag indices the top-K settings pick from ``result`` (best first)."""
        from ..overlay.normalise import normalise
        from ..overlay.topk import select

        if result is None:
            return np.zeros(0, np.int64)
        scores = result.attention(self.source_of(result))
        mode, k = self.topk_mode.currentData(), self.k_spin.value()
        if mode == "range":
            lo, hi = sorted((self.lo.value(), self.hi.value()))
            return select(normalise(scores, self.method, **self.norm_kw()), k, "range", lo, hi)
        return select(scores, k, mode)

    def topk_name(self, n: int) -> str:
        """The top-K layer's name (before the slide's): ``top 20``, ``score range``."""
        mode = self.topk_mode.currentData()
        return f"{mode} {n}" if mode != "range" else "score range"

    def restore(self, doc: dict, result) -> None:
        """Take a sidecar's view: range, zoom, colormap, top-K, source, normalisation."""
        norm = doc.get("normalisation") or {}
        if norm.get("vmin") is not None and norm.get("vmax") is not None:
            self._fixed_set = True
            self.vmin.setValue(float(norm["vmin"]))
            self.vmax.setValue(float(norm["vmax"]))
        if norm.get("zoom") is not None:
            self.zoom.setValue(float(norm["zoom"]))
        if doc.get("colormap") in COLORMAPS:
            self.cmap_combo.setCurrentText(doc["colormap"])
        tk = doc.get("topk") or {}
        if tk.get("k") is not None:
            self.k_spin.setValue(int(tk["k"]))
        mode = self.topk_mode.findData(tk.get("mode", "top"))
        if mode >= 0:
            self.topk_mode.setCurrentIndex(mode)
        if doc.get("attention_source") in result.sources:
            self.set_source(doc["attention_source"])
        self.set_method(norm.get("method", "raw"))

    # ------------------------------------------------------------------ events
    def _enable_rows(self) -> None:
        self.range_row.setEnabled(self.method == "fixed")
        self.zoom.setEnabled(self.method == "attention_x_n")
        self.topk_range.setEnabled(self.topk_mode.currentData() == "range")

    def _redraw(self, topk_too: bool) -> None:
        self.heatmap_changed.emit()
        if topk_too and self.topk_mode.currentData() == "range":
            self.topk_changed.emit()  # the score range is in normalised units

    def _on_source(self, *_) -> None:
        if self.source is not None:
            self.heatmap_changed.emit()
            self.topk_changed.emit()

    def _on_method(self, *_) -> None:
        self._enable_rows()
        if self.method == "fixed" and not self._fixed_set:  # first guess: the shown range
            s = self.shown_scores()
            s = s[np.isfinite(s)] if s is not None else np.zeros(0)
            if s.size:
                lo, hi = float(s.min()), float(s.max())
                for box, value in ((self.vmin, lo), (self.vmax, hi if hi > lo else lo + 1)):
                    box.blockSignals(True)
                    box.setValue(value)
                    box.blockSignals(False)
                self._fixed_set = True
        self._redraw(topk_too=True)

    def _on_zoom(self, *_) -> None:
        if self.method == "attention_x_n":
            self._redraw(topk_too=True)

    def _on_fixed_range(self, *_) -> None:
        self._fixed_set = True
        if self.vmax.value() > self.vmin.value() and self.method == "fixed":
            self.heatmap_changed.emit()

    def _on_topk(self, *_) -> None:
        self._enable_rows()
        self.topk_changed.emit()
