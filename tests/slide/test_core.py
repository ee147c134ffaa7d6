"""Slide core: pyramids, pixels against OpenSlide, derived levels, cache, threads, mpp."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openslide
import pytest
import tifffile

from napari_milview.slide import SlideError, TileCache, open_slide
from napari_milview.slide.core import Slide


def _osr_rgb(osr, loc, level, size):
    return np.asarray(osr.read_region(loc, level, size))[:, :, :3]


def _assert_pyramid(slide: Slide):
    arrays = slide.to_dask()
    assert len(arrays) == len(slide.info.levels)
    for lv, arr in zip(slide.info.levels, arrays):
        assert arr.dtype == np.uint8
        assert arr.shape == (*lv.shape, 3)  # RGB, no alpha
        assert arr.chunks[0][0] == lv.tile[0] and arr.chunks[1][0] == lv.tile[1]
        assert arr.chunks[2] == (3,)
    for a, b in zip(arrays, arrays[1:]):
        assert b.shape[0] < a.shape[0] and b.shape[1] < a.shape[1]


def test_svs_pyramid_and_metadata(svs):
    with open_slide(svs.path) as s:
        info = s.info
        assert info.vendor == "aperio"
        assert info.dimensions == (4480, 3456)
        assert [lv.shape for lv in info.levels] == [(3456, 4480), (864, 1120), (216, 280)]
        assert [lv.downsample for lv in info.levels] == [1.0, 4.0, 16.0]
        assert info.levels[0].tile == (256, 256)
        assert info.mpp == pytest.approx((0.25, 0.25))
        assert info.mpp_source == "vendor"
        assert info.objective_power == 40
        assert {"label", "macro", "thumbnail"} <= set(info.associated)
        assert info.scale(1) == pytest.approx((1.0, 1.0))  # microns
        _assert_pyramid(s)
        label = s.associated_image("label")
        assert label.ndim == 3 and label.shape[2] == 3 and label.dtype == np.uint8
        with pytest.raises(KeyError, match="no associated image"):
            s.associated_image("nonexistent")


def test_pixels_equal_openslide_at_every_level(svs):
    """Random regions (crossing tile borders and the clipped edge tiles) at every level."""
    rng = np.random.default_rng(0)
    osr = openslide.OpenSlide(str(svs.path))
    with open_slide(svs.path, cache=TileCache(64 * 2**20)) as s:
        levels = s.to_dask()
        for lvl in range(s.n_native):
            h, w = s.info.levels[lvl].shape
            ds = s.info.levels[lvl].downsample
            for _ in range(6):
                rh, rw = rng.integers(1, min(h, 700)), rng.integers(1, min(w, 700))
                y, x = rng.integers(0, h - rh + 1), rng.integers(0, w - rw + 1)
                ours = levels[lvl][y:y + rh, x:x + rw].compute()
                ref = _osr_rgb(osr, (int(x * ds), int(y * ds)), lvl, (int(rw), int(rh)))
                np.testing.assert_array_equal(ours, ref, err_msg=f"level {lvl} at {(x, y)}")
            # the bottom-right edge tile, clipped
            ours = levels[lvl][h - 37:h, w - 53:w].compute()
            ref = _osr_rgb(osr, (int((w - 53) * ds), int((h - 37) * ds)), lvl, (53, 37))
            np.testing.assert_array_equal(ours, ref)
    osr.close()


def test_window_fast_path_tile_graph_and_coarse_chunks_agree(svs):
    """``window.compute()`` (one read), the per-tile dask graph (``dask.compute``) and the
    coarse-chunk arrays for whole-slide work give OpenSlide's pixels."""
    import dask

    osr = openslide.OpenSlide(str(svs.path))
    with open_slide(svs.path, cache=TileCache(64 * 2**20)) as s:
        fine, coarse = s.to_dask(), s.to_dask(chunk=1000)
        assert coarse[0].chunks[0][0] == 1024 and coarse[0].chunks[1][0] == 1024
        assert coarse[2].shape == fine[2].shape
        for lvl in range(s.n_native):
            ds = s.info.levels[lvl].downsample
            y, x = 37, 211
            h, w = min(181, fine[lvl].shape[0] - y), min(530, fine[lvl].shape[1] - x)
            ref = _osr_rgb(osr, (int(x * ds), int(y * ds)), lvl, (w, h))
            window = fine[lvl][y:y + h, x:x + w]
            (graph,) = dask.compute(window, scheduler="sync")  # one task per tile
            np.testing.assert_array_equal(window.compute(), ref)
            np.testing.assert_array_equal(graph, ref)
            np.testing.assert_array_equal(coarse[lvl][y:y + h, x:x + w].compute(), ref)
            # element-wise work keeps the coarse chunking and the pixels
            doubled = (coarse[lvl].astype(np.uint16) * 2)[y:y + h, x:x + w].compute()
            np.testing.assert_array_equal(doubled, ref.astype(np.uint16) * 2)
    osr.close()


def test_iter_tiles_scans_in_order_without_filling_the_cache(svs):
    with open_slide(svs.path, cache=TileCache(64 * 2**20)) as s:
        rows, cols = s.info.levels[0].grid
        got = list(s.iter_tiles(0, threads=2))
        assert [(r, c) for r, c, _ in got] == [(r, c) for r in range(rows) for c in range(cols)]
        assert len(s.cache) == 0  # a scan does not evict what a viewer shows
        for r, c, t in got[:: max(1, len(got) // 7)] + got[-1:]:  # edge tile included
            np.testing.assert_array_equal(t, s.tile(0, r, c))
        block = list(s.iter_tiles(1, rows=range(1, 3), cols=range(2, 4), cache=True))
        assert [(r, c) for r, c, _ in block] == [(1, 2), (1, 3), (2, 2), (2, 3)]
        assert len(s.cache) >= 4


def test_tile_and_read_can_leave_the_cache_alone(svs):
    """``tile(cache=False)`` and ``read(keep=...)`` give the same pixels; only the tiles
    ``keep`` picks enter the cache; a cached tile is used either way."""
    with open_slide(svs.path, cache=TileCache(64 * 2**20)) as s:
        t = s.tile(0, 1, 1, cache=False)
        assert len(s.cache) == 0 and not t.flags.writeable
        picked = []

        def keep(r, c):
            picked.append((r, c))
            return (r, c) == (0, 1)

        region = s.read(0, 100, 100, 300, 300, keep=keep)  # tiles (0..1, 0..1)
        assert sorted(picked) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert [k[1:] for k in s.cache._items] == [(0, 0, 1)]
        np.testing.assert_array_equal(region, s.read(0, 100, 100, 300, 300))
        np.testing.assert_array_equal(t, s.tile(0, 1, 1))
        assert s.tile(0, 0, 1, cache=False) is s.tile(0, 0, 1)  # the cached one


def test_non_integer_downsample_levels_stay_aligned(odd_svs):
    """2001 x 1533 gives downsamples like 4.0014: OpenSlide's read_region then resamples
    by a sub-pixel offset, so equality is impossible; we serve the stored tiles and stay
    within JPEG/resampling noise of OpenSlide, with no shift."""
    osr = openslide.OpenSlide(str(odd_svs.path))
    with open_slide(odd_svs.path) as s:
        assert s.info.levels[0].tile == (240, 240)
        _assert_pyramid(s)
        for lvl in range(1, s.n_native):
            h, w = s.info.levels[lvl].shape
            ds = s.info.levels[lvl].downsample
            assert ds != int(ds)
            ours = s.to_dask()[lvl].compute().astype(int)
            ref = _osr_rgb(osr, (0, 0), lvl, (w, h)).astype(int)
            assert np.abs(ours - ref).mean() < 3.0
            # a one-pixel shift would be much worse than noise
            shifted = np.abs(ours[:, 1:] - ref[:, :-1]).mean()
            assert np.abs(ours - ref).mean() < shifted
    osr.close()


def test_generic_tiff_mpp_from_resolution(generic_tiff, svs):
    with open_slide(generic_tiff) as s, open_slide(svs.path) as ref:
        assert s.info.vendor == "generic-tiff"
        assert s.info.mpp == pytest.approx((0.25, 0.25))
        assert s.info.mpp_source == "tiff-resolution"
        assert s.info.levels[0].tile == (128, 128)
        _assert_pyramid(s)
        a = s.to_dask()[0][300:700, 500:900].compute().astype(int)
        b = ref.to_dask()[0][300:700, 500:900].compute().astype(int)
        assert np.abs(a - b).mean() < 4  # re-encoded JPEG of the same pixels


def test_ome_zarr_levels_match_svs(svs):
    assert svs.zarr_path is not None
    with open_slide(svs.zarr_path) as z, open_slide(svs.path) as s:
        assert z.info.vendor == "ome-zarr"
        assert z.info.mpp == pytest.approx((0.25, 0.25))
        assert [lv.shape for lv in z.info.levels[: z.n_native]] == \
            [lv.shape for lv in s.info.levels[: s.n_native]]
        _assert_pyramid(z)
        for lvl in range(z.n_native):
            a = z.to_dask()[lvl][:300, :300].compute().astype(int)
            b = s.to_dask()[lvl][:300, :300].compute().astype(int)
            assert np.abs(a - b).mean() < 4


def test_real_aperio_slide(real_svs):
    """CMU-1-Small-Region: one level of 240-px JPEG tiles; we add lazy levels below it."""
    osr = openslide.OpenSlide(str(real_svs))
    with open_slide(real_svs) as s:
        assert s.info.vendor == "aperio"
        assert s.info.dimensions == (2220, 2967)
        assert s.info.mpp == pytest.approx((0.499, 0.499))
        assert s.info.objective_power == 20
        assert set(s.info.associated) == {"label", "macro", "thumbnail"}
        assert s.n_native == 1 and len(s.info.levels) >= 2
        assert s.info.levels[0].tile == (240, 240)
        _assert_pyramid(s)
        lv0 = s.to_dask()[0]
        np.testing.assert_array_equal(lv0[1000:1500, 700:1300].compute(),
                                      _osr_rgb(osr, (700, 1000), 0, (600, 500)))
        # a derived level is the 2x box mean of the level above
        full = lv0.compute().astype(np.uint32)
        lv1 = s.to_dask()[1].compute()
        pad = np.pad(full, ((0, full.shape[0] % 2), (0, full.shape[1] % 2), (0, 0)), mode="edge")
        blocks = pad.reshape(pad.shape[0] // 2, 2, pad.shape[1] // 2, 2, 3)
        expect = (blocks.sum(axis=(1, 3)) + 2) // 4
        np.testing.assert_array_equal(lv1, expect.astype(np.uint8))
        thumb = s.associated_image("thumbnail")
        assert thumb.shape[2] == 3 and thumb.dtype == np.uint8
    osr.close()


def test_single_level_giant_gets_lazy_pyramid(tmp_path):
    """A 12,000 x 9,000 single-level TIFF: levels are derived, and opening reads no pixels."""
    path = tmp_path / "flat.tif"
    tile = np.full((256, 256, 3), (200, 120, 160), np.uint8)
    h, w = 9000, 12000

    def tiles():
        for _ in range(-(-h // 256) * -(-w // 256)):
            yield tile

    tifffile.imwrite(path, tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(256, 256),
                     compression="jpeg", photometric="rgb", metadata=None)
    cache = TileCache(64 * 2**20)
    with open_slide(path, cache=cache) as s:
        assert s.n_native == 1
        assert [lv.shape for lv in s.info.levels][1:] == [(4500, 6000), (2250, 3000),
                                                          (1125, 1500), (563, 750)]
        assert all(lv.derived for lv in s.info.levels[1:])
        assert cache.misses == 0 and len(cache) == 0  # nothing read to open it
        assert s.info.mpp is None and s.info.mpp_source == "none"
        assert s.info.scale(2) == (4.0, 4.0)  # pixel units
        corner = s.to_dask()[-1][:64, :64].compute()
        assert np.abs(corner.astype(int) - (200, 120, 160)).max() <= 6


def test_tile_cache_is_bounded_lru():
    cache = TileCache(3 * 1000)
    arrs = {k: np.zeros(1000, np.uint8) for k in "abcd"}
    for k in "abc":
        cache.put(k, arrs[k])
    assert cache.get("a") is arrs["a"]  # a becomes most recent
    cache.put("d", arrs["d"])
    assert cache.get("b") is None  # the least recently used went
    assert cache.nbytes == 3000 and len(cache) == 3
    cache.resize(1000)
    assert len(cache) == 1 and cache.get("d") is not None  # d was the most recent
    with pytest.raises(ValueError):
        arrs["d"][0] = 1  # cached tiles are shared, hence read-only
    cache.put("huge", np.zeros(5000, np.uint8))
    assert cache.get("huge") is None


def test_slide_respects_cache_size(svs):
    cache = TileCache(4 * 256 * 256 * 3)
    with open_slide(svs.path, cache=cache) as s:
        s.to_dask()[0].compute()
        rows, cols = s.info.levels[0].grid
        assert cache.nbytes <= cache.capacity and 4 <= len(cache) < rows * cols


def test_concurrent_tile_reads_from_threads(svs):
    """Many threads hammering one slide (no cache) get exactly the single-thread pixels."""
    with open_slide(svs.path, cache=TileCache(0)) as s:
        rows, cols = s.info.levels[0].grid
        keys = [(r, c) for r in range(rows) for c in range(cols)] * 3
        ref = {k: s.tile(0, *k).copy() for k in keys[: rows * cols]}
        errors = []
        barrier = threading.Barrier(8)

        def worker(chunk):
            barrier.wait()
            for k in chunk:
                if not np.array_equal(s.tile(0, *k), ref[k]):
                    errors.append(k)

        with ThreadPoolExecutor(8) as ex:
            list(ex.map(worker, [keys[i::8] for i in range(8)]))
        assert not errors
        assert s.bad_tiles == 0


def test_mpp_override_is_remembered(odd_svs, tmp_path):
    import shutil

    copy = tmp_path / "nompp.svs"
    shutil.copy(odd_svs.path, copy)
    with open_slide(copy, mpp=0.26) as s:
        assert s.info.mpp == (0.26, 0.26) and s.info.mpp_source == "user"
    with open_slide(copy) as s:  # remembered per file
        assert s.info.mpp_source == "user" and s.info.mpp == (0.26, 0.26)
    with open_slide(odd_svs.path) as s:  # another file is not affected
        assert s.info.mpp_source == "vendor"
    with pytest.raises(SlideError, match="positive"):
        open_slide(copy, mpp=-1, remember_mpp=False)


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.svs"
    with pytest.raises(SlideError, match=r"nope\.svs: no such file"):
        open_slide(missing)
