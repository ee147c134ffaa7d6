"""Exports: CSV, CLAM h5, pyramidal OME-TIFF, top-K crops from a real slide, JSON sidecar."""

import csv
import json
import re
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest

from napari_milview.overlay.export import (
    layers_from_sidecar,
    read_sidecar,
    write_clam_h5,
    write_csv,
    write_heatmap_tiff,
    write_sidecar,
    write_topk_crops,
)
from napari_milview.overlay.topk import select
from napari_milview.result import Result, load_result

PS = 256


def _result(slide=None, mpp=0.25, x0=512, y0=768, nx=10, ny=8, planted=23):
    xs, ys = np.meshgrid(np.arange(nx) * PS + x0, np.arange(ny) * PS + y0)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    att = np.full(len(coords), 0.01, np.float32)
    att[planted] = 0.5
    return Result(coords=coords, patch_size_level0=PS,
                  sources={"attention": att, "raw/attention": np.log(att), "head/0": att[::-1]},
                  default_source="attention", classes=["normal", "tumour"], logits=[0.1, 0.9],
                  probabilities=[0.31, 0.69], arch="abmil", mpp=mpp, slide=slide,
                  slide_id="s1", encoder="resnet50_trunc", model="demo")


def test_csv(tmp_path):
    r = _result()
    p = write_csv(r, tmp_path / "s1.csv")
    with open(p, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["index", "x", "y", "patch_size_level0", "attention", "raw/attention",
                       "head/0"]
    body = np.array(rows[1:], dtype=float)
    assert body.shape == (80, 7)
    np.testing.assert_array_equal(body[:, 0], np.arange(80))
    np.testing.assert_array_equal(body[:, 1:3], r.coords)
    assert (body[:, 3] == PS).all()
    for j, k in enumerate(r.sources, start=4):
        np.testing.assert_array_equal(body[:, j].astype(np.float32), r.sources[k])  # exact


def test_clam_h5(tmp_path):
    r = _result()
    p = write_clam_h5(r, tmp_path / "s1_blockmap.h5", source="raw/attention")
    with h5py.File(p, "r") as f:
        assert f["attention_scores"].shape == (80, 1) and f["attention_scores"].dtype == "f4"
        np.testing.assert_array_equal(f["attention_scores"][:, 0], r.sources["raw/attention"])
        np.testing.assert_array_equal(f["coords"][()], r.coords)
        assert f["coords"].attrs["patch_size_level0"] == PS


def test_ome_tiff_pyramid_is_placeable(tmp_path):
    import tifffile

    r = _result(x0=512, y0=768, nx=60, ny=40, planted=130)
    p = write_heatmap_tiff(r, tmp_path / "heat.ome.tif", method="minmax", min_side=16)
    with tifffile.TiffFile(p) as tf:
        assert tf.is_ome
        series = tf.series[0]
        levels = [lvl.asarray() for lvl in series.levels]
        ome = ET.fromstring(tf.ome_metadata)
    pixels = next(e for e in ome.iter() if e.tag.endswith("Pixels"))
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(PS * 0.25)
    assert float(pixels.get("PhysicalSizeY")) == pytest.approx(PS * 0.25)
    assert pixels.get("PhysicalSizeXUnit") == "µm"
    # base level starts at the slide's level-0 origin: (768 / 256, 512 / 256) NaN rows/cols
    base = levels[0]
    assert base.dtype == np.float32 and base.shape == (3 + 40, 2 + 60)
    assert np.isnan(base[:3]).all() and np.isnan(base[:, :2]).all()
    x, y = r.coords[130]
    assert base[y // PS, x // PS] == 1.0 and np.nanmax(base) == 1.0
    assert np.nanmin(base) == 0.0
    # a real pyramid: each level half the previous, down to min_side
    assert len(levels) >= 3
    for a, b in zip(levels, levels[1:], strict=False):
        assert b.shape == ((a.shape[0] + 1) // 2, (a.shape[1] + 1) // 2)
    assert max(levels[-1].shape) <= 16
    assert [q.name for q in tmp_path.iterdir()] == ["heat.ome.tif"]


def test_ome_tiff_without_mpp_has_no_physical_size(tmp_path):
    import tifffile

    p = write_heatmap_tiff(_result(mpp=None), tmp_path / "px.ome.tif")
    with tifffile.TiffFile(p) as tf:
        assert "PhysicalSizeX" not in tf.ome_metadata
        assert tf.series[0].levels[0].shape == (3 + 8, 2 + 10)


def test_topk_crops_are_the_slide_pixels(svs, tmp_path):
    import openslide
    from PIL import Image

    r = _result(slide=str(svs.path), planted=23)
    idx = select(r.attention(), 3)
    paths = write_topk_crops(r, tmp_path, idx)
    assert len(paths) == 3
    x, y = (int(v) for v in r.coords[23])
    assert paths[0].name == f"rank001_idx23_x{x}_y{y}_score0.5.png"
    assert re.fullmatch(r"rank002_idx\d+_x\d+_y\d+_score0\.01\.png", paths[1].name)
    with openslide.OpenSlide(str(svs.path)) as osr:  # an independent reader of the same file
        for p, i in zip(paths, idx, strict=True):
            cx, cy = (int(v) for v in r.coords[i])
            want = np.asarray(osr.read_region((cx, cy), 0, (PS, PS)).convert("RGB"))
            got = np.asarray(Image.open(p))
            assert got.shape == (PS, PS, 3)
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="need the slide"):
        write_topk_crops(_result(), tmp_path, idx)


def test_sidecar_round_trip_restores_the_layers(svs, tmp_path):
    r = _result(slide=str(svs.path), mpp=svs.mpp)
    p = write_sidecar(tmp_path / "s1.milview.json", r, source="head/0", method="fixed",
                      vmin=0.0, vmax=0.2, bag_source="features/s1.h5",
                      topk={"k": 5, "mode": "top"})
    assert (tmp_path / "s1.result.h5").is_file()  # the scores travel with the sidecar
    raw = json.loads(p.read_text())
    assert raw["result"] == "s1.result.h5"  # relative: the folder can move
    doc = read_sidecar(p)
    assert doc["slide"] == str(svs.path) and doc["mpp"] == svs.mpp
    assert doc["attention_source"] == "head/0" and doc["bag_source"] == "features/s1.h5"
    assert doc["normalisation"] == {"method": "fixed", "vmin": 0.0, "vmax": 0.2, "zoom": 1.0}
    assert doc["model"] == "demo" and doc["arch"] == "abmil"
    assert doc["predicted_class"] == "tumour"
    v = doc["versions"]
    assert v["napari-milview"] and v["numpy"] and v["h5py"] and "torch" in v and "napari" in v
    assert "openslide-python" in v
    np.testing.assert_array_equal(load_result(doc["result"]).attention("head/0"),
                                  r.attention("head/0"))

    slide, heat, top = layers_from_sidecar(p)
    assert slide[2] == "image" and slide[1]["multiscale"]
    assert heat[2] == "image" and heat[1]["metadata"]["source"] == "head/0"
    assert heat[1]["contrast_limits"] == (0.0, 0.2)
    assert top[2] == "shapes" and top[0].shape == (5, 4, 2)
    np.testing.assert_array_equal(top[1]["features"]["index"], select(r.attention("head/0"), 5))
    # the heatmap lands on the slide layer's coordinates (same scale units)
    assert heat[1]["scale"][0] == pytest.approx(slide[1]["scale"][0] * PS)


def test_sidecar_errors_and_missing_slide(tmp_path):
    r = _result(slide=str(tmp_path / "gone.svs"))
    p = write_sidecar(tmp_path / "x.milview.json", r)
    with pytest.warns(UserWarning, match="gone.svs not found"):
        layers = layers_from_sidecar(p)
    assert [lt[2] for lt in layers] == ["image", "shapes"]
    with pytest.raises(KeyError, match="no attention source"):
        write_sidecar(tmp_path / "y.milview.json", r, source="nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a JSON sidecar"):
        read_sidecar(bad)
    other = tmp_path / "other.json"
    other.write_text('{"type": "FeatureCollection"}')
    with pytest.raises(ValueError, match="other.json: not a napari-milview sidecar"):
        read_sidecar(other)
    (tmp_path / "x.result.h5").unlink()
    with pytest.raises(ValueError, match="x.milview.json: its result file .* does not exist"):
        layers_from_sidecar(p)
