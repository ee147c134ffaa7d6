"""The "Staining preview and robustness" dock.

Sections, top to bottom: Slide (which slide layer), Condition (a named staining condition and
its parameters: intensity ratio, H-E angle factor, HED sigma and seed, the macenko/reinhard
reference, the PLISM folder), Preview (a lazily perturbed copy of the slide, on top of it or
side by side), Robustness (run the model under several conditions: table, range, stability
layer, CSV/JSON export).

Preview
-------
The preview layer is ``stain.lazy_preview(slide.to_dask(), perturbation)``: the same pyramid,
chunks and world placement (``scale``, ``units``) as the slide layer, each chunk perturbed when
napari draws it (only what is on screen; per-pixel, so no seams). "On top" places it exactly
over the slide: its visibility check box toggles between original and perturbed. "Side by
side" moves it right by the slide's width plus :data:`.preview.GAP` of it, in world units
(microns when the slide's mpp is known), which the widget states. Changing the condition or
a parameter updates the layer's data in place.

Threads
-------
Estimating the slide's staining (``stain.estimate_slide``, 1-4 s, cached per file) and loading
a reference run in a :class:`PrepareJob`; a robustness run is a :class:`RobustnessJob` that
drives :func:`napari_milview.stain.robustness.robustness`. Both are ``jobs.Job``
generators wrapped in napari's ``create_worker``, with a progress bar in the activity dock;
Cancel stops a run within one batch; closing or deleting the widget, or quitting, cancels and
joins every job (no thread outlives it).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..jobs import (
    Inputs,
    PrepareJob,
    RobustnessConfig,
    RobustnessJob,
    StainUpdate,
    make_perturbation,
    one_line,
    relay,
)
from ._common import JobDock, slide_mpp, spin, stop_jobs
from .parts import combo_data, export_and_say, path_field, pick_data, scrolled
from .preview import PreviewBox
from .robustness_table import RobustnessTable

log = logging.getLogger(__name__)

#: conditions whose main parameter the widget can change: condition -> (param, label)
PARAMS = {"low-intensity": "ratio", "high-intensity": "ratio", "low-similarity": "angle",
          "high-similarity": "angle", "hed-light": "sigma", "hed-strong": "sigma"}


def _preset(name: str) -> float | None:
    """The preset value of a condition's main parameter (None: it has none)."""
    from ..stain import conditions as c
    from ..stain.hed import HED_PRESETS

    return {"low-intensity": c.LOW_INTENSITY_RATIO, "high-intensity": c.HIGH_INTENSITY_RATIO,
            "low-similarity": c.LOW_SIMILARITY_ANGLE,
            "high-similarity": c.HIGH_SIMILARITY_ANGLE}.get(name, HED_PRESETS.get(name))


# --------------------------------------------------------------------------------------------
# jobs (no Qt: run in worker threads)
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# the widget
# --------------------------------------------------------------------------------------------
class StainWidget(JobDock):
    """Dock widget "Staining preview and robustness" (a :class:`._common.JobDock`:
    ``napari_viewer`` is the viewer, as npe2 passes it).

    Attributes
    ----------
    preview_layer, stability_layer : the layers this widget owns (None until made).
    preview : PreviewBox
        The preview controls and layer.
    report : RobustnessReport or None
        The last finished robustness run.
    inputs : Inputs or None
        The staining estimate and targets the preview uses now.
    """

    #: emitted when the preview layer shows a new condition (with the layer)
    preview_shown = Signal(object)
    #: emitted when a staining estimate finishes ("done", "failed", "cancelled")
    prepared = Signal(str)
    #: emitted when a robustness run ends ("done", "cancelled", "failed")
    run_finished = Signal(str)
    TITLE = "Robustness"

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(napari_viewer, "Run robustness", parent)
        self.stability_layer = None
        self.report = None
        self.inputs: Inputs | None = None
        self.prep: PrepareJob | None = None
        self._params: dict[str, dict] = {}  # condition -> overridden parameters
        self._want_preview = False
        self._build()
        self._start()
        self._on_condition()

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        content, layout, form = self._content()
        self.stain_info = QLabel("")
        self.stain_info.setWordWrap(True)
        self.stain_busy = QProgressBar()
        self.stain_busy.setRange(0, 0)  # busy indicator while estimating
        self.stain_busy.setMaximumHeight(8)
        self.stain_busy.setTextVisible(False)
        self.stain_busy.hide()
        form.addRow(self.stain_info)
        form.addRow(self.stain_busy)

        for box in (self._condition_box(), self._preview_box(), self._robustness_box()):
            layout.addWidget(box)
        layout.addStretch(1)

        scrolled(self, content, 380)  # the results table's columns in full (tested)
        self._set_export_enabled(False)

    def _condition_box(self) -> QGroupBox:
        """The condition, its main parameter, the HED seed and the targets."""
        from ..stain import CONDITIONS

        box = QGroupBox("Condition")
        form = QFormLayout(box)
        self.condition_combo = QComboBox()
        for name, text in CONDITIONS.items():
            self.condition_combo.addItem(name, name)
            self.condition_combo.setItemData(self.condition_combo.count() - 1, text,
                                             Qt.ItemDataRole.ToolTipRole)
        self.condition_combo.currentIndexChanged.connect(self._on_condition)
        self.description = QLabel("")
        self.description.setWordWrap(True)
        self.param_spin = spin(0.0, 5.0, 1.0, decimals=3, step=0.05)
        self.param_spin.valueChanged.connect(self._on_param)
        self.param_label = QLabel("Ratio")
        self.reset_button = QPushButton("Preset")
        self.reset_button.setToolTip("Back to the condition's preset value")
        self.reset_button.clicked.connect(self._reset_param)
        prow = QHBoxLayout()
        prow.addWidget(self.param_spin, 1)
        prow.addWidget(self.reset_button)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setToolTip("Seed of the HED jitter draw (one draw per slide)")
        self.seed_spin.setKeyboardTracking(False)
        self.seed_spin.valueChanged.connect(self._on_inputs_changed)
        self.reference_edit = QLineEdit()
        self.reference_edit.setPlaceholderText("built-in CMU-1-Small-Region")
        self.reference_edit.setToolTip("Target of macenko / reinhard: an image tile, a "
                                       "reference JSON or a slide")
        self.reference_edit.editingFinished.connect(self._on_inputs_changed)
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("presets (no folder)")
        self.folder_edit.setToolTip("PLISM files (*_median.npz, median_intensities_per_"
                                    "condition.csv) or reference JSONs: the protocol's four "
                                    "conditions then use the published values")
        self.folder_edit.editingFinished.connect(self._on_inputs_changed)
        form.addRow("Condition", self.condition_combo)
        form.addRow(self.description)
        form.addRow(self.param_label, prow)
        form.addRow("HED seed", self.seed_spin)
        form.addRow("Reference", path_field(self.reference_edit, self._pick_reference))
        form.addRow("PLISM folder", path_field(self.folder_edit, self._pick_folder))
        return box


    def _preview_box(self) -> QGroupBox:
        """Show the preview, on top or side by side, visible or not (``preview.PreviewBox``)."""
        self.preview = p = PreviewBox(self.viewer, self._on_slide)
        p.wanted.connect(self.show_preview)
        p.shown.connect(self.preview_shown)
        self.placement_combo, self.visible_check = p.placement_combo, p.visible_check
        self.preview_button, self.placement_info = p.button, p.info
        return p

    def _robustness_box(self) -> QGroupBox:
        """Conditions to run, model, encoder, run box, results, exports."""
        from ..stain import CONDITIONS
        from ..stain.robustness import DEFAULT_CONDITIONS

        box = QGroupBox("Robustness")
        v = QVBoxLayout(box)
        self.conditions_list = QListWidget()
        self.conditions_list.setMaximumHeight(120)
        for name in CONDITIONS:
            item = QListWidgetItem(name)
            item.setData(Qt.ItemDataRole.UserRole, name)
            item.setCheckState(Qt.CheckState.Checked if name in DEFAULT_CONDITIONS
                               else Qt.CheckState.Unchecked)
            if name == "reference":  # always run: everything is compared with it
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsUserCheckable)
            self.conditions_list.addItem(item)
        head = QLabel("Conditions (the parameters set above are used)")
        head.setWordWrap(True)
        v.addWidget(head)
        v.addWidget(self.conditions_list)
        self.k_spin = QSpinBox()
        self.k_spin.setRange(1, 10000)
        self.k_spin.setValue(20)
        self.k_spin.setToolTip("K of the top-K overlap (Jaccard) with the reference")
        v.addWidget(self.models)
        v.addWidget(self.encoders)
        self.run_box.form.insertRow(2, "Top-K", self.k_spin)
        v.addWidget(self.run_box)
        self.table = RobustnessTable()
        v.addWidget(self.table)
        self.range_label = QLabel("")
        self.range_label.setWordWrap(True)
        self.range_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        v.addWidget(self.range_label)
        erow = QHBoxLayout()
        self.csv_button = QPushButton("Export CSV")
        self.csv_button.clicked.connect(partial(self._export_dialog, "csv"))
        self.json_button = QPushButton("Export JSON")
        self.json_button.clicked.connect(partial(self._export_dialog, "json"))
        erow.addWidget(self.csv_button)
        erow.addWidget(self.json_button)
        v.addLayout(erow)
        return box


    @property
    def preview_layer(self):
        """The preview layer (None until shown)."""
        return self.preview.layer

    # ------------------------------------------------------------------ slide
    @property
    def slide(self):
        layer = self.slide_layer
        return None if layer is None else layer.metadata["slide"]

    def _on_layers_changed(self, event=None) -> None:
        changed = self._follow_slide_layers(event)
        if self.preview.layer is not None and not self.preview.alive():
            self.preview.layer = None  # removed by the user: no preview until asked again
            self._want_preview = False
        if self.stability_layer is not None and self.stability_layer not in self.viewer.layers:
            self.stability_layer = None
        if changed or event is None:
            self._on_slide_choice()

    def _on_slide_choice(self, *_) -> None:
        layer = self.slide_layer
        if layer is None:
            self.stain_info.setText("Open a slide (File > Open, or File > Open Sample > "
                                    "napari-milview).")
        elif self.inputs is None or self.inputs.key[0] != str(self.slide.path):
            self.stain_info.setText("Staining not estimated yet (done when needed).")
        self._update_enabled()
        if self.preview.layer is not None:
            self.show_preview()

    # ------------------------------------------------------------------ condition
    condition = combo_data("condition_combo", "The condition chosen now.")

    def set_condition(self, name: str) -> None:
        """Choose a condition (updates the preview when there is one)."""
        pick_data(self.condition_combo, name, "condition")

    def set_param(self, value: float) -> None:
        """Set the chosen condition's main parameter (ratio, angle factor or sigma)."""
        self.param_spin.setValue(float(value))

    def _on_condition(self, *_) -> None:
        from ..stain import CONDITIONS

        name = self.condition
        self.description.setText(CONDITIONS[name])
        kind = PARAMS.get(name)
        self.param_spin.setEnabled(kind is not None)
        self.reset_button.setEnabled(kind is not None)
        self.param_label.setText({"ratio": "H&E ratio", "angle": "Angle \u00d7",
                                  "sigma": "HED \u03c3", None: "Parameter"}[kind])
        value = self._params.get(name, {}).get(kind, _preset(name)) if kind else 0.0
        self.param_spin.blockSignals(True)  # setRange may clamp: not a user's change either
        self.param_spin.setRange(*{"ratio": (0.05, 5.0), "angle": (0.05, 3.0),
                                   "sigma": (0.0, 0.95), None: (0.0, 5.0)}[kind])
        self.param_spin.setValue(float(value or 0.0))
        self.param_spin.blockSignals(False)
        self.seed_spin.setEnabled(name.startswith("hed"))
        self.reference_edit.setEnabled(name in ("macenko", "reinhard"))
        self._refresh_preview()

    def _on_param(self, value: float) -> None:
        kind = PARAMS.get(self.condition)
        if kind is None:
            return
        self._params.setdefault(self.condition, {})[kind] = float(value)
        self._refresh_preview()

    def _reset_param(self) -> None:
        self._params.pop(self.condition, None)
        self._on_condition()

    def _on_inputs_changed(self, *_) -> None:
        self._refresh_preview()

    def _pick_reference(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Reference (tile, JSON or slide)", "",
            "References (*.png *.jpg *.jpeg *.bmp *.json *.svs *.tif *.tiff *.ndpi "
            "*.mrxs);;All files (*)")
        if path:
            self.reference_edit.setText(path)
            self._on_inputs_changed()

    def _pick_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "PLISM / reference folder")
        if path:
            self.folder_edit.setText(path)
            self._on_inputs_changed()

    def _inputs_key(self) -> tuple | None:
        slide = self.slide
        if slide is None:
            return None
        return (str(slide.path), self.reference_edit.text().strip(),
                self.folder_edit.text().strip())

    def perturbation(self, name: str | None = None):
        """The perturbation of ``name`` (default: the chosen condition) with the current
        parameters; None when the staining is not estimated yet (see :meth:`estimate`)."""
        name = name or self.condition
        if name == "reference":
            return make_perturbation(name, None, {})
        if self.inputs is None or self.inputs.key != self._inputs_key():
            return None
        return make_perturbation(name, self.inputs, self._params.get(name, {}),
                                 self.seed_spin.value())

    # ------------------------------------------------------------------ estimation
    def estimate(self) -> PrepareJob | None:
        """Estimate the slide's staining (and load the targets) in a worker thread."""
        from napari.qt.threading import create_worker

        key = self._inputs_key()
        if key is None or self.prep is not None:
            return self.prep
        job = PrepareJob({"slide": self.slide, "reference": key[1], "folder": key[2]})
        worker = create_worker(relay, job.gen, _start_thread=False, _ignore_errors=True)
        worker.finished.connect(job.done.set, Qt.ConnectionType.DirectConnection)
        worker.finished.connect(partial(self._on_prepared, job))
        self.prep = job
        self._jobs.append((job, worker))
        self.stain_busy.show()
        self.stain_info.setText("Estimating the slide's staining\u2026")
        worker.start()
        return job

    def _on_prepared(self, job: PrepareJob, *_) -> None:
        from napari.utils.notifications import show_error

        job.close()
        if job.orphaned:
            return
        self._jobs[:] = [(j, w) for j, w in self._jobs if j is not job]
        self.prep = None
        self.stain_busy.hide()
        outcome = job.outcome if job.outcome != "pending" else "cancelled"
        if outcome == "done":
            self.inputs = job.result
            s = job.result.stain
            angle = _angle(s.matrix)
            text = (f"H&E estimated from {s.tiles.shape[0]} tiles \u00b7 angle {angle:.1f}\u00b0"
                    f" \u00b7 I0 {np.round(s.i0).astype(int).tolist()}")
            if s.fallback or s.notes:
                text += "".join(f"<br>\u26a0 {n}" for n in s.notes)
            self.stain_info.setText(text)
        elif outcome == "failed":
            self._want_preview = False
            self.stain_info.setText(f"Failed: {job.error}")
            show_error(f"Staining: {job.error}")
        self.prepared.emit(outcome)
        if outcome == "done" and self._want_preview:
            self._refresh_preview()

    # ------------------------------------------------------------------ preview
    def show_preview(self, *_) -> None:
        """Add (or update) the preview layer for the chosen condition."""
        self._want_preview = True
        self._refresh_preview()

    def _refresh_preview(self) -> None:
        """Update the preview when one is wanted: now, or after the staining is estimated."""
        if not self._want_preview or self.slide_layer is None:
            return
        try:
            pert = self.perturbation()
        except (ValueError, KeyError) as e:  # e.g. a reference folder without the values
            from napari.utils.notifications import show_error

            show_error(f"Staining preview: {one_line(e)}")
            return
        if pert is None:
            self.estimate()
            return
        self._apply_preview(pert)

    def _apply_preview(self, pert) -> None:
        self.preview.show(pert, self.slide_layer)

    def preview_shift(self) -> float:
        """How far right "side by side" moves the preview (world units)."""
        return self.preview.shift()

    # ------------------------------------------------------------------ robustness run
    def checked_conditions(self) -> list[str]:
        """The conditions ticked for a robustness run (``reference`` first, always)."""
        out = []
        for i in range(self.conditions_list.count()):
            item = self.conditions_list.item(i)
            name = item.data(Qt.ItemDataRole.UserRole)
            if name == "reference" or item.checkState() == Qt.CheckState.Checked:
                out.append(name)
        return out

    def set_conditions(self, names) -> None:
        """Tick exactly ``names`` (``reference`` stays ticked)."""
        for i in range(self.conditions_list.count()):
            item = self.conditions_list.item(i)
            name = item.data(Qt.ItemDataRole.UserRole)
            item.setCheckState(Qt.CheckState.Checked if name in names or name == "reference"
                               else Qt.CheckState.Unchecked)

    @property
    def busy(self) -> bool:
        """A robustness run is in progress."""
        return self.job is not None

    def _update_enabled(self) -> None:
        ready = self.slide_layer is not None and self.model is not None
        self.run_button.setEnabled(ready and not self.busy)
        self.cancel_button.setEnabled(self.busy)
        self.preview_button.setEnabled(self.slide_layer is not None)

    def run_config(self) -> RobustnessConfig:
        """The run the controls describe now (ValueError when incomplete)."""
        if self.slide_layer is None:
            raise ValueError("no slide layer: open a slide first")
        if self.model is None:
            raise ValueError("no model loaded")
        model, card, name = self.model
        return RobustnessConfig(slide=self.slide, model=model, card=card, model_name=name,
                         encoder=self.encoder_combo.currentText(),
                         conditions=self.checked_conditions(),
                         params={k: dict(v) for k, v in self._params.items()},
                         reference=self.reference_edit.text().strip(),
                         folder=self.folder_edit.text().strip(), seed=self.seed_spin.value(),
                         encoder_weights=self.weights_edit.text().strip() or None,
                         patch_um=self.patch_um.value(), top_k=self.k_spin.value(),
                         batch_size=self.batch_spin.value(),
                         device=self.device_combo.currentText() or "auto",
                         pause=self.pause_source())

    def _make_job(self, cfg: RobustnessConfig) -> RobustnessJob:
        self._start_table(cfg)
        return RobustnessJob(cfg)

    def _on_update(self, job: RobustnessJob, u: StainUpdate) -> None:
        if job.orphaned or job is not self.job:
            return
        text = u.message or u.stage
        self.status.setText(text[:1].upper() + text[1:])
        if u.result is not None:
            self.table.fill(u.condition, u.result)
        pbar = self.pbar
        if pbar is None or not u.total:
            return
        if pbar.total != u.total:
            pbar.total = u.total
            pbar.set_description("Robustness: encoding patches")
        if u.done > pbar.n and job is self.job:
            pbar.update(u.done - pbar.n)

    def _show_done(self, job) -> None:
        self.show_report(job.result)

    # ------------------------------------------------------------------ results
    def _start_table(self, cfg: RobustnessConfig) -> None:
        self.table.start(cfg.conditions, cfg.card.classes, cfg.top_k)
        self.range_label.setText("")

    def show_report(self, report) -> None:
        """Fill the table, the range line and the stability layer from ``report``."""
        self.report = report
        self.table.show_report(report)
        summ = report.summary()
        rng = ", ".join(f"{c} {v:.4f}" for c, v in summ["range"].items())
        flip = ("<b>the predicted class changes</b>" if summ["predicted_changes"] else
                "the predicted class is the same under every condition")
        st = summ["stability"]
        stab = (f"attention stability (spread of rank percentiles, 0 = stable): mean "
                f"{st['mean']:.3f}, max {st['max']:.3f}" if st["mean"] is not None else "")
        self.range_label.setText(f"Range (max - min) across conditions: {rng}; {flip}."
                                 f"<br>{stab}")
        self.update_stability()
        self._set_export_enabled(True)

    def update_stability(self) -> None:
        """(Re)draw the attention-stability heatmap of the current report."""
        from ..overlay.heatmap import heatmap_layer

        if self.report is None:
            return
        layer = self.slide_layer
        mpp = slide_mpp(layer)
        data, kwargs, _ = heatmap_layer(self.report.stability_result(), "stability", "fixed",
                                        vmin=0.0, vmax=1.0, mpp=mpp, colormap="magma",
                                        opacity=0.6)
        kwargs["metadata"]["milview"] = "stability"
        kwargs["name"] = f"attention stability ({layer.name})" if layer is not None else \
            "attention stability"
        old = self.stability_layer
        if old is not None and old in self.viewer.layers:
            old.data = data
            old.scale = kwargs["scale"]
            old.translate = kwargs["translate"]
            old.metadata = kwargs["metadata"]
            old.name = kwargs["name"]
        else:
            self.stability_layer = self.viewer.add_image(data, **kwargs)
            self.stability_layer.colorbar.visible = True
        self._on_slide(self.stability_layer, layer)

    def _set_export_enabled(self, enabled: bool) -> None:
        self.csv_button.setEnabled(enabled)
        self.json_button.setEnabled(enabled)

    def export(self, kind: str, path) -> Path:
        """Write the report as ``"csv"`` or ``"json"`` to ``path``."""
        if self.report is None:
            raise ValueError("nothing to export: run the robustness check first")
        if kind == "csv":
            return self.report.to_csv(path)
        if kind == "json":
            return self.report.to_json(path)
        raise ValueError(f"unknown export {kind!r}; choose csv or json")

    def _export_dialog(self, kind: str, *_) -> None:

        stem = (self.report.reference.slide_id or "slide") if self.report else "slide"
        path, _ = QFileDialog.getSaveFileName(self, f"Export {kind.upper()}",
                                              f"{stem}.robustness.{kind}",
                                              f"{kind.upper()} (*.{kind})")
        if path:
            export_and_say(kind.upper(), partial(self.export, kind, path), path)

    # ------------------------------------------------------------------ teardown
    def stop_all(self, wait: bool = True) -> None:
        """Cancel every job of this widget and (by default) join its thread."""
        stop_jobs(self._jobs, wait=wait)
        pbar, self.pbar = self.pbar, None
        self.job = self.worker = self.prep = None
        self.stain_busy.hide()
        if pbar is not None:
            pbar.close()


def _angle(matrix) -> float:
    from ..stain import angle_deg

    return angle_deg(*np.asarray(matrix))
