"""npe2 writers through napari's own save path: a heatmap layer -> GeoJSON, CSV, CLAM h5,
OME-TIFF and sidecar; the sidecar opened again restores slide, heatmap and top-K."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from napari_milview.result import Result

pytestmark = pytest.mark.gui

PS = 256


def _result(svs) -> Result:
    """A 10 x 8 patch result on the ``svs`` slide; patch 23 has by far the highest score."""
    xs, ys = np.meshgrid(np.arange(10) * PS + 512, np.arange(8) * PS + 768)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    att = np.linspace(0.001, 0.01, len(coords)).astype(np.float32)
    att[23] = 0.5
    return Result(coords=coords, patch_size_level0=PS,
                  sources={"attention": att, "head/0": att[::-1].copy()},
                  default_source="attention", classes=["normal", "lesion"], logits=[0.1, 0.9],
                  probabilities=[0.31, 0.69], arch="acmil_ga", mpp=0.25, slide=str(svs.path),
                  slide_id="svs", encoder="demo", model="demo")


@pytest.fixture
def heat(make_napari_viewer, svs):
    """A viewer with the slide and a fixed-range heatmap layer of source ``head/0``, selected."""
    from napari.layers import Layer

    from napari_milview.overlay.heatmap import heatmap_layer

    viewer = make_napari_viewer()
    viewer.open(str(svs.path), plugin="napari-milview")
    r = _result(svs)
    layer = Layer.create(*heatmap_layer(r, "head/0", "fixed", vmin=0.0, vmax=0.02,
                                        colormap="magma"))
    viewer.add_layer(layer)
    viewer.layers.selection.active = layer
    return viewer, layer, r


def _save(viewer, path) -> list[str]:
    return viewer.layers.save(str(path), selected=True, plugin="napari-milview")


def test_heatmap_layer_carries_its_result(heat):
    _, layer, r = heat
    assert layer.metadata["milview"] == "heatmap" and layer.metadata["result"] is r


def test_geojson_csv_h5(heat, tmp_path):
    viewer, _, r = heat
    [p] = _save(viewer, tmp_path / "svs.geojson")
    doc = json.loads(Path(p).read_text())
    detections = [f for f in doc["features"] if f["properties"]["objectType"] == "detection"]
    assert len(detections) == r.n
    got = [f["properties"]["measurements"]["attention"] for f in detections]
    np.testing.assert_allclose(got, r.sources["head/0"], rtol=1e-6)  # the layer's source

    [p] = _save(viewer, tmp_path / "svs.csv")
    with open(p, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:3] == ["index", "x", "y"] and len(rows) == r.n + 1

    [p] = _save(viewer, tmp_path / "svs_blockmap.h5")
    with h5py.File(p, "r") as f:
        np.testing.assert_array_equal(f["attention_scores"][:, 0], r.sources["head/0"])
        np.testing.assert_array_equal(f["coords"][()], r.coords)


def test_ome_tiff_keeps_the_fixed_range(heat, tmp_path):
    import tifffile

    viewer, _, r = heat
    [p] = _save(viewer, tmp_path / "svs.ome.tif")
    with tifffile.TiffFile(p) as tf:
        assert tf.is_ome and len(tf.series[0].levels) >= 1
        grid = tf.series[0].levels[0].asarray()
    # origin at level-0 (0, 0): the first patch (512, 768) is cell (3, 2)
    assert np.isnan(grid[:3]).all() and np.isnan(grid[:, :2]).all()
    vals = grid[np.isfinite(grid)]
    assert vals.size == r.n
    # fixed range [0, 0.02] clips the 0.5 outlier of head/0 (patch 79 - 23 = 56 reversed)
    assert vals.max() == pytest.approx(0.02)


def test_sidecar_round_trip_in_napari(heat, make_napari_viewer, tmp_path):
    viewer, _, r = heat
    out = _save(viewer, tmp_path / "svs.milview.json")
    assert out[0].endswith("svs.milview.json") and out[1].endswith("svs.result.h5")
    doc = json.loads(Path(out[0]).read_text())
    assert doc["attention_source"] == "head/0" and doc["colormap"] == "magma"
    assert doc["normalisation"] == {"method": "fixed", "vmin": 0.0, "vmax": 0.02, "zoom": 1.0}

    v2 = make_napari_viewer()
    layers = v2.open(out[0], plugin="napari-milview")
    slide, heatmap, topk = layers
    assert slide.metadata["path"] == r.slide and slide.multiscale
    assert heatmap.metadata["source"] == "head/0" and heatmap.colormap.name == "magma"
    assert tuple(heatmap.contrast_limits) == pytest.approx((0.0, 0.02))
    assert topk.nshapes == 20


def test_non_milview_layer_is_refused(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((8, 8), np.float32), name="plain")
    with pytest.raises(TypeError, match="layer 'plain' is not a napari-milview heatmap"):
        viewer.layers.save(str(tmp_path / "x.geojson"), selected=True,
                           plugin="napari-milview")
    assert not (tmp_path / "x.geojson").exists()


def test_partial_heatmap_is_refused(heat, tmp_path):
    viewer, layer, r = heat
    r.meta["partial"] = True  # what a run's streamed heatmap carries
    with pytest.raises(RuntimeError, match="partial result"):
        _save(viewer, tmp_path / "x.csv")


def test_empty_heatmap_of_a_starting_run_is_refused(make_napari_viewer, tmp_path):
    """The empty layer a run makes at the click (no result yet) is refused by name."""
    from napari_milview.overlay.heatmap import PENDING

    viewer = make_napari_viewer()
    viewer.add_image(np.full((1, 1), np.nan, np.float32), name="attention",
                     metadata={"milview": PENDING})
    with pytest.raises(RuntimeError, match="'attention' is waiting for its run's first result"):
        viewer.layers.save(str(tmp_path / "x.csv"), selected=True, plugin="napari-milview")
    assert not (tmp_path / "x.csv").exists()


def test_attention_x_n_zoom_is_kept(make_napari_viewer, svs, tmp_path):
    """ACMIL's attention x N zoom travels with the layer into the sidecar and the TIFF."""
    import tifffile
    from napari.layers import Layer

    from napari_milview.overlay.heatmap import heatmap_layer
    from napari_milview.overlay.normalise import normalise

    viewer = make_napari_viewer()
    r = _result(svs)
    layer = Layer.create(*heatmap_layer(r, "attention", "attention_x_n", zoom=0.5))
    viewer.add_layer(layer)
    viewer.layers.selection.active = layer
    [side, _] = _save(viewer, tmp_path / "z.milview.json")
    with open(side) as f:
        assert json.load(f)["normalisation"]["zoom"] == 0.5
    [tif] = _save(viewer, tmp_path / "z.tif")
    grid = tifffile.imread(tif)
    want = normalise(r.attention("attention"), "attention_x_n", zoom=0.5)
    assert np.nanmax(grid) == pytest.approx(want.max(), rel=1e-6)
