"""ACMIL grouped h5: one group per slide, float16 feat, coords, label."""

from __future__ import annotations

import numpy as np
import pytest

from napari_milview.features import BagError, load_bag, sniff_bag
from napari_milview.features.acmil import list_acmil_slides


@pytest.fixture
def acmil_file(write, bag_arrays):
    slides = {}
    for i in range(13):
        feats, coords = bag_arrays(n=4 + i, d=512, seed=i, step=512)
        slides[f"tumor_{i:03d}"] = (feats, coords, i % 2)
    return write.acmil(slides), slides


def test_group_selection(acmil_file):
    path, slides = acmil_file
    assert sniff_bag(path) == "acmil"
    bag = load_bag(path, slide_id="tumor_004", patch_size_level0=512, mpp=0.25)
    feats, coords, label = slides["tumor_004"]
    assert bag.n == 8 and bag.dim == 512 and bag.slide_id == "tumor_004"
    assert bag.features.dtype == np.float32
    np.testing.assert_array_equal(bag.features, feats.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.meta["label"] == label
    assert bag.encoder == "medical_ssl"        # from patch_feats_pretrain_{pretrain}.h5
    assert bag.patch_size_level0 == 512 and bag.patch_size_um == pytest.approx(128.0)
    assert "slide 'tumor_004'" in bag.source
    assert load_bag(path, slide_id="TUMOR_004.tif", patch_size_level0=512).n == 8
    assert len(list_acmil_slides(path)) == 13


def test_missing_slide_id_lists_first_ten(acmil_file):
    path, _ = acmil_file
    with pytest.raises(BagError, match=r"holds 13 slides; pass slide_id.*tumor_000.*tumor_009 "
                                       r"\(and 3 more\)") as e:
        load_bag(path, patch_size_level0=512)
    assert "tumor_010" not in str(e.value)
    with pytest.raises(BagError, match="no slide 'normal_001'; the file holds 13"):
        load_bag(path, slide_id="normal_001", patch_size_level0=512)


def test_ambiguous_slide_id(write, bag_arrays):
    feats, coords = bag_arrays()
    p = write.acmil({"Slide_A": (feats, coords, 0), "slide_a": (feats, coords, 1)})
    with pytest.raises(BagError, match="ambiguous"):
        load_bag(p, slide_id="SLIDE_A", patch_size_level0=512)
    assert load_bag(p, slide_id="slide_a", patch_size_level0=512).meta["label"] == 1


def test_single_group_used_and_extent_not_assumed(write, bag_arrays):
    feats, coords = bag_arrays(d=1024)
    p = write.acmil({"test_001": (feats, coords, 1)}, name="feats.h5")
    with pytest.raises(BagError, match="patch extent unknown: pass --patch-size-level0 "
                                       r"\(ACMIL files do not store it"):
        load_bag(p)
    bag = load_bag(p, require_extent=False)
    assert bag.slide_id == "test_001" and bag.patch_size_level0 is None
    assert bag.encoder is None  # not the ACMIL file-name pattern


def test_group_without_feat(write, tmp_path):
    import h5py

    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as f:
        f.create_group("s1").create_dataset("feat", data=np.zeros((2, 4), np.float16))
        f.create_group("s2").create_dataset("coords", data=np.zeros((2, 2)))
    with pytest.raises(BagError, match=r"no 'feat' dataset in group '/s2'; found: coords"):
        load_bag(p, slide_id="s2", patch_size_level0=512)
