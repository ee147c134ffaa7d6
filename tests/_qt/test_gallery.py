"""The top-K gallery dock: full-resolution thumbnails read in a worker, click to go there."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _result(svs, k: int = 6, ps: int = 256):
    """A Result whose first ``k`` patches lie along the slide's diagonal, scores k..1."""
    from napari_milview.result import Result

    xs = np.linspace(0, min(svs.width, svs.height) - ps, k).astype(np.int64)
    coords = np.stack([xs, xs], 1)
    scores = np.arange(k, 0, -1, dtype=np.float32)
    return Result(coords=coords, patch_size_level0=ps, sources={"attention": scores / scores.sum()},
                  default_source="attention", classes=["a", "b"], logits=np.zeros(2),
                  probabilities=np.array([0.5, 0.5]), arch="abmil", mpp=svs.mpp)


def _gallery(make_napari_viewer, qtbot, svs):
    from napari_milview._qt.gallery import TopKGallery

    viewer = make_napari_viewer()
    [layer] = viewer.open(str(svs.path), plugin="napari-milview")
    g = TopKGallery(viewer)
    viewer.window.add_dock_widget(g, name="Top-K gallery")
    return viewer, layer, g


def test_read_thumbnails_full_resolution(svs):
    from PIL import Image

    from napari_milview._qt.gallery import read_thumbnails
    from napari_milview.slide import open_slide

    coords = np.array([[512, 768], [1024, 256]])
    with open_slide(svs.path) as s:
        got = list(read_thumbnails(s, coords, 256, size=64))
        full = s.read_region((1024, 256), 0, (256, 256))
    assert [k for k, _ in got] == [0, 1]
    assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for _, img in got)
    want = np.asarray(Image.fromarray(full).resize((64, 64), Image.Resampling.BOX))
    np.testing.assert_array_equal(got[1][1], want)  # level 0, box-averaged: not a pyramid level


def test_thumbnails_arrive_and_click_centres(make_napari_viewer, qtbot, svs):
    viewer, layer, g = _gallery(make_napari_viewer, qtbot, svs)
    r = _result(svs)
    idx = np.array([0, 1, 2, 3, 4, 5])
    with qtbot.waitSignal(g.loaded, timeout=10_000):
        g.set_items(layer, r, idx, "attention", mpp=svs.mpp)
    assert len(g.buttons) == 6 and all(not b.icon().isNull() for b in g.buttons)
    assert g.buttons[0].text().startswith("#1 ") and g.buttons[5].text().startswith("#6 ")
    assert f"{r.attention()[0]:.4g}" in g.buttons[0].text()

    with qtbot.waitSignal(g.activated, timeout=2000) as sig:
        g.buttons[3].click()
    assert sig.args == [3]
    x, y = r.coords[3]
    ps = r.patch_size_level0
    cam = viewer.scene.camera
    # the patch centre on the slide layer is where the camera looks now
    centre = layer.world_to_data(np.asarray(cam.center[-2:]))
    np.testing.assert_allclose(centre, [y + (ps - 1) / 2, x + (ps - 1) / 2], atol=1e-6)
    h, w = viewer.canvas.viewbox_size(viewer.layers)
    assert cam.zoom * ps * svs.mpp == pytest.approx(min(h, w) / 3)


def test_new_selection_cancels_previous_read_and_close_joins(make_napari_viewer, qtbot, svs):
    viewer, layer, g = _gallery(make_napari_viewer, qtbot, svs)
    many = _result(svs, k=60, ps=1024)
    before = {t.name for t in threading.enumerate()
              if not isinstance(t, threading._DummyThread)}
    g.set_items(layer, many, np.arange(60), mpp=svs.mpp)
    first = g._reader.worker
    assert first is not None
    few = _result(svs, k=3)
    with qtbot.waitSignal(g.loaded, timeout=10_000):
        g.set_items(layer, few, np.arange(3), mpp=svs.mpp)  # stops the first read
    assert not first.is_running and first.abort_requested
    assert len(g.buttons) == 3 and all(not b.icon().isNull() for b in g.buttons)
    from qtpy.QtWidgets import QToolButton

    assert len(g.findChildren(QToolButton)) == 3  # the old thumbnails are gone, not hidden

    g.set_items(layer, many, np.arange(60), mpp=svs.mpp)
    worker = g._reader.worker
    g.close()  # joins the reader
    assert not worker.is_running and g._reader.worker is None
    after = {t.name for t in threading.enumerate() if not isinstance(t, threading._DummyThread)}
    assert {t for t in after - before if not t.startswith("milview-tiles")} == set()


def test_empty_selection_and_no_slide(make_napari_viewer, qtbot, svs):
    viewer, layer, g = _gallery(make_napari_viewer, qtbot, svs)
    r = _result(svs)
    with qtbot.waitSignal(g.loaded, timeout=2000):
        g.set_items(layer, r, np.zeros(0, np.int64))
    assert g.buttons == [] and g.header.text() == "No patch selected."
    with qtbot.waitSignal(g.loaded, timeout=2000):
        g.set_items(None, r, np.arange(2))  # no slide: ranks and scores, no pixels
    assert len(g.buttons) == 2 and all(b.icon().isNull() for b in g.buttons)
