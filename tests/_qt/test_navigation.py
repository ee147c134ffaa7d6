"""The slide navigation dock: magnification, minimap jumps and box, scale bar, teardown."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def napari_settings(tmp_path, monkeypatch):
    """napari's settings in a temporary file for each test: the user's real napari settings
    are never read or changed (a click below writes a reader preference)."""
    from napari import settings

    monkeypatch.setattr(settings, "_SETTINGS", None)
    path = tmp_path / "napari-settings.yaml"
    s = settings.get_settings(path)
    assert s.config_path == path
    return s


def _open(viewer, path):
    [layer] = viewer.open(str(path), plugin="napari-milview")
    viewer.reset_view()
    return layer


def _widget(qtbot, viewer):
    from napari_milview._qt.navigation import NavigationWidget

    w = NavigationWidget(viewer)
    qtbot.addWidget(w)
    w.resize(300, 480)
    w.show()
    qtbot.waitExposed(w)
    return w


def _ours(emitter, widget) -> bool:
    """Does ``emitter`` still call back into ``widget``?"""
    for cb in emitter.callbacks:
        if isinstance(cb, tuple) and cb[0]() is widget:
            return True
        if getattr(cb, "__self__", None) is widget:
            return True
    return False


def test_magnification_buttons_and_readout(make_napari_viewer, qtbot, svs):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    layer = _open(viewer, svs.path)
    assert layer.metadata["objective_power"] == 40 and svs.mpp == 0.25
    w = _widget(qtbot, viewer)
    assert w.layer is layer and not w.combo.isVisible()
    cam = viewer.scene.camera
    centre = tuple(cam.center)

    qtbot.mouseClick(w.buttons[20.0], Qt.MouseButton.LeftButton)
    # 20x from a 40x scan = 0.5 screen px per level-0 px = 0.5 / 0.25 um screen px per um
    assert cam.zoom == pytest.approx(2.0)
    assert w.readout.text() == "20.0x"
    assert tuple(cam.center) == pytest.approx(centre)  # the centre is kept
    assert "0.5 \u00b5m / screen px" in w.detail.text()

    qtbot.mouseClick(w.buttons[1.25], Qt.MouseButton.LeftButton)
    assert cam.zoom == pytest.approx(1.25 / 10) and w.readout.text() == "1.25x"

    cam.zoom = 4.0  # the user zooms: the readout follows once the throttle timer fires
    qtbot.waitUntil(lambda: w.readout.text() == "40.0x", timeout=2000)


def test_minimap_click_centres_camera_and_box_follows(make_napari_viewer, qtbot, svs):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    _open(viewer, svs.path)
    w = _widget(qtbot, viewer)
    th, tw = w.minimap.thumbnail_shape
    assert (th, tw) == (216, 280)  # the smallest level of 4480 x 3456
    f = 3456 / th  # level-0 px per thumbnail px (16)

    # fully zoomed out, the whole thumbnail is inside the viewport box
    r0, c0, r1, c1 = w.minimap.box
    assert r0 <= 0 and c0 <= 0 and r1 >= th and c1 >= tw

    w.set_magnification(10.0)
    row, col = 54.0, 210.0  # a quarter down, three quarters across
    pos = w.minimap.to_widget(row, col).toPoint()
    qtbot.mouseClick(w.minimap, Qt.MouseButton.LeftButton, pos=pos)
    row, col = w.minimap.to_thumbnail(pos)  # what the integer click really hit
    cy, cx = tuple(viewer.scene.camera.center)[-2:]
    um_per_thumb_px = f * svs.mpp
    assert cy == pytest.approx(row * um_per_thumb_px, abs=um_per_thumb_px)
    assert cx == pytest.approx(col * um_per_thumb_px, abs=um_per_thumb_px)

    # the box is centred on the click, and as big as the canvas at this zoom
    r0, c0, r1, c1 = w.minimap.box
    assert ((r0 + r1) / 2, (c0 + c1) / 2) == pytest.approx((row, col), abs=1.0)
    h, wd = viewer.canvas.size
    zoom = viewer.scene.camera.zoom
    assert c1 - c0 == pytest.approx(wd / zoom / um_per_thumb_px, rel=1e-3)
    assert r1 - r0 == pytest.approx(h / zoom / um_per_thumb_px, rel=1e-3)

    qtbot.mouseClick(w.buttons[40.0], Qt.MouseButton.LeftButton)
    fit = next(b for b in w.findChildren(type(w.buttons[40.0])) if b.text() == "Fit")
    qtbot.mouseClick(fit, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w.minimap.box[2] - w.minimap.box[0] >= th, timeout=2000)
    w.centre_on_thumbnail(row, col)

    # panning the camera moves the box (after the throttle timer)
    viewer.scene.camera.center = (*tuple(viewer.scene.camera.center)[:-2], 100.0, 200.0)
    qtbot.waitUntil(lambda: abs((w.minimap.box[1] + w.minimap.box[3]) / 2
                                - 200.0 / um_per_thumb_px) < 0.5, timeout=2000)
    assert (w.minimap.box[0] + w.minimap.box[2]) / 2 == pytest.approx(
        100.0 / um_per_thumb_px, abs=0.5)


def test_scale_bar_in_microns(make_napari_viewer, qtbot, svs):
    viewer = make_napari_viewer()
    layer = _open(viewer, svs.path)
    bar = viewer.canvas.overlays.scale_bar
    assert not bar.visible
    w = _widget(qtbot, viewer)
    assert bar.visible and bar.box and w.scale_bar_box.isChecked()
    assert str(layer.units[-1]) == "micrometer"
    assert str(viewer.layers.units[-1]) == "micrometer"  # what napari's bar is labelled in
    w.scale_bar_box.setChecked(False)
    assert not bar.visible


def test_objective_power_from_mpp(make_napari_viewer, qtbot, generic_tiff):
    viewer = make_napari_viewer()
    layer = _open(viewer, generic_tiff)
    assert layer.metadata["objective_power"] is None and layer.metadata["mpp"]
    w = _widget(qtbot, viewer)
    w.set_magnification(20.0)
    # 10 / 0.25 um = 40x at one screen px per level-0 px
    assert viewer.scene.camera.zoom == pytest.approx(2.0)
    assert w.readout.text() == "20.0x (from mpp)"


def test_slide_without_mpp_shows_pixel_ratio(make_napari_viewer, qtbot, tmp_path):
    import tifffile
    from qtpy.QtCore import Qt

    path = tmp_path / "nompp.tif"
    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path) as tw:
        for lvl, side in enumerate((1024, 256)):
            img = rng.integers(0, 255, (side, side * 3 // 2, 3), np.uint8)
            tw.write(img, tile=(128, 128), photometric="rgb", subfiletype=int(lvl > 0),
                     metadata=None)
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning, match="microns per pixel unknown"):
        layer = _open(viewer, path)
    assert layer.metadata["mpp"] is None and layer.metadata["objective_power"] is None
    w = _widget(qtbot, viewer)
    assert not any(b.isEnabled() for b in w.buttons.values())
    viewer.scene.camera.zoom = 0.25
    w.refresh()
    assert w.readout.text() == "1:4 px"
    viewer.scene.camera.zoom = 2.0
    w.refresh()
    assert w.readout.text() == "2:1 px"
    qtbot.mouseClick(w.minimap, Qt.MouseButton.LeftButton)  # the centre of the thumbnail
    cy, cx = tuple(viewer.scene.camera.center)[-2:]
    assert (cy, cx) == pytest.approx((512, 768), abs=8)  # level-0 pixels, 4 per thumb px


def test_follows_layers_and_disconnects_on_close(make_napari_viewer, qtbot, svs):
    viewer = make_napari_viewer()
    a = _open(viewer, svs.path)
    w = _widget(qtbot, viewer)
    b = _open(viewer, svs.path)
    assert w.layer is b and w.combo.isVisible() and w.combo.count() == 2
    w.combo.setCurrentIndex(0)
    assert w.layer is a
    viewer.layers.remove(a)
    assert w.layer is b and not w.combo.isVisible()
    viewer.layers.remove(b)
    assert w.layer is None and w.minimap.thumbnail_shape is None
    assert not any(btn.isEnabled() for btn in w.buttons.values())
    _open(viewer, svs.path)

    cam = viewer.scene.camera
    emitters = (cam.events.center, cam.events.zoom, viewer.canvas.events.size,
                viewer.layers.events.inserted, viewer.layers.events.removed)
    assert all(_ours(e, w) for e in emitters)
    w.close()
    assert not any(_ours(e, w) for e in emitters)
    text = w.readout.text()
    cam.zoom = cam.zoom * 3  # no callback into the closed widget
    qtbot.wait(3 * 30)
    assert w.readout.text() == text

    # a widget deleted without being closed disconnects too
    from napari_milview._qt.navigation import NavigationWidget

    w2 = NavigationWidget(viewer)
    assert _ours(cam.events.zoom, w2)
    w2.deleteLater()
    qtbot.waitUntil(lambda: not _ours(cam.events.zoom, w2), timeout=2000)
    cam.zoom = cam.zoom / 2

    # nothing but its parent keeps it alive: a dropped widget is collected (napari's dock
    # close button only unparents it)
    import gc
    import weakref

    ref = weakref.ref(NavigationWidget(viewer))
    gc.collect()
    assert ref() is None
    ours = ("_schedule", "_on_layers_changed")
    assert not any(isinstance(cb, tuple) and cb[0]() is None and cb[1] in ours
                   for e in emitters for cb in e.callbacks)  # no dead entries of ours left


def test_use_this_reader_for_slide_files(make_napari_viewer, qtbot, svs, tmp_path,
                                         napari_settings):
    import tifffile
    import yaml
    from napari.errors import MultipleReaderError
    from qtpy.QtCore import Qt

    from napari_milview._qt.navigation import PLUGIN_NAME
    from napari_milview._reader import SLIDE_FILE_PATTERNS

    viewer = make_napari_viewer()
    napari_settings.plugins.extension2reader = {"*.czi": "someone-else", "*.tif": "napari"}
    # plugin=None is what napari's File > Open and drag-and-drop pass (viewer.open's own
    # default is napari's builtins): with two readers and no preference, napari asks
    with pytest.raises(MultipleReaderError):
        viewer.open(str(svs.path), plugin=None)
    w = _widget(qtbot, viewer)
    assert w.reader_button.isEnabled()
    assert w.reader_state.text() == ("napari asks which reader opens .svs, .tiff, .ndpi, .vms, "
                                     ".vmu, .scn, .mrxs, .svslide, .bif; opens .tif with napari.")

    qtbot.mouseClick(w.reader_button, Qt.MouseButton.LeftButton)
    prefs = napari_settings.plugins.extension2reader
    assert prefs == {"*.czi": "someone-else", **dict.fromkeys(SLIDE_FILE_PATTERNS, PLUGIN_NAME)}
    assert w.reader_state.text() == "Slide files open with napari-milview without asking."
    assert not w.reader_button.isEnabled()
    saved = yaml.safe_load(napari_settings.config_path.read_text())
    assert saved["plugins"]["extension2reader"]["*.svs"] == PLUGIN_NAME  # in the temp file

    # napari now picks this reader for a slide, without a dialog ...
    [layer] = viewer.open(str(svs.path), plugin=None)
    assert layer.metadata["slide"].path == str(svs.path)
    assert layer.source.reader_plugin == PLUGIN_NAME
    # ... and a plain TIFF still opens (napari's own reader, through this one)
    plain = tmp_path / "photo.tif"
    tifffile.imwrite(plain, np.full((32, 48), 7, np.uint8))
    [photo] = viewer.open(str(plain), plugin=None)
    assert photo.data.shape == (32, 48) and "slide" not in photo.metadata

    # napari's Preferences change it back: the dock follows
    napari_settings.plugins.extension2reader = {}
    assert w.reader_state.text() == "napari asks which reader opens each slide file."
    assert w.reader_button.isEnabled()
    w.close()
    assert not _ours(napari_settings.plugins.events.extension2reader, w)
