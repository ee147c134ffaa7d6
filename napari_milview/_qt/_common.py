"""What the dock widgets share: :class:`JobDock` (slide picker, model, encoder and run
parts, running a :class:`~napari_milview.jobs.Job` in napari's ``create_worker`` through
:func:`~napari_milview.jobs.relay`, teardown), and small helpers. Cancelling sets a job's
``threading.Event`` and quits its worker; :func:`stop_jobs` cancels and joins every job of a
dock (from its teardown or its ``destroyed`` signal).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from functools import partial
from typing import Any

import numpy as np
from qtpy.QtCore import QEvent, Qt, Signal
from qtpy.QtWidgets import QDoubleSpinBox, QWidget

from .._reader import is_slide_layer
from ..jobs import Interaction, Job, one_line, relay

__all__ = ["JobDock", "real_viewer", "slide_frame", "slide_mpp", "spin", "stop_jobs"]

log = logging.getLogger(__name__)


def real_viewer(napari_viewer):
    """The viewer itself. napari's Plugins menu hands a dock widget a ``PublicOnlyProxy``
    whose every attribute access is inspected and whose layers are new proxy objects each
    time (so ``is`` comparisons between layers never match)."""
    return getattr(napari_viewer, "__wrapped__", napari_viewer)


def slide_mpp(layer) -> float | None:
    """Microns per level-0 pixel along x of a slide layer, None when unknown."""
    mpp = layer.metadata.get("mpp") if layer is not None else None
    return float(mpp[-1]) if mpp else None


def spin(lo: float, hi: float, value: float, decimals: int = 4, step: float = 0.01,
         suffix: str = "") -> QDoubleSpinBox:
    """A float spin box that reports a value only when editing is finished."""
    s = QDoubleSpinBox()
    s.setRange(lo, hi)
    s.setDecimals(decimals)
    s.setSingleStep(step)
    s.setValue(value)
    if suffix:
        s.setSuffix(suffix)
    s.setKeyboardTracking(False)
    return s


def slide_frame(slide_layer) -> np.ndarray:
    """[3, 3] affine matrix: where a 2-D slide layer puts its scaled data in the world beyond
    its scale, its ``affine`` after its translate, rotate and shear (napari's order), the
    identity for a slide layer as opened. An overlay built in the slide's own world (level-0
    pixels x mpp) takes it as its ``affine`` to sit on the slide (``JobDock._on_slide``)."""
    from napari.utils.transforms import Affine

    own = Affine(translate=slide_layer.translate[-2:], rotate=slide_layer.rotate[-2:, -2:],
                 shear=slide_layer.shear[-1:], ndim=2)
    return slide_layer.affine.affine_matrix[-3:, -3:] @ own.affine_matrix


#: Set once the thread that imports torch (started by the first dock) is done.
_torch_done = threading.Event()
_torch_thread: threading.Thread | None = None


def _import_torch() -> None:
    try:
        import torch  # noqa: F401
    finally:
        _torch_done.set()


def stop_jobs(jobs: list, wait: bool = True) -> None:
    """Cancel every (job, worker) in ``jobs`` and join them; safe from ``destroyed``."""
    for job, worker in list(jobs):
        job.orphaned = True
        job.stop()
        with contextlib.suppress(RuntimeError):  # the worker's Qt object is already gone
            worker.quit()
    if wait:
        for job, _ in list(jobs):
            job.join()
    jobs.clear()


class JobDock(QWidget):
    """What the dock widgets that run jobs share: following the viewer's slide layers, the
    model picker, encoder box and run box (``parts``), starting a :class:`Job` in a napari
    worker with a progress bar, cancel, and teardown when the widget is closed, taken out of
    its dock or the application quits.

    ``napari_viewer`` is the viewer (npe2 passes it by this name; its proxy is unwrapped), and
    ``run_label`` the Run button's text. The constructor makes the shared parts
    (``slide_combo``, ``models``, ``encoders``, ``run_box`` with its pause check box) and the
    run state (``job``, ``worker``, ``pbar``, ``jobs_started``); a subclass lays the parts
    out, then calls :meth:`_start` once built.
    It implements the hooks :meth:`_on_layers_changed`, :meth:`_on_update`,
    :meth:`_show_done`, :meth:`_update_enabled` and :meth:`stop_all`, :meth:`run_config` and
    :meth:`_make_job` (``TITLE`` names its runs), optionally
    :meth:`_on_model` and :meth:`_run_ended`, and has a ``run_finished`` signal (str: the
    outcome). Its runs wait while the view moves through :meth:`pause_source` (their config)
    and ``Job._paused`` (between batches).
    """

    #: emitted once torch is imported and the chosen model loaded (``ready``)
    became_ready = Signal()

    def __init__(self, napari_viewer, run_label: str, parent: QWidget | None = None):
        from qtpy.QtWidgets import QComboBox

        from .parts import EncoderBox, ModelPicker, RunBox

        super().__init__(parent)
        self.viewer = real_viewer(napari_viewer)
        self.job: Job | None = None
        self.worker = None
        self.pbar = None
        self.jobs_started = 0
        self._jobs: list = []  # (job, worker) pairs not yet finished
        self._slide_layers: list = []
        self._docked = False
        self._placed: list = []  # (overlay layer, its slide layer): see _on_slide
        self.ready = False  # torch imported, the chosen model loaded (became_ready)
        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("The slide layer the model runs on")
        self.models = ModelPicker()
        self.encoders = EncoderBox()
        self.run_box = RunBox(run_label, self._pause_control())
        # the parts' controls, by the names the docks and their tests use
        self.demo_radio, self.file_radio = self.models.demo_radio, self.models.file_radio
        self.model_edit, self.model_info = self.models.model_edit, self.models.info
        self.encoder_combo, self.weights_edit = (self.encoders.encoder_combo,
                                                 self.encoders.weights_edit)
        self.patch_um = self.encoders.patch_um
        rb = self.run_box
        self.device_combo, self.batch_spin, self.status = rb.device_combo, rb.batch_spin, \
            rb.status
        self.run_button, self.cancel_button = rb.run_button, rb.cancel_button
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.models.changed.connect(self._model_changed)

    def _content(self):
        """(content widget, its vertical layout, the form of its "Slide" box): the dock's
        controls start with the slide layer picker; ``scrolled`` wraps the content."""
        from qtpy.QtWidgets import QFormLayout, QGroupBox, QVBoxLayout

        content = QWidget()
        layout = QVBoxLayout(content)
        layout.setContentsMargins(4, 4, 4, 4)
        box = QGroupBox("Slide")
        form = QFormLayout(box)
        self.slide_combo.currentIndexChanged.connect(self._on_slide_choice)
        form.addRow("Layer", self.slide_combo)
        layout.addWidget(box)
        return content, layout, form

    @property
    def model(self):
        """``(model, card, name)`` of the loaded model, None without one."""
        return self.models.model

    def _model_changed(self, model) -> None:
        if model is not None:
            self.encoders.follow(model[1])
        self._on_model(model)
        self._update_enabled()

    def _on_model(self, model) -> None:
        """Hook: the model was (re)loaded (None: none loaded)."""

    def _start(self) -> None:
        """Once built: follow the viewer's layers, stop the jobs however the widget goes
        (closed, deleted with the viewer, application quit), and load the model once torch
        is imported."""
        from qtpy.QtWidgets import QApplication

        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self.destroyed.connect(partial(stop_jobs, self._jobs))
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.stop_all)
        self._on_layers_changed()
        self._after_torch(self._torch_ready)

    def _torch_ready(self) -> None:
        """torch is imported: the CUDA devices, and the chosen model loaded."""
        self.run_box.fill_devices()
        self.models.start()
        self.ready = True
        self.became_ready.emit()

    def run(self, *_) -> Job | None:
        """Start a run of what the controls describe in a worker thread; the job, or None
        when nothing could start (the reason in a notification)."""
        from napari.utils.notifications import show_error

        if self.job is not None:
            return None
        try:
            cfg = self.run_config()
        except ValueError as e:
            show_error(f"{self.TITLE}: {e}")
            return None
        job = self._make_job(cfg)
        worker = self._start_job(job, self.TITLE)
        self._update_enabled()
        worker.start()
        return job

    # -- hooks a dock implements
    #: How notifications and the activity dock name this dock's runs.
    TITLE = "run"

    def run_config(self) -> Any:  # pragma: no cover - abstract
        """What a run started now needs (ValueError, shown as one line, when incomplete)."""
        raise NotImplementedError

    def _make_job(self, config: Any) -> Job:  # pragma: no cover - abstract
        """The job for ``config`` (and what the dock prepares for it)."""
        raise NotImplementedError

    def _on_layers_changed(self, event=None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _on_update(self, job: Job, update: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _show_done(self, job: Job) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update_enabled(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def stop_all(self, wait: bool = True) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _after_torch(self, then) -> None:
        """Call ``then()`` (GUI thread) once torch is imported: at once when it is, else when
        a plain thread has imported it (1.4-1.9 s on a 2-core machine), so the dock appears
        at once and fills in. The dock polls for it with a timer it owns: a dock closed (or
        napari quit) before the import ends gets no call, and nothing Qt outlives it; the
        interpreter waits for the import at exit."""
        import sys

        from qtpy.QtCore import QTimer

        global _torch_thread
        if _torch_thread is None and "torch" in sys.modules:
            then()
            return
        if _torch_thread is None:
            _torch_thread = threading.Thread(target=_import_torch, name="milview-import-torch")
            _torch_thread.start()
        timer = QTimer(self)
        timer.setInterval(20)

        def poll() -> None:
            if _torch_done.is_set():
                timer.stop()
                then()

        timer.timeout.connect(poll)
        timer.start()

    def _pause_control(self) -> QWidget:
        """The "Pause while I pan or zoom" check box (on), ``self.pause_check``; the camera's
        moves are followed in ``self.interaction`` (see :meth:`pause_source`)."""
        from qtpy.QtWidgets import QCheckBox

        from .navigation import viewer_camera

        self.interaction = Interaction()
        camera = viewer_camera(self.viewer)
        for emitter in (camera.events.center, camera.events.zoom):
            emitter.connect(self.interaction.touch)
        self.pause_check = QCheckBox("Pause while I pan or zoom")
        self.pause_check.setChecked(True)
        self.pause_check.setToolTip("The run waits between batches while the view moves, "
                                    "so panning and zooming keep the CPU (few-core machines)")
        return self.pause_check

    def _on_slide(self, overlay, slide_layer=None) -> None:
        """Keep ``overlay`` where its slide layer (default: the one picked now) is drawn.

        Overlays are built in the slide's own world, level-0 pixels x mpp, which is where a
        slide layer as opened sits. A user who moves the slide layer (its translate, rotate,
        shear or affine: aligning two slides, say) moves the overlay with it: the overlay's
        ``affine`` becomes the slide's placement beyond its scale (:func:`slide_frame`), now
        and on every later change; the overlay's own scale and translate stay its local
        placement.
        """
        slide_layer = slide_layer if slide_layer is not None else self.slide_layer
        if slide_layer is None or overlay is None:
            return
        self._placed = [(o, s) for o, s in self._placed
                        if o is not overlay and o in self.viewer.layers]
        self._placed.append((overlay, slide_layer))
        overlay.affine = slide_frame(slide_layer)
        for name in ("translate", "rotate", "shear", "affine"):
            getattr(slide_layer.events, name).connect(self._slide_moved)  # once (napari)

    def _slide_moved(self, event) -> None:
        for overlay, slide_layer in self._placed:
            if slide_layer is event.source and overlay in self.viewer.layers:
                overlay.affine = slide_frame(slide_layer)

    def pause_source(self) -> Interaction | None:
        """What a run started now pauses on: the camera's moves, None when unchecked."""
        return self.interaction if self.pause_check.isChecked() else None

    @property
    def slide_layer(self):
        """The slide layer picked now (None without one)."""
        i = self.slide_combo.currentIndex()
        return self._slide_layers[i] if 0 <= i < len(self._slide_layers) else None

    def _follow_slide_layers(self, event=None) -> bool:
        """Refill the slide combo from the viewer (a newly inserted slide is picked); True when
        the picked slide changed."""
        layers = [lyr for lyr in self.viewer.layers if is_slide_layer(lyr)]
        keep = self.slide_layer if any(lyr is self.slide_layer for lyr in layers) else None
        added = getattr(event, "value", None) if getattr(event, "type", "") == "inserted" else None
        if added is not None and is_slide_layer(added):
            keep = added
        if keep is None and layers:
            keep = layers[-1]
        changed = keep is not self.slide_layer
        self._slide_layers = layers
        self.slide_combo.blockSignals(True)
        self.slide_combo.clear()
        self.slide_combo.addItems([lyr.name for lyr in layers])
        if keep is not None:
            self.slide_combo.setCurrentIndex(next(i for i, lyr in enumerate(layers)
                                                  if lyr is keep))
        self.slide_combo.blockSignals(False)
        return changed

    def _start_job(self, job: Job, desc: str):
        """Run ``job`` in a napari worker (not started yet: the caller starts it)."""
        from napari.qt.threading import create_worker
        from napari.utils import progress

        worker = create_worker(relay, job.gen, _start_thread=False, _ignore_errors=True)
        worker.finished.connect(job.done.set, Qt.ConnectionType.DirectConnection)
        worker.yielded.connect(partial(self._on_update, job))
        worker.finished.connect(partial(self._on_finished, job))
        self.job, self.worker = job, worker
        self._jobs.append((job, worker))
        self.pbar = progress(total=0, desc=f"{desc}: starting")
        self._desc = desc
        self.jobs_started += 1
        self.status.setText("Starting\u2026")
        return worker

    def _on_finished(self, job: Job, *_) -> None:
        """The run's worker ended (finished, failed or cancelled): status line, notification,
        ``_show_done(job)`` on success, controls re-enabled, ``run_finished(outcome)``.

        A layer a subclass drops in ``_run_ended`` goes on a later turn of the event loop
        (``overlays.remove_later``), never in this step, which shows a notification."""
        from napari.utils.notifications import show_error, show_info

        job.close()  # a run stopped between yields: end its worker threads now
        if job.orphaned:  # stopped by closing the widget (which may be deleted by now)
            return
        self._jobs[:] = [(j, w) for j, w in self._jobs if j is not job]
        if job is not self.job:
            return
        pbar, self.pbar = self.pbar, None
        self.job = self.worker = None
        if pbar is not None:
            pbar.close()
        if job.outcome == "pending":  # stopped between yields
            job.outcome = "cancelled"
        if job.outcome == "done":
            try:
                self._show_done(job)
            except Exception as e:  # noqa: BLE001 - the run still ends, with a word
                log.exception("showing the result of %s failed", type(job).__name__)
                job.outcome, job.error = "failed", f"showing the result: {one_line(e)}"
        outcome = job.outcome
        if outcome == "done":
            self.status.setText("Done.")
        elif outcome == "failed":
            self.status.setText(f"Failed: {job.error}")
            show_error(f"{self._desc}: {job.error}")
        else:
            done, total = job.progress
            self.status.setText(f"Cancelled after {done} of {total} patches." if total
                                else "Cancelled.")
            show_info(f"{self._desc}: run cancelled")
        self._run_ended(job)
        self._update_enabled()
        self.run_finished.emit(outcome)

    def _run_ended(self, job: Job) -> None:
        """Called once a run has ended and its result (if any) is shown."""

    def cancel(self, *_) -> None:
        """Stop the current run at its next batch."""
        if self.job is None:
            return
        self.job.stop()
        self.worker.quit()
        self.status.setText("Cancelling\u2026")
        self.cancel_button.setEnabled(False)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.teardown()
        super().closeEvent(event)

    def event(self, event) -> bool:
        # napari's dock close button takes the widget out of its dock without closing it
        if event.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif getattr(self, "_docked", False):
                self.teardown()
        return super().event(event)

    def teardown(self) -> None:
        """Stop the jobs, join them, and disconnect from the viewer (idempotent)."""
        import contextlib

        from qtpy.QtWidgets import QApplication

        self.stop_all(wait=True)
        for emitter in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            with contextlib.suppress(ValueError, RuntimeError):
                emitter.disconnect(self._on_layers_changed)
        app = QApplication.instance()
        if app is not None:
            with contextlib.suppress(TypeError, RuntimeError):
                app.aboutToQuit.disconnect(self.stop_all)
