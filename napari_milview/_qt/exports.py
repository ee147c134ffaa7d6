"""The MIL dock's Export box: the shown result written as QuPath GeoJSON, CSV, CLAM h5, a
heatmap OME-TIFF, top-K PNG crops or a sidecar, and a saved result opened again.

:func:`write_view` is the Qt-free writing (the view = result, source, normalisation, top-K);
:class:`ExportBox` holds the buttons and the file dialogs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QFileDialog, QGridLayout, QGroupBox, QPushButton, QWidget

from .parts import export_and_say

__all__ = ["EXPORTS", "ExportBox", "write_view"]

#: Export kinds -> button label.
EXPORTS = {"geojson": "GeoJSON (QuPath)", "csv": "CSV table", "clam": "CLAM h5",
           "tiff": "Heatmap OME-TIFF", "crops": "Top-K PNGs", "sidecar": "Sidecar JSON"}
#: Save dialogs: kind -> (suffix, filter).
SUFFIXES = {"geojson": (".geojson", "GeoJSON (*.geojson *.json)"), "csv": (".csv", "CSV (*.csv)"),
            "clam": (".h5", "HDF5 (*.h5)"), "tiff": (".ome.tif", "OME-TIFF (*.ome.tif *.tif)"),
            "sidecar": (".milview.json", "Sidecar (*.json)")}


def write_view(kind: str, path, result, *, source: str, method: str, norm: dict,
               topk: dict, indices, mpp: float | None = None, slide=None,
               colormap: str = "inferno", bag_source: str | None = None) -> Path | list[Path]:
    """Write ``result`` as ``kind`` (a key of :data:`EXPORTS`) to ``path``.

    ``norm``: what the normalisation ``method`` uses (``vmin``/``vmax`` or ``zoom``);
    ``topk``: the sidecar's top-K settings (``k``, ``mode``, ``lo``/``hi``); ``indices`` [K]:
    the bag rows of the top-K crops. ``crops`` takes a folder and returns the PNG paths; the
    others return ``path``.
    """
    from ..overlay import export as ex
    from ..overlay.geojson import to_geojson

    if kind == "geojson":
        to_geojson(result, path, source=source, top_k=topk["k"])
        return Path(path)
    if kind == "csv":
        return ex.write_csv(result, path)
    if kind == "clam":
        return ex.write_clam_h5(result, path, source=source)
    if kind == "tiff":
        return ex.write_heatmap_tiff(result, path, source=source, method=method, mpp=mpp,
                                     **norm)
    if kind == "crops":
        return ex.write_topk_crops(result, path, indices, source=source, slide=slide)
    if kind == "sidecar":
        return ex.write_sidecar(path, result, source=source, method=method,
                                bag_source=bag_source, colormap=colormap, topk=topk, **norm)
    raise ValueError(f"unknown export {kind!r}; choose one of {list(EXPORTS)}")


class ExportBox(QGroupBox):
    """One button per export and "Open result...": ``export(kind, path)`` writes, ``open(path)``
    shows a saved result (both given by the dock)."""

    def __init__(self, export: Callable[[str, Any], Any], open_result: Callable[[str], Any],
                 stem: Callable[[], str], parent: QWidget | None = None):
        super().__init__("Export", parent)
        self._export, self._open, self._stem = export, open_result, stem
        g = QGridLayout(self)
        self.buttons: dict[str, QPushButton] = {}
        for i, (kind, label) in enumerate(EXPORTS.items()):
            b = QPushButton(label)
            b.clicked.connect(partial(self._dialog, kind))
            self.buttons[kind] = b
            g.addWidget(b, i // 2, i % 2)
        self.open_button = QPushButton("Open result\u2026")
        self.open_button.setToolTip("Show a saved result (.h5) or sidecar (.milview.json)")
        self.open_button.clicked.connect(self._open_dialog)
        g.addWidget(self.open_button, len(EXPORTS) // 2 + 1, 0, 1, 2)

    def ask_path(self, kind: str) -> str:
        """The file (or folder, for crops) to export to, from a dialog ('' = cancelled); a
        sidecar always ends ``.milview.json`` (napari offers our reader for those only)."""
        if kind == "crops":
            return QFileDialog.getExistingDirectory(self, "Folder for the top-K PNGs")
        suffix, filt = SUFFIXES[kind]
        path, _ = QFileDialog.getSaveFileName(self, EXPORTS[kind], self._stem() + suffix, filt)
        if path and kind == "sidecar" and not path.lower().endswith(suffix):
            path = (path[:-5] if path.lower().endswith(".json") else path) + suffix
        return path

    def _dialog(self, kind: str, *_) -> None:
        path = self.ask_path(kind)
        if path:
            export_and_say(EXPORTS[kind], partial(self._export, kind, path), path)

    def _open_dialog(self) -> None:
        from napari.utils.notifications import show_error

        from ._common import one_line

        path, _ = QFileDialog.getOpenFileName(self, "Open result", "",
                                              "Results (*.h5 *.json);;All files (*)")
        if not path:
            return
        try:
            self._open(path)
        except Exception as e:  # noqa: BLE001 - shown as one line
            show_error(f"Open result: {one_line(e)}")
