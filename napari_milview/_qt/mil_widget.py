"""The "MIL attention" dock: run a MIL model on a slide and show what it looked at.

Sections, top to bottom: Slide (which slide layer), Features (extract them with an encoder,
or load a bag file), Model (the bundled demo or a checkpoint, with what was inferred from
it), Device and Run / Cancel, Prediction (class probabilities, predicted class, bag size,
seconds per stage, device), Display (attention source, normalisation, colormap, opacity,
interpolation, top-K), Export and Evidence (annotations, localisation, concentration,
faithfulness, what-if and fold disagreement: :mod:`.evidence`).

Threads
-------
A run is a :class:`~napari_milview.jobs.MILJob`: a plain generator (no Qt) driving the run path,
:func:`napari_milview.pipeline.run` (features from a bag file, or extracted now: encoder
checked against the model, patch grid, ``extract_bag``; then the model). It yields one
:class:`~napari_milview.pipeline.Progress` per batch; the widget wraps it in napari's
``create_worker`` (a ``GeneratorWorker``: registered in the viewer's task list) and turns
the updates into a ``napari.utils.progress`` bar in the activity dock. Every ``stream_s``
seconds of extraction the model also runs on the patches encoded so far, and the heatmap
shows that partial attention (patches not yet encoded are transparent).

Cancel sets the job's ``threading.Event``, which the pipeline checks between batches and
between the encoder's sub-batches (each ~0.2 s), and quits the worker: the run ends within
one sub-batch. Exceptions are caught inside the job and become one readable line in
``show_error``; the buttons come back in every case (``finished``). Closing the widget,
deleting it, or quitting the app cancels every job and joins its thread; the extraction's
reader threads end with it. The run's layers belong to the slide layer it ran on
(:class:`.overlays.SlideOverlays`).

Display changes (source, normalisation, colormap, ...) recompute the small heatmap grid
from the stored :class:`~napari_milview.result.Result` (O(N) numpy) and update the
existing layers in place: the model is never re-run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QGroupBox,
    QLabel,
    QLineEdit,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from ..jobs import MILConfig, MILJob, gui_readers
from ..overlay.heatmap import PENDING
from ..pipeline import PAUSED, Progress
from ._common import JobDock, slide_mpp
from ._common import stop_jobs as _stop_jobs
from .display import DisplayBox
from .evidence import EvidenceBox
from .exports import ExportBox, write_view
from .overlays import SlideOverlays, install_status, raw_score_at, same_file
from .parts import path_field, pick_file, scrolled
from .prediction import PredictionPanel, fill_edge

log = logging.getLogger(__name__)

#: Seconds between two updates of the activity dock's progress bar during a run.
PBAR_EVERY_S = 0.25

# --------------------------------------------------------------------------------------------
# the widget
# --------------------------------------------------------------------------------------------
class MILWidget(JobDock):
    """Dock widget "MIL attention" (a :class:`._common.JobDock`: ``napari_viewer`` is the viewer,
    as npe2 passes it).

    Attributes
    ----------
    result : Result or None
        The last complete result shown.
    heatmap_layer, topk_layer : the picked slide's layers (None until a result); each slide
        layer has its own (:class:`.overlays.SlideOverlays`, ``overlays_for``).
    jobs_started : int
        Runs started so far (tests check that display changes start none).
    """

    #: emitted with the Result when a run completes (or a result file is opened)
    result_ready = Signal(object)
    #: emitted when a run ends, whatever the outcome ("done", "cancelled", "failed")
    run_finished = Signal(str)
    TITLE = "MIL attention"

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(napari_viewer, "Run", parent)
        self._overlays: list[SlideOverlays] = []  # one per slide layer that has results
        self._loose: SlideOverlays | None = None  # a result opened without a slide layer
        self.gallery = None
        self.stream_s = 1.0
        self._build()
        self._start()

    # ------------------------------------------------------------------ per slide
    def overlays_for(self, slide_layer=None, create: bool = True) -> SlideOverlays | None:
        """The :class:`SlideOverlays` of ``slide_layer`` (default: the one picked now; None
        with no slide layer: the result opened without one)."""
        slide_layer = slide_layer if slide_layer is not None else self.slide_layer
        if slide_layer is None:
            if self._loose is None and create:
                self._loose = SlideOverlays(self.viewer, None, self._on_slide)
            return self._loose
        for ov in self._overlays:
            if ov.slide_layer is slide_layer:
                return ov
        if not create:
            return None
        ov = SlideOverlays(self.viewer, slide_layer, self._on_slide)
        self._overlays.append(ov)
        return ov

    @property
    def current(self) -> SlideOverlays:
        """What is shown on the slide picked now."""
        return self.overlays_for()

    @property
    def result(self):
        """The last complete result on the picked slide (None before one)."""
        return self.current.result

    @property
    def heatmap_layer(self):
        """The picked slide's heatmap layer (None before a run)."""
        return self.current.heatmap

    @property
    def topk_layer(self):
        """The picked slide's top-K layer (None before a result)."""
        return self.current.topk

    @property
    def _shown(self):
        return self.current.shown

    @property
    def _indices(self) -> np.ndarray:
        return self.current.indices

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        content, layout, form = self._content()
        self.slide_info = QLabel("")
        self.slide_info.setWordWrap(True)
        form.addRow(self.slide_info)

        # Features: extracted now with an encoder, or read from a bag file
        box = QGroupBox("Features")
        v = QVBoxLayout(box)
        self.extract_radio = QRadioButton("Extract with an encoder")
        self.bag_radio = QRadioButton("Load a bag file")
        self._feature_group = QButtonGroup(self)
        self._feature_group.addButton(self.extract_radio)
        self._feature_group.addButton(self.bag_radio)
        self.extract_radio.setChecked(True)
        self.extract_radio.toggled.connect(self._on_feature_choice)
        self.encoders.form.setContentsMargins(16, 0, 0, 0)
        self.bag_edit = QLineEdit()
        self.bag_edit.setPlaceholderText("CLAM / TRIDENT / ACMIL h5, .pt bag")
        self.bag_box = path_field(self.bag_edit, self._pick_bag)
        self.bag_box.setContentsMargins(16, 0, 0, 0)
        self.foreign_check = QCheckBox("Run a bag that does not fit the slide")
        self.foreign_check.setToolTip("A bag whose patches lie outside this slide, or that "
                                      "names another slide file, is refused; tick to run it "
                                      "anyway (the result carries a warning)")
        for w in (self.extract_radio, self.encoders, self.bag_radio, self.bag_box,
                  self.foreign_check):
            v.addWidget(w)
        layout.addWidget(box)

        box = QGroupBox("Model")
        QVBoxLayout(box).addWidget(self.models)
        layout.addWidget(box)
        box = QGroupBox("Run")
        QVBoxLayout(box).addWidget(self.run_box)
        layout.addWidget(box)

        # Prediction
        box = QGroupBox("Prediction")
        v = QVBoxLayout(box)
        self.prediction = PredictionPanel()
        v.addWidget(self.prediction)
        layout.addWidget(box)

        self.display = d = DisplayBox()
        d.shown_scores = lambda: (self._shown.attention(d.source_of(self._shown))
                                  if self._shown is not None else None)
        d.heatmap_changed.connect(self.update_heatmap)
        d.look_changed.connect(self._on_look)
        d.topk_changed.connect(self.update_topk)
        d.gallery_wanted.connect(self.show_gallery)
        # its controls, by the names the tests and the rest of the dock use
        for name in ("source_combo", "method_combo", "vmin", "vmax", "zoom", "cmap_combo",
                     "opacity", "interp_combo", "topk_mode", "k_spin", "lo", "hi",
                     "gallery_button", "set_source", "set_method"):
            setattr(self, name, getattr(d, name))
        layout.addWidget(d)

        self.exports = ExportBox(self.export, self.open_result,
                                 lambda: (self.result.slide_id or "result")
                                 if self.result is not None else "result")
        self.export_buttons = self.exports.buttons
        layout.addWidget(self.exports)
        self.evidence = EvidenceBox(self)
        layout.addWidget(self.evidence)
        layout.addStretch(1)

        scrolled(self, content, 320)

        self._on_feature_choice()
        self._set_display_enabled(False)

    # ------------------------------------------------------------------ slide
    def _on_layers_changed(self, event=None) -> None:
        self._follow_slide_layers(event)
        # a removed slide's overlays are forgotten (its layers stay: the user's to remove)
        self._overlays = [ov for ov in self._overlays if ov.slide_layer in self.viewer.layers]
        for ov in [*self._overlays, self._loose]:
            if ov is not None:
                ov.forget_removed()
        self._adopt_restored()
        self._on_slide_choice()

    def _adopt_restored(self) -> None:
        """Take on the heatmap and top-K layers a sidecar restored (``metadata
        ["restored_from"]``, opened before or after this dock): their result becomes their
        slide's result here, with the display controls and exports, as if it had just run."""
        owned = {id(layer) for ov in [*self._overlays, self._loose] if ov is not None
                 for layer in (ov.heatmap, ov.topk) if layer is not None}
        for layer in list(self.viewer.layers):
            md = layer.metadata
            if id(layer) in owned or not md.get("restored_from") or md.get("milview") != \
                    "heatmap" or md.get("result") is None:
                continue
            slide = next((s for s in self._slide_layers
                          if same_file(s.metadata.get("path"), md.get("slide_path"))), None)
            ov = self.overlays_for(slide)
            ov.heatmap, ov.result, ov.shown, ov.ended = layer, md["result"], md["result"], ""
            ov.restored_from = md["restored_from"]
            install_status(layer)
            layer.colorbar.visible = True
            if ov is self.current:
                self.display.fill_sources(ov.result)
                if md.get("source") in ov.result.sources:
                    self.source_combo.setCurrentIndex(self.source_combo.findData(md["source"]))
                if self.cmap_combo.findText(layer.colormap.name) >= 0:
                    self.cmap_combo.setCurrentText(layer.colormap.name)
                self.set_method(md.get("method", "raw"))
        for ov in [*self._overlays, self._loose]:  # its top-K layer (inserted after it)
            if ov is not None and ov.restored_from and ov.topk is None:
                ov.topk = next((t for t in self.viewer.layers if t.metadata.get("milview") ==
                                "topk" and t.metadata.get("restored_from") == ov.restored_from),
                               None)

    def _on_slide_choice(self, index: int = -1) -> None:
        layer = self.slide_layer
        if layer is None:
            self.slide_info.setText("Open a slide (File > Open, or File > Open Sample > "
                                    "napari-milview).")
        else:
            meta = layer.metadata
            w, h = meta["slide"].info.dimensions
            mpp = slide_mpp(layer)
            um = f"{mpp:.4g} \u00b5m/px ({meta.get('mpp_source', '?')})" if mpp else \
                "mpp unknown: pixel units"
            self.slide_info.setText(f"{w} x {h} px \u00b7 {um}")
        self._show_panel()
        self._update_enabled()

    def _show_panel(self) -> None:
        """The prediction panel, sources and exports for the slide picked now."""
        ov = self.current
        shown = ov.shown
        if shown is None:
            self.prediction.clear()
        else:
            if self.source_combo.count() == 0 or self.source not in shown.sources:
                self.display.fill_sources(shown)
            self.prediction.set_result(shown, partial=shown is not ov.result, ended=ov.ended)
        self._set_display_enabled(ov.result is not None and shown is ov.result)
        self.evidence.refresh()

    # ------------------------------------------------------------------ features
    def _on_feature_choice(self, checked: bool = True) -> None:
        extract = self.extract_radio.isChecked()
        self.encoders.setEnabled(extract)
        self.bag_box.setEnabled(not extract)
        self.foreign_check.setEnabled(not extract)

    def _pick_bag(self) -> None:
        path = pick_file(self, "Feature bag", "Bags (*.h5 *.hdf5 *.pt);;All files (*)")
        if path:
            self.bag_edit.setText(path)
            self.bag_radio.setChecked(True)

    # ------------------------------------------------------------------ running
    def _update_enabled(self) -> None:
        busy = self.job is not None
        ready = self.slide_layer is not None and self.model is not None
        self.run_button.setEnabled(ready and not busy)
        self.run_button.setToolTip("" if ready else
                                   "needs a slide layer and a loaded model")
        self.cancel_button.setEnabled(busy)

    @property
    def busy(self) -> bool:
        """A run is in progress."""
        return self.job is not None

    def run_config(self) -> MILConfig:
        """The run the controls describe now (raises ValueError when incomplete)."""
        from ..pipeline import RunSpec

        layer = self.slide_layer
        if layer is None:
            raise ValueError("no slide layer: open a slide first")
        if self.model is None:
            raise ValueError("no model loaded")
        model, card, name = self.model
        device = self.run_box.device
        spec = RunSpec(model_name=name, device=device, batch_size=self.batch_spin.value(),
                       workers=gui_readers(device), stream_s=self.stream_s,
                       pause=self.pause_source())
        if self.bag_radio.isChecked():
            path = self.bag_edit.text().strip()
            if not path:
                raise ValueError("choose a bag file")
            spec.bag = path
            spec.allow_foreign_bag = self.foreign_check.isChecked()
        else:
            spec.encoder, spec.weights = self.encoders.encoder, self.encoders.weights
            spec.patch_um = self.patch_um.value()
        return MILConfig(slide=layer.metadata["slide"], model=model, card=card, spec=spec)

    def _make_job(self, cfg: MILConfig) -> MILJob:
        job = MILJob(cfg)
        ov = job.overlays = self.current  # the run's layers belong to this slide
        ov.ended = ""
        spec = cfg.spec
        ov.bag_source = str(spec.bag) if spec.bag is not None else \
            f"extracted with {spec.encoder}"
        self._prepare_heatmap_layer(ov)
        return job

    def _on_update(self, job: MILJob, u: Progress) -> None:
        # napari's progress bar widget calls processEvents(): later updates (and the end of
        # the run) can be handled inside the pbar calls, so they come last and every step
        # re-checks that this job is still the current one
        if job.orphaned or job is not self.job:
            return
        if u.stage == "extract" and u.total:
            text = f"Encoding patches: {u.done} / {u.total}"
            if u.message:
                text = f"{text} ({u.message})" if u.done else u.message
        else:
            text = u.message
        self.status.setText(text[:1].upper() + text[1:])
        if u.partial is not None:
            self.show_result(u.partial, partial=True, ov=job.overlays)
        pbar = self.pbar
        if job is not self.job or pbar is None:
            return
        if u.stage != "extract" or u.message == PAUSED:
            pbar.set_description(f"MIL attention: {u.message}")
        elif u.total:
            if pbar.total != u.total:
                pbar.total = u.total
                pbar.set_description("MIL attention: encoding patches")
            # each update of napari's progress bar runs processEvents() (a repaint on the
            # GUI thread): at most a few per second, and the last one always
            now = time.perf_counter()
            if u.done > pbar.n and job is self.job and (
                    u.done >= u.total or now - getattr(self, "_pbar_t", 0.0) >= PBAR_EVERY_S):
                self._pbar_t = now
                pbar.update(u.done - pbar.n)

    def _show_done(self, job: MILJob) -> None:
        ov = job.overlays  # the run's features and model, for the Evidence section
        ov.bag, ov.model, ov.bag_result = job.bag, (job.config.model, job.config.card), \
            job.result
        self.show_result(job.result, ov=ov)

    def _run_ended(self, job: MILJob) -> None:
        """A run that did not finish: its pending heatmap layer goes (later, see
        ``overlays``); partial heatmaps stay, marked partial, and the prediction panel says
        there is no prediction."""
        ov = job.overlays
        ov.drop_pending()
        if job.outcome == "done":
            return
        done, total = job.progress
        verb = "cancelled" if job.outcome != "failed" else "failed"
        ov.mark_ended(f"{verb} after {done} of {total} patches" if total else verb)
        if ov is self.current:
            self._show_panel()

    def stop_all(self, wait: bool = True) -> None:
        """Cancel every run of this widget and (by default) join its thread; their partial
        layers are marked (never removed while napari may draw them)."""
        running = [job for job, _ in self._jobs]
        _stop_jobs(self._jobs, wait=wait)
        for job in running:
            ov = getattr(job, "overlays", None)
            if ov is not None:
                ov.drop_pending()
                if ov.shown is not None and ov.shown is not ov.result:
                    ov.mark_ended("stopped when the dock closed")
        pbar, self.pbar = self.pbar, None
        self.job = self.worker = None
        if pbar is not None:
            pbar.close()
        if self.gallery is not None:
            self.gallery.stop()
        self.evidence.stop_all(wait=wait)

    def teardown(self) -> None:
        super().teardown()
        self.evidence.teardown()

    # ------------------------------------------------------------------ results
    def show_result(self, result, partial: bool = False, ov: SlideOverlays | None = None
                    ) -> None:
        """Show ``result`` on ``ov``'s slide (default: the picked one): its heatmap and top-K
        layers (top-K not for a partial result), and, when that slide is the picked one, the
        prediction panel and the display controls."""
        ov = ov if ov is not None else self.current
        if partial and self.job is None:
            return  # a late partial of a run that has ended
        if not partial:
            ov.result = result
            ov.ended = ""
        ov.shown = result
        if ov is self.current:
            first = self.source_combo.count() == 0 or self.source not in result.sources
            self.prediction.set_result(result, partial=partial)
            if first:
                self.display.fill_sources(result)
            self._set_display_enabled(not partial)
        self.update_heatmap(ov)
        if not partial:
            self.update_topk(ov)
            self.result_ready.emit(result)
            if self.gallery is None and ov is self.current:
                self.show_gallery()

    source = property(lambda self: self.display.source,
                      doc="The attention source shown (None before a result).")
    method = property(lambda self: self.display.method,
                      doc="The normalisation shown (a key of ``overlay.normalise.METHODS``).")

    def _set_display_enabled(self, enabled: bool) -> None:
        for b in self.export_buttons.values():
            b.setEnabled(enabled)
        self.gallery_button.setEnabled(enabled)

    @property
    def mpp(self) -> float | None:
        """Microns per level-0 pixel the picked slide's layers are placed with."""
        return self.current.mpp()

    def update_heatmap(self, ov: SlideOverlays | None = None) -> None:
        """(Re)draw ``ov``'s heatmap (default: the picked slide's) with the display settings."""
        from ..overlay.heatmap import heatmap_layer

        ov = ov if ov is not None else self.current
        result = ov.shown
        if result is None or self.source is None:
            return
        kw = self.display.heatmap_kwargs()
        data, kwargs, _ = heatmap_layer(result, self.display.source_of(result), self.method,
                                        mpp=ov.mpp(), name="attention", **kw)
        if kwargs["interpolation2d"] == "linear":
            data = fill_edge(data)
        if not ov.alive(ov.heatmap):
            ov.add_heatmap(data, kwargs)
            if ov.shown is not result:  # another result came in while the layer was added
                self.update_heatmap(ov)
            return
        ov.set_heatmap(data, kwargs)

    def _prepare_heatmap_layer(self, ov: SlideOverlays) -> None:
        """At Run: an empty heatmap layer (one transparent cell, no colour bar yet), unless
        one is there. Creating a layer costs napari ~0.4 s of the GUI thread with software
        OpenGL; paid at the click, the run's partial heatmaps later only update it
        (docs/BENCHMARKS.md, responsiveness)."""
        if ov.alive(ov.heatmap):
            return
        kw = self.display.heatmap_kwargs()
        ov.add_heatmap(np.full((1, 1), np.nan, np.float32), {
            "colormap": kw["colormap"], "opacity": kw["opacity"], "blending": "translucent",
            "interpolation2d": kw["interpolation"], "contrast_limits": (0.0, 1.0),
            "metadata": {"milview": PENDING}}, pending=True)

    def selection(self, ov: SlideOverlays | None = None) -> np.ndarray:
        """[K] bag indices the top-K settings pick from ``ov``'s result (best first)."""
        return self.display.selection((ov if ov is not None else self.current).result)

    def _norm_kw(self) -> dict:
        return self.display.norm_kw()

    def update_topk(self, ov: SlideOverlays | None = None) -> None:
        """(Re)draw ``ov``'s top-K rectangles (default: the picked slide's), and the gallery
        when that slide is the picked one."""
        from ..overlay.topk import topk_layer

        ov = ov if ov is not None else self.current
        r = ov.result
        if r is None or self.source is None:
            return
        src = self.display.source_of(r)
        idx = self.selection(ov)
        ov.indices = idx
        data, kwargs, _ = topk_layer(r, idx, src, mpp=ov.mpp())
        ov.set_topk(data, kwargs, ov.name(self.display.topk_name(len(idx))))
        if self.gallery is not None and ov is self.current:
            self.gallery.set_items(ov.slide_layer, r, idx, src, mpp=ov.mpp())

    def raw_score_at(self, position, world: bool = True, layer=None) -> float | None:
        """The raw score under a viewer position of ``layer`` (default: the picked slide's
        heatmap), None outside the patches (``overlays.raw_score_at``)."""
        layer = layer if layer is not None else self.heatmap_layer
        return None if layer is None else raw_score_at(layer, position, world)

    def _on_look(self, *_) -> None:
        """Colormap or opacity: set on the layer, nothing recomputed."""
        layer = self.heatmap_layer
        if layer is not None and layer in self.viewer.layers:
            layer.colormap = self.cmap_combo.currentText()
            layer.opacity = self.opacity.value() / 100


    # ------------------------------------------------------------------ gallery
    def show_gallery(self, *_) -> None:
        """Open (or raise) the top-K gallery dock, filled with the current selection."""
        from .gallery import TopKGallery

        if self.gallery is None:
            self.gallery = TopKGallery(self.viewer)
            window = getattr(self.viewer, "window", None)
            if window is not None and hasattr(window, "add_dock_widget"):
                window.add_dock_widget(self.gallery, name="Top-K gallery", area="right",
                                       tabify=False)
            self.gallery.destroyed.connect(self._gallery_gone)
        if self.result is not None:
            self.gallery.set_items(self.slide_layer, self.result, self._indices, self.source,
                                   mpp=self.mpp)

    def _gallery_gone(self, *_) -> None:
        self.gallery = None

    # ------------------------------------------------------------------ export
    def export(self, kind: str, path) -> Path | list[Path]:
        """Write the picked slide's result as ``kind`` (a key of ``exports.EXPORTS``) to
        ``path`` with the view shown (source, normalisation, top-K); ``crops`` takes a folder
        and returns the PNG paths."""
        r, d = self.result, self.display
        if r is None:
            raise ValueError("nothing to export: run the model first")
        layer = self.slide_layer
        return write_view(kind, path, r, source=self.source, method=self.method,
                          norm=d.used_norm_kw(), topk=d.topk_settings(), indices=self._indices,
                          mpp=self.mpp, slide=layer.metadata["slide"] if layer else None,
                          colormap=self.cmap_combo.currentText(),
                          bag_source=self.current.bag_source)

    # ------------------------------------------------------------------ open a result
    def open_result(self, path) -> Any:
        """Show a saved result: an h5 from ``save_result`` or a ``.milview.json`` sidecar.

        A sidecar also restores the source, normalisation, colormap and top-K settings, and
        opens its slide when no slide layer is open.
        """
        from ..overlay.export import read_sidecar
        from ..result import load_result

        p = Path(path)
        doc = None
        if p.suffix.lower() == ".json":
            doc = read_sidecar(p)
            result = load_result(doc["result"])
            slide = doc.get("slide") or result.slide
            if self.slide_layer is None and slide and Path(slide).exists():
                self.viewer.open(slide, plugin="napari-milview")
        else:
            result = load_result(p)
        self.show_result(result)
        if doc is not None:
            self.display.restore(doc, result)
        return result
