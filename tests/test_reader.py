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
