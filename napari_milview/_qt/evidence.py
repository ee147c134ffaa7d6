"""The MIL dock's Evidence section: how the picked slide's attention compares with an
annotation, whether the prediction follows it, what happens without a region, and whether
several checkpoints of one model agree.

For the picked slide's result (:class:`.overlays.SlideOverlays`; the run's bag and model are
kept there, ``bag`` / ``model``):

- **Annotations**: a QuPath GeoJSON / ASAP XML file (``evidence.annotations``), or a Shapes
  or Labels layer drawn on the slide. A file's regions are shown as a Shapes layer
  ``annotations (slide)`` in the slide's own world (level-0 px x mpp, the heatmap's
  placement) and follow the slide's moves like the heatmap (``JobDock._on_slide``); tumour
  outlines in :data:`POSITIVE_COLOUR`, exclusions in :data:`EXCLUDE_COLOUR`. A file that
  cannot be read is one line in the section and a notification.
- **Numbers** per attention source (combo, default = the result's): localisation (AUROC, AP,
  top-K precision, mass inside, Dice) at the overlap fraction and K of the spin boxes, and
  concentration (entropy, effective N, top 1 % / top-K mass; per branch for ACMIL), at once
  (O(N log N) numpy); faithfulness (deletion / insertion AUC against seeded random orders,
  the top-K patches alone) in a background :class:`FaithfulnessJob` on the run's cached
  features, cancellable between model calls. ROC / PR and deletion / insertion plots are
  ``evidence.plots`` PNGs shown as pixmaps.
- **What if**: a Shapes layer picks a region; the model re-predicts on the cached features
  without it (or from it alone) as soon as the region or the choice changes.
- **Disagreement**: several checkpoints of one model (folds) run on the run's bag in a
  :class:`~napari_milview.jobs.DisagreementJob`; per-patch mean / spread / rank spread
  become heatmap layers and the spread of their predictions a line.
- **Export**: the numbers as CSV / JSON, the plots as PNG.

The jobs are :class:`~napari_milview.jobs.FaithfulnessJob` and
:class:`~napari_milview.jobs.DisagreementJob` (Qt-free generators), run in napari's
``create_worker`` like the dock's runs; closing the dock cancels and joins them
(:meth:`EvidenceBox.stop_all`). Layers with a colour bar (the disagreement heatmaps) are
never removed here (``overlays`` says why); the annotation layer (a Shapes layer) may be
replaced, and the user may remove it at any time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import weakref
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtGui import QPixmap
from qtpy.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..jobs import (
    DisagreementConfig,
    DisagreementJob,
    EvidenceUpdate,
    FaithfulnessConfig,
    FaithfulnessJob,
    Job,
    one_line,
    relay,
)
from ._common import slide_frame, spin, stop_jobs

__all__ = ["EvidenceBox", "labels_annotations", "layer_to_level0", "level0_to_world",
           "shapes_polygons"]

log = logging.getLogger(__name__)

#: Edge colours of the annotation layer: positive (tumour) outlines, exclusions.
POSITIVE_COLOUR = "#00ff66"
EXCLUDE_COLOUR = "#3d8bff"
#: What the layers this section makes say in ``metadata["milview"]``.
ANNOTATION_LAYER = "annotations"
FOLDS_LAYER = "folds"
#: Plot size in inches at 100 dpi (scaled to the dock's width).
PLOT_SIZE = (5.2, 2.5)
#: File dialog filter of annotation files.
ANNOTATION_FILES = "Annotations (*.geojson *.json *.xml);;All files (*)"


# --------------------------------------------------------------------------------------------
# coordinates: level-0 pixels (x, y) <-> the slide's world
# --------------------------------------------------------------------------------------------
def _matrix(layer) -> np.ndarray:
    """[3, 3]: a 2-D layer's data (row, col) -> world, its scale included."""
    return slide_frame(layer) @ np.diag([*np.asarray(layer.scale[-2:], float), 1.0])


def level0_to_world(xy: np.ndarray, mpp: float | None) -> np.ndarray:
    """[M, 2] level-0 (x, y) (pixel-edge convention) -> [M, 2] (row, col) in the slide's own
    world (level-0 px x mpp, as ``overlay.topk.patch_rectangles``): pixel x spans
    [x - 1/2, x + 1/2) in the slide layer's data."""
    f = 1.0 if mpp is None else float(mpp)
    p = np.asarray(xy, dtype=np.float64).reshape(-1, 2) - 0.5
    return p[:, ::-1] * f


def layer_to_level0(layer, slide_layer, points: np.ndarray) -> np.ndarray:
    """[M, 2] data (row, col) of ``layer`` -> [M, 2] level-0 (x, y) of ``slide_layer``, through
    both layers' scale, translate, rotate, shear and affine (a drawn layer follows the
    world, the slide may have been moved)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    m = np.linalg.inv(_matrix(slide_layer)) @ _matrix(layer)
    rc = pts @ m[:2, :2].T + m[:2, 2]
    return rc[:, ::-1] + 0.5


def _ellipse(corners: np.ndarray, n: int = 64) -> np.ndarray:
    """The outline of an ellipse given by napari's 4 bounding-box corners."""
    c = corners.mean(axis=0)
    a, b = (corners[1] - corners[0]) / 2, (corners[3] - corners[0]) / 2
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)[:, None]
    return c + np.cos(t) * a + np.sin(t) * b


def shapes_polygons(layer, slide_layer) -> tuple[list[np.ndarray], list[str]]:
    """(polygons [M, 2] level-0 (x, y), what was left out) of a Shapes layer: polygons,
    rectangles and ellipses (their outline); lines and paths are not regions."""
    polys, skipped = [], []
    for k, (data, kind) in enumerate(zip(layer.data, layer.shape_type, strict=False)):
        pts = np.asarray(data, dtype=np.float64)[:, -2:]
        if kind == "ellipse":
            pts = _ellipse(pts)
        elif kind not in ("polygon", "rectangle"):
            skipped.append(f"shape {k} is a {kind}, not a region")
            continue
        polys.append(layer_to_level0(layer, slide_layer, pts))
    return polys, skipped


def labels_annotations(layer, slide_layer):
    """``evidence.annotations.from_labels`` of a 2-D Labels layer, placed on the slide (a
    layer scaled and shifted against the slide; rotated or sheared ones are refused)."""
    from ..evidence.annotations import AnnotationError, from_labels

    data = np.asarray(layer.data)
    if data.ndim != 2:
        raise AnnotationError(layer.name, f"a 2-D Labels layer is needed, got {data.ndim}-D")
    m = np.linalg.inv(_matrix(slide_layer)) @ _matrix(layer)
    if abs(m[0, 1]) > 1e-9 * abs(m[0, 0]) or abs(m[1, 0]) > 1e-9 * abs(m[1, 1]) or \
            not np.isclose(m[0, 0], m[1, 1], rtol=1e-6) or m[0, 0] <= 0:
        raise AnnotationError(layer.name, "is rotated, sheared or unevenly scaled against the "
                                          "slide: draw it on the slide's grid")
    s = float(m[0, 0])
    origin = (m[1, 2] - s / 2 + 0.5, m[0, 2] - s / 2 + 0.5)
    ann = from_labels(data, s, origin)
    ann.source = f"layer {layer.name}"
    return ann


# --------------------------------------------------------------------------------------------
# per slide
# --------------------------------------------------------------------------------------------
class SlideEvidence:
    """What the section holds for one slide's result."""

    def __init__(self) -> None:
        self.result = None  # the result these numbers belong to
        self.annotations = None
        self.overlap: np.ndarray | None = None  # [N] float64
        self.layer = None  # the annotation Shapes layer (None: none, or the user removed it)
        self.faithfulness: dict[str, dict] = {}
        self.faith_key: tuple = ()
        self.folds: dict | None = None
        self.fold_layers: dict[str, Any] = {}
        self.what_if: dict | None = None

    def forget_result(self) -> None:
        """A new result on the slide: what was computed from the old one goes (the
        annotations stay, their overlap is recomputed)."""
        self.overlap = None
        self.faithfulness, self.faith_key = {}, ()
        self.folds, self.what_if = None, None


# --------------------------------------------------------------------------------------------
# the section
# --------------------------------------------------------------------------------------------
class EvidenceBox(QGroupBox):
    """The "Evidence" section of the MIL dock (``dock``: the :class:`.mil_widget.MILWidget`).

    Attributes
    ----------
    numbers : dict
        What the numbers label shows now: ``localisation``, ``concentration``,
        ``faithfulness`` (or None), ``branches`` (source -> concentration), ``source``.
    job : Job or None
        The evidence job running now.
    """

    #: emitted when an evidence job ends ("done", "cancelled", "failed")
    job_finished = Signal(str)
    #: emitted after the numbers were recomputed
    numbers_changed = Signal()

    def __init__(self, dock, parent: QWidget | None = None):
        super().__init__("Evidence", parent)
        self.dock = dock
        self.viewer = dock.viewer
        self.job: Job | None = None
        self.worker = None
        self._jobs: list = []
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.numbers: dict = {}
        self._roc_png: bytes | None = None
        self._region_layer = None
        self._build()
        self.viewer.layers.events.inserted.connect(self._on_layers)
        self.viewer.layers.events.removed.connect(self._on_layers)
        self.destroyed.connect(partial(stop_jobs, self._jobs))
        dock.result_ready.connect(self.refresh)  # the dock's _show_panel calls refresh too
        self._what_if_timer = QTimer(self)
        self._what_if_timer.setSingleShot(True)
        self._what_if_timer.setInterval(150)
        self._what_if_timer.timeout.connect(self.update_what_if)
        self._on_layers()
        self.refresh()

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        v = QVBoxLayout(self)
        # annotations
        self.load_button = QPushButton("Load annotations\u2026")
        self.load_button.setToolTip("QuPath GeoJSON or ASAP XML (CAMELYON), level-0 pixels")
        self.load_button.clicked.connect(self._load_dialog)
        self.drawn_combo = QComboBox()
        self.drawn_combo.setToolTip("A Shapes or Labels layer drawn on the slide")
        self.use_button = QPushButton("Use layer")
        self.use_button.clicked.connect(lambda *_: self.use_layer())
        row = QHBoxLayout()
        row.addWidget(self.load_button)
        row.addWidget(self.drawn_combo, 1)
        row.addWidget(self.use_button)
        v.addLayout(row)
        self.ann_info = QLabel("No annotations: load a file or use a drawn layer.")
        self.ann_info.setWordWrap(True)
        self.ann_info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        v.addWidget(self.ann_info)

        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        self.source_combo = QComboBox()
        self.source_combo.setToolTip("The attention source measured")
        self.source_combo.currentIndexChanged.connect(lambda *_: self.update_numbers())
        form.addRow("Source", self.source_combo)
        self.fraction = spin(0.0, 1.0, 0.5, decimals=2, step=0.05)
        self.fraction.setToolTip("A patch is positive when at least this fraction of it lies "
                                 "inside the annotation (0: any overlap)")
        self.k_spin = QSpinBox()
        self.k_spin.setRange(0, 100_000)
        self.k_spin.setSpecialValueText("auto")
        self.k_spin.setKeyboardTracking(False)
        self.k_spin.setToolTip("K of top-K precision (auto: the number of positive patches), "
                               "top-K mass and the top-K prediction (auto: 20)")
        pair = QHBoxLayout()
        pair.addWidget(QLabel("Overlap \u2265"))
        pair.addWidget(self.fraction)
        pair.addWidget(QLabel("K"))
        pair.addWidget(self.k_spin)
        form.addRow(pair)
        self.fraction.valueChanged.connect(lambda *_: self.update_numbers(True))
        self.k_spin.valueChanged.connect(lambda *_: self.update_numbers())
        v.addLayout(form)
        self.numbers_label = QLabel("")
        self.numbers_label.setWordWrap(True)
        self.numbers_label.setTextFormat(Qt.TextFormat.RichText)
        self.numbers_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        v.addWidget(self.numbers_label)
        self.roc_plot = QLabel()
        self.roc_plot.setAlignment(Qt.AlignmentFlag.AlignCenter)
        v.addWidget(self.roc_plot)

        # faithfulness
        self.orders_spin = QSpinBox()
        self.orders_spin.setRange(0, 10_000)
        self.orders_spin.setValue(5)
        self.orders_spin.setToolTip("Random orders averaged as the baseline")
        self.orders_spin.setKeyboardTracking(False)
        self.orders_spin.valueChanged.connect(lambda *_: self.update_numbers())
        self.faith_button = QPushButton("Faithfulness")
        self.faith_button.setToolTip("Deletion / insertion on the run's cached features, every "
                                     "source (background job)")
        self.faith_button.clicked.connect(lambda *_: self.run_faithfulness())
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(lambda *_: self.cancel())
        row = QHBoxLayout()
        row.addWidget(self.faith_button)
        row.addWidget(QLabel("random"))
        row.addWidget(self.orders_spin)
        row.addWidget(self.cancel_button)
        v.addLayout(row)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        v.addWidget(self.status)
        self.curves_plot = QLabel()
        self.curves_plot.setAlignment(Qt.AlignmentFlag.AlignCenter)
        v.addWidget(self.curves_plot)

        # what if
        box = QGroupBox("What if")
        g = QGridLayout(box)
        self.region_combo = QComboBox()
        self.region_combo.setToolTip("A Shapes layer with the region")
        self.region_combo.currentIndexChanged.connect(self._on_region_choice)
        self.without_radio = QRadioButton("without it")
        self.alone_radio = QRadioButton("it alone")
        self._mode = QButtonGroup(self)
        self._mode.addButton(self.without_radio)
        self._mode.addButton(self.alone_radio)
        self.without_radio.setChecked(True)
        self.without_radio.toggled.connect(lambda *_: self.update_what_if())
        self.what_if_label = QLabel("Draw a region in a Shapes layer.")
        self.what_if_label.setWordWrap(True)
        g.addWidget(QLabel("Region"), 0, 0)
        g.addWidget(self.region_combo, 0, 1, 1, 2)
        g.addWidget(self.without_radio, 1, 1)
        g.addWidget(self.alone_radio, 1, 2)
        g.addWidget(self.what_if_label, 2, 0, 1, 3)
        v.addWidget(box)

        # disagreement
        box = QGroupBox("Disagreement (folds)")
        b = QVBoxLayout(box)
        self.folds_button = QPushButton("Load checkpoints\u2026")
        self.folds_button.setToolTip("Two or more checkpoints of one model (folds), run on "
                                     "this run's features")
        self.folds_button.clicked.connect(self._folds_dialog)
        self.folds_label = QLabel("")
        self.folds_label.setWordWrap(True)
        b.addWidget(self.folds_button)
        b.addWidget(self.folds_label)
        v.addWidget(box)

        # export
        row = QHBoxLayout()
        self.export_buttons: dict[str, QPushButton] = {}
        for kind, label in (("csv", "CSV"), ("json", "JSON"), ("png", "PNG")):
            btn = QPushButton(label)
            btn.setToolTip(f"Export the evidence as {label}")
            btn.clicked.connect(partial(self._export_dialog, kind))
            self.export_buttons[kind] = btn
            row.addWidget(btn)
        v.addLayout(row)

    # ------------------------------------------------------------------ state
    @property
    def overlays(self):
        return self.dock.current

    @property
    def result(self):
        return self.overlays.result

    @property
    def slide_layer(self):
        return self.overlays.slide_layer

    def state(self, ov=None) -> SlideEvidence:
        """The evidence of ``ov``'s slide (default: the picked one), reset when its result
        changed."""
        ov = ov if ov is not None else self.overlays
        st = self._states.get(ov)
        if st is None:
            st = self._states[ov] = SlideEvidence()
        if st.result is not ov.result:
            st.forget_result()
            st.result = ov.result
        return st

    @property
    def features(self):
        """The run's cached features [N, D] (None: a result opened from a file)."""
        ov = self.overlays
        if ov.bag is None or ov.result is None or ov.bag_result is not ov.result:
            return None
        return ov.bag.features

    @property
    def model(self):
        """The model that made the picked slide's result (None: not known here)."""
        ov = self.overlays
        return ov.model[0] if ov.model is not None and ov.bag_result is ov.result else None

    @property
    def source(self) -> str | None:
        return self.source_combo.currentData()

    def set_source(self, name: str) -> None:
        i = self.source_combo.findData(name)
        if i < 0:
            raise KeyError(f"no source {name!r}")
        self.source_combo.setCurrentIndex(i)

    # ------------------------------------------------------------------ layers
    def _on_layers(self, event=None) -> None:
        from napari.layers import Labels, Shapes

        for st in list(self._states.values()):
            if st.layer is not None and st.layer not in self.viewer.layers:
                st.layer = None  # removed by hand: the annotations stay loaded
            st.fold_layers = {k: v for k, v in st.fold_layers.items() if v in self.viewer.layers}
        mine = {id(st.layer) for st in self._states.values() if st.layer is not None}
        drawn = [lyr for lyr in self.viewer.layers if isinstance(lyr, Shapes | Labels)
                 and id(lyr) not in mine and lyr.metadata.get("milview") != "topk"]
        regions = [lyr for lyr in self.viewer.layers if isinstance(lyr, Shapes)
                   and lyr.metadata.get("milview") != "topk"]
        self._fill(self.drawn_combo, drawn)
        self._fill(self.region_combo, regions)
        self._on_region_choice()
        self._update_enabled()

    @staticmethod
    def _fill(combo: QComboBox, layers: list) -> None:
        keep = combo.currentData()
        combo.blockSignals(True)
        combo.clear()
        for lyr in layers:
            combo.addItem(lyr.name, lyr)
        i = next((i for i, lyr in enumerate(layers) if lyr is keep), -1)
        combo.setCurrentIndex(i if i >= 0 else len(layers) - 1)
        combo.blockSignals(False)

    def _update_enabled(self) -> None:
        r = self.result
        busy = self.job is not None
        has_bag = self.features is not None and self.model is not None
        self.load_button.setEnabled(r is not None)
        self.use_button.setEnabled(r is not None and self.drawn_combo.count() > 0)
        self.faith_button.setEnabled(has_bag and not busy)
        self.faith_button.setToolTip("" if has_bag else "needs this run's features: run the "
                                     "model on the slide (a result opened from a file has "
                                     "none)")
        self.folds_button.setEnabled(self.features is not None and not busy)
        self.cancel_button.setEnabled(busy)
        for btn in self.export_buttons.values():
            btn.setEnabled(bool(self.numbers))

    # ------------------------------------------------------------------ refresh
    def refresh(self, *_) -> None:
        """The picked slide or its result changed: sources, numbers, plots, what-if."""
        r = self.result
        keep = self.source
        self.source_combo.blockSignals(True)
        self.source_combo.clear()
        if r is not None:
            for name in r.sources:
                self.source_combo.addItem(name + (" (default)" if name == r.default_source
                                                  else ""), name)
            pick = keep if keep in r.sources else r.default_source
            self.source_combo.setCurrentIndex(self.source_combo.findData(pick))
        self.source_combo.blockSignals(False)
        self.update_numbers()
        self._show_folds()
        self.update_what_if()
        self._update_enabled()

    def say(self, text: str, error: bool = False) -> None:
        """One line in the section's status (and a notification for an error)."""
        self.status.setText(text)
        if error:
            from napari.utils.notifications import show_error

            show_error(f"Evidence: {text}")

    # ------------------------------------------------------------------ annotations
    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Annotations", "", ANNOTATION_FILES)
        if path:
            self.load_annotations(path)

    def load_annotations(self, path) -> bool:
        """Read a GeoJSON / ASAP XML file for the picked slide and show it; False (the
        reason in the section and a notification) when it cannot be used."""
        from ..evidence.annotations import read_annotations

        if self.result is None:
            self.say("run the model on this slide first", error=True)
            return False
        size = None
        if self.slide_layer is not None:
            size = tuple(self.slide_layer.metadata["slide"].info.dimensions)
        try:
            ann = read_annotations(path, slide_size=size)
        except Exception as e:  # noqa: BLE001 - one line for the user
            self.ann_info.setText(f"Not loaded: {one_line(e)}")
            self.say(one_line(e), error=True)
            return False
        self.set_annotations(ann, show=True)
        return True

    def use_layer(self, layer=None) -> bool:
        """Take the regions of a Shapes or Labels layer drawn on the slide (default: the one
        the combo picks) as the annotations (the layer itself shows them)."""
        from napari.layers import Labels

        from ..evidence.annotations import from_polygons

        layer = layer if layer is not None else self.drawn_combo.currentData()
        if layer is None or self.result is None:
            return False
        slide = self.slide_layer
        try:
            if slide is None:
                raise ValueError("no slide layer to place the drawing on")
            if isinstance(layer, Labels):
                ann = labels_annotations(layer, slide)
            else:
                polys, skipped = shapes_polygons(layer, slide)
                if not polys:
                    raise ValueError(f"{layer.name}: no polygon, rectangle or ellipse")
                ann = from_polygons(polys, label="drawn")
                ann.source = f"layer {layer.name}"
                ann.skipped = skipped
        except Exception as e:  # noqa: BLE001 - one line for the user
            self.ann_info.setText(f"Not used: {one_line(e)}")
            self.say(one_line(e), error=True)
            return False
        self.set_annotations(ann, show=False)
        return True

    def set_annotations(self, ann, show: bool = True) -> None:
        """Use ``ann`` (``evidence.annotations.Annotations``) on the picked slide; ``show``:
        draw it as the slide's annotation layer."""
        st = self.state()
        st.annotations = ann
        st.overlap = None
        if show:
            self._show_annotations(st, ann)
        self.update_numbers()

    def _show_annotations(self, st: SlideEvidence, ann) -> None:
        from napari.layers import Shapes

        ov = self.overlays
        mpp = ov.mpp()
        shapes, colours = [], []
        for reg in ann.regions:
            for ring in reg.rings():
                shapes.append(level0_to_world(ring, mpp))
                colours.append(EXCLUDE_COLOUR if reg.exclude else POSITIVE_COLOUR)
        r = self.result
        side = r.patch_size_level0 * (mpp or 1.0)
        kwargs = dict(shape_type="polygon", edge_color=colours or POSITIVE_COLOUR,
                      face_color="transparent", edge_width=max(side * 0.04, 1e-9),
                      name=ov.name("annotations"), metadata={
                          "milview": ANNOTATION_LAYER, "source": ann.source}, **ov.units())
        layers = self.viewer.layers
        old, index = st.layer, None
        active = layers.selection.active
        if old is not None and old in layers:  # a Shapes layer: no colour bar, safe to remove
            index = layers.index(old)
            layers.remove(old)
        new = Shapes(shapes if shapes else None, ndim=2, **kwargs)
        if index is None:
            layers.append(new)
        else:
            layers.insert(index, new)
        st.layer = new
        self.dock._on_slide(new, ov.slide_layer)
        if active is not None and active in layers:
            layers.selection.active = active
        self._on_layers()

    @property
    def annotation_layer(self):
        """The picked slide's annotation layer (None: none, or removed)."""
        st = self.state()
        return st.layer if st.layer is not None and st.layer in self.viewer.layers else None

    # ------------------------------------------------------------------ numbers
    def _k(self) -> int | None:
        return self.k_spin.value() or None

    def overlap(self) -> np.ndarray | None:
        """[N] fraction of each patch inside the annotation (None: no annotations)."""
        from ..evidence.annotations import patch_overlap

        st, r = self.state(), self.result
        if st.annotations is None or r is None:
            return None
        if st.overlap is None:
            st.overlap = patch_overlap(st.annotations, r.coords, r.patch_size_level0)
        return st.overlap

    def positive(self) -> np.ndarray | None:
        from ..evidence.annotations import patch_labels

        ov = self.overlap()
        return None if ov is None else patch_labels(ov, self.fraction.value())

    def compute(self, source: str) -> dict:
        """Localisation (with annotations) and concentration of ``source`` now."""
        from ..evidence.metrics import concentration, localisation

        r = self.result
        scores = r.attention(source)
        out: dict[str, Any] = {"source": source, "localisation": None}
        ov = self.overlap()
        if ov is not None:
            out["localisation"] = localisation(scores, self.positive(), overlap=ov,
                                               k=self._k())
        out["concentration"] = _concentration(source, scores, self._k(), concentration)
        return out

    def update_numbers(self, fraction_changed: bool = False) -> None:
        """Recompute and show the numbers and the ROC / PR plot of the picked source."""
        r, src = self.result, self.source
        if r is None or src is None:
            self.numbers = {}
            self.numbers_label.setText("No result on this slide yet." if r is None else "")
            self.roc_plot.clear()
            self.curves_plot.clear()
            self._roc_png = None
            self._update_enabled()
            return
        st = self.state()
        if st.annotations is not None:
            pos = self.positive()
            a = st.annotations
            n_ex = sum(r_.exclude for r_ in a.regions)
            self.ann_info.setText(
                f"{Path(a.source).name or a.source}: {len(a.regions) - n_ex} region(s)"
                + (f", {n_ex} excluded" if n_ex else "")
                + f" \u00b7 {int(pos.sum())} of {r.n} patches positive"
                + (f" \u00b7 {len(a.skipped)} left out" if a.skipped else ""))
        try:
            nums = self.compute(src)
        except Exception as e:  # noqa: BLE001 - one line for the user
            self.say(f"numbers: {one_line(e)}", error=True)
            return
        nums["branches"] = {}
        branches = [s for s in r.sources if s.startswith("branch/") and s != src
                    and s != "branch/mean"]
        if len(branches) > 1 and src.startswith("branch/"):
            from ..evidence.metrics import concentration

            nums["branches"] = {b: _concentration(b, r.attention(b), self._k(), concentration)
                                for b in branches}
        nums["faithfulness"] = st.faithfulness.get(src) if st.faith_key == self._faith_key() \
            else None
        self.numbers = nums
        self.numbers_label.setText(_numbers_html(nums, self.fraction.value(), r.classes))
        loc = nums["localisation"]
        self._roc_png = None
        if loc is not None:
            try:
                from ..evidence.plots import roc_pr_png

                self._roc_png = roc_pr_png(loc, src, width=PLOT_SIZE[0], height=PLOT_SIZE[1])
            except Exception as e:  # noqa: BLE001 - one line for the user
                self.say(f"ROC plot: {one_line(e)}", error=True)
        self._set_plot(self.roc_plot, self._roc_png)
        fa = nums["faithfulness"]
        self._set_plot(self.curves_plot, fa.get("png") if fa else None)
        if fraction_changed:
            self.update_what_if()
        self._update_enabled()
        self.numbers_changed.emit()

    def _set_plot(self, label: QLabel, png: bytes | None) -> None:
        if not png:
            label.clear()
            return
        pix = QPixmap()
        pix.loadFromData(png, "PNG")
        width = max(200, self.width() - 24) if self.isVisible() else 300
        label.setPixmap(pix.scaledToWidth(min(width, pix.width()),
                                          Qt.TransformationMode.SmoothTransformation))

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        fa = self.numbers.get("faithfulness") if self.numbers else None
        self._set_plot(self.roc_plot, self._roc_png)
        self._set_plot(self.curves_plot, fa.get("png") if fa else None)

    # ------------------------------------------------------------------ jobs
    def _faith_key(self) -> tuple:
        return (self._k(), self.orders_spin.value())

    def run_faithfulness(self) -> Job | None:
        """Start deletion / insertion of every source in a background job (the picked source
        first); None when it cannot start (the reason in the status)."""
        r, x, model = self.result, self.features, self.model
        if self.job is not None:
            return None
        if r is None or x is None or model is None:
            self.say("faithfulness needs this run's features and model: run the model on "
                     "the slide", error=True)
            return None
        src = self.source or r.default_source
        names = [src, *[s for s in r.sources if s != src]]
        cfg = FaithfulnessConfig(model=model, features=x,
                                 scores={s: r.attention(s) for s in names}, k=self._k(),
                                 random_orders=self.orders_spin.value(),
                                 classes=list(r.classes), plot_size=PLOT_SIZE)
        job = FaithfulnessJob(cfg)
        job.overlays, job.key = self.overlays, self._faith_key()
        st = self.state()
        st.faithfulness, st.faith_key = {}, job.key
        return self._start(job, "faithfulness")

    def _folds_dialog(self) -> None:
        from .parts import CHECKPOINTS

        paths, _ = QFileDialog.getOpenFileNames(self, "Checkpoints of one model (folds)", "",
                                                CHECKPOINTS)
        if paths:
            self.run_disagreement(paths)

    def run_disagreement(self, paths: list) -> Job | None:
        """Run ``paths`` (checkpoints of one model) on this run's bag in a background job."""
        bag = self.overlays.bag
        if self.job is not None:
            return None
        if self.features is None:
            self.say("disagreement needs this run's features: run the model on the slide",
                     error=True)
            return None
        if len(paths) < 2:
            self.say("choose 2 or more checkpoints of one model", error=True)
            return None
        job = DisagreementJob(DisagreementConfig([str(p) for p in paths], bag, source=None,
                                                 classes=list(self.result.classes)))
        job.overlays = self.overlays
        return self._start(job, "disagreement")

    def _start(self, job: Job, what: str) -> Job:
        from napari.qt.threading import create_worker

        worker = create_worker(relay, job.gen, _start_thread=False, _ignore_errors=True)
        worker.finished.connect(job.done.set, Qt.ConnectionType.DirectConnection)
        worker.yielded.connect(partial(self._on_update, job))
        worker.finished.connect(partial(self._on_finished, job))
        job.what = what
        self.job, self.worker = job, worker
        self._jobs.append((job, worker))
        self.status.setText(f"{what.capitalize()}: starting\u2026")
        self._update_enabled()
        worker.start()
        return job

    def _on_update(self, job: Job, u: EvidenceUpdate) -> None:
        if job.orphaned or job is not self.job:
            return
        self.status.setText(f"{u.message[:1].upper()}{u.message[1:]} ({u.done} / {u.total})")
        if isinstance(job, FaithfulnessJob) and u.source:
            st = self.state(job.overlays)
            st.faithfulness[u.source] = u.value
            if job.overlays is self.overlays and u.source == self.source:
                self.update_numbers()

    def _on_finished(self, job: Job, *_) -> None:
        job.close()
        if job.orphaned:  # the dock closed: the widget may be gone
            return
        self._jobs[:] = [(j, w) for j, w in self._jobs if j is not job]
        if job is not self.job:
            return
        self.job = self.worker = None
        if job.outcome == "pending":
            job.outcome = "cancelled"
        outcome = job.outcome
        if outcome == "done":
            try:
                self._show_done(job)
                self.status.setText(f"{job.what.capitalize()}: done.")
            except Exception as e:  # noqa: BLE001 - one line for the user
                log.exception("showing %s failed", job.what)
                outcome, job.error = "failed", one_line(e)
        if outcome == "failed":
            self.say(f"{job.what} failed: {job.error}", error=True)
        elif outcome == "cancelled":
            self.status.setText(f"{job.what.capitalize()}: cancelled.")
        self._update_enabled()
        self.job_finished.emit(outcome)

    def _show_done(self, job: Job) -> None:
        st = self.state(job.overlays)
        if isinstance(job, FaithfulnessJob):
            st.faithfulness = dict(job.result)
            if job.overlays is self.overlays:
                self.update_numbers()
        elif isinstance(job, DisagreementJob):
            st.folds = job.result
            self._fold_layers(st, job.overlays)
            if job.overlays is self.overlays:
                self._show_folds()

    def cancel(self) -> None:
        """Stop the running evidence job at its next model call."""
        if self.job is None:
            return
        self.job.stop()
        self.worker.quit()
        self.status.setText("Cancelling\u2026")
        self.cancel_button.setEnabled(False)

    def stop_all(self, wait: bool = True) -> None:
        """Cancel every evidence job and (by default) join its thread."""
        stop_jobs(self._jobs, wait=wait)
        self.job = self.worker = None

    def teardown(self) -> None:
        """Stop the jobs and disconnect from the viewer (idempotent)."""
        self.stop_all(wait=True)
        self._what_if_timer.stop()
        for emitter in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            with contextlib.suppress(ValueError, RuntimeError, TypeError):
                emitter.disconnect(self._on_layers)
        self._watch_region(None)

    # ------------------------------------------------------------------ disagreement
    def _fold_layers(self, st: SlideEvidence, ov) -> None:
        """The folds' mean, spread and rank spread as heatmap layers on ``ov``'s slide,
        updated in place when they exist (they have colour bars: never removed here)."""
        from ..overlay.heatmap import heatmap_layer
        from ..result import Result

        r, f = ov.result, st.folds
        maps = {"mean": f["mean"], "spread": f["std"], "rank spread": f["rank_spread"]}
        tmp = Result(coords=r.coords, patch_size_level0=r.patch_size_level0, sources=maps,
                     default_source="spread", classes=r.classes, logits=r.logits,
                     probabilities=r.probabilities, arch="folds", mpp=r.mpp)
        for name, cmap in (("mean", "viridis"), ("spread", "magma"), ("rank spread", "plasma")):
            data, kw, _ = heatmap_layer(tmp, name, "minmax", mpp=ov.mpp(), colormap=cmap,
                                        opacity=0.6)
            kw = {k: v for k, v in kw.items() if k != "name"}
            kw["metadata"] = {**kw["metadata"], "milview": FOLDS_LAYER, "folds": name,
                              "result": None}
            layer = st.fold_layers.get(name)
            if layer is not None and layer in self.viewer.layers:
                layer.metadata = kw["metadata"]
                layer.data = data
                continue
            kw.update(ov.units())
            layer = self.viewer.add_image(data, name=ov.name(f"folds {name}"), **kw)
            layer.visible = name == "spread"
            layer.colorbar.visible = True
            self.dock._on_slide(layer, ov.slide_layer)
            st.fold_layers[name] = layer

    def _show_folds(self) -> None:
        st = self.state() if self.result is not None else None
        f = st.folds if st is not None else None
        if not f:
            self.folds_label.setText("")
            return
        m = len(f["names"])
        i = int(np.argmax(f["prediction_mean"]))
        cls = f["classes"][i] if i < len(f["classes"]) else str(i)
        p = f["probabilities"][:, i]
        self.folds_label.setText(
            f"{m} checkpoints \u00b7 p({cls}) {f['prediction_mean'][i]:.3f} \u00b1 "
            f"{f['prediction_std'][i]:.3f} (range {p.min():.3f}\u2013{p.max():.3f}) \u00b7 "
            f"rank spread mean {float(np.mean(f['rank_spread'])):.1f} pts")

    # ------------------------------------------------------------------ what if
    def _on_region_choice(self, *_) -> None:
        self._watch_region(self.region_combo.currentData())
        self._what_if_timer.start()

    def _watch_region(self, layer) -> None:
        old = self._region_layer
        if old is layer:
            return
        if old is not None:
            with contextlib.suppress(ValueError, RuntimeError, TypeError):
                old.events.data.disconnect(self._region_changed)
        self._region_layer = layer
        if layer is not None:
            layer.events.data.connect(self._region_changed)

    def _region_changed(self, event=None) -> None:
        self._what_if_timer.start()

    def update_what_if(self) -> dict | None:
        """Re-predict without the region (or from it alone) on the cached features, now."""
        from ..evidence.annotations import from_polygons, patch_labels, patch_overlap
        from ..evidence.faithfulness import what_if

        layer, r, x, model = (self.region_combo.currentData(), self.result, self.features,
                              self.model)
        if r is None or x is None or model is None:
            self.what_if_label.setText("Needs this run's features: run the model on the slide.")
            return None
        if layer is None or layer not in self.viewer.layers or self.slide_layer is None:
            self.what_if_label.setText("Draw a region in a Shapes layer.")
            return None
        try:
            polys, _ = shapes_polygons(layer, self.slide_layer)
            if not polys:
                self.what_if_label.setText(f"{layer.name}: draw a polygon, rectangle or "
                                           "ellipse.")
                return None
            ann = from_polygons(polys, label="region")
            inside = patch_labels(patch_overlap(ann, r.coords, r.patch_size_level0),
                                  self.fraction.value())
            mode = "alone" if self.alone_radio.isChecked() else "without"
            out = what_if(model, x, inside, mode=mode)
        except Exception as e:  # noqa: BLE001 - one line for the user
            self.what_if_label.setText(f"What if: {one_line(e)}")
            return None
        out["n_inside"] = int(inside.sum())
        self.state().what_if = out
        i = int(np.argmax(out["baseline"]))
        cls = r.classes[i] if i < len(r.classes) else str(i)
        what = "without" if mode == "without" else "from"
        self.what_if_label.setText(
            f"{what} {out['n_inside']} patches of {r.n}: p({cls}) "
            f"{out['baseline'][i]:.3f} \u2192 {out['probabilities'][i]:.3f} "
            f"(<b>{out['change'][i]:+.3f}</b>)")
        return out

    # ------------------------------------------------------------------ export
    def report(self):
        """An ``evidence.report.EvidenceReport`` of every source with what is computed now
        (faithfulness where it ran)."""
        from ..evidence.report import EvidenceReport

        r, st = self.result, self.state()
        if r is None or st.annotations is None:
            raise ValueError("nothing to export: load annotations first")
        srcs = {}
        use_faith = st.faith_key == self._faith_key()
        for name in r.sources:
            c = self.compute(name)
            srcs[name] = {"localisation": c["localisation"],
                          "concentration": c["concentration"],
                          "faithfulness": st.faithfulness.get(name) if use_faith else None}
        stem = Path(str(r.slide)).name.split(".")[0] if r.slide else (r.slide_id or "slide")
        return EvidenceReport(slide=stem, classes=list(r.classes),
                              probabilities=[float(p) for p in r.probabilities],
                              default_source=r.default_source,
                              fraction=float(self.fraction.value()), overlap=self.overlap(),
                              positive=self.positive(), sources=srcs)

    def export(self, kind: str, path) -> Path | list[Path]:
        """Write the evidence as ``csv`` / ``json`` (every source) or ``png`` (the picked
        source's plots: ``path`` and ``<stem>.deletion_insertion.png``)."""
        p = Path(path)
        if kind == "csv":
            return self.report().to_csv(p)
        if kind == "json":
            from .._io import atomic_write

            rep = self.report()
            st = self.state()
            doc = {"slide": rep.slide, "annotations": st.annotations.source,
                   "fraction": rep.fraction, "classes": rep.classes,
                   "probabilities": rep.probabilities,
                   "rows": [rep.json_row(s) for s in
                            [rep.default_source, *[s for s in rep.sources
                                                   if s != rep.default_source]]]}
            if st.what_if is not None:
                doc["what_if"] = _plain(st.what_if)
            if st.folds is not None:
                doc["folds"] = _plain({k: st.folds[k] for k in (
                    "names", "prediction_mean", "prediction_std", "rank_spread_mean")
                    if k in st.folds})
            text = json.dumps(doc, indent=1)
            return atomic_write(p, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        if kind == "png":
            fa = self.numbers.get("faithfulness") if self.numbers else None
            pngs = [(p, self._roc_png)]
            if fa and fa.get("png"):
                pngs.append((p.with_name(p.name.removesuffix(".png") +
                                         ".deletion_insertion.png"), fa["png"]))
            pngs = [(q, b) for q, b in pngs if b]
            if not pngs:
                raise ValueError("no plot yet: load annotations or run faithfulness")
            for q, b in pngs:
                q.write_bytes(b)
            return [q for q, _ in pngs]
        raise ValueError(f"unknown export {kind!r}")

    def _export_dialog(self, kind: str, *_) -> None:
        from .parts import export_and_say

        filters = {"csv": "CSV (*.csv)", "json": "JSON (*.json)", "png": "PNG (*.png)"}
        stem = Path(str(self.result.slide)).name.split(".")[0] if self.result is not None \
            and self.result.slide else "evidence"
        path, _ = QFileDialog.getSaveFileName(self, f"Evidence {kind.upper()}",
                                              f"{stem}.evidence.{kind}", filters[kind])
        if path:
            export_and_say(f"evidence {kind.upper()}", partial(self.export, kind, path), path)


# --------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------
def _concentration(name: str, scores: np.ndarray, k, concentration) -> dict:
    """Concentration of a source as ``evidence.report`` measures it (softmax first for
    ``raw/...`` logits: ``concentration_input``); NaN with a note for scores that are not a
    distribution (negative values)."""
    from ..evidence.report import concentration_input

    s, note = concentration_input(name, scores)
    try:
        out = dict(concentration(s, k))
        if note:
            out["note"] = note
        return out
    except ValueError as e:
        nan = float("nan")
        return {"entropy": nan, "effective_n": nan, "top1pct_mass": nan, "topk_mass": nan,
                "k": k, "note": one_line(e)}


def _f(v, digits: int = 3) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not np.isfinite(v) else f"{v:.{digits}f}"


def _numbers_html(n: dict, fraction: float, classes: list[str]) -> str:
    lines = []
    loc, con, fa = n["localisation"], n["concentration"], n.get("faithfulness")
    if loc is not None:
        lines.append(f"<b>Localisation</b> ({loc['n_positive']} of {loc['n']} patches "
                     f"\u2265 {fraction:g} inside)")
        lines.append(f"AUROC {_f(loc['auroc'])} \u00b7 AP {_f(loc['average_precision'])} "
                     f"\u00b7 top-{loc['k']} precision {_f(loc['topk_precision'])}")
        lines.append(f"mass inside {_f(loc['mass_inside'])} \u00b7 Dice {_f(loc['dice'])} "
                     f"({loc['dice_rule']})")
        if loc.get("note"):
            lines.append(f"<i>{loc['note']}</i>")
    lines.append(f"<b>Concentration</b> entropy {_f(con['entropy'], 2)} \u00b7 effective N "
                 f"{_f(con['effective_n'], 1)} \u00b7 top 1 % mass {_f(con['top1pct_mass'])} "
                 f"\u00b7 top-{con.get('k')} mass {_f(con['topk_mass'])}")
    for b, c in n.get("branches", {}).items():
        lines.append(f"&nbsp;&nbsp;{b}: effective N {_f(c['effective_n'], 1)}, top-{c.get('k')}"
                     f" mass {_f(c['topk_mass'])}")
    if fa is not None:
        t = fa["target"]
        lines.append(f"<b>Faithfulness</b> (p({classes[t] if t < len(classes) else t})) "
                     f"deletion AUC "
                     f"{_f(fa['deletion_auc'])} (random {_f(fa['random_deletion_auc'])}) "
                     f"\u00b7 insertion AUC {_f(fa['insertion_auc'])} (random "
                     f"{_f(fa['random_insertion_auc'])}) \u00b7 top-{fa['k']} alone "
                     f"{_f(fa['topk_probability'])} (all {_f(fa['baseline'])})")
    return "<br>".join(lines)


def _plain(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out
