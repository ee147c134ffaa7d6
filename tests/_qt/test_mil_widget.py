"""The "MIL attention" dock on a real viewer: runs, streaming, cancel, errors, display, export.

Real parts throughout: the synthetic SVS with a planted lesion (``svs`` fixture), OpenSlide
reads, the shipped demo encoder and demo ACMIL-GA (trained on other synthetic slides to tell
lesion from normal), napari thread workers.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui

PATCH_UM = 64.0


@pytest.fixture(scope="module")
def assets():
    """The shipped demo encoder (64-d, 64 px at 1 um/px) and demo ACMIL-GA checkpoint."""
    from napari_milview.assets import demo_encoder_path, demo_model_path

    for p in (demo_encoder_path(), demo_model_path()):
        assert p.is_file(), f"{p} missing: the demo assets ship with the package"
    return {"encoder": "demo", "model": demo_model_path(), "dim": 64}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _setup(make_napari_viewer, qtbot, svs, assets, *, patch_um=PATCH_UM, batch=16,
           model_file=False):
    """A viewer with the slide and the widget; the demo model (or its file, loaded as a user's
    checkpoint would be); the widget follows the model card's encoder and patch size."""
    from napari_milview._qt.mil_widget import MILWidget

    viewer = make_napari_viewer()
    [slide_layer] = viewer.open(str(svs.path), plugin="napari-milview")
    w = MILWidget(viewer)
    viewer.window.add_dock_widget(w, name="MIL attention")
    assert w.demo_radio.isChecked() and w.model is not None, w.model_info.text()
    if model_file:
        w.file_radio.setChecked(True)
        w.model_edit.setText(str(assets["model"]))
        w.models.choose()
        assert w.model is not None and w.model[2] == str(assets["model"])
    assert w.encoder_combo.currentText() == assets["encoder"]
    assert w.patch_um.value() == PATCH_UM
    w.patch_um.setValue(patch_um)
    w.batch_spin.setValue(batch)
    w.device_combo.setCurrentText("cpu")
    return viewer, w, slide_layer


def _run(qtbot, w, timeout=30_000) -> tuple:
    with qtbot.waitSignal(w.run_finished, timeout=timeout) as blocker:
        job = w.run()
        assert job is not None
    return job, blocker.args[0]


def _threads() -> set[str]:
    """Live Python threads, without the process-wide tile pool and Qt's pool threads."""
    return {t.name for t in threading.enumerate()
            if not isinstance(t, threading._DummyThread)  # a Qt pool thread that ran Python
            and not t.name.startswith("milview-tiles")}


def _no_threads_left(qtbot, before: set[str]) -> None:
    from qtpy.QtCore import QThreadPool

    from napari_milview.pipeline import THREAD_PREFIX

    assert not any(t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())
    assert _threads() <= before
    qtbot.waitUntil(lambda: QThreadPool.globalInstance().activeThreadCount() == 0,
                    timeout=5000)


def _lesion_fraction(svs, coords, ps) -> np.ndarray:
    """[K] fraction of each patch (level-0 (x, y), side ps) inside the lesion mask."""
    from PIL import Image

    mask = np.asarray(Image.open(svs.mask_path)) > 0
    ds = svs.mask_downsample
    return np.array([mask[y // ds:(y + ps) // ds, x // ds:(x + ps) // ds].mean()
                     for x, y in np.asarray(coords).tolist()])


def _errors(text: str) -> list[str]:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [str(n.message) for n in notification_manager.records
            if n.severity == NotificationSeverity.ERROR and text in str(n.message)]


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def test_end_to_end_streams_then_topk_inside_lesion(make_napari_viewer, qtbot, svs, assets):
    from napari_milview.overlay.heatmap import PENDING
    from napari_milview.overlay.normalise import normalise

    viewer, w, slide_layer = _setup(make_napari_viewer, qtbot, svs, assets, batch=8)
    w.stream_s = 0.0  # a partial heatmap after every batch
    assert w.run_button.isEnabled() and not w.cancel_button.isEnabled()
    info = w.model_info.text()  # what was inferred from the checkpoint
    assert "acmil_ga" in info and "classes: normal, lesion" in info and "64-d" in info
    assert "patch 64 \u00b5m" in info and "encoder demo" in info

    streamed, bars = [], []

    def on_insert(event):
        layer = event.value
        if str(layer.metadata.get("milview", "")).startswith("heatmap"):
            layer.events.data.connect(lambda e: streamed.append(int(np.isfinite(
                layer.data).sum())))

    viewer.layers.events.inserted.connect(on_insert)
    with qtbot.waitSignal(w.run_finished, timeout=30_000) as blocker:
        job = w.run()
        assert w.busy and not w.run_button.isEnabled() and w.cancel_button.isEnabled()
        # the heatmap layer is made at the click, empty (one transparent cell), no colour bar
        # (a layer whose colour bar was shown is never removed: overlays.py says why)
        empty = w.heatmap_layer
        assert empty is not None and empty.metadata["milview"] == PENDING
        assert empty.data.shape == (1, 1) and not np.isfinite(empty.data).any()
        assert not empty.colorbar.visible
        assert tuple(empty.units) == tuple(slide_layer.units)  # microns, as the slide's
        w.worker.yielded.connect(lambda u: bars.append((w.pbar.total, w.pbar.n)
                                                       if w.pbar is not None else None))
    assert blocker.args == ["done"], w.status.text()
    r = w.result
    n = r.n
    assert n > 100 and job.progress == (n, n)
    assert job.calls["batches"] >= n // 16 and job.calls["attend"] == 1
    assert job.calls["partial"] >= 3
    # the activity-dock progress bar counted patches, per batch
    counted = [b for b in bars if b is not None and b[0]]
    assert counted[-1] == (n, n) and len(counted) >= n // 8
    # the heatmap streamed in: updates with more and more patches, fewer than all
    assert len(streamed) >= 3 and streamed == sorted(streamed) and streamed[0] < n
    assert not w.busy and w.run_button.isEnabled() and not w.cancel_button.isEnabled()
    assert w.status.text() == "Done."

    # prediction panel
    assert r.predicted_class == "lesion"
    i = r.classes.index("lesion")
    assert w.prediction.names[i].font().bold() and not w.prediction.names[1 - i].font().bold()
    assert w.prediction.values[i].text() == f"{r.probabilities[i]:.3f}"
    assert f"N = {n} patches" in w.prediction.info.text() and "cpu" in w.prediction.info.text()
    assert "extract" in w.prediction.info.text() and "attend" in w.prediction.info.text()

    # heatmap: colour bar on, and every patch's cell is where the patch is (no one-patch shift)
    heat = w.heatmap_layer
    assert heat in viewer.layers and heat.colorbar.visible
    assert tuple(heat.units) == tuple(w.topk_layer.units) == tuple(slide_layer.units)
    assert viewer.layers.selection.active is heat
    shown = normalise(r.attention(w.source), w.method)
    ps = r.patch_size_level0
    mpp = float(slide_layer.scale[-1])
    centres = (r.coords + (ps - 1) / 2) * mpp  # world (x, y) of the patch centres
    cells = np.floor(np.stack([heat.world_to_data(np.array([y, x]))
                               for x, y in centres]) + 0.5).astype(int)
    np.testing.assert_allclose(heat.data[cells[:, 0], cells[:, 1]], shown, rtol=1e-6)
    # smooth look: the scored cells unchanged, a one-cell margin filled, the rest transparent
    from scipy import ndimage

    blocky = heat.data.copy()
    ok = np.isfinite(blocky)
    w.interp_combo.setCurrentIndex(w.interp_combo.findData("linear"))
    assert str(heat.interpolation2d) == "linear"
    np.testing.assert_array_equal(heat.data[ok], blocky[ok])
    np.testing.assert_array_equal(np.isfinite(heat.data),
                                  ndimage.binary_dilation(ok, np.ones((3, 3))))
    assert np.isnan(heat.data).any()
    w.interp_combo.setCurrentIndex(w.interp_combo.findData("nearest"))
    np.testing.assert_array_equal(heat.data, blocky)
    # the same centres are the patch centres on the slide layer
    px = np.stack([slide_layer.world_to_data(np.array([y, x])) for x, y in centres[:5]])
    np.testing.assert_allclose(px[:, ::-1], r.coords[:5] + (ps - 1) / 2, atol=1e-6)

    # another attention source re-colours the same layer, without running anything
    before = heat.data.copy()
    other = next(s for s in r.sources if s.startswith("branch/") and s != w.source)
    w.set_source(other)
    assert not np.array_equal(before, heat.data, equal_nan=True)
    assert heat.metadata["source"] == other and w.jobs_started == 1 and not w.busy
    w.set_source(r.default_source)

    # top-K rectangles lie inside the planted lesion
    topk = w.topk_layer
    k = w.k_spin.value()
    assert topk.nshapes == k == 20
    idx = topk.features["index"].to_numpy()
    np.testing.assert_allclose(topk.features["score"], r.attention(w.source)[idx])
    assert (_lesion_fraction(svs, r.coords[idx], ps) > 0.5).all()
    rect = np.asarray(topk.data[0])
    x0, y0 = r.coords[idx[0]]
    np.testing.assert_allclose(rect.min(0), [(y0 - 0.5) * mpp, (x0 - 0.5) * mpp])

    # hover: the status line carries the raw score of the patch under the cursor
    raw = r.attention(w.source)
    cy, cx = centres[idx[0]][::-1]
    assert w.raw_score_at((cy, cx)) == pytest.approx(float(raw[idx[0]]), rel=1e-6)
    status = heat.get_status((cy, cx), world=True)
    assert f"raw {w.source} = {float(raw[idx[0]]):.6g}" in status["coordinates"]
    assert w.raw_score_at((-1e6, -1e6)) is None

    # the gallery opened with the top-K; K follows the widget; a click goes to the patch
    gal = w.gallery
    assert gal is not None
    qtbot.waitUntil(lambda: gal._reader.worker is None, timeout=10_000)
    assert len(gal.buttons) == k and all(not b.icon().isNull() for b in gal.buttons)
    with qtbot.waitSignal(gal.loaded, timeout=10_000):
        w.k_spin.setValue(5)
    assert len(gal.buttons) == 5 and w.topk_layer.nshapes == 5
    with qtbot.waitSignal(gal.activated, timeout=2000) as clicked:
        gal.buttons[0].click()
    assert clicked.args == [int(idx[0])]
    cam = viewer.scene.camera
    np.testing.assert_allclose(cam.center[-2:], (cy, cx), atol=1e-6)
    h, wd = viewer.canvas.viewbox_size(viewer.layers)
    assert cam.zoom * ps * mpp == pytest.approx(min(h, wd) / 3)

    # the user moves and turns the slide layer: heatmap, rectangles and gallery go with it,
    # also through a later re-colour (which resets the heatmap's own scale and translate)
    slide_layer.translate = (250.0, -400.0)
    slide_layer.rotate = 30.0
    w.set_source(other)
    w.set_source(r.default_source)
    on_slide = np.stack([slide_layer.data_to_world(np.array([y, x]))
                         for x, y in r.coords + (ps - 1) / 2])  # world (row, col)
    cells = np.floor(np.stack([heat.world_to_data(p) for p in on_slide]) + 0.5).astype(int)
    np.testing.assert_allclose(heat.data[cells[:, 0], cells[:, 1]], shown, rtol=1e-6)
    corner = np.asarray(w.topk_layer.data[0]).min(0)  # the rectangle's top-left, local
    x0, y0 = r.coords[w.topk_layer.features["index"].to_numpy()[0]]
    np.testing.assert_allclose(w.topk_layer.data_to_world(corner),
                               slide_layer.data_to_world(np.array([y0 - 0.5, x0 - 0.5])),
                               atol=1e-6)
    gal.buttons[0].click()
    np.testing.assert_allclose(cam.center[-2:], on_slide[idx[0]], atol=1e-6)


def test_cancel_mid_run_stops_within_a_batch(make_napari_viewer, qtbot, svs, assets):
    # 16 um patches: ~2000 of them, 4 per batch, so the run is far from over when cancelled
    viewer, w, slide_layer = _setup(make_napari_viewer, qtbot, svs, assets, patch_um=16.0,
                                    batch=4)
    w.stream_s = -1.0
    before = _threads()
    with qtbot.waitSignal(w.run_finished, timeout=30_000) as blocker:
        job = w.run()
        qtbot.waitUntil(lambda: job.progress[0] > 0, timeout=20_000)
        w.cancel()
        at_cancel = job.progress[0]  # read after the event is set: no race with the worker
        assert not w.cancel_button.isEnabled()
    assert blocker.args == ["cancelled"]
    done, total = job.progress
    # after the event is set at most the batch between the pipeline's last check and its
    # yield comes out (4 patches); one more batch of slack for the worker's progress update
    assert total > 1000 and done <= at_cancel + 2 * 4
    assert job.calls["attend"] == 0 and w.result is None and w.heatmap_layer is None
    # the empty heatmap layer goes on a later turn of the event loop
    qtbot.waitUntil(lambda: [lyr.name for lyr in viewer.layers] == [slide_layer.name],
                    timeout=2000)
    assert not w.busy and w.run_button.isEnabled() and not w.cancel_button.isEnabled()
    assert w.status.text().startswith("Cancelled after")
    assert job.done.is_set() and job.gen.gi_frame is None  # the generator is closed
    _no_threads_left(qtbot, before)


def test_run_pauses_while_the_view_moves(make_napari_viewer, qtbot, svs, assets, check_pause):
    """Camera moves hold the extraction between batches (conftest.check_pause)."""
    viewer, w, _ = _setup(make_napari_viewer, qtbot, svs, assets, patch_um=16.0, batch=4)
    w.stream_s = -1.0
    check_pause(viewer, w)


def test_error_then_a_good_run(make_napari_viewer, qtbot, svs, assets, tmp_path):
    from napari_milview.features.bag import Bag
    from napari_milview.features.milview_h5 import save_bag
    from napari_milview.slide import open_slide
    from napari_milview.tissue import patch_grid

    viewer, w, _ = _setup(make_napari_viewer, qtbot, svs, assets, model_file=True)
    dim = assets["dim"]
    with open_slide(svs.path) as s:
        grid = patch_grid(s, patch_px=64, patch_um=PATCH_UM)
    rng = np.random.default_rng(0)
    bad = save_bag(Bag.from_arrays(rng.random((len(grid), dim + 12), dtype=np.float32),
                                   grid.coords, patch_size_level0=grid.patch_size_level0,
                                   mpp=grid.mpp, slide_id="svs"), tmp_path / "bad.h5")
    w.bag_radio.setChecked(True)
    w.bag_edit.setText(str(bad))
    n_before = len(_errors(""))
    job, outcome = _run(qtbot, w)
    assert outcome == "failed"
    msgs = _errors("")[n_before:]
    assert len(msgs) == 1, msgs  # one readable notification, naming both dimensions
    assert f"{dim + 12}-d" in msgs[0] and f"{dim}-d" in msgs[0] and "\n" not in msgs[0]
    assert w.status.text().startswith("Failed:")
    assert w.run_button.isEnabled() and not w.busy and w.result is None

    # the same widget runs again, correctly
    w.extract_radio.setChecked(True)
    job, outcome = _run(qtbot, w)
    assert outcome == "done" and w.result.n == len(grid)
    assert len(_errors("")) == n_before + 1


def test_source_and_normalisation_switch_without_rerun(make_napari_viewer, qtbot, svs):
    """Re-colouring a 40 000-patch result happens in place, with no worker started (its
    time is measured in bench/overlay.py, not asserted here)."""
    from napari_milview._qt.mil_widget import MILWidget
    from napari_milview.overlay.normalise import METHODS, contrast_limits, normalise
    from napari_milview.result import Result

    viewer = make_napari_viewer()
    viewer.open(str(svs.path), plugin="napari-milview")
    w = MILWidget(viewer)
    viewer.window.add_dock_widget(w, name="MIL attention")
    rng = np.random.default_rng(1)
    side, ps = 200, 16
    yy, xx = np.mgrid[0:side, 0:side]
    coords = np.stack([xx.ravel(), yy.ravel()], 1) * ps
    logits = rng.normal(size=(3, side * side)).astype(np.float32)
    att = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    sources = {"branch/0": att[0], "branch/1": att[1], "branch/mean": att[:2].mean(0),
               "raw/branch/0": logits[0], "raw/branch/1": logits[1], "instance/1": att[2]}
    r = Result(coords=coords, patch_size_level0=ps, sources=sources,
               default_source="branch/mean", classes=["normal", "lesion"],
               logits=np.array([0.1, 0.9]), probabilities=np.array([0.31, 0.69]),
               arch="acmil_ga", mpp=svs.mpp)
    w.show_result(r)
    assert w.source == "branch/mean"
    items = [w.source_combo.itemText(i) for i in range(w.source_combo.count())]
    assert items[0].startswith("\u2014 attention") and items[1] == "branch/mean"
    assert items.index("raw/branch/0") > items.index("branch/1")  # logits in their own group
    heat, n_layers = w.heatmap_layer, len(viewer.layers)
    seen = set()
    for source in ("branch/0", "raw/branch/1", "branch/mean"):
        for method in METHODS:
            if method == "fixed":
                w.vmin.setValue(0.0)
                w.vmax.setValue(float(np.quantile(sources[source], 0.9)))
            w.set_source(source)
            w.set_method(method)
            assert w.zoom.isEnabled() == (method == "attention_x_n")
            want = normalise(sources[source], method, **w._norm_kw())
            np.testing.assert_allclose(heat.data.reshape(-1), want, rtol=1e-6)
            assert tuple(heat.contrast_limits) == pytest.approx(
                contrast_limits(method, want, vmin=w.vmin.value(), vmax=w.vmax.value()))
            assert heat.metadata["source"] == source and heat.metadata["method"] == method
            seen.add(heat.data.tobytes())
            raw = heat.metadata["raw_grid"].reshape(-1)
            np.testing.assert_array_equal(raw, sources[source])  # hover reads raw scores
    assert len(seen) == 3 * len(METHODS)
    assert w.heatmap_layer is heat and len(viewer.layers) == n_layers  # updated in place
    assert w.jobs_started == 0 and w.job is None
    # ACMIL's zoom factor rescales attention x N (uniform attention shows as the zoom)
    w.set_method("attention_x_n")
    w.zoom.setValue(0.25)
    want = normalise(sources["branch/mean"], "attention_x_n", zoom=0.25)
    np.testing.assert_allclose(heat.data.reshape(-1), want, rtol=1e-6)
    assert np.nanmedian(want) < 0.3 and heat.metadata["zoom"] == 0.25
    w.zoom.setValue(1.0)
    # look changes touch the same layer
    w.cmap_combo.setCurrentText("viridis")
    w.opacity.setValue(80)
    w.interp_combo.setCurrentIndex(w.interp_combo.findData("linear"))
    assert heat.colormap.name == "viridis" and heat.opacity == pytest.approx(0.8)
    assert str(heat.interpolation2d) == "linear"
    # top-K follows the source and the range mode picks in the colour-bar units
    w.set_method("rank")
    w.topk_mode.setCurrentIndex(w.topk_mode.findData("range"))
    w.lo.setValue(0.5)
    w.hi.setValue(0.6)
    w.k_spin.setValue(7)
    pct = normalise(sources["branch/mean"], "rank")[w._indices]
    assert len(w._indices) == 7 and ((pct >= 0.5) & (pct <= 0.6)).all()
    assert w.topk_layer.nshapes == 7


def test_export_round_trip(make_napari_viewer, qtbot, svs, assets, tmp_path):
    import csv

    import h5py
    import tifffile

    from napari_milview._qt.mil_widget import MILWidget
    from napari_milview.overlay.export import read_sidecar

    viewer, w, _ = _setup(make_napari_viewer, qtbot, svs, assets, model_file=True)
    w.stream_s = -1.0
    _, outcome = _run(qtbot, w)
    assert outcome == "done"
    r = w.result
    w.set_method("minmax")
    w.k_spin.setValue(4)

    gj = w.export("geojson", tmp_path / "a.geojson")
    doc = json.loads(Path(gj).read_text())
    assert doc["type"] == "FeatureCollection"
    kinds = [f["properties"]["objectType"] for f in doc["features"]]
    assert kinds.count("detection") == r.n and kinds.count("annotation") == 4
    for f in doc["features"]:
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
    det = doc["features"][0]
    assert det["geometry"]["coordinates"][0][0] == r.coords[0].tolist()
    assert det["properties"]["measurements"]["attention"] == pytest.approx(
        float(r.attention(w.source)[0]))

    with open(w.export("csv", tmp_path / "a.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == r.n and float(rows[3][w.source]) == pytest.approx(
        float(r.attention(w.source)[3]))

    with h5py.File(w.export("clam", tmp_path / "a.h5"), "r") as f:
        assert f["attention_scores"].shape == (r.n, 1) and f["coords"].shape == (r.n, 2)

    grid = tifffile.imread(w.export("tiff", tmp_path / "a.ome.tif"))
    assert grid.dtype == np.float32 and np.nanmax(grid) == pytest.approx(1.0)

    pngs = w.export("crops", tmp_path)
    assert len(pngs) == 4 and all(p.suffix == ".png" and p.exists() for p in pngs)

    side = w.export("sidecar", tmp_path / "a.milview.json")
    meta = read_sidecar(side)
    assert meta["attention_source"] == w.source and meta["normalisation"]["method"] == "minmax"
    assert meta["topk"]["k"] == 4 and meta["n_instances"] == r.n
    assert Path(meta["result"]).exists()

    # reopening the sidecar shows the same heatmap and settings
    w2 = MILWidget(viewer)
    viewer.window.add_dock_widget(w2, name="MIL attention 2")
    again = w2.open_result(side)
    assert again.n == r.n and w2.method == "minmax" and w2.k_spin.value() == 4
    np.testing.assert_array_equal(w2.heatmap_layer.data, w.heatmap_layer.data)
    assert w2.jobs_started == 0


def test_closing_widget_or_viewer_mid_run_leaves_no_threads(make_napari_viewer, qtbot, svs,
                                                            assets):
    viewer, w, slide_layer = _setup(make_napari_viewer, qtbot, svs, assets, patch_um=16.0,
                                    batch=4)
    w.stream_s = -1.0
    before = _threads()
    job = w.run()
    qtbot.waitUntil(lambda: job.progress[0] > 0, timeout=20_000)
    w.close()  # joins
    assert job.done.is_set() and job.cancel.is_set() and job.gen.gi_frame is None
    _no_threads_left(qtbot, before)

    from napari_milview._qt.mil_widget import MILWidget

    # napari's dock close button (remove_dock_widget) stops it too
    w1 = MILWidget(viewer)
    viewer.window.add_dock_widget(w1, name="MIL attention 1")
    w1.patch_um.setValue(16.0)
    w1.batch_spin.setValue(4)
    job1 = w1.run()
    qtbot.waitUntil(lambda: job1.progress[0] > 0, timeout=20_000)
    viewer.window.remove_dock_widget(w1)
    assert job1.done.is_set() and job1.gen.gi_frame is None and not w1.busy
    _no_threads_left(qtbot, before)

    # and so does the viewer closing under a running widget
    w2 = MILWidget(viewer)
    viewer.window.add_dock_widget(w2, name="MIL attention 2")
    w2.patch_um.setValue(16.0)
    w2.batch_spin.setValue(4)
    job2 = w2.run()
    qtbot.waitUntil(lambda: job2.progress[0] > 0, timeout=20_000)
    viewer.close()
    qtbot.waitUntil(job2.done.is_set, timeout=10_000)
    qtbot.waitUntil(lambda: job2.gen.gi_frame is None, timeout=10_000)
    _no_threads_left(qtbot, before)


def test_reader_and_thread_counts_inside_napari():
    """CPU runs: 2 readers that also run the forward, torch on every core but one; asking
    for CUDA where there is none is the same clear error as the run's."""
    import os

    import torch

    from napari_milview.jobs import gui_readers, gui_torch_threads

    assert gui_torch_threads() == max(1, (os.cpu_count() or 2) - 1)
    assert gui_readers("cpu") == 2
    if torch.cuda.is_available():
        assert 2 <= gui_readers("cuda") <= 8
    else:
        assert gui_readers("auto") == 2
        with pytest.raises(ValueError, match="CUDA is not available"):
            gui_readers("cuda")


def test_two_slides_keep_their_own_layers(make_napari_viewer, qtbot, svs, odd_svs, assets):
    """A run on slide B never touches slide A's heatmap and top-K: each slide's layers are
    named for it, placed on it (moving B moves B's overlays only) and come back in the dock
    when that slide is picked again."""
    viewer, w, layer_a = _setup(make_napari_viewer, qtbot, svs, assets, batch=32)
    w.stream_s = -1.0
    job_a, outcome = _run(qtbot, w)
    assert outcome == "done"
    heat_a, topk_a, result_a = w.heatmap_layer, w.topk_layer, w.result
    grid_a = np.array(heat_a.data, copy=True)
    assert heat_a.name == "attention (svs.svs)" and topk_a.name.endswith("(svs.svs)")

    [layer_b] = viewer.open(str(odd_svs.path), plugin="napari-milview")
    assert w.slide_layer is layer_b  # a newly opened slide is picked
    assert w.result is None and w.heatmap_layer is None
    assert w.prediction.headline.text() == "No prediction yet."
    assert not w.export_buttons["csv"].isEnabled()
    w.patch_um.setValue(PATCH_UM)
    job_b, outcome = _run(qtbot, w)
    assert outcome == "done", w.status.text()
    heat_b, topk_b = w.heatmap_layer, w.topk_layer
    assert heat_b is not heat_a and topk_b is not topk_a
    assert heat_b.name == "attention (odd.svs)" and topk_b.name.endswith("(odd.svs)")
    assert w.result is not result_a and w.result.slide == str(odd_svs.path)
    # A's layers untouched
    assert heat_a in viewer.layers and topk_a in viewer.layers
    np.testing.assert_array_equal(heat_a.data, grid_a)
    assert heat_a.name == "attention (svs.svs)"

    # move B: its overlays follow, A's stay
    layer_b.translate = (500.0, 700.0)
    np.testing.assert_allclose(heat_b.affine.affine_matrix[:2, 2], (500.0, 700.0))
    np.testing.assert_allclose(topk_b.affine.affine_matrix[:2, 2], (500.0, 700.0))
    np.testing.assert_allclose(heat_a.affine.affine_matrix[:2, 2], (0.0, 0.0))
    np.testing.assert_allclose(topk_a.affine.affine_matrix[:2, 2], (0.0, 0.0))

    # pick A again: its result, layers and exports come back; display changes touch A only
    w.slide_combo.setCurrentIndex(w.slide_combo.findText(layer_a.name))
    assert w.result is result_a and w.heatmap_layer is heat_a and w.topk_layer is topk_a
    assert w.prediction.headline.text().startswith("Predicted:")
    assert w.export_buttons["csv"].isEnabled()
    grid_b = np.array(heat_b.data, copy=True)
    w.set_method("minmax")
    assert not np.array_equal(np.nan_to_num(heat_a.data), np.nan_to_num(grid_a))
    np.testing.assert_array_equal(heat_b.data, grid_b)

    # removing slide B forgets its overlays (its layers stay, the user's to remove)
    viewer.layers.remove(layer_b)
    assert w.overlays_for(layer_b, create=False) is None
    assert heat_b in viewer.layers


def test_restored_sidecar_and_the_dock_agree(make_napari_viewer, qtbot, svs, assets, tmp_path):
    """A sidecar opened in napari, before or after the MIL dock: its heatmap shows its colour
    bar, and the dock shows that result (prediction, source, exports enabled) on its slide."""
    from napari_milview._qt.mil_widget import MILWidget

    viewer, w, _ = _setup(make_napari_viewer, qtbot, svs, assets, batch=32)
    w.stream_s = -1.0
    _, outcome = _run(qtbot, w)
    assert outcome == "done"
    w.set_method("minmax")
    side = w.export("sidecar", tmp_path / "svs.milview.json")
    n = w.result.n

    for dock_first in (False, True):
        v2 = make_napari_viewer()
        if dock_first:
            w2 = MILWidget(v2)
            v2.window.add_dock_widget(w2, name="MIL attention")
        layers = v2.open(str(side), plugin="napari-milview")
        heat = next(lyr for lyr in layers if lyr.metadata.get("milview") == "heatmap")
        assert heat.colorbar.visible  # with no dock too
        if not dock_first:
            w2 = MILWidget(v2)
            v2.window.add_dock_widget(w2, name="MIL attention")
        assert w2.slide_layer is not None and w2.slide_layer.name == "svs.svs"
        assert w2.result is not None and w2.result.n == n
        assert w2.heatmap_layer is heat and w2.topk_layer is not None
        assert w2.method == "minmax" and w2.source == w.source
        assert w2.prediction.headline.text().startswith("Predicted:")
        assert all(b.isEnabled() for b in w2.export_buttons.values())
        out = w2.export("csv", tmp_path / f"again_{dock_first}.csv")
        assert out.is_file()
        w2.teardown()


def test_demo_model_on_a_real_slide_says_it_is_a_demo(make_napari_viewer, qtbot, real_svs,
                                                      svs, assets):
    """The demo model was trained on synthetic slides only: on the real Aperio slide its
    output carries that note; on a synthetic slide it does not."""
    from napari_milview.pipeline import DEMO_NOTE

    viewer, w, _ = _setup(make_napari_viewer, qtbot, svs, assets, batch=32)
    w.stream_s = -1.0
    assert _run(qtbot, w)[1] == "done"
    assert DEMO_NOTE not in w.prediction.info.text()
    assert "notes" not in w.result.meta or DEMO_NOTE not in w.result.meta["notes"]
    viewer.open(str(real_svs), plugin="napari-milview")
    w.patch_um.setValue(PATCH_UM)
    assert _run(qtbot, w, timeout=60_000)[1] == "done", w.status.text()
    assert DEMO_NOTE in w.result.meta["notes"]
    assert DEMO_NOTE in w.prediction.info.text()
