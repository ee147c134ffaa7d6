"""The "Staining preview and robustness" dock on a real viewer.

Real parts: the synthetic SVS with a planted lesion (``svs`` fixture) read by OpenSlide, the
stain estimate of that slide, napari's multiscale image layers and thread workers, the shipped
demo encoder and model.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _threads() -> set[str]:
    """Live Python threads, without the process-wide tile pool and Qt's pool threads."""
    return {t.name for t in threading.enumerate()
            if not isinstance(t, threading._DummyThread)
            and not t.name.startswith("milview-tiles")}


def _no_threads_left(qtbot, before: set[str]) -> None:
    from qtpy.QtCore import QThreadPool

    from napari_milview.pipeline import THREAD_PREFIX

    assert not any(t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())
    assert _threads() <= before
    qtbot.waitUntil(lambda: QThreadPool.globalInstance().activeThreadCount() == 0,
                    timeout=5000)


def _setup(make_napari_viewer, svs):
    from napari_milview._qt.stain_widget import StainWidget
    from napari_milview.stain.robustness import clear_cache

    clear_cache()
    viewer = make_napari_viewer()
    [slide_layer] = viewer.open(str(svs.path), plugin="napari-milview")
    w = StainWidget(viewer)
    viewer.window.add_dock_widget(w, name="Staining")
    w.device_combo.setCurrentText("cpu")
    return viewer, w, slide_layer


def _show(qtbot, w, condition: str):
    with qtbot.waitSignal(w.preview_shown, timeout=30_000):
        if w.preview_layer is None:
            w.set_condition(condition)
            w.show_preview()
        else:
            w.set_condition(condition)
    return w.preview_layer


def _on_screen(layer) -> np.ndarray:
    """The pixels of ``layer`` napari has on screen: its data level inside its corners."""
    (r0, c0), (r1, c1) = np.asarray(layer.corner_pixels)[:, :2]
    return np.asarray(layer.data[layer.data_level][r0:r1 + 1, c0:c1 + 1])


def test_preview_follows_condition_and_parameters(make_napari_viewer, qtbot, svs):
    viewer, w, slide_layer = _setup(make_napari_viewer, svs)
    slide = slide_layer.metadata["slide"]

    # a non-reference condition: the staining is estimated in a worker first
    with qtbot.waitSignal(w.prepared, timeout=30_000) as est:
        w.set_condition("low-intensity")
        w.show_preview()
        assert not w.stain_busy.isHidden() and w.prep is not None  # busy indicator
    assert est.args == ["done"] and "estimated" in w.stain_info.text()
    assert w.stain_busy.isHidden() and w.prep is None
    qtbot.waitUntil(lambda: w.preview_layer is not None, timeout=10_000)
    prev = w.preview_layer
    assert prev.multiscale and prev.rgb and len(prev.data) == len(slide_layer.data)
    np.testing.assert_array_equal(prev.scale, slide_layer.scale)
    np.testing.assert_array_equal(prev.translate, slide_layer.translate)
    assert tuple(prev.units) == tuple(slide_layer.units)
    assert prev.metadata["condition"] == "low-intensity"
    assert prev.metadata["milview"] == "stain-preview" and "slide" not in prev.metadata
    assert w.slide_combo.count() == 1  # the preview is not a slide layer

    # what napari has on screen differs from the original, and is the condition applied to it
    viewer.reset_view()
    qtbot.wait(50)
    shown, orig = _on_screen(prev), _on_screen(slide_layer)
    assert prev.data_level == slide_layer.data_level and shown.shape == orig.shape
    pert = w.perturbation()
    np.testing.assert_array_equal(shown, pert(orig))
    assert (shown != orig).any(axis=-1).mean() > 0.2
    raw = np.asarray(prev._slice.image.raw)  # the pixels napari actually loaded for drawing
    np.testing.assert_array_equal(raw, pert(np.asarray(slide_layer._slice.image.raw)))
    # no seams: a level-0 window across chunk borders equals the one-shot perturbation
    win = (slice(1000, 1700), slice(1100, 1900))
    np.testing.assert_array_equal(np.asarray(prev.data[0][win]),
                                  pert(np.asarray(slide.to_dask()[0][win])))

    # a parameter change updates the same layer in place
    before = shown.copy()
    w.set_param(0.3)
    assert w.preview_layer is prev and prev.metadata["params"]["ratio"] == [0.3, 0.3]
    assert not np.array_equal(_on_screen(prev), before)

    # the reference condition shows the original pixels
    _show(qtbot, w, "reference")
    assert prev.metadata["condition"] == "reference"
    np.testing.assert_array_equal(_on_screen(prev), _on_screen(slide_layer))
    # the parameter of a condition is remembered, the preset comes back on request
    w.set_condition("low-intensity")
    assert w.param_spin.value() == pytest.approx(0.3)
    w.reset_button.click()
    assert w.param_spin.value() == pytest.approx(0.6)

    # side by side: moved right by the slide's width + the gap, in world units (um)
    _show(qtbot, w, "hed-strong")
    w.placement_combo.setCurrentIndex(w.placement_combo.findData("side"))
    width_um = slide.info.dimensions[0] * slide_layer.scale[-1]
    assert prev.translate[-1] == pytest.approx(width_um * 1.05)
    assert prev.translate[-2] == slide_layer.translate[-2]
    assert f"{width_um * 1.05:,.1f}" in w.placement_info.text()
    assert "\u00b5m" in w.placement_info.text()
    w.placement_combo.setCurrentIndex(w.placement_combo.findData("overlay"))
    np.testing.assert_array_equal(prev.translate, slide_layer.translate)
    # the user moves and turns the slide layer: the preview goes with it, in either placement
    slide_layer.translate = (300.0, -120.0)
    slide_layer.rotate = 20.0
    p = np.array([700.0, 1500.0])  # a level-0 pixel (row, col)
    np.testing.assert_allclose(prev.data_to_world(p), slide_layer.data_to_world(p), atol=1e-6)
    w.placement_combo.setCurrentIndex(w.placement_combo.findData("side"))
    shifted = slide_layer.data_to_world(p + (0, slide.info.dimensions[0] * 1.05))
    np.testing.assert_allclose(prev.data_to_world(p), shifted, atol=1e-6)
    w.placement_combo.setCurrentIndex(w.placement_combo.findData("overlay"))
    slide_layer.translate, slide_layer.rotate = (0.0, 0.0), 0.0
    # toggling shows the original underneath
    w.visible_check.setChecked(False)
    assert not prev.visible
    w.visible_check.setChecked(True)
    assert prev.visible
    # removing the layer ends the preview: a new condition does not bring it back
    viewer.layers.remove(prev)
    w.set_condition("macenko")
    assert w.preview_layer is None and len(viewer.layers) == 1


def test_robustness_run_table_stability_export(make_napari_viewer, qtbot, svs, tmp_path):
    from napari_milview.stain.robustness import RobustnessReport

    viewer, w, slide_layer = _setup(make_napari_viewer, svs)
    assert w.model_info.text().startswith("<b>acmil_ga")
    assert w.encoder_combo.currentText() == "demo" and w.patch_um.value() == 64.0
    w.set_conditions(["low-intensity", "hed-strong"])
    w.set_condition("low-intensity")
    w.set_param(0.4)  # used by the run too
    assert w.checked_conditions() == ["reference", "low-intensity", "hed-strong"]
    assert not w.csv_button.isEnabled()
    with qtbot.waitSignal(w.run_finished, timeout=60_000) as blocker:
        job = w.run()
        assert job is not None and w.busy and not w.run_button.isEnabled()
        assert w.cancel_button.isEnabled() and w.run() is None  # one run at a time
    assert blocker.args == ["done"], w.status.text()
    rep = w.report
    assert isinstance(rep, RobustnessReport) and w.status.text() == "Done."
    assert rep.conditions == ["reference", "low-intensity", "hed-strong"]
    assert rep.params["low-intensity"]["ratio"] == [0.4, 0.4]
    assert np.isfinite(rep.probabilities).all()
    # the table: one row per condition + the range row
    t = w.table
    assert t.rowCount() == 4
    assert [t.item(r, 0).text() for r in range(4)] == [*rep.conditions, "min-max range"]
    heads = [t.horizontalHeaderItem(c).text() for c in range(t.columnCount())]
    assert heads == ["condition", "predicted", "p(normal)", "p(lesion)", "Jaccard top-20"]
    assert t.item(0, 1).text() == "lesion" and t.item(0, 4).text() == "1.000"
    assert t.item(1, 3).text() == f"{rep.probabilities[1, 1]:.4f}"
    assert t.item(3, 3).text() == f"{rep.prob_range[1]:.4f}"
    assert "Range (max - min)" in w.range_label.text()
    # the stability layer: one cell per patch, on the slide's world coordinates
    lay = w.stability_layer
    assert lay in viewer.layers and lay.metadata["milview"] == "stability"
    ps = rep.reference.patch_size_level0
    mpp = float(slide_layer.scale[-1])
    assert tuple(lay.scale) == pytest.approx((ps * mpp, ps * mpp))
    x0, y0 = rep.reference.coords[0]
    cell = np.floor(lay.world_to_data(np.array([(y0 + ps / 2) * mpp, (x0 + ps / 2) * mpp]))
                    + 0.5).astype(int)
    assert lay.data[cell[0], cell[1]] == pytest.approx(float(rep.stability[0]))
    slide_layer.translate = (-80.0, 40.0)  # moved by the user: the layer goes with the slide
    slide_layer.rotate = -25.0
    centre = slide_layer.data_to_world(np.array([y0 + ps / 2, x0 + ps / 2]))
    cell = np.floor(lay.world_to_data(centre) + 0.5).astype(int)
    assert lay.data[cell[0], cell[1]] == pytest.approx(float(rep.stability[0]))
    assert tuple(lay.contrast_limits) == (0.0, 1.0)
    # exports
    assert w.csv_button.isEnabled()
    w.export("csv", tmp_path / "r.csv")
    w.export("json", tmp_path / "r.json")
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("condition,predicted")
    assert '"napari-milview-robustness"' in (tmp_path / "r.json").read_text()
    # a second run is served from the feature cache: no patch is encoded again
    with qtbot.waitSignal(w.run_finished, timeout=30_000) as blocker:
        job2 = w.run()
    assert blocker.args == ["done"] and job2.calls["extract_batches"] == 0
    assert set(w.report.cache.values()) == {"memory"}
    assert w.stability_layer is lay and len(viewer.layers) == 2


def test_run_pauses_while_the_view_moves(make_napari_viewer, qtbot, svs, check_pause):
    """As in the MIL dock: camera moves hold the run between batches (conftest.check_pause)."""
    viewer, w, _ = _setup(make_napari_viewer, svs)
    w.patch_um.setValue(16.0)  # ~2000 patches per condition, 4 per batch
    w.batch_spin.setValue(4)
    check_pause(viewer, w)


def test_cancel_and_teardown_leave_no_threads(make_napari_viewer, qtbot, svs):
    viewer, w, _ = _setup(make_napari_viewer, svs)
    before = _threads()
    w.patch_um.setValue(16.0)  # ~2000 patches per condition, 4 per batch
    w.batch_spin.setValue(4)
    with qtbot.waitSignal(w.run_finished, timeout=60_000) as blocker:
        job = w.run()
        qtbot.waitUntil(lambda: job.progress[0] > 0, timeout=30_000)
        at_cancel = job.progress[0]
        w.cancel()
    assert blocker.args == ["cancelled"] and w.report is None
    done, total = job.progress
    assert total > 5000 and done <= at_cancel + 2 * 4
    assert w.status.text().startswith("Cancelled after") and not w.busy
    assert w.run_button.isEnabled() and not w.cancel_button.isEnabled()
    assert job.gen.gi_frame is None
    _no_threads_left(qtbot, before)

    # closing the widget mid-run (and mid-estimate) joins everything
    job = w.run()
    qtbot.waitUntil(lambda: job.progress[0] > 0, timeout=30_000)
    w.set_condition("reinhard")
    w.show_preview()
    w.close()
    assert job.done.is_set() and job.cancel.is_set() and job.gen.gi_frame is None
    _no_threads_left(qtbot, before)

    # napari's dock close button stops a run too
    from napari_milview._qt.stain_widget import StainWidget

    w2 = StainWidget(viewer)
    viewer.window.add_dock_widget(w2, name="Staining 2")
    w2.patch_um.setValue(16.0)
    w2.batch_spin.setValue(4)
    job2 = w2.run()
    qtbot.waitUntil(lambda: job2.progress[0] > 0, timeout=30_000)
    viewer.window.remove_dock_widget(w2)
    assert job2.done.is_set() and job2.gen.gi_frame is None and not w2.busy
    _no_threads_left(qtbot, before)


@pytest.mark.parametrize("width", [1280, 1600])
def test_dock_fits_the_window_without_horizontal_scrolling(make_napari_viewer, qtbot, svs,
                                                            width):
    """Issue 11: in a 1280 x 900 window (and at 1600 px) the Jaccard column, Visible, Cancel
    and Export JSON hid behind a horizontal scroll bar."""
    from qtpy.QtCore import QPoint, QRect
    from qtpy.QtWidgets import QScrollArea

    from napari_milview._qt.stain_widget import StainWidget
    from napari_milview.stain.robustness import clear_cache

    clear_cache()
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(width, 900)
    viewer.open(str(svs.path), plugin="napari-milview")
    w = StainWidget(viewer)
    viewer.window.add_dock_widget(w, area="right", name="Staining")
    w.device_combo.setCurrentText("cpu")
    qtbot.waitUntil(lambda: w.model_info.text().startswith("<b>"), timeout=60_000)
    w.set_conditions(["low-intensity"])
    with qtbot.waitSignal(w.run_finished, timeout=60_000) as blocker:
        w.run()
    assert blocker.args == ["done"], w.status.text()
    qtbot.wait(100)  # layout settles
    assert viewer.window._qt_window.width() == width and w.isVisible()

    scroll = w.findChild(QScrollArea)
    bar = scroll.horizontalScrollBar()
    assert not bar.isVisible() or bar.maximum() == 0
    port = scroll.viewport()

    def inside(widget, rect=None) -> bool:
        rect = widget.rect() if rect is None else rect
        scroll.ensureWidgetVisible(widget, 0, 0)  # vertically; there is no horizontal scroll
        return port.rect().contains(QRect(widget.mapTo(port, rect.topLeft()), rect.size()))

    for widget in (w.visible_check, w.cancel_button, w.json_button, w.csv_button,
                   w.run_button, w.preview_button, w.table):
        assert inside(widget), widget
    # the table: every column inside its own viewport (no scrolling there either), values
    # not cut, the Jaccard column (last) inside the dock's viewport
    t = w.table
    heads = [t.horizontalHeaderItem(c).text() for c in range(t.columnCount())]
    assert heads[-1] == "Jaccard top-20" and t.rowCount() == 3
    assert t.item(1, t.columnCount() - 1).text() not in ("", "\u2026")  # a result is shown
    assert t.horizontalScrollBar().maximum() == 0
    for c in range(t.columnCount()):
        assert t.columnViewportPosition(c) >= 0
        assert t.columnViewportPosition(c) + t.columnWidth(c) <= t.viewport().width()
        assert t.columnWidth(c) >= t.sizeHintForColumn(c), heads[c]
    last = t.columnCount() - 1
    cell = QRect(QPoint(t.columnViewportPosition(last), 0), t.visualItemRect(t.item(0, last))
                 .size())
    assert inside(t.viewport(), cell)
    assert t.horizontalHeaderItem(last).toolTip() == "Jaccard top-20"  # full text when elided
