"""Top-K gallery dock: thumbnails of the selected patches; a click takes the view there.

The patches are read at full resolution (level 0, one patch side) from the slide in a
napari thread worker, one patch per yield, and appear as they arrive, each with its rank
and raw score. A new selection cancels the previous read (between patches). Clicking a
thumbnail centres the camera on the patch and zooms so that it fills about a third of the
canvas (:data:`FILL`).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import numpy as np
from qtpy.QtCore import QEvent, QSize, Qt, Signal
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import (
    QGridLayout,
    QLabel,
    QScrollArea,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ._common import real_viewer
from .navigation import viewbox_size, viewer_camera

#: Thumbnail side in screen pixels.
THUMB = 112
#: Fraction of the canvas's shorter side a clicked patch fills.
FILL = 1 / 3
#: Thumbnails per row.
COLUMNS = 2


def read_thumbnails(slide: Any, coords: np.ndarray, patch_size_level0: int, size: int = THUMB):
    """Read patches at level 0 and shrink them: a generator of (position, [s, s, 3] uint8).

    Parameters
    ----------
    slide : napari_milview.slide.Slide
    coords : np.ndarray
        [K, 2] level-0 (x, y) top-left corners, in display order.
    patch_size_level0 : int
        Patch side in level-0 pixels (read at full resolution).
    size : int
        Thumbnail side.
    """
    from PIL import Image

    ps = int(patch_size_level0)
    for k, (x, y) in enumerate(np.asarray(coords, dtype=np.int64).tolist()):
        img = np.asarray(slide.read_region((x, y), 0, (ps, ps)))[..., :3]
        if img.shape[0] != size or img.shape[1] != size:
            img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(
                (size, size), Image.Resampling.BOX if ps > size else Image.Resampling.NEAREST))
        yield k, np.ascontiguousarray(img, dtype=np.uint8)


class TopKGallery(QWidget):
    """Dock widget with the thumbnails of the top-K patches.

    Parameters
    ----------
    napari_viewer : napari.Viewer

    Attributes
    ----------
    buttons : list[QToolButton]
        One per patch, in rank order (the icon arrives when its patch is read).
    """

    #: emitted with the bag index of a clicked patch
    activated = Signal(int)
    #: emitted when every thumbnail of the current selection has been read
    loaded = Signal()

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer = real_viewer(napari_viewer)
        self.buttons: list[QToolButton] = []
        self._images: list = []  # keep the QImage buffers alive
        self._reader = _Reader()  # the running thumbnail worker (plain object: see destroyed)
        self._coords = np.zeros((0, 2), np.int64)
        self._indices = np.zeros(0, np.int64)
        self._ps = 1
        self._mpp: float | None = None
        self._slide_layer = None

        self.header = QLabel("No selection yet.")
        self.header.setWordWrap(True)
        self.grid = QGridLayout()
        self.grid.setSpacing(4)
        inner = QWidget()
        v = QVBoxLayout(inner)
        v.addLayout(self.grid)
        v.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(inner)
        layout = QVBoxLayout(self)
        layout.addWidget(self.header)
        layout.addWidget(scroll, 1)
        self.setMinimumWidth(COLUMNS * (THUMB + 16) + 40)
        self.setMinimumHeight(THUMB + 100)  # at least one row, also when docked under others
        self.destroyed.connect(partial(_Reader.stop, self._reader))

    # ------------------------------------------------------------------ filling
    def set_items(self, slide_layer, result, indices: np.ndarray, source: str | None = None,
                  *, mpp: float | None = None) -> None:
        """Show the patches ``indices`` [K] (rank order) of ``result``, read from the slide.

        Parameters
        ----------
        slide_layer : napari Image layer of the slide (its ``metadata["slide"]``), or None
            (then no pixels: rank and score only).
        result : Result
            ``coords`` [N, 2], ``patch_size_level0`` and the scores of ``source``.
        mpp : float, optional
            Microns per level-0 pixel of the world coordinates (None: level-0 pixels).
        """
        self.stop()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        self._indices = idx
        self._coords = result.coords[idx]
        self._ps = int(result.patch_size_level0)
        self._mpp = mpp
        self._slide_layer = slide_layer
        scores = result.attention(source)[idx]
        self._clear()
        self.header.setText(f"{len(idx)} patches \u00b7 {source or result.default_source}"
                            if len(idx) else "No patch selected.")
        for k, (i, s) in enumerate(zip(idx.tolist(), scores.tolist())):
            b = QToolButton()
            b.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextUnderIcon)
            b.setIconSize(QSize(THUMB, THUMB))
            b.setFixedSize(THUMB + 12, THUMB + 34)
            b.setText(f"#{k + 1}  {s:.4g}")
            b.setToolTip(f"rank {k + 1}, patch {i}, score {s:.6g}\n"
                         f"level-0 (x, y) = {tuple(int(v) for v in result.coords[i])}")
            b.clicked.connect(partial(self.go_to, k))
            self.grid.addWidget(b, k // COLUMNS, k % COLUMNS)
            self.buttons.append(b)
        slide = slide_layer.metadata.get("slide") if slide_layer is not None else None
        if slide is None or not len(idx):
            self.loaded.emit()
            return
        from napari.qt.threading import create_worker

        worker = create_worker(read_thumbnails, slide, self._coords, self._ps,
                               _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(partial(self._on_thumb, worker))
        worker.finished.connect(partial(self._on_done, worker))
        worker.errored.connect(self._on_error)
        self._reader.worker = worker
        worker.start()

    def _clear(self) -> None:
        for b in self.buttons:  # unparented now (deleteLater waits for the event loop)
            self.grid.removeWidget(b)
            b.hide()
            b.setParent(None)
        self.buttons = []
        self._images = []

    def _on_thumb(self, worker, item) -> None:
        if worker is not self._reader.worker:
            return
        k, img = item
        if k >= len(self.buttons):
            return
        h, w = img.shape[:2]
        qimg = QImage(img.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
        self.buttons[k].setIcon(QIcon(QPixmap.fromImage(qimg)))
        self._images.append(qimg)

    def _on_done(self, worker, *_) -> None:
        if worker is self._reader.worker:
            self._reader.worker = None
            self.loaded.emit()

    def _on_error(self, exc) -> None:
        from napari.utils.notifications import show_warning

        show_warning(f"Top-K gallery: cannot read a patch ({exc})")

    def stop(self, wait: bool = True) -> None:
        """Stop reading thumbnails (and wait for the reader thread)."""
        self._reader.stop(wait)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.stop()
        super().closeEvent(event)

    def event(self, event) -> bool:
        # napari's dock close button takes the widget out of its dock without closing it
        if event.type() == QEvent.Type.ParentChange and self.parent() is None \
                and hasattr(self, "_reader"):
            self.stop()
        return super().event(event)

    # ------------------------------------------------------------------ navigation
    def patch_centre(self, k: int) -> tuple[float, float]:
        """World (row, col) of the centre of the ``k``-th patch shown (where the slide layer
        draws it, wherever the user moved that layer)."""
        f = 1.0 if self._mpp is None else float(self._mpp)
        x, y = (float(v) for v in self._coords[k])
        # level-0 pixel i is centred on world i * mpp: the patch [x, x + ps) centres on
        # x + (ps - 1) / 2
        c = (self._ps - 1) / 2
        if self._slide_layer is not None:
            world = self._slide_layer.data_to_world((y + c, x + c))
            return (float(world[-2]), float(world[-1]))
        return ((y + c) * f, (x + c) * f)

    def go_to(self, k: int, *_) -> None:
        """Centre the camera on the ``k``-th patch and zoom so it fills ~1/3 of the canvas."""
        if not 0 <= k < len(self._coords):
            return
        cam = viewer_camera(self.viewer)
        row, col = self.patch_centre(k)
        h, w = viewbox_size(self.viewer)
        side = self._ps * (1.0 if self._mpp is None else float(self._mpp))
        cam.center = (*tuple(cam.center)[:-2], row, col)
        cam.zoom = FILL * min(h, w) / side
        self.activated.emit(int(self._indices[k]))


class _Reader:
    """The gallery's running thumbnail worker, kept outside the Qt object."""

    def __init__(self):
        self.worker = None

    def stop(self, wait: bool = True) -> None:
        """Quit the worker (between patches) and wait up to 10 s for its thread."""
        worker, self.worker = self.worker, None
        if worker is None:
            return
        try:
            worker.quit()
        except RuntimeError:  # its Qt object is gone
            return
        deadline = time.monotonic() + 10.0
        while wait and worker.is_running and time.monotonic() < deadline:
            time.sleep(0.005)
