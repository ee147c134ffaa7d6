"""The npe2 reader: cheap sniffing, one multiscale RGB layer, real viewer, sample data."""

from __future__ import annotations

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
    plain_tif = tmp_path / "photo.tif"
    import tifffile

    tifffile.imwrite(plain_tif, np.zeros((64, 64, 3), np.uint8))  # stripped, not a slide
    for not_ours in (str(png), str(tmp_path), str(tmp_path / "missing.svs"), str(plain_tif),
                     [str(svs.path), str(svs.path)], None, 42, b"\x00"):
        assert napari_get_reader(not_ours) is None, not_ours


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
