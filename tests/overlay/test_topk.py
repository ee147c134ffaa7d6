"""Top-K / bottom-K / range selection and the Shapes layer of patch rectangles."""

import numpy as np
import pytest

from napari_milview.overlay.topk import patch_rectangles, select, topk_layer
from napari_milview.result import Result


def test_top_and_bottom_are_stable_and_skip_nan():
    s = np.array([0.5, 0.9, np.nan, 0.9, 0.1, 0.5, 0.1])
    assert select(s, 3, "top").tolist() == [1, 3, 0]  # tie 0.9: bag order
    assert select(s, None, "top").tolist() == [1, 3, 0, 5, 4, 6]
    assert select(s, 3, "bottom").tolist() == [4, 6, 0]
    assert select(s, 100, "bottom").size == 6  # NaN never picked
    assert select(s, 0).size == 0 and select(s, 1).dtype == np.int64


def test_range_is_inclusive_highest_first_and_spread():
    s = np.linspace(0, 1, 101)  # s[i] = i / 100
    got = select(s, None, "range", 0.45, 0.55)
    assert got.tolist() == list(range(55, 44, -1))
    few = select(s, 3, "range", 0.45, 0.55)
    assert few.tolist() == [55, 50, 45]  # evenly spaced over the range, deterministic
    assert select(s, 5, "range", 2.0, 3.0).size == 0


def test_select_errors():
    with pytest.raises(ValueError, match="unknown selection mode 'best'"):
        select(np.ones(3), 1, "best")
    with pytest.raises(ValueError, match="needs lo <= hi"):
        select(np.ones(3), 1, "range", 0.6, 0.4)
    with pytest.raises(ValueError, match="k must be"):
        select(np.ones(3), -1)


def test_rectangles_follow_the_pixel_centre_convention():
    r = patch_rectangles(np.array([[100, 40]]), 256, 0.5)
    # level-0 pixels x in [100, 356) span world [(100 - 0.5) * 0.5, (356 - 0.5) * 0.5)
    np.testing.assert_allclose(r[0], [[19.75, 49.75], [19.75, 177.75], [147.75, 177.75],
                                      [147.75, 49.75]])
    np.testing.assert_allclose(patch_rectangles(np.array([[0, 0]]), 4, None)[0, 2], [3.5, 3.5])


def test_layer_tuple():
    coords = np.array([[0, 0], [256, 0], [0, 256], [256, 256]])
    scores = np.array([0.1, 0.4, 0.3, 0.2], np.float32)
    res = Result(coords=coords, patch_size_level0=256,
                 sources={"attention": scores, "class/1": scores[::-1].copy()},
                 default_source="attention", classes=["a", "b"], logits=[0, 1],
                 probabilities=[0.3, 0.7], arch="clam_mb", mpp=0.5)
    idx = select(res.attention(), 2)
    data, kw, kind = topk_layer(res, idx)
    assert kind == "shapes" and data.shape == (2, 4, 2)
    assert kw["features"]["index"].tolist() == [1, 2]
    assert kw["features"]["rank"].tolist() == [1, 2]
    np.testing.assert_allclose(kw["features"]["score"], [0.4, 0.3])
    assert kw["face_color"] == "transparent" and kw["shape_type"] == "rectangle"
    assert kw["text"]["string"] == "{rank}" and kw["units"] == ("um", "um")
    np.testing.assert_allclose(data[0].min(0), [-0.25, 127.75])  # patch (256, 0)
    _, kw2, _ = topk_layer(res, idx, "class/1")
    np.testing.assert_allclose(kw2["features"]["score"], [0.3, 0.4])
    empty, kw3, _ = topk_layer(res, select(res.attention(), 0))
    assert empty.shape == (0, 4, 2) and kw3["features"]["rank"].size == 0
    with pytest.raises(ValueError, match="out of range"):
        topk_layer(res, [4])


@pytest.mark.gui
def test_layer_tuples_load_in_napari(make_napari_viewer):
    """The (data, kwargs) tuples are accepted by napari as they are, empty selection too."""
    coords = np.array([[0, 0], [256, 0]])
    res = Result(coords=coords, patch_size_level0=256, sources={"attention": [0.2, 0.8]},
                 default_source="attention", classes=[], logits=[0], probabilities=[1],
                 arch="abmil", mpp=0.25)
    from napari.layers import Layer

    viewer = make_napari_viewer()
    layer = viewer.add_layer(Layer.create(*topk_layer(res, select(res.attention(), 2))))
    assert layer.nshapes == 2 and layer.features["rank"].tolist() == [1, 2]
    assert layer.text.values.tolist() == ["1", "2"]
    empty = viewer.add_layer(Layer.create(*topk_layer(res, select(res.attention(), 0))))
    assert empty.nshapes == 0 and empty.features["index"].size == 0
