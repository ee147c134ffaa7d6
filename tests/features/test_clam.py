"""CLAM feature files (h5_files/*.h5, pt_files/*.pt) and their patches files."""

from __future__ import annotations

import re

import numpy as np
import pytest

from napari_milview.features import BagError, BagWarning, load_bag
from napari_milview.features.clam import read_clam_h5, read_clam_pt
from napari_milview.features.patches import extent_from_coords_attrs


def test_extent_from_explicit_patches_file(write, bag_arrays):
    feats, coords = bag_arrays(n=12, d=1024)
    h5 = write.clam("s1", feats, coords)
    patches = write.clam_patches("s1", coords, patch_size=256, patch_level=1,
                                 downsample=(4.0, 4.0), folder="elsewhere")
    bag = load_bag(h5, patches_h5=patches, mpp=0.25)
    assert bag.patch_size_level0 == 1024
    assert bag.patch_size_um == pytest.approx(256.0)
    assert bag.slide_id == "s1" and bag.encoder is None
    assert bag.meta["format"] == "CLAM features h5"
    assert "patch_size 256 at level 1 x downsample 4" in bag.meta["extent_source"]
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.coords.dtype == np.int64 and bag.features.dtype == np.float32
    assert "CLAM features h5" in bag.source and str(h5) in bag.source


def test_patches_file_found_next_to_h5_files(write, bag_arrays):
    feats, coords = bag_arrays()
    h5 = write.clam("slide_7", feats, coords)                 # root/h5_files/slide_7.h5
    write.clam_patches("slide_7", coords, patch_size=256, patch_level=1,
                       downsample=[[1.0, 1.0], [4.0, 4.0], [16.0, 16.0]])  # root/patches/
    bag = load_bag(h5)
    assert bag.patch_size_level0 == 1024


def test_missing_extent_refused_with_hint(write):
    h5 = write.clam("lonely")
    with pytest.raises(BagError, match="patch extent unknown: pass --patch-size-level0 or "
                                       "the CLAM patches .h5") as e:
        load_bag(h5)
    assert str(h5) in str(e.value)
    bag = load_bag(h5, require_extent=False)
    assert bag.patch_size_level0 is None
    assert load_bag(h5, patch_size_level0=512).patch_size_level0 == 512


def test_user_extent_wins_with_warning_on_conflict(write, bag_arrays):
    feats, coords = bag_arrays()
    h5 = write.clam("s1", feats, coords)
    patches = write.clam_patches("s1", coords)
    with pytest.warns(BagWarning, match="using the given patch extent 512 px, not 1024 px"):
        bag = load_bag(h5, patches_h5=patches, patch_size_level0=512)
    assert bag.patch_size_level0 == 512 and bag.meta["extent_source"] == "user"


def test_patches_file_of_another_run_refused(write, bag_arrays):
    feats, coords = bag_arrays(n=12)
    h5 = write.clam("s1", feats, coords)
    write.clam_patches("s1", coords[:10])
    with pytest.raises(BagError, match="lists 10 patches but the features have 12"):
        load_bag(h5)


@pytest.mark.parametrize(("attrs", "expected"), [
    ({"patch_size": 256, "patch_level": 0, "downsample": (1.0, 1.0)}, 256),
    ({"patch_size": 256, "patch_level": 0}, 256),
    ({"patch_size": 256, "patch_level": 1, "downsample": (4.0, 4.0)}, 1024),
    ({"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0003, 3.9998])}, 1024),
    ({"patch_size": 256, "patch_level": 2, "downsample": [[1, 1], [4, 4], [16, 16]]}, 4096),
    ({"patch_size": 256, "patch_level": 2, "downsample": [1.0, 2.0, 4.0]}, 1024),
    ({"patch_size": 256, "patch_level": 1, "downsample": [1.0, 2.0]}, 512),
    ({"patch_size": 256, "patch_level": 1, "downsample": 4}, 1024),
    ({"patch_size": 256, "patch_level": 0, "downsample": (1.0, 1.0),
      "custom_downsample": 2}, 512),
    ({"patch_size_level0": 448, "patch_size": 224}, 448),
    ({"patch_size": 512}, None),           # TRIDENT-style bare patch_size: not level 0
    ({}, None),
])
def test_extent_rules(attrs, expected):
    got = extent_from_coords_attrs(attrs, "x")
    assert (got[0] if got else None) == expected


@pytest.mark.parametrize(("attrs", "msg"), [
    ({"patch_size": 256, "patch_level": 1}, "no 'downsample'"),
    ({"patch_size": 256, "patch_level": 3, "downsample": [[1, 1], [4, 4]]}, "lists 2 levels"),
    ({"patch_size": 256, "patch_level": 1, "downsample": (2.0, 8.0)}, "neither a square"),
    ({"patch_size": -1, "patch_level": 0}, "must be positive"),
])
def test_extent_rules_malformed(attrs, msg):
    with pytest.raises(BagError, match=msg):
        extent_from_coords_attrs(attrs, "x")


def test_patches_file_without_geometry(write, bag_arrays):
    feats, coords = bag_arrays()
    h5 = write.clam("s1", feats, coords)
    other = write.clam("s1", feats, coords, folder="not_patches")  # coords, no attributes
    with pytest.raises(BagError, match="no patch geometry on 'coords'"):
        load_bag(h5, patches_h5=other)


def test_missing_dataset_named(write, tmp_path):
    import h5py

    p = tmp_path / "half.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("features", data=np.zeros((3, 4), np.float32))
        f.create_dataset("imgs", data=np.zeros((3, 2, 2, 3), np.uint8))
    with pytest.raises(BagError, match=r"no 'coords' dataset; found: features \(dataset"):
        read_clam_h5(p, patch_size_level0=256)
    with pytest.raises(BagError, match="no 'features' dataset; found: coords"):
        read_clam_h5(write.clam_patches("p"), patch_size_level0=256)


def test_coords_rows_must_match(tmp_path):
    import h5py

    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("features", data=np.zeros((3, 4), np.float32))
        f.create_dataset("coords", data=np.zeros((4, 2), np.int32))
    with pytest.raises(BagError, match="3 feature rows but coords has shape"):
        load_bag(p, patch_size_level0=256)


def test_nan_row_refuses_the_file(write, bag_arrays):
    feats, coords = bag_arrays(n=12)
    feats[5] = np.nan
    h5 = write.clam("s1", feats, coords)
    with pytest.raises(BagError, match=re.escape(str(h5)) + r".*1 of 12 patches have damaged "
                                                            r"features.*first row 5"):
        load_bag(h5, patch_size_level0=256)


def test_pt_files_coords_from_matching_h5(write, bag_arrays):
    torch = pytest.importorskip("torch")
    feats, coords = bag_arrays(n=12, d=1024)
    write.clam("s1", feats, coords)
    write.clam_patches("s1", coords)
    pt = write.root / "pt_files" / "s1.pt"
    pt.parent.mkdir()
    torch.save(torch.from_numpy(feats), pt)
    bag = load_bag(pt)
    assert bag.meta["format"] == "CLAM features .pt"
    assert bag.patch_size_level0 == 1024 and bag.slide_id == "s1"
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    assert read_clam_pt(pt).n == 12


def test_pt_files_without_h5_refused(tmp_path, bag_arrays):
    torch = pytest.importorskip("torch")
    feats, _ = bag_arrays()
    pt = tmp_path / "pt_files" / "s9.pt"
    pt.parent.mkdir()
    torch.save(torch.from_numpy(feats), pt)
    with pytest.raises(BagError, match="holds features but no coords.*h5_files"):
        load_bag(pt, patch_size_level0=256)


def test_pt_and_h5_row_counts_must_agree(write, bag_arrays):
    torch = pytest.importorskip("torch")
    feats, coords = bag_arrays(n=12)
    write.clam("s1", feats, coords)
    pt = write.root / "pt_files" / "s1.pt"
    pt.parent.mkdir()
    torch.save(torch.from_numpy(feats[:9]), pt)
    with pytest.raises(BagError, match="9 feature rows but coords has shape"):
        load_bag(pt, patch_size_level0=256)
