"""Per-pixel perturbations and the lazy preview: chunks are continuous at their borders."""

from __future__ import annotations

import dask
import numpy as np
import pytest

from napari_milview.slide import open_slide
from napari_milview.stain import (
    CONDITIONS,
    Perturbation,
    StainPerturbation,
    estimate_slide,
    lazy_preview,
    make_condition,
)


@pytest.fixture(scope="module")
def slide(svs):
    with open_slide(svs.path) as s:
        yield s


@pytest.fixture(scope="module")
def stain(slide):
    return estimate_slide(slide)


class Counting(Perturbation):
    """A real perturbation (inverts colours) that counts the pixels it is given."""

    def __init__(self):
        super().__init__("invert")
        self.pixels = 0

    def _apply(self, px):
        self.pixels += px.shape[0]
        return 255 - px


@pytest.mark.parametrize("name", [n for n in CONDITIONS if n != "reference"])
def test_adjacent_chunks_are_continuous(slide, stain, name):
    pert = make_condition(name, stain, seed=5)
    levels = slide.to_dask()
    preview = lazy_preview(levels, pert)
    for lv, pv in zip(levels, preview):
        assert pv.shape == lv.shape and pv.chunks == lv.chunks and pv.dtype == np.uint8
    th, tw = slide.info.levels[0].tile
    # a window straddling a 2 x 2 corner of chunks, and a full chunk row + the next
    for y0, y1, x0, x1 in ((th - 37, th + 41, 2 * tw - 50, 2 * tw + 30), (0, th + 1, 0, 3 * tw)):
        whole = pert(slide.read(0, y0, x0, y1 - y0, x1 - x0))
        with dask.config.set(scheduler="threads"):
            chunked = np.asarray(preview[0][y0:y1, x0:x1].compute())
        np.testing.assert_array_equal(chunked, whole)
        # continuity at the chunk border: the border columns equal the one-shot result
        c = tw * ((x0 // tw) + 1) - x0
        np.testing.assert_array_equal(chunked[:, c - 1:c + 1], whole[:, c - 1:c + 1])
    lv1 = preview[1][100:300, 50:400].compute()
    np.testing.assert_array_equal(lv1, pert(slide.read(1, 100, 50, 200, 350)))


def test_preview_is_lazy_and_computes_only_what_is_asked(slide):
    pert = Counting()
    preview = lazy_preview(slide.to_dask(), pert)
    assert pert.pixels == 0
    th, tw = slide.info.levels[0].tile
    out = preview[0][10:20, tw - 5:tw + 5].compute()
    assert out.shape == (10, 10, 3)
    assert pert.pixels == 2 * th * tw  # exactly the two chunks touched
    assert lazy_preview(slide.to_dask(), Perturbation())[0] is not None  # identity: as is


def test_batches_and_pixel_lists_give_the_same_pixels(slide, stain):
    pert = make_condition("low-similarity", stain)
    patches = np.stack([slide.read(0, 300 * i, 500, 96, 96) for i in range(4)])
    batch = pert(patches)
    assert batch.shape == patches.shape and batch.dtype == np.uint8
    for b in range(4):
        np.testing.assert_array_equal(batch[b], pert(patches[b]))
    np.testing.assert_array_equal(pert(patches.reshape(-1, 3)), batch.reshape(-1, 3))


def test_identity_parameters_and_token(stain):
    ident = StainPerturbation("same", stain.matrix, stain.i0)
    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    np.testing.assert_array_equal(ident(rgb), rgb)
    a = make_condition("low-intensity", stain)
    assert a.token == make_condition("low-intensity", stain).token
    assert a.token != make_condition("high-intensity", stain).token


def test_bad_input_is_refused(stain):
    pert = make_condition("high-intensity", stain)
    with pytest.raises(ValueError, match="high-intensity.*uint8"):
        pert(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        pert(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="ratios"):
        StainPerturbation("x", stain.matrix, ratio=(-1, 1))
    with pytest.raises(ValueError, match="level 0 must be"):
        lazy_preview([dask.array.zeros((8, 8), dtype=np.uint8)], pert)
