"""The Bag type: validation, cleaning, dimension and extent checks."""

from __future__ import annotations

import numpy as np
import pytest

from napari_milview.features import Bag, BagError, BagWarning


def test_from_arrays_normalises_types(bag_arrays):
    feats, coords = bag_arrays(n=5, d=3)
    bag = Bag.from_arrays(feats.astype(np.float16), coords.astype(np.int32),
                          patch_size_level0=np.int64(512), mpp=np.float32(0.5),
                          encoder="uni", slide_id="s1", source="x.h5 (test)")
    assert bag.features.dtype == np.float32 and bag.features.shape == (5, 3)
    assert bag.coords.dtype == np.int64 and bag.coords.shape == (5, 2)
    assert (bag.n, bag.dim) == (5, 3)
    assert bag.patch_size_level0 == 512 and type(bag.patch_size_level0) is int
    assert bag.patch_size_um == pytest.approx(256.0)
    assert bag.dropped == 0
    assert "n=5" in repr(bag) and "dim=3" in repr(bag)
    assert bag.validate() is bag


def test_patch_size_um_unknown_without_mpp_or_extent(bag_arrays):
    feats, coords = bag_arrays()
    assert Bag.from_arrays(feats, coords, patch_size_level0=256).patch_size_um is None
    assert Bag.from_arrays(feats, coords, mpp=0.5).patch_size_um is None


def test_whole_float_coords_accepted_fractional_refused(bag_arrays):
    feats, coords = bag_arrays(n=4)
    bag = Bag.from_arrays(feats, coords.astype(np.float64))
    assert bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.coords, coords)
    bad = coords.astype(np.float64)
    bad[1, 0] += 0.5
    with pytest.raises(BagError, match="whole level-0 pixels"):
        Bag.from_arrays(feats, bad)


def test_non_finite_features_refuse_the_bag(bag_arrays):
    feats, coords = bag_arrays(n=10)
    feats[2, 0] = np.nan
    feats[7, 3] = np.inf
    with pytest.raises(BagError, match=r"a\.h5 \(test\): 2 of 10 patches have damaged "
                                       r"features .* first row 2 holds nan"):
        Bag.from_arrays(feats, coords, source="a.h5 (test)")


def test_float64_overflow_to_float32_is_refused(bag_arrays):
    feats, coords = bag_arrays(n=4)
    f64 = feats.astype(np.float64)
    f64[1, 0] = 1e300
    with pytest.raises(BagError, match="1 of 4 patches .* first row 1 holds inf"):
        Bag.from_arrays(f64, coords)


def test_non_finite_coords_rows_dropped_with_counted_warning(bag_arrays):
    feats, coords = bag_arrays(n=5)
    c = coords.astype(np.float64)
    c[3, 1] = np.nan
    with pytest.warns(BagWarning, match=r"dropped 1 of 5 patches with non-finite coords "
                                        r"\(first row 3\)"):
        bag = Bag.from_arrays(feats, c)
    assert bag.n == 4 and bag.dropped == 1
    np.testing.assert_array_equal(bag.features, feats[[0, 1, 2, 4]])


def test_all_coords_nan_refused(bag_arrays):
    feats, coords = bag_arrays(n=6)
    with pytest.raises(BagError, match="all 6 patches have non-finite coords"):
        Bag.from_arrays(feats, np.full((6, 2), np.nan), source="nan.h5 (test)")


def test_empty_refused():
    with pytest.raises(BagError, match="empty"):
        Bag.from_arrays(np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64))


@pytest.mark.parametrize(("feats", "coords", "msg"), [
    (np.zeros(8), np.zeros((1, 2)), "2-D"),
    (np.zeros((4, 8, 2)), np.zeros((4, 2)), "2-D"),
    (np.zeros((4, 0)), np.zeros((4, 2)), "no dimensions"),
    (np.array([["a", "b"]] * 4), np.zeros((4, 2)), "numbers"),
    (np.zeros((4, 8)), np.zeros((4, 3)), r"\[N, 2\]"),
    (np.zeros((4, 8)), np.zeros((5, 2)), "4 feature rows but 5 coords"),
    (np.zeros((4, 8)), np.full((4, 2), 2**50), "out of range"),
    (np.zeros((4, 8)), np.zeros((4, 2), dtype=bool), "dtype bool"),
])
def test_shape_and_type_errors(feats, coords, msg):
    with pytest.raises(BagError, match=msg):
        Bag.from_arrays(feats, coords)


@pytest.mark.parametrize("bad", [0, -256, 255.5, "256", float("nan"), True])
def test_bad_extent_refused(bag_arrays, bad):
    feats, coords = bag_arrays()
    with pytest.raises(BagError, match="patch_size_level0"):
        Bag.from_arrays(feats, coords, patch_size_level0=bad)


@pytest.mark.parametrize("bad", [0, -0.5, float("inf")])
def test_bad_mpp_refused(bag_arrays, bad):
    feats, coords = bag_arrays()
    with pytest.raises(BagError, match="mpp"):
        Bag.from_arrays(feats, coords, mpp=bad)


def test_check_dim_names_file_and_both_numbers(bag_arrays):
    feats, coords = bag_arrays(d=768)
    bag = Bag.from_arrays(feats, coords, source="bag.h5")
    bag.check_dim(768, "abmil")
    with pytest.raises(BagError) as e:
        bag.check_dim(1024)
    assert str(e.value).startswith("bag.h5: features are 768-d but the model expects 1024-d")
    with pytest.raises(BagError, match="768-d but the model 'clam_sb' expects 1024-d"):
        bag.check_dim(1024, "clam_sb")


def test_require_extent(bag_arrays):
    feats, coords = bag_arrays()
    assert Bag.from_arrays(feats, coords, patch_size_level0=512).require_extent() == 512
    with pytest.raises(BagError, match="patch extent unknown: pass --patch-size-level0 or the "
                                       "CLAM patches .h5"):
        Bag.from_arrays(feats, coords, source="x.h5").require_extent()


def test_validate_catches_hand_edits(bag_arrays):
    feats, coords = bag_arrays()
    bag = Bag.from_arrays(feats, coords)
    bag.features = bag.features.astype(np.float64)
    with pytest.raises(BagError, match="float32"):
        bag.validate()
    bag = Bag.from_arrays(feats, coords)
    bag.features[0, 0] = np.nan
    with pytest.raises(BagError, match="non-finite"):
        bag.validate()


def test_to_torch(bag_arrays):
    torch = pytest.importorskip("torch")
    feats, coords = bag_arrays(n=3, d=4)
    t = Bag.from_arrays(feats, coords).to_torch("cpu")
    assert t.dtype == torch.float32 and tuple(t.shape) == (3, 4)
    np.testing.assert_array_equal(t.numpy(), feats)
