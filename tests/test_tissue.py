"""Tissue mask and patch grid on synthetic slides with a known lesion (real OpenSlide)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from napari_milview.slide import open_slide
from napari_milview.tissue import (
    PatchGrid,
    TissueMask,
    patch_grid,
    read_patch,
    read_patches,
    resize_box,
    tile_order,
    tile_uses,
    tissue_mask,
)


@pytest.fixture(scope="module")
def slide(svs):
    with open_slide(svs.path) as s:
        yield s


def _write_tiff(path, img, mpp=None):
    kw = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp),
                                 "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, img, tile=(256, 256), compression="jpeg", photometric="rgb",
                     metadata=None, **kw)
    return path


@pytest.fixture(scope="module")
def blank_tif(tmp_path_factory):
    """All-white glass (240 +- 3, JPEG) with mpp 0.5, no tissue at all."""
    rng = np.random.default_rng(0)
    img = (240 + rng.integers(-3, 4, (1536, 2048, 3))).astype(np.uint8)
    return _write_tiff(tmp_path_factory.mktemp("blank") / "blank.tif", img, mpp=0.5)


@pytest.fixture(scope="module")
def nompp_tif(tmp_path_factory, svs):
    """Level 1 of ``svs`` as a generic TIFF without any resolution tag (mpp unknown)."""
    with open_slide(svs.path) as s:
        h, w = s.info.levels[1].shape
        img = s.read(1, 0, 0, h, w)
    return _write_tiff(tmp_path_factory.mktemp("nompp") / "nompp.tif", img)


def _gt_not_white(slide, m: TissueMask) -> np.ndarray:
    h, w = m.mask.shape
    return slide.read(m.level, 0, 0, h, w).min(axis=2) < 225


# ------------------------------------------------------------------------------ mask
def test_mask_covers_tissue_not_background(slide):
    m = tissue_mask(slide)
    assert m.level == 2 and m.downsample == 16.0  # nearest 32 on (1, 4, 16); tie -> coarser
    assert m.mask.shape == slide.info.levels[2].shape and m.mask.dtype == bool
    gt = _gt_not_white(slide, m)
    assert (m.mask == gt).mean() > 0.95
    assert m.mask[gt].mean() > 0.97  # tissue is covered
    far = ~ndimage.binary_fill_holes(ndimage.binary_dilation(gt, iterations=3))  # glass
    assert far.sum() > 1000 and not m.mask[far].any()
    assert m.fraction() == pytest.approx(m.mask.mean()) and 0.3 < m.fraction() < 0.7
    assert 8 <= m.threshold <= 30


def test_mask_level_and_given_threshold(slide):
    m = tissue_mask(slide, target_downsample=4)
    assert m.level == 1 and m.mask.shape == slide.info.levels[1].shape
    hi = tissue_mask(slide, threshold=200, min_area_um2=0, fill_holes_smaller_than=0)
    assert hi.threshold == 200 and hi.fraction() < 0.5 * tissue_mask(slide).fraction()


def test_ink_and_dark_are_not_tissue(tmp_path, slide):
    h, w = slide.info.levels[1].shape
    img = slide.read(1, 0, 0, h, w).copy()
    bg = img.min(axis=2) > 232
    yy, xx = np.mgrid[0:h, 0:w]
    green = bg & (np.abs(yy - xx * h / w) < 10)  # a green pen stroke across the background
    img[green] = (60, 160, 90)
    black = bg & ((yy - 40) ** 2 + (xx - 60) ** 2 < 30 ** 2)  # a black blob (ink, padding)
    img[black] = (12, 8, 10)
    assert green.sum() > 2000 and black.sum() > 1000
    with open_slide(_write_tiff(tmp_path / "ink.tif", img, mpp=1.0)) as s:
        m = tissue_mask(s, target_downsample=1)
        keep = tissue_mask(s, target_downsample=1, exclude_ink=False)
    assert m.mask[green].mean() < 0.05 and m.mask[black].mean() < 0.05
    assert keep.mask[green].mean() > 0.5 and keep.mask[black].mean() > 0.5


def test_blank_slide_gives_empty_grid_and_note(blank_tif):
    with open_slide(blank_tif) as s:
        m = tissue_mask(s)
        assert not m.mask.any() and m.fraction() == 0.0
        assert any(n.startswith("no tissue found: blank slide") for n in m.notes)
        for min_tissue in (0.25, 0.0):
            g = patch_grid(s, min_tissue=min_tissue)
            assert len(g) == 0 and g.coords.shape == (0, 2) and g.coords.dtype == np.int64
            assert g.tissue_fraction.shape == (0,)
            assert any("no tissue" in n for n in g.notes)


# ------------------------------------------------------------------------------ grid
def test_grid_anchor_step_bounds(slide):
    h0, w0 = slide.info.levels[0].shape
    for overlap in (0.0, 0.5):
        g = patch_grid(slide, mag=20, overlap=overlap, min_tissue=0)
        ps, st = g.patch_size_level0, g.step_level0
        assert ps == 512 and st == round(512 * (1 - overlap))
        xs = np.arange(0, w0 - ps + 1, st)
        ys = np.arange(0, h0 - ps + 1, st)
        # min_tissue=0 keeps every patch fully inside level 0, anchored at (0, 0), row-major
        want = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
        np.testing.assert_array_equal(g.coords, want)
        assert (g.coords % st == 0).all() and g.coords.min() == 0
        assert (g.coords[:, 0] + ps <= w0).all() and (g.coords[:, 1] + ps <= h0).all()
        assert xs[-1] + st + ps > w0 and ys[-1] + st + ps > h0  # no in-bounds patch missed


def test_keep_rule_and_fractions(slide):
    m = tissue_mask(slide)
    full = np.repeat(np.repeat(m.mask, 16, axis=0), 16, axis=1)  # level-0 resolution
    g0 = patch_grid(slide, mag=None, patch_px=200, min_tissue=0, mask=m)  # not on mask pixels
    want = np.array([full[y:y + 200, x:x + 200].mean() for x, y in g0.coords])
    np.testing.assert_allclose(g0.tissue_fraction, want, atol=1e-5)
    g = patch_grid(slide, mag=None, patch_px=200, mask=m)
    g1 = patch_grid(slide, mag=None, patch_px=200, min_tissue=1.0, mask=m)
    assert len(g1) < len(g) < len(g0)
    np.testing.assert_array_equal(g.coords, g0.coords[want >= 0.25 - 1e-9])
    assert (g.tissue_fraction >= 0.25).all() and (g1.tissue_fraction == 1.0).all()
    assert g.tissue_fraction.dtype == np.float32
    assert len(g1) == int((want >= 1.0 - 1e-9).sum())


def test_mag_and_patch_um_agree(slide):
    a = patch_grid(slide, patch_px=256, mag=20)
    b = patch_grid(slide, patch_px=256, mag=None, patch_um=128)
    c = patch_grid(slide, patch_px=256, mag=40, patch_um=128)  # patch_um wins over mag
    for g in (b, c):
        np.testing.assert_array_equal(g.coords, a.coords)
        assert (g.patch_size_level0, g.read_level, g.read_size, g.target_mpp) == \
               (a.patch_size_level0, a.read_level, a.read_size, a.target_mpp)
    assert a.patch_size_level0 == 512 and a.target_mpp == 0.5 and a.mpp == 0.25
    assert isinstance(a, PatchGrid) and len(a) > 0
    assert patch_grid(slide, patch_px=224, mag=10).patch_size_level0 == round(224 * 1.0 / 0.25)


def test_no_mpp_warns_pixel_units(nompp_tif):
    with open_slide(nompp_tif) as s:
        assert s.info.mpp is None
        with pytest.warns(UserWarning, match="pixel units") as rec:
            g = patch_grid(s, patch_px=64, mag=20)
    assert str(nompp_tif) in str(rec[0].message)
    assert g.patch_size_level0 == 64 and g.mpp is None and g.target_mpp is None
    assert g.read_level == 0 and g.read_size == 64 and len(g) > 0


def test_bad_arguments_name_the_file(slide):
    for kw in ({"overlap": 1.0}, {"min_tissue": 1.5}, {"mag": 0}, {"patch_px": 0},
               {"patch_um": -3}):
        with pytest.raises(ValueError, match=str(slide.path)):
            patch_grid(slide, **kw)
    with pytest.raises(ValueError, match="median must be odd"):
        tissue_mask(slide, median=4)
    other = TissueMask(np.ones((10, 10), bool), 0, 16.0, 8.0)
    with pytest.raises(ValueError, match="does not cover"):
        patch_grid(slide, mask=other)


# ---------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("mag, px, level, size", [(20, 256, 0, 512), (5, 256, 1, 512),
                                                  (2.5, 128, 2, 128)])
def test_read_patch_equals_openslide(svs, slide, mag, px, level, size):
    import openslide

    g = patch_grid(slide, patch_px=px, mag=mag)
    assert (g.read_level, g.read_size) == (level, size)
    osr = openslide.OpenSlide(str(svs.path))
    try:
        for i in (0, len(g) // 2, len(g) - 1):
            x, y = (int(v) for v in g.coords[i])
            ref = osr.read_region((x, y), level, (size, size)).convert("RGB")
            if size != px:  # whole multiples here: the exact rounded block mean
                assert size % px == 0
                ref = ref.reduce(size // px)
            np.testing.assert_array_equal(read_patch(slide, g, i), np.asarray(ref))
    finally:
        osr.close()


def test_read_patch_without_resize_is_level0(slide):
    g = patch_grid(slide, patch_px=256, mag=40)
    assert g.patch_size_level0 == 256 and (g.read_level, g.read_size) == (0, 256)
    idx = np.arange(0, len(g), 7)
    batch = read_patches(slide, g, idx)
    assert batch.shape == (len(idx), 256, 256, 3) and batch.dtype == np.uint8
    for k, i in enumerate(idx):
        x, y = g.coords[i]
        np.testing.assert_array_equal(batch[k], slide.read(0, y, x, 256, 256))


@pytest.mark.parametrize("mag, px, shift", [
    (10, 64, 0),     # 64 read px in 256-px tiles: whole 4 x 4 blocks per tile
    (10, 64, 40),    # off the tiles' sub-grid: one-tile cuts and patches straddling tiles
    (5, 48, 0),      # 96 read px resized to 48: one-tile cuts and strips, box-resized
    (2.5, 100, 12),  # a side that does not divide the tile, on a coarser level
])
def test_read_patches_equals_read_patch_in_any_order(slide, mag, px, shift):
    """Every path of read_patches (tile blocks, one-tile cuts, strips, edge tiles, resizing)
    gives read_patch's pixels, in whatever order and with repeats."""
    import dataclasses

    g = patch_grid(slide, patch_px=px, mag=mag, min_tissue=0.0)
    g = dataclasses.replace(g, coords=g.coords + shift)
    rng = np.random.default_rng(1)
    idx = np.concatenate([rng.permutation(len(g))[:150], [len(g) - 1, 0, 0]])
    batch = read_patches(slide, g, idx)
    assert batch.shape == (len(idx), px, px, 3)
    for k, i in enumerate(idx):
        np.testing.assert_array_equal(batch[k], read_patch(slide, g, int(i)), err_msg=f"{i}")


@pytest.mark.parametrize("mag, px, shift", [
    (10, 64, 0),    # whole 4 x 4 blocks per 256-px tile
    (10, 64, 40),   # off the tiles' sub-grid: one-tile cuts and strips
    (20, 256, 0),   # 20x on 40x: 512-px strips over 2 x 2 tiles, resized
    (20, 256, 100),  # the same, straddling: neighbouring strips share tiles
])
def test_extraction_reads_each_tile_once_and_keeps_only_shared_ones(svs, mag, px, shift):
    """An extraction pass (tile-order batches with ``uses``) gives the cached pass's pixels,
    decodes each tile once, and leaves in the cache only tiles that patches of another read
    (group or strip) also touch."""
    import dataclasses

    from napari_milview.slide.cache import TileCache

    def run(extraction):
        with open_slide(svs.path, cache=TileCache(1 << 30)) as s:
            g = patch_grid(s, patch_px=px, mag=mag, min_tissue=0.0)
            g = dataclasses.replace(g, coords=g.coords + shift)
            order, uses = tile_order(s, g), tile_uses(s, g)
            decoded = []
            decode = s._decode_tile
            s._decode_tile = lambda *key: decoded.append(key) or decode(*key)
            batches = [order[i:i + 37] for i in range(0, len(order), 37)]
            pix = np.concatenate([read_patches(s, g, b, uses=uses if extraction else None)
                                  for b in batches])
            kept = {k[1:] for k in s.cache._items if k[0] == s._key}
            return pix, decoded, kept, uses

    pix, decoded, kept, uses = run(False)
    pix_u, decoded_u, kept_u, _ = run(True)
    np.testing.assert_array_equal(pix_u, pix)
    assert len(decoded_u) == len(set(decoded_u)) == len(set(decoded))
    level = decoded_u[0][0]
    shared = {k for k in kept if k[0] == level and uses[k[1], k[2]] > 1}
    assert kept_u <= kept and {k for k in kept_u if k[0] == level} <= shared
    if any(uses[r, c] == 1 for _, r, c in decoded_u):  # tiles one patch needs: not kept
        assert kept_u < kept
    if (mag, shift) == (20, 0):  # aligned strips: no tile is shared, none is kept
        assert not shared and not {k for k in kept_u if k[0] == level}


def test_tile_uses_counts_the_patches_on_each_tile(svs, slide):
    g = patch_grid(slide, patch_px=256, mag=20, min_tissue=0.0)  # 512 px on 256-px tiles
    uses = tile_uses(slide, g)
    assert uses.shape == slide.info.levels[g.read_level].grid
    ly, lx = g.coords[:, 1], g.coords[:, 0]
    expect = np.zeros_like(uses)
    for y, x in zip(ly.tolist(), lx.tolist()):
        expect[y // 256:(y + 511) // 256 + 1, x // 256:(x + 511) // 256 + 1] += 1
    np.testing.assert_array_equal(uses, expect)
    assert uses.max() == 1  # an aligned 512-px grid: every tile under one patch at most


@pytest.mark.parametrize("side, size", [(512, 256), (256, 64), (96, 32), (100, 48)])
def test_resize_box_is_the_block_mean(side, size):
    """Whole multiples: each pixel the mean of its f x f block, rounded half up (exactly for
    f = 2, 4; within one level for f = 3); other ratios: Pillow's BOX filter; the same side:
    the same array."""
    img = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = resize_box(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    if side % size == 0:
        f = side // size
        blocks = img.reshape(size, f, size, f, 3).astype(np.int64).sum(axis=(1, 3))
        mean = (blocks + f * f // 2) // (f * f)
        if f in (2, 4):
            np.testing.assert_array_equal(out, mean)
        else:
            assert np.abs(out.astype(np.int64) - mean).max() <= 1
    else:
        ref = Image.fromarray(img).resize((size, size), Image.BOX)
        np.testing.assert_array_equal(out, np.asarray(ref))
    assert resize_box(img, side) is img


def test_tile_order_groups_patches_by_tile(slide):
    g = patch_grid(slide, patch_px=64, mag=10, min_tissue=0.0)
    order = tile_order(slide, g)
    np.testing.assert_array_equal(np.sort(order), np.arange(len(g)))
    th, tw = slide.info.levels[g.read_level].tile
    ds = slide.info.levels[g.read_level].downsample
    tiles = [(int(y / ds) // th, int(x / ds) // tw) for x, y in g.coords[order]]
    assert tiles == sorted(tiles)  # tiles row-major, each tile's patches together
    assert len(set(tiles)) < len(g) // 4  # about 16 patches per 256-px tile here


def test_lesion_patches_land_on_the_lesion(svs, slide):
    """Patches the ground truth calls lesion look like lesion; a one-patch shift breaks it."""
    lesion = np.asarray(Image.open(svs.mask_path)) > 0
    d = svs.mask_downsample
    g = patch_grid(slide, patch_px=256, mag=40, min_tissue=0.9)
    ps = g.patch_size_level0
    assert ps % d == 0 and len(g) > 50
    pix = read_patches(slide, g, np.arange(len(g))).astype(np.float32)
    purple = pix[..., 2].mean(axis=(1, 2)) - pix[..., 0].mean(axis=(1, 2))  # lesion is purple

    def truth(coords):
        out = np.full(len(coords), np.nan)
        for k, (x, y) in enumerate(coords):
            blk = lesion[y // d:(y + ps) // d, x // d:(x + ps) // d]
            if x >= 0 and y >= 0 and blk.size == (ps // d) ** 2:
                out[k] = blk.mean()
        return out

    def corr(shift):
        t = truth(g.coords + np.asarray(shift) * g.step_level0)
        ok = ~np.isnan(t)
        return np.corrcoef(t[ok], purple[ok])[0, 1]

    t = truth(g.coords)
    assert (t == 1).sum() >= 5 and purple[t == 1].min() > purple[t == 0].max()
    right = corr((0, 0))
    shifted = max(corr(s) for s in ((1, 0), (-1, 0), (0, 1), (0, -1)))
    assert right > 0.85 and right > shifted + 0.1
