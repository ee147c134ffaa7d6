"""Slide navigation dock: overview minimap, magnification readout and buttons, scale bar.

What a pathologist expects from QuPath or ASAP and napari lacks (napari #1162): an overview
of the whole slide with the current field of view drawn on it (click or drag to jump), the
magnification the screen shows now, one-click 1.25x ... 40x, and a scale bar in microns.

Magnification
-------------
Effective magnification = base power x (screen pixels per level-0 pixel), where

- base power = the slide's objective power (e.g. 40 for a 40x scan), or, when the file
  does not say, ``10 / mpp`` (the usual convention: 0.25 um/px ~ 40x, 0.5 um/px ~ 20x),
  shown with "(from mpp)";
- screen pixels per level-0 pixel = ``camera.zoom x layer.scale[-1]``: napari's zoom is
  screen pixels per world unit, and the slide layer's world unit is the micron
  (``scale`` = mpp) when mpp is known, the level-0 pixel (``scale`` = 1) otherwise.

Screen pixels are napari's (Qt's logical, device-independent) pixels: on a high-DPI screen
one of them covers ``devicePixelRatio`` physical pixels, exactly as napari's zoom and scale
bar count them. With neither objective power nor mpp the readout is the zoom as a ratio of
screen to slide pixels ("1:4 px" = one screen pixel shows 4 x 4 slide pixels) and the
magnification buttons are disabled.

Updates to the minimap box and the readout are coalesced on a short single-shot timer, so a
burst of camera events while panning costs one repaint per :data:`THROTTLE_MS`.

Default reader
--------------
napari asks which reader opens a ``.svs`` or ``.tif`` (its builtins claim them too) unless its
own preference ``settings.plugins.extension2reader`` names one. "Use napari-milview for slide
files" sets it for every slide file pattern (:data:`~napari_milview._reader.
SLIDE_FILE_PATTERNS`), as napari's "remember this choice" does for one; a label says the state.
"""

from __future__ import annotations

import weakref
from functools import partial

import numpy as np
from qtpy.QtCore import QPointF, QRectF, QSize, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QImage, QPainter, QPen, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from .._reader import SLIDE_FILE_PATTERNS, is_slide_layer
from ._common import real_viewer

#: The npe2 plugin name napari's reader preference refers to (napari.yaml's ``name``).
PLUGIN_NAME = "napari-milview"

#: The magnification buttons, as on a microscope's nosepiece.
MAGNIFICATIONS = (1.25, 5.0, 10.0, 20.0, 40.0)
#: At most one minimap/readout update per this many milliseconds of camera events.
THROTTLE_MS = 30


# ----------------------------------------------------------------- napari accessors
# napari 0.9 moved these (viewer.camera -> viewer.scene.camera, ...); older ones lack the new.
def viewer_camera(viewer):
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def _scale_bar(viewer):
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    return overlays.scale_bar if overlays is not None else viewer.scale_bar


def viewbox_size(viewer) -> tuple[float, float]:
    """(height, width) of the canvas view in screen (logical) pixels."""
    canvas = getattr(viewer, "canvas", None)
    if canvas is not None and hasattr(canvas, "viewbox_size"):
        return tuple(canvas.viewbox_size(viewer.layers))
    return tuple(viewer._canvas_size)


# ------------------------------------------------------------------ magnification
def base_power(metadata: dict) -> tuple[float | None, bool]:
    """(magnification at one screen pixel per level-0 pixel, derived_from_mpp).

    The objective power when the slide records one, else ``10 / mpp``; (None, False) when
    neither is known.
    """
    power = metadata.get("objective_power")
    if power:
        return float(power), False
    mpp = metadata.get("mpp")
    if mpp:
        return 10.0 / float(mpp[-1]), True
    return None, False


def format_ratio(screen_per_px: float) -> str:
    """Zoom as screen:slide pixels, e.g. '1:4 px' (zoomed out) or '2:1 px' (zoomed in)."""
    if screen_per_px >= 1:
        return f"{screen_per_px:.3g}:1 px"
    return f"1:{1 / screen_per_px:.3g} px"


def format_magnification(mag: float) -> str:
    """'20.0x', '1.25x', '0.35x': two decimals at most, at least one."""
    text = f"{mag:.2f}".rstrip("0")
    return f"{text}0x" if text.endswith(".") else f"{text}x"


# ------------------------------------------------------------------ default reader
def reader_preference() -> dict[str, str | None]:
    """The reader napari's settings name for each slide file pattern (None: napari asks)."""
    from napari.settings import get_settings

    prefs = get_settings().plugins.extension2reader
    return {pat: prefs.get(pat) for pat in SLIDE_FILE_PATTERNS}


def prefer_this_reader() -> None:
    """Make napari-milview napari's preferred reader for every slide file pattern (saved in
    napari's settings, like the reader dialog's "remember this choice"; other patterns kept)."""
    from napari.settings import get_settings

    plugins = get_settings().plugins
    plugins.extension2reader = {**plugins.extension2reader,
                                **dict.fromkeys(SLIDE_FILE_PATTERNS, PLUGIN_NAME)}


def describe_reader_preference(prefs: dict[str, str | None]) -> str:
    """One sentence for the dock, from :func:`reader_preference`."""
    if all(r == PLUGIN_NAME for r in prefs.values()):
        return f"Slide files open with {PLUGIN_NAME} without asking."
    if all(r is None for r in prefs.values()):
        return "napari asks which reader opens each slide file."
    ext = [pat.lstrip("*") for pat, r in prefs.items() if r is None]
    other = [f"{pat.lstrip('*')} with {r}" for pat, r in prefs.items()
             if r not in (None, PLUGIN_NAME)]
    parts = ([f"napari asks which reader opens {', '.join(ext)}"] if ext else []) + (
        [f"opens {', '.join(other)}"] if other else [])
    return "; ".join(parts) + "."


# ------------------------------------------------------------------------ minimap
class Minimap(QWidget):
    """A slide thumbnail with the viewport box; a click or drag asks to centre there.

    Coordinates in and out are thumbnail pixels, continuous: the thumbnail of shape
    (h, w, 3) spans rows [0, h] and columns [0, w], pixel (i, j) covering [i, i+1] x [j, j+1].
    """

    #: (row, col) in thumbnail pixels the user clicked or dragged to.
    jumped = Signal(float, float)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._rgb: np.ndarray | None = None  # keeps the QImage buffer alive
        self._image: QImage | None = None
        self._pixmap: QPixmap | None = None  # scaled to the current widget size
        self._box: tuple[float, float, float, float] | None = None
        self.setMinimumSize(120, 90)
        policy = QSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        policy.setHeightForWidth(True)  # as tall as the slide's aspect asks, no letterbox
        self.setSizePolicy(policy)
        self.setCursor(Qt.CursorShape.CrossCursor)
        self.setToolTip("Overview: click or drag to move the view there")

    def sizeHint(self) -> QSize:
        if self._rgb is None:
            return QSize(260, 180)
        return QSize(260, self.heightForWidth(260))

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        if self._rgb is None:
            return 90
        h, w = self._rgb.shape[:2]
        return int(np.clip(width * h / max(w, 1), 90, 400))

    @property
    def thumbnail_shape(self) -> tuple[int, int] | None:
        """(h, w) of the thumbnail, None before one is set."""
        return None if self._rgb is None else self._rgb.shape[:2]

    @property
    def box(self) -> tuple[float, float, float, float] | None:
        """The viewport box (row0, col0, row1, col1) in thumbnail pixels, or None."""
        return self._box

    def set_image(self, rgb: np.ndarray | None) -> None:
        """Show ``rgb``, a (h, w, 3) uint8 thumbnail (None clears it)."""
        if rgb is None:
            self._rgb = self._image = None
        else:
            self._rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
            h, w = self._rgb.shape[:2]
            self._image = QImage(self._rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888)
        self._pixmap = None
        self.updateGeometry()
        self.update()

    def set_box(self, box: tuple[float, float, float, float] | None) -> None:
        """Draw the viewport ``(row0, col0, row1, col1)`` in thumbnail pixels (None hides it)."""
        if box != self._box:
            self._box = box
            self.update()

    def image_rect(self) -> QRectF:
        """Where the thumbnail is drawn: aspect kept, centred, in widget pixels."""
        if self._rgb is None:
            return QRectF()
        h, w = self._rgb.shape[:2]
        s = min(self.width() / w, self.height() / h)
        return QRectF((self.width() - w * s) / 2, (self.height() - h * s) / 2, w * s, h * s)

    def to_widget(self, row: float, col: float) -> QPointF:
        """Thumbnail (row, col) -> widget point."""
        r, (h, w) = self.image_rect(), self._rgb.shape[:2]
        return QPointF(r.left() + col * r.width() / w, r.top() + row * r.height() / h)

    def to_thumbnail(self, point: QPointF) -> tuple[float, float]:
        """Widget point -> thumbnail (row, col), clipped to the thumbnail."""
        r, (h, w) = self.image_rect(), self._rgb.shape[:2]
        row = (point.y() - r.top()) * h / r.height()
        col = (point.x() - r.left()) * w / r.width()
        return float(np.clip(row, 0, h)), float(np.clip(col, 0, w))

    # -------------------------------------------------------------- Qt events
    def resizeEvent(self, event) -> None:
        self._pixmap = None
        super().resizeEvent(event)

    def paintEvent(self, event) -> None:
        p = QPainter(self)
        try:
            if self._image is None:
                p.setPen(self.palette().text().color())
                p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "no slide layer")
                return
            target = self.image_rect()
            if self._pixmap is None or self._pixmap.size() != target.size().toSize():
                self._pixmap = QPixmap.fromImage(self._image).scaled(
                    target.size().toSize(), Qt.AspectRatioMode.IgnoreAspectRatio,
                    Qt.TransformationMode.SmoothTransformation)
            p.drawPixmap(target.topLeft(), self._pixmap)
            if self._box is not None:
                self._paint_box(p, target)
        finally:
            p.end()

    def _paint_box(self, p: QPainter, target: QRectF) -> None:
        r0, c0, r1, c1 = self._box
        box = QRectF(self.to_widget(r0, c0), self.to_widget(r1, c1)).intersected(target)
        if box.isEmpty():
            return
        if box.width() < 6 or box.height() < 6:  # zoomed far in: keep it findable
            centre = box.center()
            box = QRectF(0, 0, max(box.width(), 6), max(box.height(), 6))
            box.moveCenter(centre)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        p.setBrush(Qt.BrushStyle.NoBrush)
        # a dark halo under a bright line: visible on white glass and on dark tissue
        p.setPen(QPen(QColor(0, 0, 0, 160), 4))
        p.drawRect(box)
        p.setPen(QPen(QColor(255, 210, 0), 2))
        p.drawRect(box)

    def mousePressEvent(self, event) -> None:
        if self._rgb is not None and event.button() == Qt.MouseButton.LeftButton:
            self.jumped.emit(*self.to_thumbnail(event.position()))

    def mouseMoveEvent(self, event) -> None:
        if self._rgb is not None and event.buttons() & Qt.MouseButton.LeftButton:
            self.jumped.emit(*self.to_thumbnail(event.position()))


# --------------------------------------------------------------------- the widget
_GONE = object()


def _disconnect(connections: list) -> None:
    """Disconnect (emitter, weak callback) pairs; safe to call twice and from ``destroyed``."""
    while connections:
        emitter, ref = connections.pop()
        cb = ref()
        # a non-callable argument makes napari drop the callbacks of that object and every
        # dead one: ours are dead when Python collected the widget before Qt destroyed it
        emitter.disconnect(cb if cb is not None else _GONE)


class NavigationWidget(QWidget):
    """Dock widget: minimap, magnification readout and buttons, scale bar toggle.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (npe2 passes it by this name).
    """

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer = real_viewer(napari_viewer)
        self.layer = None  # the slide layer followed now
        self._slide_layers: list = []
        self._factor = np.ones(2)  # level-0 pixels per thumbnail pixel (row, col)
        self._connections: list = []

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(THROTTLE_MS)
        self._timer.timeout.connect(self.refresh)

        self.combo = QComboBox()
        self.combo.setToolTip("Slide layer to navigate")
        self.combo.currentIndexChanged.connect(self._on_combo)
        self.minimap = Minimap()
        self.minimap.jumped.connect(self.centre_on_thumbnail)
        self.readout = QLabel("-")
        self.readout.setStyleSheet("font-size: 18px; font-weight: bold;")  # beats napari's QSS
        self.readout.setToolTip("Magnification on screen now")
        self.detail = QLabel("")
        self.detail.setWordWrap(True)
        self.buttons: dict[float, QPushButton] = {}
        grid = QGridLayout()
        grid.setSpacing(2)
        for i, mag in enumerate(MAGNIFICATIONS):
            b = QPushButton(f"{mag:g}x")
            b.setToolTip(f"Zoom to {mag:g}x, keeping the centre")
            b.setProperty("magnification", mag)
            b.clicked.connect(self._on_button)  # bound methods: no cycle keeps us alive
            self.buttons[mag] = b
            grid.addWidget(b, i // 3, i % 3)
        fit = QPushButton("Fit")
        fit.setToolTip("Show the whole slide")
        fit.setProperty("magnification", 0.0)
        fit.clicked.connect(self._on_button)
        grid.addWidget(fit, len(MAGNIFICATIONS) // 3, len(MAGNIFICATIONS) % 3)
        self.scale_bar_box = QCheckBox("Scale bar")
        self.scale_bar_box.toggled.connect(self.show_scale_bar)
        self.reader_state = QLabel("")
        self.reader_state.setWordWrap(True)
        self.reader_button = QPushButton(f"Use {PLUGIN_NAME} for slide files")
        self.reader_button.setToolTip(
            "Open " + ", ".join(p.lstrip("*") for p in SLIDE_FILE_PATTERNS) + " with "
            f"{PLUGIN_NAME} without napari asking (napari's Preferences > Plugins > File "
            "extension readers; other TIFFs still open with napari's own reader)")
        self.reader_button.clicked.connect(self._on_prefer_reader)

        top = QHBoxLayout()
        top.addWidget(self.readout)
        top.addStretch(1)
        top.addWidget(self.scale_bar_box)
        layout = QVBoxLayout(self)
        layout.addWidget(self.combo)
        layout.addWidget(self.minimap)
        layout.addLayout(top)
        layout.addWidget(self.detail)
        layout.addLayout(grid)
        layout.addWidget(self.reader_state)
        layout.addWidget(self.reader_button)
        layout.addStretch(1)

        cam = viewer_camera(napari_viewer)
        self._connect(cam.events.center, self._schedule)
        self._connect(cam.events.zoom, self._schedule)
        size_events = getattr(getattr(napari_viewer, "canvas", None), "events", None)
        if size_events is not None and hasattr(size_events, "size"):
            self._connect(size_events.size, self._schedule)
        self._connect(napari_viewer.layers.events.inserted, self._on_layers_changed)
        self._connect(napari_viewer.layers.events.removed, self._on_layers_changed)
        from napari.settings import get_settings

        # the state follows napari's Preferences dialog and its reader dialog too
        self._connect(get_settings().plugins.events.extension2reader, self.show_reader_state)
        # no callback into a deleted widget, however it goes away
        self.destroyed.connect(partial(_disconnect, self._connections))

        self._on_layers_changed()
        self.scale_bar_box.setChecked(True)
        self.show_reader_state()

    # ------------------------------------------------------------- plumbing
    def _connect(self, emitter, callback) -> None:
        emitter.connect(callback)
        self._connections.append((emitter, weakref.WeakMethod(callback)))

    def disconnect_viewer(self) -> None:
        """Drop every connection to the viewer (done on close and on destruction)."""
        self._timer.stop()
        _disconnect(self._connections)

    def closeEvent(self, event) -> None:
        self.disconnect_viewer()
        super().closeEvent(event)

    def _on_button(self, checked: bool = False) -> None:
        mag = float(self.sender().property("magnification"))
        if mag > 0:
            self.set_magnification(mag)
        else:
            self.viewer.reset_view()

    def _on_prefer_reader(self, checked: bool = False) -> None:
        prefer_this_reader()
        self.show_reader_state()

    def show_reader_state(self, event=None) -> None:
        """Say which reader napari uses for slide files; the button only when not all ours."""
        prefs = reader_preference()
        self.reader_state.setText(describe_reader_preference(prefs))
        self.reader_button.setEnabled(any(r != PLUGIN_NAME for r in prefs.values()))

    def _schedule(self, event=None) -> None:
        if not self._timer.isActive():
            self._timer.start()

    # --------------------------------------------------------------- layers
    def _on_layers_changed(self, event=None) -> None:
        layers = [lyr for lyr in self.viewer.layers if is_slide_layer(lyr)]
        keep = self.layer if any(lyr is self.layer for lyr in layers) else None
        added = getattr(event, "value", None) if getattr(event, "type", "") == "inserted" else None
        if added is not None and is_slide_layer(added):
            keep = added  # a slide just opened: navigate it
        if keep is None and layers:
            keep = layers[-1]  # the newest slide
        self._slide_layers = layers
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItems([lyr.name for lyr in layers])
        if keep is not None:
            self.combo.setCurrentIndex(next(i for i, lyr in enumerate(layers) if lyr is keep))
        self.combo.blockSignals(False)
        self.combo.setVisible(len(layers) > 1)
        self.set_layer(keep)

    def _on_combo(self, index: int) -> None:
        if 0 <= index < len(self._slide_layers):
            self.set_layer(self._slide_layers[index])

    def set_layer(self, layer) -> None:
        """Follow ``layer`` (a slide layer, or None): thumbnail from its smallest level."""
        if layer is self.layer:
            self.refresh()
            return
        self.layer = layer
        if layer is None:
            self.minimap.set_image(None)
        else:
            data = layer.data[-1] if layer.multiscale else layer.data
            full = layer.data[0] if layer.multiscale else layer.data
            # the smallest level is at most ~1024 px a side (Slide adds derived levels) and
            # napari has just read it for its own overview, so this hits the tile cache
            thumb = np.asarray(data)
            self._factor = np.array(full.shape[:2], float) / thumb.shape[:2]
            self.minimap.set_image(thumb)
            meta = layer.metadata
            if meta.get("mpp") and not hasattr(layer, "units"):  # napari < 0.6: bar's unit
                _scale_bar(self.viewer).unit = "um"
        enabled = layer is not None and base_power(layer.metadata)[0] is not None
        for b in self.buttons.values():
            b.setEnabled(enabled)
        self.refresh()

    # ------------------------------------------------------------ geometry
    def _screen_per_px(self) -> float:
        """Screen pixels per level-0 pixel at the current zoom."""
        return float(viewer_camera(self.viewer).zoom) * abs(float(self.layer.scale[-1]))

    def magnification(self) -> float | None:
        """Effective magnification on screen now, or None when it cannot be known."""
        if self.layer is None:
            return None
        base, _ = base_power(self.layer.metadata)
        return None if base is None else base * self._screen_per_px()

    def set_magnification(self, mag: float) -> None:
        """Zoom so the screen shows ``mag`` x (the camera centre stays where it is)."""
        if self.layer is None:
            return
        base, _ = base_power(self.layer.metadata)
        if base is None:
            return
        viewer_camera(self.viewer).zoom = mag / (base * abs(float(self.layer.scale[-1])))
        self.refresh()

    def centre_on_thumbnail(self, row: float, col: float) -> None:
        """Centre the camera on thumbnail point (row, col) (continuous thumbnail pixels)."""
        if self.layer is None:
            return
        # thumbnail pixel j covers level-0 pixels [j*f, (j+1)*f); napari's data coordinate
        # of level-0 pixel i is its centre, i
        data = np.array([row, col]) * self._factor - 0.5
        world = self.layer.data_to_world(data)
        cam = viewer_camera(self.viewer)
        cam.center = (*tuple(cam.center)[:-2], float(world[-2]), float(world[-1]))
        self.refresh()

    def viewport_box(self) -> tuple[float, float, float, float] | None:
        """The visible canvas as (row0, col0, row1, col1) in thumbnail pixels."""
        if self.layer is None:
            return None
        cam = viewer_camera(self.viewer)
        cy, cx = tuple(cam.center)[-2:]
        h, w = viewbox_size(self.viewer)
        hy, hx = h / 2 / cam.zoom, w / 2 / cam.zoom
        corners = [self.layer.world_to_data(np.array(p, float))[-2:]
                   for p in ((cy - hy, cx - hx), (cy + hy, cx + hx))]
        (r0, c0), (r1, c1) = ((np.asarray(c) + 0.5) / self._factor for c in corners)
        return (min(r0, r1), min(c0, c1), max(r0, r1), max(c0, c1))

    def refresh(self) -> None:
        """Update the readout and the minimap box from the camera now."""
        self._timer.stop()
        if self.layer is None:
            self.readout.setText("-")
            self.detail.setText("Open a slide (File > Open, or the sample data).")
            self.minimap.set_box(None)
            return
        meta = self.layer.metadata
        base, from_mpp = base_power(meta)
        per_px = self._screen_per_px()
        if base is None:
            self.readout.setText(format_ratio(per_px))
            self.detail.setText("No objective power or mpp: zoom shown as screen:slide "
                                "pixels; no scale in microns.")
        else:
            text = format_magnification(base * per_px)
            self.readout.setText(f"{text} (from mpp)" if from_mpp else text)
            parts = []
            if meta.get("mpp"):
                um = float(meta["mpp"][-1]) / per_px
                parts.append(f"{um:.3g} \u00b5m / screen px")
            if from_mpp:
                parts.append("no objective power in the file: 10 / mpp")
            else:
                parts.append(f"{base:g}x scan")
            self.detail.setText(" \u00b7 ".join(parts))
        self.minimap.set_box(self.viewport_box())

    # ------------------------------------------------------------ scale bar
    def show_scale_bar(self, visible: bool = True) -> None:
        """Show or hide napari's scale bar, boxed so it reads on white glass and tissue.

        The unit comes from the slide layer's ``units`` (microns when mpp is known).
        """
        bar = _scale_bar(self.viewer)
        if visible:
            bar.box = True  # dark box, light text: legible on any background
            bar.colored = False
            bar.font_size = max(bar.font_size, 11)
        bar.visible = visible
        if self.scale_bar_box.isChecked() != visible:
            self.scale_bar_box.setChecked(visible)
