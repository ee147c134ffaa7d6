"""Heatmap grid and layer: values land on the right cells, the layer sits on the slide.

The one-patch-shift tests plant a high score on one patch and check that the heatmap and the
top-K rectangle land exactly on that patch's level-0 rectangle; the viewer test checks the same
with napari's own transforms and pixel lookup against the slide layer the reader makes.
"""

import warnings

import numpy as np
import pytest

from napari_milview.overlay.heatmap import (
    heatmap_grid,
    heatmap_layer,
    level0_to_world,
    value_at,
    world_to_level0,
)
from napari_milview.overlay.topk import patch_rectangles, select, topk_layer
from napari_milview.result import Result

MPP = 0.25
PS = 256


def _lattice(x0, y0, step, nx, ny):
    xs, ys = np.meshgrid(np.arange(nx) * step + x0, np.arange(ny) * step + y0)
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)


def _result(coords, scores, mpp=MPP, ps=PS):
    scores = np.asarray(scores, np.float32)
    return Result(coords=coords, patch_size_level0=ps,
                  sources={"attention": scores, "raw/attention": np.log(scores + 1e-3)},
                  default_source="attention", classes=["a", "b"], logits=[0.0, 1.0],
                  probabilities=[0.27, 0.73], arch="abmil", mpp=mpp)


def _world_rect_of_cell(i, j, kwargs):
    """World (row, col) edges [top, left, bottom, right] of grid cell (i, j) under napari's
    pixel-centre convention (pixel k spans [k - 1/2, k + 1/2] in data coordinates)."""
    (sr, sc), (tr, tc) = kwargs["scale"], kwargs["translate"]
    return np.array([tr + (i - 0.5) * sr, tc + (j - 0.5) * sc,
                     tr + (i + 0.5) * sr, tc + (j + 0.5) * sc])


# -------------------------------------------------------------------------------- the grid
def test_grid_is_one_cell_per_step_and_averages_overlaps():
    coords = np.array([[100, 50], [228, 50], [100, 178], [356, 306]])
    grid, origin, cell = heatmap_grid(coords, 256, 128, np.array([1.0, 2.0, 3.0, 4.0]))
    assert origin == (100, 50) and cell == 128 and grid.dtype == np.float32
    nan = np.nan
    np.testing.assert_allclose(grid, [[1, 1.5, 2, nan], [2, 2, 2, nan], [3, 3, 4, 4],
                                      [nan, nan, 4, 4]])


def test_grid_infers_the_step_and_skips_nan_scores():
    coords = _lattice(16, 48, 256, 5, 4)
    vals = np.arange(20, dtype=float)
    vals[7] = np.nan
    grid, origin, cell = heatmap_grid(coords, 256, None, vals)
    assert (origin, cell, grid.shape) == ((16, 48), 256, (4, 5))
    np.testing.assert_array_equal(np.isnan(grid).ravel(), np.isnan(vals))
    np.testing.assert_array_equal(grid.ravel()[~np.isnan(vals)], vals[~np.isnan(vals)])
    # a missing patch is NaN, not 0
    g2, _, _ = heatmap_grid(coords[:-1], 256, None, vals[:-1])
    assert np.isnan(g2[-1, -1])


def test_grid_origin_at_the_slide_corner():
    coords = _lattice(512, 256, 256, 2, 2)
    grid, origin, cell = heatmap_grid(coords, 256, None, np.ones(4), origin_level0=(0, 0))
    assert origin == (0, 0) and cell == 256 and grid.shape == (3, 4)
    assert np.isnan(grid[0]).all() and np.isnan(grid[:, :2]).all() and (grid[1:, 2:] == 1).all()
    with pytest.raises(ValueError, match="right of or below"):
        heatmap_grid(coords, 256, None, np.ones(4), origin_level0=(600, 0))


def test_off_lattice_patches_are_snapped_with_a_warning():
    coords = np.array([[0, 0], [100003, 0], [7, 50001]])  # offsets share no lattice
    with pytest.warns(UserWarning, match="drawn on .*-pixel cells"):
        grid, _, cell = heatmap_grid(coords, 256, None, np.array([1.0, 2.0, 3.0]),
                                     max_cells=10_000)
    assert grid.size <= 10_000 and cell > 1
    assert np.nanmax(grid) == 3.0 and np.nanmin(grid) == 1.0


def test_grid_input_errors():
    with pytest.raises(ValueError, match=r"coords must be \[N, 2\]"):
        heatmap_grid(np.zeros((0, 2)), 256, None, np.zeros(0))
    with pytest.raises(ValueError, match="3 values for 2 patches"):
        heatmap_grid(np.zeros((2, 2)), 256, None, np.zeros(3))
    with pytest.raises(ValueError, match="patch_size_level0"):
        heatmap_grid(np.zeros((2, 2)), 0, None, np.zeros(2))


# ----------------------------------------------------------------------- one-patch shift
@pytest.mark.parametrize("mpp", [MPP, None])
def test_one_patch_shift_heatmap_and_topk_land_on_the_planted_patch(mpp):
    coords = _lattice(37, 53, PS, 9, 7)  # odd origin: no lucky zero
    planted = 31
    scores = np.full(len(coords), 0.01)
    scores[planted] = 0.9
    r = _result(coords, scores, mpp=mpp)
    grid, kw, kind = heatmap_layer(r, "attention", "raw")
    assert kind == "image"
    i, j = np.unravel_index(np.nanargmax(grid), grid.shape)
    # the cell maps back to exactly the planted patch's level-0 rectangle
    x0, y0 = kw["metadata"]["origin_level0"]
    cell = kw["metadata"]["cell_level0"]
    assert cell == PS
    assert (x0 + j * cell, y0 + i * cell) == tuple(coords[planted])
    # and in world units it coincides with the patch rectangle the top-K layer draws
    rects, tkw, _ = topk_layer(r, select(r.attention(), 1), "attention")
    top, left = rects[0].min(0)
    bottom, right = rects[0].max(0)
    np.testing.assert_allclose(_world_rect_of_cell(i, j, kw), [top, left, bottom, right],
                               atol=1e-9)
    f = 1.0 if mpp is None else mpp
    x, y = coords[planted]
    np.testing.assert_allclose([top, left, bottom, right],
                               [(y - 0.5) * f, (x - 0.5) * f, (y + PS - 0.5) * f,
                                (x + PS - 0.5) * f])
    assert tkw["features"]["index"].tolist() == [planted]


def test_one_patch_shift_with_overlapping_patches():
    coords = _lattice(37, 53, PS // 2, 12, 10)  # 50 % overlap: cells of 128 px
    planted = 45
    scores = np.zeros(len(coords))
    scores[planted] = 1.0
    r = _result(coords, scores)
    grid, kw, _ = heatmap_layer(r, "attention", "raw")
    assert kw["metadata"]["cell_level0"] == PS // 2
    lit = np.argwhere(grid > 0)
    x0, y0 = kw["metadata"]["origin_level0"]
    c = PS // 2
    # exactly the 2 x 2 cells the planted patch covers, nothing beside them
    x, y = coords[planted]
    assert {(y0 + i * c, x0 + j * c) for i, j in lit} == {(y, x), (y, x + c), (y + c, x),
                                                         (y + c, x + c)}
    world = _world_rect_of_cell(lit[:, 0].min(), lit[:, 1].min(), kw)
    assert world[:2] == pytest.approx(patch_rectangles(coords[[planted]], PS, MPP)[0, 0])


# --------------------------------------------------------------------------- the layer
def test_layer_kwargs_per_method():
    coords = _lattice(0, 0, PS, 4, 3)
    scores = np.linspace(0.01, 0.2, 12)
    r = _result(coords, scores)
    grid, kw, _ = heatmap_layer(r, None, "rank", colormap="turbo", opacity=0.4,
                                interpolation="linear")
    assert kw["contrast_limits"] == (0.0, 1.0)
    assert (kw["colormap"], kw["opacity"], kw["interpolation2d"]) == ("turbo", 0.4, "linear")
    assert kw["units"] == ("um", "um")
    assert kw["scale"] == (PS * MPP, PS * MPP)
    assert kw["translate"] == pytest.approx(((PS / 2 - 0.5) * MPP, (PS / 2 - 0.5) * MPP))
    np.testing.assert_allclose(np.sort(grid.ravel()), np.arange(1, 13) / 12, rtol=1e-6)
    # the raw scores stay available for hover, whatever the display normalisation
    np.testing.assert_allclose(kw["metadata"]["raw_grid"].ravel(), scores, rtol=1e-6)
    _, kw_raw, _ = heatmap_layer(r, "raw/attention", "raw")
    lo, hi = kw_raw["contrast_limits"]
    assert lo == pytest.approx(np.log(0.011), rel=1e-5) and hi == pytest.approx(np.log(0.201))
    _, kw_fix, _ = heatmap_layer(r, None, "fixed", vmin=0.0, vmax=0.1)
    assert kw_fix["contrast_limits"] == (0.0, 0.1)
    _, kw_px, _ = heatmap_layer(_result(coords, scores, mpp=None), None, "raw")
    assert "units" not in kw_px and kw_px["scale"] == (PS, PS)
    with pytest.raises(KeyError, match="no attention source"):
        heatmap_layer(r, "nope", "raw")
    with pytest.raises(ValueError, match="unknown normalisation"):
        heatmap_layer(r, None, "zscore")


def test_value_at_and_world_conversions():
    coords = np.array([[0, 0], [128, 0]])  # overlap on x in [128, 256)
    r = _result(coords, [0.2, 0.6])
    assert value_at(r, None, (10, 10)) == pytest.approx(0.2)
    assert value_at(r, None, (200, 10)) == pytest.approx(0.4)  # mean of both
    assert value_at(r, None, (383.9, 255.9)) == pytest.approx(0.6)
    assert value_at(r, None, (384, 10)) is None and value_at(r, None, (10, 256)) is None
    assert value_at(r, "raw/attention", (10, 10)) == pytest.approx(np.log(0.201))
    # world <-> level 0 round trip; level-0 pixel (x, y)'s centre is world (y, x) * mpp
    assert level0_to_world((10.5, 20.5), MPP) == pytest.approx((20 * MPP, 10 * MPP))
    assert world_to_level0(level0_to_world((3.25, 7.75), MPP), MPP) == pytest.approx((3.25, 7.75))
    assert world_to_level0((20.0, 10.0), None) == (10.5, 20.5)


def _steps_to_recolour(n_x: int, n_y: int, method: str) -> int:
    """Python lines run and C functions called by ``heatmap_layer`` for an n_x x n_y lattice."""
    import sys

    rng = np.random.default_rng(0)
    r = _result(_lattice(0, 0, PS, n_x, n_y), rng.random(n_x * n_y))
    heatmap_layer(r, None, "rank")  # first use (imports, caches) outside the count
    steps = [0]

    def line(frame, event, arg):
        steps[0] += event == "line"
        return line

    def call(frame, event, arg):
        steps[0] += event == "c_call"

    tracer, profiler = sys.gettrace(), sys.getprofile()
    sys.settrace(line)
    sys.setprofile(call)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            heatmap_layer(r, "raw/attention", method)
    finally:
        sys.setprofile(profiler)
        sys.settrace(tracer)
    return steps[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["raw", "minmax", "rank", "softmax", "attention_x_n"])
def test_recolour_is_vectorised(method):
    """Not a benchmark (bench/overlay.py is): a per-patch Python loop shows as lines and calls
    that grow with the patches (100 -> 100,000 here); an O(N^2) array would not fit in memory
    (N = 100,000), and the timeout stops anything that hangs."""
    small, large = _steps_to_recolour(10, 10, method), _steps_to_recolour(400, 250, method)
    assert small > 0 and large == small, (method, small, large)


# ---------------------------------------------------------------- a real napari viewer
@pytest.mark.gui
def test_heatmap_and_topk_align_with_the_slide_in_napari(make_napari_viewer, svs):
    viewer = make_napari_viewer()
    [slide] = viewer.open(str(svs.path), plugin="napari-milview")
    coords = _lattice(37, 53, PS, 15, 11)
    planted = 80
    scores = np.full(len(coords), 0.1)
    scores[planted] = 0.9
    r = _result(coords, scores, mpp=svs.mpp)
    data, kw, _ = heatmap_layer(r, None, "raw", mpp=slide.metadata["mpp"][0])
    hm = viewer.add_image(data, **kw)
    rects, tkw, _ = topk_layer(r, select(r.attention(), 1), None, mpp=svs.mpp)
    shapes = viewer.add_shapes(rects, **tkw)
    x, y = (int(v) for v in coords[planted])

    def world(px, py):  # centre of the slide's level-0 pixel (col px, row py) in world units
        return slide.data_to_world([py, px])

    # napari's own lookup: every corner pixel of the patch reads the planted value ...
    for px, py in [(x, y), (x + PS - 1, y), (x, y + PS - 1), (x + PS - 1, y + PS - 1)]:
        assert hm.get_value(world(px, py), world=True) == pytest.approx(0.9), (px, py)
    # ... and the pixels just outside it do not (a one-pixel shift would fail here)
    for px, py in [(x - 1, y), (x, y - 1), (x + PS, y + PS - 1), (x + PS - 1, y + PS)]:
        assert hm.get_value(world(px, py), world=True) == pytest.approx(0.1), (px, py)
    # the patch's outer corners coincide: slide pixel edge (x - 1/2) <-> heatmap cell edge
    i, j = np.unravel_index(np.nanargmax(data), data.shape)
    for (px, py), (ci, cj) in [((x - 0.5, y - 0.5), (i - 0.5, j - 0.5)),
                               ((x + PS - 0.5, y + PS - 0.5), (i + 0.5, j + 0.5))]:
        w = slide.data_to_world([py, px])
        np.testing.assert_allclose(hm.world_to_data(w), [ci, cj], atol=1e-6)
        np.testing.assert_allclose(hm.data_to_world([ci, cj]), w, atol=1e-9)
    # the top-K rectangle is the same patch: its corners are the slide's pixel edges
    corners = np.asarray(shapes.data[0])
    np.testing.assert_allclose(corners.min(0), world(x - 0.5, y - 0.5), atol=1e-9)
    np.testing.assert_allclose(corners.max(0), world(x + PS - 0.5, y + PS - 0.5), atol=1e-9)
    assert shapes.features["index"].tolist() == [planted]
    # a hover readout from the cursor's world position gives the raw score
    assert value_at(r, None, world_to_level0(world(x + 3, y + 5), svs.mpp)) == pytest.approx(0.9)
    assert value_at(r, None, world_to_level0(world(x - 1, y), svs.mpp)) == pytest.approx(0.1)


@pytest.mark.gui
def test_heatmap_renders_on_the_slide_pixels_and_nan_is_transparent(make_napari_viewer, svs):
    """What the GPU draws: zoomed to 10 screen pixels per level-0 pixel, the heatmap's edge
    falls on the same screen column as the edge of a level-0 reference image placed exactly
    like the slide layer (half a level-0 pixel off would be 5 screen pixels)."""
    viewer = make_napari_viewer(show=True)
    [slide] = viewer.open(str(svs.path), plugin="napari-milview")
    slide.visible = False
    coords = _lattice(37, 53, PS, 4, 3)
    planted, missing = 5, 2
    scores = np.full(len(coords), 0.1)
    scores[planted] = 0.9
    scores[missing] = np.nan
    r = _result(coords, scores, mpp=svs.mpp)
    x, y = (int(v) for v in coords[planted])
    ref = np.zeros((coords[:, 1].max() + PS + 8, coords[:, 0].max() + PS + 8), np.float32)
    ref[y:y + PS, x:x + PS] = 1  # the planted patch's level-0 pixels
    ref_layer = viewer.add_image(ref, scale=slide.scale[-2:], translate=slide.translate[-2:],
                                 units=slide.units[-2:], colormap="gray",
                                 contrast_limits=(0, 1))
    data, kw, _ = heatmap_layer(r, None, "raw", mpp=svs.mpp, colormap="gray", opacity=1.0)
    kw["contrast_limits"] = (0.1, 0.9)
    hm = viewer.add_image(data, **kw)
    cam = viewer.scene.camera
    cam.center = ((y - 0.5) * svs.mpp, (x - 0.5) * svs.mpp)  # the patch's corner
    cam.zoom = 10 / svs.mpp

    def edges(img):
        h, w = img.shape[:2]
        row = img[h // 2 + 30, :, 0].astype(int)
        col = img[:, w // 2 + 30, 0].astype(int)
        return np.flatnonzero(np.diff(row) > 100), np.flatnonzero(np.diff(col) > 100)

    hm.visible = False
    want = edges(viewer.screenshot(canvas_only=True, flash=False))
    hm.visible, ref_layer.visible = True, False
    got = edges(viewer.screenshot(canvas_only=True, flash=False))
    assert len(want[0]) == 1 and len(want[1]) == 1
    for g, w in zip(got, want, strict=True):
        assert len(g) == 1 and abs(int(g[0]) - int(w[0])) <= 1
    # a patch without a score is transparent: the white reference shows through
    ref_layer.visible = True
    ref_layer.data = np.ones_like(ref)
    xm, ym = coords[missing]
    cam.center = ((ym + PS / 2) * svs.mpp, (xm + PS / 2) * svs.mpp)
    img = viewer.screenshot(canvas_only=True, flash=False)
    h, w = img.shape[:2]
    assert img[h // 2, w // 2, :3].min() > 200  # white, not the black of the low colour
    xo, yo = coords[missing + 4]  # a scored (low, black) patch below it is drawn opaque
    cam.center = ((yo + PS / 2) * svs.mpp, (xo + PS / 2) * svs.mpp)
    img = viewer.screenshot(canvas_only=True, flash=False)
    assert img[h // 2, w // 2, :3].max() < 50
