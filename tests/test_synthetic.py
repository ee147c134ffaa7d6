"""Tests for napari_milview.synthetic: the synthetic Aperio-style slide writer."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_milview.synthetic import (
    SyntheticSlide,
    default_objective_power,
    mask_downsample_for,
    sidecar_paths,
    write_synthetic_slide,
)

openslide = pytest.importorskip("openslide")

W, H, TILE = 2048, 1536, 128  # 3 levels: 2048x1536, 512x384, 128x96


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> SyntheticSlide:
    out = tmp_path_factory.mktemp("syn") / "slide.svs"
    return write_synthetic_slide(out, width=W, height=H, tile=TILE, levels=3, seed=7,
                                 ome_zarr=True, workers=2)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> SyntheticSlide:
    """No lesion, 2000 x 1500 with tile 256: a third level would fit in one tile."""
    out = tmp_path_factory.mktemp("plain") / "plain.tif"
    return write_synthetic_slide(out, width=2000, height=1500, tile=256, levels=3, seed=3,
                                 mpp=0.5, lesion=False)


@pytest.fixture(scope="module")
def level0(slide) -> np.ndarray:
    with openslide.OpenSlide(slide.path) as o:
        return np.asarray(o.read_region((0, 0), 0, (W, H)).convert("RGB"))


@pytest.fixture(scope="module")
def mask(slide) -> np.ndarray:
    with Image.open(slide.mask_path) as im:
        return np.asarray(im)


def _blocks(img: np.ndarray, ds: int) -> np.ndarray:
    """(h, w, ...) -> (h // ds, w // ds, ds * ds, ...) blocks (edges cropped)."""
    h, w = img.shape[0] // ds, img.shape[1] // ds
    b = img[: h * ds, : w * ds].reshape(h, ds, w, ds, *img.shape[2:])
    return b.swapaxes(1, 2).reshape(h, w, ds * ds, *img.shape[2:])


# ------------------------------------------------------------------------- file format


def test_openslide_reads_aperio(slide):
    with openslide.OpenSlide(slide.path) as o:
        p = o.properties
        assert p["openslide.vendor"] == "aperio"
        assert o.level_count == 3
        assert o.level_dimensions == ((W, H), (W // 4, H // 4), (W // 16, H // 16))
        assert [round(d) for d in o.level_downsamples] == [1, 4, 16]
        assert float(p["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(p["openslide.mpp-y"]) == pytest.approx(0.25)
        assert p["openslide.objective-power"] == "40"
        assert int(p["openslide.level[0].tile-width"]) == TILE
        assert int(p["openslide.level[1].tile-height"]) == TILE
        assert {"label", "macro", "thumbnail"} <= set(o.associated_images)
        thumb = o.associated_images["thumbnail"]
        assert thumb.size[0] / thumb.size[1] == pytest.approx(W / H, rel=0.02)
        # colours survive (not swapped or YCbCr-garbled): background is light grey
        corner = np.asarray(o.read_region((0, 0), 0, (64, 64)).convert("RGB")).reshape(-1, 3)
        assert np.all(np.abs(np.median(corner, 0) - 240) < 8)


def test_tiff_layout(slide):
    with tifffile.TiffFile(slide.path) as tf:
        pages = tf.pages
        assert len(pages) == 6  # level 0, thumbnail, level 1, level 2, label, macro
        for i in (0, 2, 3):
            pg = pages[i]
            assert pg.is_tiled and pg.tilewidth == TILE and pg.tilelength == TILE
            assert pg.compression == tifffile.COMPRESSION.JPEG
            assert pg.photometric == tifffile.PHOTOMETRIC.RGB
            assert pg.description.startswith("Aperio Image Library")
        assert "JPEG/RGB Q=85" in pages[0].description
        assert "|AppMag = 40|" in pages[0].description
        assert "|MPP = 0.25" in pages[0].description
        assert " -> 512x384 " in pages[2].description
        assert not pages[1].is_tiled  # thumbnail
        assert not pages[4].is_tiled and "label" in pages[4].description
        assert pages[4].subfiletype == 1
        assert not pages[5].is_tiled and "macro" in pages[5].description
        assert pages[5].subfiletype == 9


def test_levels_stop_when_a_level_fits_in_one_tile(plain):
    meta = json.loads(plain.json_path.read_text())
    assert meta["levels_requested"] == 3
    assert meta["levels"] == 2  # 125 x 93 would fit inside one 256 tile
    with openslide.OpenSlide(plain.path) as o:
        assert o.properties["openslide.vendor"] == "aperio"
        assert o.level_dimensions == ((2000, 1500), (500, 375))
        assert o.properties["openslide.objective-power"] == "20"  # mpp 0.5
        assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.5)


# --------------------------------------------------------------------- sidecars & mask


def test_sidecars_and_json(slide):
    assert slide.mask_path == slide.path.with_name("slide.lesion.png")
    assert slide.json_path == slide.path.with_name("slide.json")
    assert slide.zarr_path == slide.path.with_name("slide.ome.zarr")
    meta = json.loads(slide.json_path.read_text())
    for key in ("mpp", "width", "height", "seed", "lesion_mask", "mask_downsample", "tile",
                "levels", "objective_power", "lesion", "lesion_fraction_of_tissue",
                "tissue_fraction"):
        assert key in meta
    assert meta["lesion_mask"] == "slide.lesion.png"
    assert (meta["width"], meta["height"], meta["mpp"], meta["seed"]) == (W, H, 0.25, 7)
    assert (meta["tile"], meta["levels"], meta["objective_power"]) == (TILE, 3, 40)
    assert meta["lesion"] is True
    assert meta["mask_downsample"] == slide.mask_downsample == mask_downsample_for(W, H)
    assert 0.3 <= meta["tissue_fraction"] <= 0.6
    assert 1 <= meta["lesion_regions_planted"] <= 3
    assert (slide.width, slide.height, slide.mpp, slide.seed) == (W, H, 0.25, 7)


def test_mask_shape_and_values(slide, mask):
    ds = slide.mask_downsample
    with Image.open(slide.mask_path) as im:
        assert im.mode == "L"
    assert mask.shape == (math.ceil(H / ds), math.ceil(W / ds))
    assert set(np.unique(mask)) == {0, 255}
    meta = json.loads(slide.json_path.read_text())
    frac = (mask > 0).mean() / meta["tissue_fraction"]
    assert frac == pytest.approx(meta["lesion_fraction_of_tissue"], rel=1e-6)
    assert meta["lesion_fraction_of_tissue"] >= 0.08
    for x, y, w, h in meta["lesion_bboxes_xywh"]:
        sub = mask[y // ds: (y + h) // ds, x // ds: (x + w) // ds]
        assert sub.any()


def test_tissue_under_every_lesion_pixel(slide, mask, level0):
    ds = slide.mask_downsample
    # stained pixels: coloured (glass is neutral grey ~240) or dark
    spread = level0.max(-1).astype(np.int16) - level0.min(-1)
    stained = (spread > 15) | (level0.mean(-1) < 200)
    blocks = _blocks(stained, ds)  # (H/ds, W/ds, ds*ds)
    lesion = mask[: blocks.shape[0], : blocks.shape[1]] > 0
    tissue_frac = blocks.mean(-1)
    assert lesion.sum() > 50
    assert tissue_frac[lesion].min() > 0.75
    assert np.median(tissue_frac[lesion]) == 1.0
    # and the glass around the tissue is not stained
    assert tissue_frac[:2, :2].max() < 0.05


def test_lesion_looks_different_where_the_mask_says(slide, mask, level0):
    ds = slide.mask_downsample
    rgb = level0.astype(np.float32)
    darkness = 255 - rgb.mean(-1)
    # hematoxylin-rich pixels: dark and blue-purple (blue above red)
    hema = ((rgb[..., 2] - rgb[..., 0]) > 15) & (rgb.mean(-1) < 160)
    dark_b = _blocks(darkness, ds).mean(-1)
    hema_b = _blocks(hema.astype(np.float32), ds).mean(-1)
    spread = rgb.max(-1) - rgb.min(-1)
    stained_b = _blocks((spread > 15) | (rgb.mean(-1) < 200), ds).mean(-1)
    lesion = mask[: dark_b.shape[0], : dark_b.shape[1]] > 0
    # non-lesion tissue blocks, away from the lesion edge
    far = ~_dilate(lesion, 3)
    tissue = stained_b > 0.95
    normal = far & tissue
    assert normal.sum() > 50
    assert dark_b[lesion].mean() > dark_b[normal].mean() + 30
    assert hema_b[lesion].mean() > 0.4
    assert hema_b[lesion].mean() > 4 * hema_b[normal].mean()
    # 128-px patches (32 um) separate perfectly: what a patch classifier needs
    ps = 128
    hema_p = _blocks(hema.astype(np.float32), ps).mean(-1)
    cover = _blocks(np.kron(mask > 0, np.ones((ds, ds), bool))[:H, :W], ps).mean(-1)
    stained_p = _blocks((spread > 15) | (rgb.mean(-1) < 200), ps).mean(-1)
    in_p = cover >= 0.9
    out_p = (cover == 0) & (stained_p > 0.95)
    assert in_p.sum() >= 3 and out_p.sum() >= 10
    assert hema_p[in_p].min() > hema_p[out_p].max()


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(m, iterations=r)


def test_no_lesion_gives_empty_mask(plain):
    with Image.open(plain.mask_path) as im:
        m = np.asarray(im)
    ds = plain.mask_downsample
    assert m.shape == (math.ceil(1500 / ds), math.ceil(2000 / ds))
    assert not m.any()
    meta = json.loads(plain.json_path.read_text())
    assert meta["lesion"] is False and meta["lesion_fraction_of_tissue"] == 0.0
    assert meta["tissue_fraction"] > 0.2
    # sidecars of a .tif strip the last suffix too
    assert plain.json_path.name == "plain.json" and plain.mask_path.name == "plain.lesion.png"
    assert plain.zarr_path is None


# ------------------------------------------------------------------------------ pyramid


def test_pyramid_consistent(slide, level0):
    with openslide.OpenSlide(slide.path) as o:
        for k, ds in ((1, 4), (2, 16)):
            w, h = o.level_dimensions[k]
            lvl = np.asarray(o.read_region((0, 0), k, (w, h)).convert("RGB")).astype(np.float32)
            ref = _blocks(level0.astype(np.float32), ds).mean(2)[:h, :w]
            diff = np.abs(lvl - ref)
            assert diff.mean() < 3, (k, diff.mean())
            assert np.percentile(diff, 99) < 20


def test_ome_zarr_matches_svs(slide):
    zarr = pytest.importorskip("zarr")
    g = zarr.open_group(str(slide.zarr_path), mode="r")
    assert (slide.zarr_path / ".zattrs").exists() and (slide.zarr_path / ".zgroup").exists()
    ms = g.attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["axes"][0]["type"] == "channel" and ms["axes"][1]["unit"] == "micrometer"
    assert len(ms["datasets"]) == 3
    with openslide.OpenSlide(slide.path) as o:
        for k, ds in enumerate(ms["datasets"]):
            scale = ds["coordinateTransformations"][0]["scale"]
            assert scale == pytest.approx([1.0, 0.25 * 4**k, 0.25 * 4**k])
            arr = g[ds["path"]]
            w, h = o.level_dimensions[k]
            assert arr.shape == (3, h, w) and arr.dtype == np.uint8
            assert tuple(arr.chunks) == (3, TILE, TILE)
            z = np.moveaxis(arr[:], 0, -1).astype(np.float32)
            s = np.asarray(o.read_region((0, 0), k, (w, h)).convert("RGB")).astype(np.float32)
            # the zarr holds the exact pre-JPEG pixels: equal up to JPEG noise
            assert np.abs(z - s).mean() < 3


# -------------------------------------------------------------------------- determinism


def _level0_digest(path) -> str:
    with tifffile.TiffFile(path) as tf:
        return hashlib.sha256(tf.pages[0].asarray().tobytes()).hexdigest()


def test_deterministic(tmp_path):
    kw = {"width": 1024, "height": 768, "tile": 256, "levels": 1}
    a = write_synthetic_slide(tmp_path / "a" / "s.svs", seed=11, workers=1, **kw)
    b = write_synthetic_slide(tmp_path / "b" / "s.svs", seed=11, workers=3, **kw)
    c = write_synthetic_slide(tmp_path / "c" / "s.svs", seed=12, **kw)
    assert a.path.read_bytes() == b.path.read_bytes()  # whatever the thread count
    assert a.mask_path.read_bytes() == b.mask_path.read_bytes()
    assert _level0_digest(a.path) != _level0_digest(c.path)


# ------------------------------------------------------------------------------ helpers


def test_helpers():
    from pathlib import Path

    assert sidecar_paths("/d/slide.svs") == (
        Path("/d/slide.lesion.png"), Path("/d/slide.json"), Path("/d/slide.ome.zarr"))
    assert sidecar_paths("/d/x.y.tif")[1] == Path("/d/x.y.json")
    assert mask_downsample_for(50_000, 40_000) == 16
    assert mask_downsample_for(100_000, 80_000) == 32
    assert mask_downsample_for(20_000, 15_000) == 16
    assert mask_downsample_for(2000, 1500) == 4
    assert mask_downsample_for(256, 256) == 1
    assert [default_objective_power(m) for m in (0.25, 0.5, 1.0)] == [40, 20, 10]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"width": 100}, "width and height"),
        ({"height": 255}, "width and height"),
        ({"levels": 0}, "levels"),
        ({"levels": 11}, "levels"),
        ({"mpp": 0}, "mpp"),
        ({"mpp": -0.25}, "mpp"),
        ({"mpp": float("nan")}, "mpp"),
        ({"tile": 250}, "multiple of 16"),
        ({"tile": 0}, "multiple of 16"),
        ({"quality": 0}, "quality"),
        ({"quality": 101}, "quality"),
        ({"workers": 0}, "workers"),
        ({"width": 512.5}, "integer"),
    ],
)
def test_bad_arguments(tmp_path, kw, match):
    args = {"width": 512, "height": 512, "tile": 256, "levels": 1}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        write_synthetic_slide(tmp_path / "bad.svs", **args)
    assert not (tmp_path / "bad.svs").exists()
