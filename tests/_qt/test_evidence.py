"""The MIL dock's Evidence section on a real viewer: annotations placed on the slide (and
following it), numbers equal to the Qt-free core's, faithfulness and fold disagreement in
background jobs, what-if, drawn Shapes / Labels layers, exports; and, in a *shown* viewer in
a child process, a malformed file, closing the dock mid-job and removing the annotation
layer by hand.

Real parts throughout: the synthetic SVS with its planted lesion (``svs``), its exact lesion
mask turned into a GeoJSON (``evidence.annotations.from_mask``), the demo encoder and demo
ACMIL-GA (trained to find such lesions).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.gui


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lesion_geojson(svs, tmp_path_factory):
    """The slide's lesion mask as a QuPath GeoJSON (exact pixel-edge outlines)."""
    from PIL import Image

    from napari_milview.evidence.annotations import from_mask, write_geojson

    mask = np.asarray(Image.open(svs.mask_path)) > 127
    ann = from_mask(mask, svs.mask_downsample, label="Tumor")
    out = tmp_path_factory.mktemp("ann") / "svs.geojson"
    write_geojson(ann, out)
    return out


def _mask(svs) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(svs.mask_path)) > 127


def _setup(make_napari_viewer, qtbot, svs):
    """Viewer, slide, MIL dock with the demo model; one run done on the CPU."""
    from napari_milview._qt.mil_widget import MILWidget

    viewer = make_napari_viewer()
    [slide] = viewer.open(str(svs.path), plugin="napari-milview")
    w = MILWidget(viewer)
    viewer.window.add_dock_widget(w, name="MIL attention")
    assert w.model is not None, w.model_info.text()
    w.device_combo.setCurrentText("cpu")
    ev = w.evidence
    assert not ev.faith_button.isEnabled() and not ev.load_button.isEnabled()  # no result yet
    with qtbot.waitSignal(w.run_finished, timeout=60_000) as blocker:
        assert w.run() is not None
    assert blocker.args == ["done"], w.status.text()
    return viewer, w, slide, ev


def _finish(qtbot, ev, start, timeout=60_000) -> str:
    with qtbot.waitSignal(ev.job_finished, timeout=timeout) as blocker:
        job = start()
        assert job is not None, ev.status.text()
    return blocker.args[0]


def _no_pixmap(label) -> bool:
    pm = label.pixmap()
    return pm is None or pm.isNull()


def _no_threads_left(qtbot) -> None:
    from qtpy.QtCore import QThreadPool

    from napari_milview.pipeline import THREAD_PREFIX

    assert not any(t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())
    qtbot.waitUntil(lambda: QThreadPool.globalInstance().activeThreadCount() == 0,
                    timeout=10_000)


# --------------------------------------------------------------------------------------------
# in process
# --------------------------------------------------------------------------------------------
def test_annotations_numbers_and_placement(make_napari_viewer, qtbot, svs, lesion_geojson):
    """A GeoJSON on the slide: a Shapes layer named for the slide at the right place, that
    follows the slide's move; the numbers of each source are the core's; the spin boxes act."""
    from napari_milview.evidence.annotations import (
        patch_labels,
        patch_overlap,
        read_annotations,
    )
    from napari_milview.evidence.metrics import concentration, localisation

    viewer, w, slide, ev = _setup(make_napari_viewer, qtbot, svs)
    r = w.result
    assert ev.source == r.default_source and ev.features is not None
    assert "No annotations" in ev.ann_info.text()
    assert ev.numbers["localisation"] is None  # concentration only, without annotations
    assert ev.numbers["concentration"]["effective_n"] > 1

    assert ev.load_annotations(lesion_geojson)
    layer = ev.annotation_layer
    assert layer is not None and layer.name == "annotations (svs.svs)"
    assert layer.metadata["milview"] == "annotations"
    ann = read_annotations(lesion_geojson)
    assert layer.nshapes == sum(len(reg.rings()) for reg in ann.regions)
    assert np.allclose(layer.edge_color[0][:3], [0.0, 1.0, 0.4], atol=0.01)
    assert tuple(layer.units) == tuple(slide.units)
    # a vertex (x, y) level-0 sits on the slide's pixel edge there, in world coordinates
    x, y = ann.regions[0].exterior[0]

    def on_slide(x, y):  # the slide layer's data -> world of level-0 edge point (x, y)
        return np.asarray(slide.data_to_world((y - 0.5, x - 0.5)))

    assert np.allclose(layer.data_to_world(layer.data[0][0]), on_slide(x, y))
    # the slide moves (translate and rotate): the annotations go with it, as the heatmap does
    slide.translate = (300.0, -120.0)
    slide.rotate = 20.0
    assert np.allclose(layer.data_to_world(layer.data[0][0]), on_slide(x, y))
    heat = w.heatmap_layer
    assert np.allclose(layer.affine.affine_matrix, heat.affine.affine_matrix)
    slide.translate, slide.rotate = (0.0, 0.0), 0.0

    overlap = patch_overlap(ann, r.coords, r.patch_size_level0)
    pos = patch_labels(overlap, 0.5)
    for src in (r.default_source, "branch/0", "raw/branch/1"):
        ev.set_source(src)
        loc = localisation(r.attention(src), pos, overlap=overlap)
        got = ev.numbers["localisation"]
        for key in ("auroc", "average_precision", "topk_precision", "mass_inside", "dice"):
            assert got[key] == pytest.approx(loc[key], nan_ok=True), (src, key)
        assert got["n_positive"] == int(pos.sum()) > 5
    ev.set_source(r.default_source)
    loc = ev.numbers["localisation"]
    assert loc["auroc"] > 0.9, loc["auroc"]  # the demo model finds the planted lesion
    assert f"AUROC {loc['auroc']:.3f}" in ev.numbers_label.text()
    con = concentration(r.attention(r.default_source))
    assert ev.numbers["concentration"]["entropy"] == pytest.approx(con["entropy"])
    assert set(ev.numbers["branches"]) == {f"branch/{i}" for i in range(5)}  # ACMIL per branch
    assert "branch/3: effective N" in ev.numbers_label.text()
    assert not _no_pixmap(ev.roc_plot) and ev.roc_plot.pixmap().width() > 100

    ev.fraction.setValue(0.0)  # any overlap
    assert ev.numbers["localisation"]["n_positive"] == int((overlap > 0).sum()) > int(pos.sum())
    ev.k_spin.setValue(7)
    assert ev.numbers["localisation"]["k"] == 7 and ev.numbers["concentration"]["k"] == 7
    assert "top-7 precision" in ev.numbers_label.text()


def test_faithfulness_job_equals_the_core(make_napari_viewer, qtbot, svs, lesion_geojson):
    """The job (one core call per source, the random baseline shared) gives
    deletion_insertion's numbers exactly; plots shown; switching source shows that source's
    curves without a new job."""
    from napari_milview.evidence.faithfulness import deletion_insertion, descending

    viewer, w, slide, ev = _setup(make_napari_viewer, qtbot, svs)
    ev.load_annotations(lesion_geojson)
    r = w.result
    model = w.current.model[0]
    feats = w.current.bag.features
    ev.orders_spin.setValue(4)
    assert _finish(qtbot, ev, ev.run_faithfulness) == "done", ev.status.text()
    assert ev.status.text() == "Faithfulness: done."
    for src in (r.default_source, "branch/2"):
        ev.set_source(src)
        fa = ev.numbers["faithfulness"]
        ref = deletion_insertion(model, feats, descending(r.attention(src)), random_orders=4)
        for key in ("deletion_auc", "insertion_auc", "random_deletion_auc",
                    "random_insertion_auc", "topk_probability", "baseline"):
            assert fa[key] == pytest.approx(ref[key], abs=1e-9), (src, key)
        assert np.allclose(fa["random_deletion_std"], ref["random_deletion_std"])
        assert fa["target"] == r.classes.index("lesion")
        assert not _no_pixmap(ev.curves_plot)
        assert "deletion AUC" in ev.numbers_label.text()
    ev.set_source(r.default_source)
    fa = ev.numbers["faithfulness"]
    assert fa["deletion_auc"] < fa["random_deletion_auc"]  # the map is faithful here
    assert w.jobs_started == 1  # the model's run was not repeated
    ev.orders_spin.setValue(3)  # other settings: the old curves no longer apply
    assert ev.numbers["faithfulness"] is None and _no_pixmap(ev.curves_plot)
    _no_threads_left(qtbot)


def test_what_if_and_drawn_layers(make_napari_viewer, qtbot, svs):
    """A drawn rectangle over the lesion: re-predicting without it drops p(lesion) at once,
    as the core says; a drawn Shapes layer and a Labels layer painted from the mask are
    annotations with the overlap of the mask itself."""
    from napari_milview.evidence.annotations import (
        from_mask,
        from_polygons,
        patch_labels,
        patch_overlap,
    )
    from napari_milview.evidence.faithfulness import what_if

    viewer, w, slide, ev = _setup(make_napari_viewer, qtbot, svs)
    r = w.result
    mask = _mask(svs)
    ds = svs.mask_downsample
    rows, cols = np.nonzero(mask)
    x0, x1 = cols.min() * ds, (cols.max() + 1) * ds
    y0, y1 = rows.min() * ds, (rows.max() + 1) * ds
    mpp = svs.mpp
    rect = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float) - 0.5
    region = viewer.add_shapes([rect * mpp], shape_type="rectangle", name="region")
    assert ev.region_combo.currentData() is region
    qtbot.waitUntil(lambda: "p(lesion)" in ev.what_if_label.text(), timeout=5_000)
    model, feats = w.current.model[0], w.current.bag.features
    inside = patch_labels(patch_overlap(from_polygons([rect[:, ::-1] + 0.5]), r.coords,
                                        r.patch_size_level0), 0.5)
    ref = what_if(model, feats, inside, "without")
    got = ev.state().what_if
    assert got["n_inside"] == int(inside.sum()) > 0
    assert np.allclose(got["probabilities"], ref["probabilities"])
    i = r.classes.index("lesion")
    assert ref["change"][i] < -0.2  # without the lesion, much less lesion
    assert f"{ref['change'][i]:+.3f}" in ev.what_if_label.text()
    ev.alone_radio.setChecked(True)
    alone = what_if(model, feats, inside, "alone")
    assert np.allclose(ev.state().what_if["probabilities"], alone["probabilities"])
    # the region is edited: the prediction follows
    region.data = [rect * mpp * 0.5]
    qtbot.waitUntil(lambda: ev.state().what_if["n_inside"] != int(inside.sum()), timeout=5_000)

    # the drawn Shapes layer as annotations
    ev.alone_radio.setChecked(False)
    region.data = [rect * mpp]
    ev.drawn_combo.setCurrentIndex(ev.drawn_combo.findData(region))
    assert ev.use_layer()
    assert "layer region" in ev.ann_info.text()
    assert np.allclose(ev.overlap(), patch_overlap(from_polygons([rect[:, ::-1] + 0.5]),
                                                   r.coords, r.patch_size_level0))
    assert ev.annotation_layer is None  # the drawn layer shows itself
    # a Labels layer painted from the mask on the slide's grid (16 level-0 px per label px)
    labels = viewer.add_labels(mask.astype(np.uint8), scale=(ds * mpp, ds * mpp),
                               translate=((ds / 2 - 0.5) * mpp, (ds / 2 - 0.5) * mpp),
                               name="painted")
    assert ev.use_layer(labels), ev.ann_info.text()
    want = patch_overlap(from_mask(mask, ds), r.coords, r.patch_size_level0)
    assert np.allclose(ev.overlap(), want, atol=1e-9)
    assert ev.numbers["localisation"]["auroc"] > 0.9


def test_disagreement_of_folds(make_napari_viewer, qtbot, svs, tmp_path):
    """Three perturbed copies of the demo model (folds): mean / spread / rank-spread layers on
    the slide (spread shown), the spread of p(lesion), the core's numbers; a second run
    updates the layers in place."""
    import torch

    from napari_milview.evidence.disagreement import disagreement
    from napari_milview.mil.checkpoint import load_model, save_model
    from napari_milview.pipeline import attend

    viewer, w, slide, ev = _setup(make_napari_viewer, qtbot, svs)
    model, card = w.current.model
    paths = []
    for i in range(3):
        m, _ = load_model(_demo(), device="cpu")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.std().nan_to_num(0.1))
        paths.append(save_model(m, card, tmp_path / f"fold{i}.safetensors"))
    assert _finish(qtbot, ev, lambda: ev.run_disagreement(paths)) == "done", ev.status.text()
    f = ev.state().folds
    rs = [attend(w.current.bag, load_model(p, device="cpu")[0], card, device="cpu")
          for p in paths]
    ref = disagreement([x.attention() for x in rs], [x.probabilities for x in rs])
    assert np.allclose(f["std"], ref["std"]) and np.allclose(f["rank_spread"],
                                                             ref["rank_spread"])
    layers = dict(ev.state().fold_layers)
    assert set(layers) == {"mean", "spread", "rank spread"}
    assert all(lyr in viewer.layers and lyr.colorbar.visible for lyr in layers.values())
    assert layers["spread"].visible and not layers["mean"].visible
    assert layers["spread"].name == "folds spread (svs.svs)"
    assert np.allclose(layers["mean"].affine.affine_matrix, w.heatmap_layer.affine.affine_matrix)
    assert "3 checkpoints" in ev.folds_label.text() and "p(lesion)" in ev.folds_label.text()
    n_layers = len(viewer.layers)
    assert _finish(qtbot, ev, lambda: ev.run_disagreement(paths[:2])) == "done"
    assert len(viewer.layers) == n_layers  # updated in place, none removed or added
    assert "2 checkpoints" in ev.folds_label.text()
    # a bad checkpoint: one line, the dock goes on
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert _finish(qtbot, ev, lambda: ev.run_disagreement([paths[0], bad])) == "failed"
    assert "bad.pt" in ev.status.text()
    _no_threads_left(qtbot)


def _demo():
    from napari_milview.assets import demo_model_path

    return demo_model_path()


def test_exports(make_napari_viewer, qtbot, svs, lesion_geojson, tmp_path):
    """CSV (one row per source, the columns of evidence.report), JSON (with what-if and
    faithfulness), PNG plots."""
    import csv

    viewer, w, slide, ev = _setup(make_napari_viewer, qtbot, svs)
    assert not ev.export_buttons["csv"].isEnabled() or ev.numbers  # nothing before a result
    ev.load_annotations(lesion_geojson)
    ev.orders_spin.setValue(2)
    assert _finish(qtbot, ev, ev.run_faithfulness) == "done"
    r = w.result
    ev.export("csv", tmp_path / "e.csv")
    rows = list(csv.DictReader((tmp_path / "e.csv").open()))
    assert [row["source"] for row in rows][0] == r.default_source
    assert {row["source"] for row in rows} == set(r.sources)
    row = rows[0]
    assert float(row["auroc"]) == pytest.approx(ev.numbers["localisation"]["auroc"], abs=1e-6)
    assert float(row["deletion_auc"]) == pytest.approx(
        ev.numbers["faithfulness"]["deletion_auc"], abs=1e-6)
    ev.export("json", tmp_path / "e.json")
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["slide"] == "svs" and doc["fraction"] == 0.5 and len(doc["rows"]) == len(r.sources)
    assert doc["annotations"].endswith("svs.geojson")
    out = ev.export("png", tmp_path / "e.png")
    assert [p.name for p in out] == ["e.png", "e.deletion_insertion.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out)


def test_opened_result_has_no_features(make_napari_viewer, qtbot, svs, lesion_geojson,
                                       tmp_path):
    """A result opened from a file: annotations and numbers work, faithfulness and folds
    say they need the run's features."""
    from napari_milview.result import save_result

    viewer, w, slide, ev = _setup(make_napari_viewer, qtbot, svs)
    path = save_result(w.result, tmp_path / "r.h5")
    w.open_result(path)
    assert ev.features is None and not ev.faith_button.isEnabled()
    assert "run the model" in ev.faith_button.toolTip()
    assert ev.run_faithfulness() is None and "features" in ev.status.text()
    assert ev.load_annotations(lesion_geojson)
    assert ev.numbers["localisation"]["auroc"] > 0.9
    assert "features" in ev.what_if_label.text()


def test_malformed_annotation_in_process(make_napari_viewer, qtbot, svs, tmp_path):
    """A malformed file: one line in the section (naming the file) and no layer."""
    viewer, w, slide, ev = _setup(make_napari_viewer, qtbot, svs)
    bad = tmp_path / "broken.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [ {"type": "Feature",')
    n = len(viewer.layers)
    assert not ev.load_annotations(bad)
    assert "broken.geojson" in ev.ann_info.text() and "Not loaded" in ev.ann_info.text()
    assert len(viewer.layers) == n and ev.annotation_layer is None


# --------------------------------------------------------------------------------------------
# a shown viewer, in a child process
# --------------------------------------------------------------------------------------------
SETUP = r'''
import numpy as np
from napari_milview._qt.mil_widget import MILWidget

[slide] = viewer.open({slide!r}, plugin="napari-milview")
dock = MILWidget(viewer)
viewer.window.add_dock_widget(dock, name="MIL attention")
wait_until(lambda: dock.model is not None, 60, "the demo model")
dock.device_combo.setCurrentText("cpu")
ENDED = []
dock.run_finished.connect(ENDED.append)
dock.run()
wait_until(lambda: ENDED, 120, "the run")
assert ENDED == ["done"], dock.status.text()
ev = dock.evidence
'''


def test_failure_paths_in_a_shown_viewer(shown_child, svs, lesion_geojson, tmp_path):
    """Shown viewer: a malformed file (notification, nothing crashes); the annotation layer
    removed by hand, then numbers, a new load and draws; the dock closed while the
    faithfulness job runs: the job is cancelled and joined, napari draws on, no thread
    left, exit 0."""
    bad = tmp_path / "bad.xml"
    bad.write_text("<ASAP_Annotations><Annotations><Annotation Name='a' Type='Polygon'>"
                   "<Coordinates><Coordinate Order='0' X='1' Y='nope'/>")
    _, reports = shown_child(SETUP.format(slide=str(svs.path)) + f'''
# 1. a malformed file
assert not ev.load_annotations({str(bad)!r})
process(200)
assert any("bad.xml" in m for m in MESSAGES), MESSAGES
draw()
report(case="malformed", info=ev.ann_info.text())
# 2. the annotation layer removed by hand
assert ev.load_annotations({str(lesion_geojson)!r})
draw()
viewer.layers.remove(ev.annotation_layer)
draw()
assert ev.annotation_layer is None and ev.numbers["localisation"] is not None
ev.fraction.setValue(0.25)
ev.set_source("branch/1")
assert ev.load_annotations({str(lesion_geojson)!r}) and ev.annotation_layer is not None
draw()
report(case="removed", layers=[l.name for l in viewer.layers])
# 3. the dock closed while the faithfulness job runs
ev.orders_spin.setValue(5000)
job = ev.run_faithfulness()
assert job is not None
wait_until(lambda: job.progress[0] > 2, 60, "the job to be under way")
t0 = time.monotonic()
viewer.window.remove_dock_widget(dock)
dock.close()
closed_s = time.monotonic() - t0
draw(1000)
# stopped between two model calls (the worker quit: "pending", or the event: "cancelled")
assert job.done.is_set() and job.outcome in ("pending", "cancelled"), job.outcome
report(case="closed", closed_s=closed_s, progress=list(job.progress))
''', timeout=300)
    by = {r["case"]: r for r in reports}
    assert "bad.xml" in by["malformed"]["info"] and "Not loaded" in by["malformed"]["info"]
    assert "annotations (svs.svs)" in by["removed"]["layers"]
    closed = by["closed"]
    assert closed["progress"][0] < closed["progress"][1] and closed["closed_s"] < 10
