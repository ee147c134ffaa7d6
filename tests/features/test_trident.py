"""TRIDENT feature files: geometry attributes on coords, encoder on features."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from napari_milview.features import BagError, BagWarning, load_bag, sniff_bag
from napari_milview.features.trident import read_trident_h5


def test_reads_features_coords_extent_encoder(write, bag_arrays):
    feats, coords = bag_arrays(n=12, d=768)
    coords = coords.astype(np.int64)
    p = write.trident("TCGA-01", feats, coords, encoder="conch_v15", patch_size_level0=1024)
    assert sniff_bag(p) == "trident"
    bag = load_bag(p, mpp=0.25)
    assert bag.meta["format"] == "TRIDENT features h5"
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.patch_size_level0 == 1024 and bag.meta["extent_source"] == \
        "attribute patch_size_level0"
    assert bag.encoder == "conch_v15" and bag.slide_id == "TCGA-01"
    assert bag.mpp == 0.25 and bag.patch_size_um == pytest.approx(256.0)
    assert bag.meta["level0_magnification"] == 40 and bag.meta["target_magnification"] == 20


def test_encoder_from_folder_name(write):
    p = write.trident(encoder=None, folder="job/features_uni_v2")
    assert sniff_bag(p) == "trident"  # patch_size_level0 on coords marks it
    assert load_bag(p).encoder == "uni_v2"


def test_mpp_not_stored(write):
    assert load_bag(write.trident()).mpp is None


def test_missing_patch_size_level0(write):
    p = write.trident(patch_size_level0=None)
    with pytest.raises(BagError, match="patch extent unknown: pass --patch-size-level0"):
        load_bag(p)
    assert load_bag(p, patch_size_level0=1024).patch_size_level0 == 1024


def test_extent_from_trident_patches_file(write, tmp_path):
    p = write.trident(patch_size_level0=None)
    coords = h5py.File(p, "r")["coords"][()]
    patches = tmp_path / "slide_1_patches.h5"
    with h5py.File(patches, "w") as f:
        f.create_dataset("coords", data=coords).attrs["patch_size_level0"] = 1024
    assert load_bag(p, patches_h5=patches).patch_size_level0 == 1024


def test_inconsistent_magnification_warns(write):
    p = write.trident(patch_size_level0=1000)  # 512 px at 20x on a 40x slide is 1024
    with pytest.warns(BagWarning, match="gives 1024"):
        assert read_trident_h5(p).patch_size_level0 == 1000


def test_slide_level_embedding_is_not_a_bag(tmp_path):
    p = tmp_path / "slide_emb.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("features", data=np.zeros(768, np.float32)).attrs["encoder"] = "titan"
        f.create_dataset("coords", data=np.zeros((1, 2), np.int64))
    with pytest.raises(BagError, match="slide-level embedding"):
        load_bag(p, patch_size_level0=256)
