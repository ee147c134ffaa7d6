"""The npe2 reader: cheap sniffing, one multiscale RGB layer, real viewer, sample data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_milview._reader import napari_get_reader, read_slide
from napari_milview.slide import SlideError


def test_get_reader_claims_slides_only(svs, tmp_path):
    assert callable(napari_get_reader(str(svs.path)))
    assert callable(napari_get_reader(svs.path))  # PathLike
    assert callable(napari_get_reader([str(svs.path)]))
    assert callable(napari_get_reader(str(svs.zarr_path)))  # OME-Zarr folder
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    for not_ours in (str(png), str(tmp_path), str(tmp_path / "missing.svs"),
                     [str(svs.path), str(svs.path)], None, 42, b"\x00"):
        assert napari_get_reader(not_ours) is None, not_ours


def test_plain_tiff_opens_with_naparis_own_reader(tmp_path):
    """A stripped 2-D .tif is not a slide: napari's builtin reader reads it, also when this
    plugin is the chosen (or preferred) reader for ``*.tif``."""
    import tifffile

    from napari_milview._reader import read_plain_tiff

    plain_tif = tmp_path / "photo.tif"
    img = np.arange(64 * 48 * 3, dtype=np.uint8).reshape(64, 48, 3)
    tifffile.imwrite(plain_tif, img)  # stripped, not a slide
    reader = napari_get_reader(str(plain_tif))
    assert reader is read_plain_tiff
    [(data, *_)] = reader(str(plain_tif))
    np.testing.assert_array_equal(np.asarray(data), img)


def _png(path):
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(path, format="PNG")
    return path


#: name -> (content, the problem the error states); None content = an empty folder
NOT_SLIDES = {
    "png.svs": ("png", "not a whole-slide image: it is a PNG image"),
    "png.tif": ("png", "not a whole-slide image: it is a PNG image"),
    "notes.svs": (b"slide 12, stain H&E\n", "not a whole-slide image: it is a text file"),
    "notes.ndpi": (b'{"a": 1}', "not a whole-slide image: it is a text file"),
    "empty.svs": (b"", "the file is empty"),
    "jpeg.mrxs": (b"\xff\xd8\xff\xe0" + b"\x00" * 60, "not a whole-slide image: it is a JPEG"),
    "plain.zarr": (None, "not a whole-slide image"),
}


@pytest.mark.parametrize("name", list(NOT_SLIDES))
def test_not_a_slide_gets_one_clear_error(tmp_path, name):
    content, problem = NOT_SLIDES[name]
    path = tmp_path / name
    if content == "png":
        _png(path)
    elif content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    reader = napari_get_reader(str(path))
    assert reader is read_slide, "a slide extension is always answered, never refused"
    with pytest.raises(SlideError) as info:
        reader(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: {problem}"), message
    assert "\n" not in message


@pytest.mark.gui
def test_viewer_shows_the_not_a_slide_error(make_napari_viewer, tmp_path):
    path = _png(tmp_path / "renamed.svs")
    viewer = make_napari_viewer()
    with pytest.raises(SlideError, match=r"renamed\.svs: not a whole-slide image: it is a PNG"):
        viewer.open(str(path), plugin="napari-milview")
    assert len(viewer.layers) == 0


def _manifest_patterns() -> list[str]:
    import yaml

    import napari_milview

    manifest = yaml.safe_load(
        (Path(napari_milview.__file__).parent / "napari.yaml").read_text(encoding="utf-8"))
    [reader] = manifest["contributions"]["readers"]
    return reader["filename_patterns"]


def test_slide_patterns_are_the_manifests():
    from napari_milview._reader import SIDECAR_PATTERN, SLIDE_FILE_PATTERNS, SLIDE_PATTERNS

    patterns = _manifest_patterns()
    assert [p for p in patterns if p != SIDECAR_PATTERN] == list(SLIDE_PATTERNS)
    assert set(SLIDE_FILE_PATTERNS) <= set(SLIDE_PATTERNS)
    assert "*.json" not in patterns and SIDECAR_PATTERN in patterns


def test_other_json_is_not_offered_to_this_plugin(tmp_path):
    import json

    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"format": "something else"}))
    offered = {r.plugin_name for r in pm.iter_compatible_readers([str(cfg)])}
    assert "napari-milview" not in offered
    assert napari_get_reader(str(cfg)) is None
    side = tmp_path / "s.milview.json"
    assert "napari-milview" in {r.plugin_name for r in pm.iter_compatible_readers([str(side)])}


# --------------------------------------------------------------------- heatmap OME-TIFF
def _heatmap_tiff(svs, tmp_path, method="minmax"):
    from napari_milview.overlay.export import write_heatmap_tiff
    from napari_milview.result import Result

    ps = 256
    xs, ys = np.meshgrid(np.arange(10) * ps + 512, np.arange(8) * ps + 768)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    att = np.linspace(0.001, 0.01, len(coords)).astype(np.float32)
    att[23] = 0.5
    r = Result(coords=coords, patch_size_level0=ps, sources={"attention": att},
               default_source="attention", classes=["normal", "lesion"], logits=[0.1, 0.9],
               probabilities=[0.31, 0.69], arch="abmil", mpp=svs.mpp, slide=str(svs.path),
               slide_id="svs", encoder="demo", model="demo")
    return r, write_heatmap_tiff(r, tmp_path / "svs.heatmap.ome.tif", method=method,
                                 min_side=4)


def test_heatmap_tiff_reopens_with_values_and_placement(svs, tmp_path):
    from napari_milview._reader import read_heatmap_tiff_layer
    from napari_milview.overlay.normalise import normalise

    r, path = _heatmap_tiff(svs, tmp_path)
    reader = napari_get_reader(str(path))
    assert reader is read_heatmap_tiff_layer
    [(grid, kwargs, kind)] = reader(str(path))
    assert kind == "image" and grid.dtype == np.float32 and grid.ndim == 2
    # one cell per 256-px patch from the slide's origin: 3 NaN rows, 2 NaN columns first
    assert grid.shape == (3 + 8, 2 + 10)
    expected = np.full(grid.shape, np.nan, np.float32)
    cells = r.coords // 256
    expected[cells[:, 1], cells[:, 0]] = normalise(r.attention(), "minmax")
    np.testing.assert_array_equal(grid, expected)  # NaN where NaN (assert_array_equal)
    cell_um = 256 * svs.mpp
    assert kwargs["scale"] == pytest.approx((cell_um, cell_um))
    # cell (0, 0) is centred where the slide layer draws level-0 pixel (127.5, 127.5)
    assert kwargs["translate"] == pytest.approx(((128 - 0.5) * svs.mpp,) * 2)
    assert kwargs["units"] == ("um", "um") and kwargs["colormap"] == "inferno"
    assert kwargs["contrast_limits"] == pytest.approx((0.0, 1.0))
    md = kwargs["metadata"]
    assert md["path"] == str(path) and md["source"] == "attention" and md["method"] == "minmax"
    assert md["cell_level0"] == 256 and md["mpp"] == pytest.approx(svs.mpp)


def test_heatmap_tiff_without_mpp_is_in_level0_pixels(svs, tmp_path):
    from napari_milview.overlay.export import read_heatmap_tiff, write_heatmap_tiff

    r, _ = _heatmap_tiff(svs, tmp_path)
    r.mpp = None
    path = write_heatmap_tiff(r, tmp_path / "px.tif", method="raw")
    [(grid, kwargs, _)] = napari_get_reader(str(path))(str(path))
    assert kwargs["scale"] == (256, 256) and "units" not in kwargs
    assert kwargs["contrast_limits"] == pytest.approx((0.001, 0.5))
    assert np.isfinite(grid).sum() == r.n
    with pytest.raises(ValueError, match=r"photo\.tif: not a napari-milview heatmap"):
        import tifffile

        tifffile.imwrite(tmp_path / "photo.tif", np.zeros((8, 8), np.float32))
        read_heatmap_tiff(tmp_path / "photo.tif")


@pytest.mark.gui
def test_viewer_puts_the_heatmap_tiff_on_the_slide(make_napari_viewer, svs, tmp_path):
    r, path = _heatmap_tiff(svs, tmp_path)
    viewer = make_napari_viewer()
    [slide] = viewer.open(str(svs.path), plugin="napari-milview")
    [heat] = viewer.open(str(path), plugin="napari-milview")
    assert heat.dtype == np.float32 and not heat.rgb and not heat.multiscale
    assert tuple(heat.units) == tuple(slide.units)
    # the centre of the planted patch (level-0 pixels) falls in the planted cell
    x, y = r.coords[23]
    world = slide.data_to_world(np.array([y + 128, x + 128], float))
    i, j = np.round(heat.world_to_data(world)).astype(int)
    assert (i, j) == (y // 256, x // 256)
    assert heat.data[i, j] == 1.0 == np.nanmax(heat.data)


def test_read_slide_layer_tuple(svs):
    [(data, kwargs, kind)] = read_slide(str(svs.path))
    assert kind == "image"
    assert kwargs["rgb"] is True and kwargs["multiscale"] is True
    assert len(data) == 3 and all(d.shape[-1] == 3 and d.dtype == np.uint8 for d in data)
    assert kwargs["scale"] == pytest.approx((0.25, 0.25))
    md = kwargs["metadata"]
    assert md["vendor"] == "aperio" and md["mpp_source"] == "vendor"
    assert md["objective_power"] == 40
    assert md["level_dimensions"] == [(4480, 3456), (1120, 864), (280, 216)]
    assert md["level_downsamples"] == [1.0, 4.0, 16.0]
    assert "label" in md["associated_images"]
    assert md["slide"].associated_image("macro").shape[2] == 3


def test_read_slide_error_names_file(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    with pytest.raises(SlideError, match="broken.svs"):
        read_slide(str(bad))


@pytest.mark.gui
def test_viewer_opens_slide_in_microns(make_napari_viewer, svs):
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(svs.path), plugin="napari-milview")
    assert layer.multiscale and layer.rgb
    assert len(layer.data) == 3
    assert tuple(layer.scale) == pytest.approx((0.25, 0.25))
    assert str(layer.units[0]) == "micrometer"
    assert layer.data[0].chunksize == (256, 256, 3)
    # the whole slide spans 4480 x 3456 px = 1120 x 864 um in world coordinates
    extent = np.asarray(layer.extent.world)
    assert extent[1] - extent[0] == pytest.approx((864 - 0.25, 1120 - 0.25), abs=0.3)
    viewer.reset_view()
    # zoomed out on a 4480-px slide the viewer draws a coarse level, not level 0
    assert layer.data_level > 0
    assert layer.metadata["slide"].bad_tiles == 0


@pytest.mark.gui
def test_viewer_opens_ome_zarr(make_napari_viewer, svs):
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(svs.zarr_path), plugin="napari-milview")
    assert layer.multiscale and layer.rgb and len(layer.data) == 3
    assert tuple(layer.scale) == pytest.approx((0.25, 0.25))


@pytest.mark.gui
@pytest.mark.slow
def test_sample_data_contribution(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-milview", "synthetic-lesion")
    [layer] = viewer.layers
    assert layer.multiscale and layer.rgb
    assert layer.metadata["vendor"] == "aperio"
    assert layer.metadata["mpp"] == pytest.approx((0.5, 0.5))


# -------------------------------------------------------------------------- sidecars
def test_get_reader_claims_sidecars_by_content(tmp_path):
    import json

    from napari_milview._reader import read_sidecar_layers
    from napari_milview.overlay.export import SIDECAR_FORMAT

    side = tmp_path / "s.milview.json"
    side.write_text(json.dumps({"format": SIDECAR_FORMAT, "version": 1}, indent=1))
    assert napari_get_reader(str(side)) is read_sidecar_layers
    assert napari_get_reader([side]) is read_sidecar_layers
    renamed = tmp_path / "s.json"  # any name ending in .json: the content decides
    renamed.write_text(side.read_text())
    assert napari_get_reader(str(renamed)) is read_sidecar_layers
    other = tmp_path / "s.done.json"  # a cohort marker, a config, ... are not ours
    other.write_text(json.dumps({"slide": "x.svs", "format": "other"}))
    late = tmp_path / "late.milview.json"  # "format" must come first, as written
    late.write_text(json.dumps({"slide": "x.svs", "format": SIDECAR_FORMAT}))
    broken = tmp_path / "b.milview.json"
    broken.write_bytes(b"\xff\xfe\x00garbage")
    for not_ours in (other, late, broken, tmp_path / "missing.milview.json"):
        assert napari_get_reader(str(not_ours)) is None, not_ours


def _restored(viewer, sidecar, slide_path: str, n: int, k: int) -> None:
    """Opening ``sidecar`` in ``viewer`` gives slide, an aligned heatmap and K boxes."""
    layers = viewer.open(str(sidecar), plugin="napari-milview")
    assert [type(lyr).__name__ for lyr in layers] == ["Image", "Image", "Shapes"]
    slide, heat, topk = layers
    assert slide.metadata["path"] == slide_path and slide.multiscale
    assert heat.metadata["milview"] == "heatmap" and heat.metadata["result"].n == n
    assert np.isfinite(heat.data).sum() == n  # one cell per patch (step = patch size)
    assert tuple(heat.scale) == pytest.approx(tuple(slide.scale[-2:]) * np.array(
        heat.metadata["cell_level0"]))
    assert topk.nshapes == k


@pytest.mark.gui
def test_sidecar_from_widget_export_restores_in_napari(make_napari_viewer, qtbot, svs,
                                                       tmp_path):
    from napari_milview._qt.mil_widget import MILWidget

    viewer = make_napari_viewer()
    viewer.open(str(svs.path), plugin="napari-milview")
    w = MILWidget(viewer)
    viewer.window.add_dock_widget(w, name="MIL attention")
    qtbot.waitUntil(lambda: w.ready, timeout=60_000)  # torch imported off the GUI thread
    w.device_combo.setCurrentText("cpu")
    w.k_spin.setValue(7)
    with qtbot.waitSignal(w.run_finished, timeout=60_000) as blocker:
        w.run()
    assert blocker.args == ["done"], w.status.text()
    assert w.heatmap_layer.metadata["result"] is w.result  # kept through in-place updates
    side = w.export("sidecar", tmp_path / "svs.milview.json")
    _restored(make_napari_viewer(), side, str(svs.path), w.result.n, 7)
    w.teardown()


@pytest.mark.gui
def test_sidecar_from_cohort_run_restores_in_napari(make_napari_viewer, svs, tmp_path):
    from napari_milview.cohort import CohortConfig, outputs, plan, process_slide

    (job,) = plan([svs.path], tmp_path / "out", CohortConfig(model="demo", device="cpu",
                                                             top_k=5))
    row = process_slide(job)  # what each task of `milview run` does
    assert row.ok, row.message
    side = outputs(tmp_path / "out", "svs")["sidecar"]
    assert side.name == "svs.milview.json"
    _restored(make_napari_viewer(), side, str(svs.path), row.n_patches, 5)


def test_a_pipe_named_svs_is_refused_without_blocking(tmp_path):
    """A FIFO named ``.svs``: our reader answers (a slide extension) and refuses it by type;
    nothing opens it (opening a FIFO for reading blocks until a writer comes)."""
    import os

    from napari_milview._reader import napari_get_reader
    from napari_milview.slide import SlideError

    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    reader = napari_get_reader(str(fifo))
    assert reader is not None
    with pytest.raises(SlideError, match="pipe.svs"):
        reader(str(fifo))
