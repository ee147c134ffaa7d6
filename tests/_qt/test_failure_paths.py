"""Every way a MIL dock run can go wrong, in a *shown* napari viewer in a child process.

A layer removed while napari draws it, or a draw after a colour-bar layer was removed, kills
the process with a segmentation fault (Mesa llvmpipe under Xvfb); an in-process test or a
``show=False`` viewer would hide that. Each child: opens the synthetic slide, docks the MIL
widget, makes a run fail or stops it, then pans and zooms (draws) for a while, and must exit
0 with the message shown and no thread left (``finish`` in ``conftest.CHILD_PRELUDE``).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui

#: The dock on the slide, the demo model loaded, runs on the CPU; ``run_and_wait`` starts a
#: run and waits for ``run_finished``; ``draw`` pans and zooms so napari redraws.
SETUP = r'''
import numpy as np
from napari_milview._qt.mil_widget import MILWidget
from napari_milview.overlay.heatmap import PENDING

SLIDE = {slide!r}
[slide_layer] = viewer.open(SLIDE, plugin="napari-milview")
dock = MILWidget(viewer)
viewer.window.add_dock_widget(dock, name="MIL attention")
wait_until(lambda: dock.model is not None, 60, "the demo model")
dock.device_combo.setCurrentText("cpu")
ENDED = []
dock.run_finished.connect(ENDED.append)


def run_and_wait(timeout=120):
    ENDED.clear()
    job = dock.run()
    assert job is not None, dock.status.text()
    wait_until(lambda: ENDED, timeout, "the run to end")
    return job


def no_pending():
    return not any(l.metadata.get("milview") == PENDING for l in viewer.layers)


def use_bag(path, foreign=False):
    dock.bag_radio.setChecked(True)
    dock.bag_edit.setText(str(path))
    dock.foreign_check.setChecked(foreign)
'''


def _script(svs, body: str) -> str:
    return SETUP.format(slide=str(svs.path)) + body


def test_failed_runs_keep_the_viewer_alive(shown_child, svs, tmp_path):
    """Missing encoder weights, an encoder/model mismatch, a bag of the wrong dimension, a
    garbage bag, a bag from another slide: each ends with the message in a notification and
    in the status line, the empty heatmap layer gone, and napari drawing on."""
    import numpy as np
    import torch

    from napari_milview.features.bag import Bag
    from napari_milview.features.milview_h5 import save_bag
    from napari_milview.mil.base import build_model

    model = build_model("abmil", in_dim=1024, n_classes=2)
    ckpt = tmp_path / "abmil_1024.pt"
    torch.save(model.state_dict(), ckpt)
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(0, 2048, 256), np.arange(0, 2048, 256)),
                      -1).reshape(-1, 2)
    wrong_dim = tmp_path / "wrong_dim.h5"
    save_bag(Bag.from_arrays(rng.random((len(coords), 32), np.float32), coords,
                             patch_size_level0=256, mpp=0.25, encoder="demo"), wrong_dim)
    far = tmp_path / "other_slide.h5"
    save_bag(Bag.from_arrays(rng.random((len(coords), 64), np.float32), coords + 40_000,
                             patch_size_level0=256, mpp=0.25, encoder="demo"), far)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(rng.bytes(5000))
    _, reports = shown_child(_script(svs, f'''
def failed(what):
    assert ENDED == ["failed"], (what, ENDED, dock.status.text())
    process(100)
    assert dock.status.text().startswith("Failed:"), dock.status.text()
    shown = [m for m in MESSAGES if dock.status.text()[len("Failed: "):] in m]
    assert shown, (what, MESSAGES[-3:], dock.status.text())
    draw()
    assert no_pending(), [l.name for l in viewer.layers]
    report(case=what, status=dock.status.text())

# 1. an encoder whose weights file does not exist (model: a 1024-d ABMIL checkpoint)
dock.file_radio.setChecked(True)
dock.model_edit.setText({str(ckpt)!r})
dock.models.choose()
assert dock.model is not None, dock.model_info.text()
dock.encoder_combo.setCurrentText("resnet50_trunc")
dock.weights_edit.setText("/nonexistent/resnet50_trunc.pth")
run_and_wait()
failed("missing weights")
# 2. the encoder's dimension is not the model's (demo encoder 64-d, model 1024-d)
dock.encoder_combo.setCurrentText("demo")
dock.weights_edit.setText("")
run_and_wait()
failed("encoder/model mismatch")
# 3.-5. bags, with the demo model (64-d)
dock.demo_radio.setChecked(True)
wait_until(lambda: dock.model is not None and dock.model[2] == "demo", 30, "demo model")
use_bag({str(wrong_dim)!r})
run_and_wait()
failed("wrong-dimension bag")
use_bag({str(garbage)!r})
run_and_wait()
failed("garbage bag")
use_bag({str(far)!r})
run_and_wait()
failed("bag from another slide")
# the override runs it, with a warning on the prediction
use_bag({str(far)!r}, foreign=True)
run_and_wait()
assert ENDED == ["done"], dock.status.text()
assert "outside the slide" in dock.prediction.info.text(), dock.prediction.info.text()
draw()
report(case="override", status=dock.status.text())
''', ), timeout=300)
    by_case = {r["case"]: r["status"] for r in reports}
    assert "resnet50_trunc" in by_case["missing weights"]
    assert "1024" in by_case["encoder/model mismatch"] and "64" in by_case[
        "encoder/model mismatch"]
    assert "wrong_dim.h5" in by_case["wrong-dimension bag"]
    assert "garbage.h5" in by_case["garbage bag"]
    other = by_case["bag from another slide"]
    assert "other_slide.h5" in other and "svs.svs" in other and "another slide" in other
    assert by_case["override"] == "Done."


def test_cancel_early_and_after_partial_heatmaps(shown_child, svs):
    """Cancel before the first heatmap (0.3-0.6 s into a demo run): the empty layer goes, the
    panel says cancelled. Cancel after partial heatmaps: the layer stays, named partial, and
    the panel says there is no prediction (not "So far ...")."""
    _, reports = shown_child(_script(svs, '''
dock.patch_um.setValue(16.0)   # ~2000 patches: far from done when cancelled
dock.batch_spin.setValue(8)
for delay in (0.3, 0.45, 0.6):
    ENDED.clear()
    job = dock.run()
    process(delay * 1000)
    dock.cancel()
    wait_until(lambda: ENDED, 30, "the cancel")
    assert ENDED == ["cancelled"], dock.status.text()
    draw()
    assert "Cancelled" in dock.status.text(), dock.status.text()
    assert any("cancelled" in m for m in MESSAGES), MESSAGES
    assert no_pending(), [l.name for l in viewer.layers]
    assert "So far" not in dock.prediction.headline.text()
    report(case=f"early {delay}", layers=[l.name for l in viewer.layers])
dock.stream_s = 0.2
ENDED.clear()
job = dock.run()
wait_until(lambda: dock.heatmap_layer is not None and dock.heatmap_layer.colorbar.visible,
           60, "a partial heatmap")
dock.cancel()
wait_until(lambda: ENDED, 30, "the cancel")
draw(1000)
heat = dock.heatmap_layer
assert heat in viewer.layers and "partial" in heat.name, [l.name for l in viewer.layers]
assert heat.metadata.get("partial", "").startswith("cancelled after")
dock.set_method("minmax")  # a display change redraws it: still named and marked partial
assert "partial" in heat.name and heat.metadata.get("partial"), heat.name
text = dock.prediction.headline.text()
assert "No prediction" in text and "So far" not in text, text
assert not dock.export_buttons["csv"].isEnabled()
report(case="after partial", heatmap=heat.name, headline=text)
'''))
    late = reports[-1]
    assert "cancelled after" in late["heatmap"] and "No prediction" in late["headline"]
    assert all(r["layers"] == ["svs.svs"] for r in reports[:-1])


def test_closing_the_dock_mid_run(shown_child, svs):
    """Close the dock while it encodes (before and after the first heatmap): the viewer goes
    on drawing, the reader threads end, the partial heatmap stays marked."""
    _, reports = shown_child(_script(svs, '''
dock.patch_um.setValue(16.0)
dock.batch_spin.setValue(8)
dock.stream_s = 0.2
job = dock.run()
wait_until(lambda: dock.heatmap_layer is not None and dock.heatmap_layer.colorbar.visible,
           60, "a partial heatmap")
heat = dock.heatmap_layer
t0 = time.monotonic()
viewer.window.remove_dock_widget(dock)
closed_s = time.monotonic() - t0
draw(1000)
assert job.cancel.is_set() and job.done.is_set()
assert heat in viewer.layers and "partial" in heat.name, heat.name
report(case="after heatmap", closed_s=closed_s, heatmap=heat.name)
# a second dock, closed before its first heatmap: its empty layer goes
dock = MILWidget(viewer)
viewer.window.add_dock_widget(dock, name="MIL attention 2")
wait_until(lambda: dock.model is not None, 60, "the demo model")
dock.patch_um.setValue(16.0)
dock.batch_spin.setValue(8)
job = dock.run()
process(300)
viewer.window.remove_dock_widget(dock)
draw(800)
assert no_pending(), [l.name for l in viewer.layers]
report(case="before heatmap", layers=[l.name for l in viewer.layers])
'''))
    assert "partial" in reports[0]["heatmap"]


def test_quitting_napari_mid_run(shown_child, svs):
    """Quit napari while a run encodes: the process exits 0, no reader thread left."""
    out, _ = shown_child(_script(svs, '''
dock.patch_um.setValue(16.0)
dock.batch_spin.setValue(8)
dock.stream_s = 0.2
job = dock.run()
wait_until(lambda: job.progress[0] > 0, 60, "the first batch")
viewer.close()
process(200)
assert job.cancel.is_set()
assert not leftover_threads(), leftover_threads()
print("CHILD-EXIT-OK", flush=True)
sys.exit(0)
'''))
    assert "CHILD-EXIT-OK" in out


def test_docks_appear_before_torch_is_imported(shown_child):
    """torch is imported by a worker thread: both docks are built at once (the model line
    says so), the event loop turns before the models are loaded, then they fill in."""
    _, reports = shown_child('''
from qtpy.QtCore import QTimer
from napari_milview._qt.mil_widget import MILWidget
from napari_milview._qt.stain_widget import StainWidget

assert "torch" not in sys.modules
ticks, ready = [], []
timer = QTimer()
timer.timeout.connect(lambda: ticks.append(time.monotonic()))
timer.start(20)
mil = MILWidget(viewer)
stain = StainWidget(viewer)
mil.became_ready.connect(lambda: ready.append(time.monotonic()))
built = {"mil": mil.model_info.text(), "mil_model": mil.model is not None,
         "stain_model": stain.model is not None}
viewer.window.add_dock_widget(mil, name="MIL attention")
viewer.window.add_dock_widget(stain, name="Staining")
wait_until(lambda: mil.model is not None and stain.model is not None, 60, "the models")
timer.stop()
report(built=built, ticks_before_ready=sum(t < ready[0] for t in ticks),
       devices=[mil.device_combo.itemText(i) for i in range(mil.device_combo.count())])
''')
    r = reports[0]
    assert r["built"]["mil"].startswith("Loading torch")
    assert not r["built"]["mil_model"] and not r["built"]["stain_model"]
    assert r["ticks_before_ready"] >= 1  # the GUI thread turned while torch was imported
    assert r["devices"][:2] == ["auto", "cpu"]


def test_staining_dock_cancel_and_close_mid_run(shown_child, svs):
    """The staining dock's robustness run: Cancel, then a run stopped by closing the dock
    while its preview is shown; napari draws on, no thread left."""
    _, reports = shown_child(f'''
from napari_milview._qt.stain_widget import StainWidget
[slide_layer] = viewer.open({str(svs.path)!r}, plugin="napari-milview")
dock = StainWidget(viewer)
viewer.window.add_dock_widget(dock, name="Staining")
wait_until(lambda: dock.model is not None, 60, "the demo model")
dock.device_combo.setCurrentText("cpu")
dock.patch_um.setValue(16.0)
dock.batch_spin.setValue(8)
ENDED = []
dock.run_finished.connect(ENDED.append)
job = dock.run()
wait_until(lambda: job.progress[0] > 0, 60, "the first batch")
dock.cancel()
wait_until(lambda: ENDED, 30, "the cancel")
process(500)
assert ENDED == ["cancelled"] and any("cancelled" in m for m in MESSAGES), MESSAGES
dock.set_condition("reinhard")
dock.show_preview()
job = dock.run()
wait_until(lambda: job.progress[0] > 0, 60, "the first batch")
viewer.window.remove_dock_widget(dock)
cam = viewer.camera
for _ in range(20):
    cam.zoom = cam.zoom * 1.02
    process(30)
assert job.done.is_set() and job.cancel.is_set()
report(layers=[l.name for l in viewer.layers])
''')
    assert reports[0]["layers"][0] == "svs.svs"


def test_not_a_slide_is_one_error_and_napari_goes_on(shown_child, tmp_path):
    """A PNG renamed .svs, a text file and an empty file opened in a shown viewer: one
    error naming the file and what it is; the viewer draws on."""
    from PIL import Image

    png = tmp_path / "photo.svs"
    Image.new("RGB", (32, 32), (200, 100, 50)).save(png, format="PNG")
    text = tmp_path / "notes.ndpi"
    text.write_text("not a slide at all\n")
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    _, reports = shown_child(f'''
import numpy as np
viewer.add_image(np.random.rand(64, 64))
for path in {[str(png), str(text), str(empty)]!r}:
    try:
        viewer.open(path, plugin="napari-milview")
        report(path=path, error=None)
    except Exception as e:
        report(path=path, error=str(e).splitlines()[0][:300])
    viewer.camera.zoom = viewer.camera.zoom * 1.05
    process(200)
''')
    by_name = {r["path"].rsplit("/", 1)[-1]: r["error"] for r in reports}
    assert "photo.svs" in by_name["photo.svs"] and "PNG" in by_name["photo.svs"]
    assert "notes.ndpi" in by_name["notes.ndpi"] and "text" in by_name["notes.ndpi"]
    assert "empty.svs" in by_name["empty.svs"] and "empty" in by_name["empty.svs"]


def test_quitting_while_the_dock_still_imports_torch(shown_child):
    """The MIL dock opened and napari quit at once, while torch is still being imported: the
    process exits 0 (no callback into a deleted dock, no Qt object left to a thread)."""
    out, _ = shown_child('''
from napari_milview._qt.mil_widget import MILWidget
assert "torch" not in sys.modules
dock = MILWidget(viewer)
viewer.window.add_dock_widget(dock, name="MIL attention")
process(50)
viewer.close()
process(100)
print("CHILD-EXIT-OK", flush=True)
sys.exit(0)
''')
    assert "CHILD-EXIT-OK" in out and "Traceback" not in out
