"""Our own bag h5: every field round-trips, writes are atomic, CLAM readers read it."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from napari_milview.features import Bag, BagError, BagWarning, load_bag, save_bag, sniff_bag
from napari_milview.features.clam import read_clam_h5
from napari_milview.features.milview_h5 import FORMAT_NAME, read_milview_h5


@pytest.fixture
def bag(bag_arrays):
    feats, coords = bag_arrays(n=12, d=1024)
    coords = coords.astype(np.float64)
    coords[3] = np.nan  # a row dropped on the way in: ``dropped`` must survive the round trip
    with pytest.warns(BagWarning):
        return Bag.from_arrays(feats, coords, patch_size_level0=512, mpp=0.2525,
                               encoder="resnet50_trunc", slide_id="CMU-1",
                               meta={"slide": "/data/CMU-1.svs", "label": 1})


def test_round_trip_recovers_every_field(tmp_path, bag):
    p = save_bag(bag, tmp_path / "out.h5")
    assert sniff_bag(p) == "milview"
    got = load_bag(p)
    np.testing.assert_array_equal(got.features, bag.features)
    np.testing.assert_array_equal(got.coords, bag.coords)
    assert got.features.dtype == np.float32 and got.coords.dtype == np.int64
    for name in ("patch_size_level0", "mpp", "encoder", "slide_id", "dropped"):
        assert getattr(got, name) == getattr(bag, name), name
    assert got.dropped == 1
    assert got.meta["slide"] == "/data/CMU-1.svs" and got.meta["label"] == 1
    assert got.meta["format"] == "napari-milview bag h5" and str(p) in got.source


def test_file_layout(tmp_path, bag):
    p = save_bag(bag, tmp_path / "out.h5", slide="other.svs")
    with h5py.File(p, "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape == (11, 1024)
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (11, 2)
        a = dict(f.attrs)
        assert a["format"] == FORMAT_NAME and a["version"] == 1
        assert a["patch_size_level0"] == 512 and a["mpp"] == pytest.approx(0.2525)
        assert a["encoder"] == "resnet50_trunc" and a["slide_id"] == "CMU-1"
        assert a["slide"] == "other.svs"
        assert f["coords"].attrs["patch_size_level0"] == 512


def test_unknown_values_left_out(tmp_path, bag_arrays):
    feats, coords = bag_arrays()
    p = save_bag(Bag.from_arrays(feats, coords), tmp_path / "bare.h5")
    with h5py.File(p, "r") as f:
        assert not {"mpp", "patch_size_level0", "encoder", "slide_id"} & set(f.attrs)
    got = load_bag(p, require_extent=False)
    assert (got.patch_size_level0, got.mpp, got.encoder, got.slide_id) == (None,) * 4
    with pytest.raises(BagError, match="patch extent unknown"):
        load_bag(p)


def test_clam_reader_reads_our_file(tmp_path, bag):
    p = save_bag(bag, tmp_path / "out.h5")
    got = read_clam_h5(p)
    np.testing.assert_array_equal(got.features, bag.features)
    np.testing.assert_array_equal(got.coords, bag.coords)
    assert got.patch_size_level0 == 512  # from the copy on coords


def test_atomic_write_leaves_no_temporary(tmp_path, bag, monkeypatch):
    dest = tmp_path / "out.h5"
    save_bag(bag, dest)
    before = dest.read_bytes()
    import napari_milview.features.milview_h5 as mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_bag(bag, dest)
    assert dest.read_bytes() == before          # the old file is intact
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.h5"]  # no temporary left


def test_newer_version_refused(tmp_path, bag):
    p = save_bag(bag, tmp_path / "out.h5")
    with h5py.File(p, "a") as f:
        f.attrs["version"] = 2
    with pytest.raises(BagError, match="newer napari-milview"):
        read_milview_h5(p)


def test_overrides(tmp_path, bag):
    p = save_bag(bag, tmp_path / "out.h5")
    with pytest.warns(BagWarning, match="not 512 px"):
        got = load_bag(p, patch_size_level0=256, mpp=0.5, slide_id="renamed")
    assert (got.patch_size_level0, got.mpp, got.slide_id) == (256, 0.5, "renamed")
    assert got.meta["mpp_source"] == "user"


def test_missing_folder(tmp_path, bag):
    with pytest.raises(BagError, match="does not exist"):
        save_bag(bag, tmp_path / "nope" / "out.h5")
