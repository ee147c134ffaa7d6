"""The dispatcher: content sniffing (never the suffix) and clear errors for bad files."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest

from napari_milview.features import Bag, BagError, BagWarning, load_bag, save_bag, sniff_bag


@pytest.fixture
def every_format(write, bag_arrays, tmp_path):
    """One file per format, each renamed to a misleading suffix."""
    torch = pytest.importorskip("torch")
    feats, coords = bag_arrays(n=12, d=64)
    files = {
        "clam": write.clam("s1", feats, coords),
        "trident": write.trident("s1", feats, coords.astype(np.int64)),
        "acmil": write.acmil({"s1": (feats, coords, 0)}),
        "milview": save_bag(Bag.from_arrays(feats, coords, patch_size_level0=1024),
                            tmp_path / "ours.h5"),
    }
    pt = tmp_path / "bag.pt"
    torch.save({"features": torch.from_numpy(feats), "coords": torch.from_numpy(coords)}, pt)
    files["pt"] = pt
    renamed = {}
    for fmt, p in files.items():
        q = p.with_name(f"{fmt}_renamed.bin" if fmt != "pt" else "pt_renamed.h5")
        p.rename(q)
        renamed[fmt] = q
    return renamed, feats, coords


def test_sniffing_ignores_suffix(every_format):
    files, feats, coords = every_format
    for fmt, p in files.items():
        assert sniff_bag(p) == fmt, p
        bag = load_bag(p, patch_size_level0=1024)
        np.testing.assert_allclose(bag.features, feats, atol=1e-2, err_msg=fmt)
        np.testing.assert_array_equal(bag.coords, coords, err_msg=fmt)


def test_text_file_renamed_h5(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("slide_id,label\ntumor_001,1\n")
    assert sniff_bag(p) is None
    with pytest.raises(BagError, match=r"notes.h5: not a feature bag: neither an HDF5 file .* "
                                       r"nor a torch .pt file \(it starts with b'slide_id"):
        load_bag(p)


def test_truncated_hdf5(write, tmp_path):
    src = write.clam("s1")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(src.read_bytes()[:600])
    with pytest.raises(BagError, match="cut.h5.*(corrupt or truncated HDF5|cannot read)"):
        load_bag(cut, patch_size_level0=256)


def test_patches_file_is_not_a_bag(write):
    p = write.clam_patches("s1")
    with pytest.raises(BagError, match="patch-coordinates file.*pass it as patches_h5"):
        load_bag(p)


def test_unrelated_hdf5_lists_contents(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("image", data=np.zeros((2, 2)))
    with pytest.raises(BagError, match=r"no 'features' dataset; found: image \(dataset"):
        load_bag(p)


@pytest.mark.parametrize("content", [b"", b"\x89HDF\r\n\x1a\n" + b"\x00" * 40])
def test_empty_and_header_only(tmp_path, content):
    p = tmp_path / "x.h5"
    p.write_bytes(content)
    with pytest.raises(BagError):
        load_bag(p)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(BagError, match="no such file"):
        load_bag(tmp_path / "missing.h5")
    with pytest.raises(BagError, match="is a folder"):
        load_bag(tmp_path)


def test_random_bytes_never_crash(tmp_path):
    """Fuzz smoke (style.md B.7): random bytes give a BagError, nothing else."""
    rng = np.random.default_rng(0)
    for i in range(30):
        head = [b"", b"\x89HDF\r\n\x1a\n", b"PK\x03\x04", b"\x80\x02"][i % 4]
        p = tmp_path / f"f{i}.h5"
        p.write_bytes(head + rng.bytes(int(rng.integers(0, 2000))))
        assert sniff_bag(p) in (None, "pt")
        with pytest.raises(BagError):
            load_bag(p, patch_size_level0=256)


def test_empty_bag_in_file_refused(tmp_path):
    p = tmp_path / "empty.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("features", data=np.zeros((0, 16), np.float32))
        f.create_dataset("coords", data=np.zeros((0, 2), np.int32))
    with pytest.raises(BagError, match="empty"):
        load_bag(p, patch_size_level0=256)


def test_all_nan_file_refused(write, bag_arrays):
    feats, coords = bag_arrays()
    feats[:] = np.nan
    with pytest.raises(BagError, match="12 of 12 patches have damaged features"):
        load_bag(write.clam("s1", feats, coords), patch_size_level0=256)


def test_import_is_light():
    import json
    import subprocess
    import sys

    code = ("import napari_milview.features, sys, json; "
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    mods = set(json.loads(out.splitlines()[-1]))
    assert not {"torch", "napari", "qtpy", "PyQt5", "dask"} & mods


DAMAGE = ("flip", "cut", "overwrite")


def test_damaged_hdf5_gives_bag_errors(write, bag_arrays, tmp_path):
    """Mutation corpus (style.md B.7): flipped bytes, cut files and overwritten runs in real
    bag files (each damage on each format). A cut file is always detected: a one-line
    BagError naming it. Any damage gives such a BagError or a bag that is still valid (finite
    [n, 16] features, n <= 40, dropped rows announced by a BagWarning), never a raw h5py/HDF5
    exception. HDF5 keeps no checksum of the data, so a flip inside the features can only
    change values: not every flip or overwrite can be seen, but some must be."""
    feats, coords = bag_arrays(n=40, d=16)
    sources = [write.clam("s1", feats, coords),
               save_bag(Bag.from_arrays(feats, coords, patch_size_level0=256),
                        tmp_path / "ours.h5"),
               write.acmil({"a": (feats, coords, 0), "b": (feats, coords, 1)})]
    rng = np.random.default_rng(1)  # these assertions held for seeds 1-30
    damaged = tmp_path / "damaged.h5"
    outcomes: dict[str, list[str]] = {k: [] for k in DAMAGE}
    for i in range(45):
        data = bytearray(sources[i % 3].read_bytes())
        kind = DAMAGE[(i // 3) % 3]
        if kind == "flip":
            for _ in range(8):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        elif kind == "cut":
            data = data[:int(rng.integers(0, len(data)))]
        else:
            j = int(rng.integers(0, len(data)))
            data[j:j + 64] = rng.bytes(64)
        damaged.write_bytes(bytes(data))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                bag = load_bag(damaged, patch_size_level0=256, slide_id="a")
            except BagError as e:
                assert str(damaged) in str(e) and "\n" not in str(e), (i, kind, str(e))
                outcomes[kind].append("error")
                continue
        n = bag.features.shape[0]
        assert bag.features.shape == (n, 16) and bag.coords.shape == (n, 2), (i, kind)
        assert 0 < n <= 40 and np.isfinite(bag.features).all(), (i, kind, n)
        if n < 40:
            assert any(issubclass(w.category, BagWarning) for w in caught), (i, kind, n)
        same = n == 40 and np.array_equal(bag.features, feats) and \
            np.array_equal(bag.coords, coords)
        outcomes[kind].append("same" if same else "changed")
    assert outcomes["cut"] == ["error"] * 15, outcomes
    assert outcomes["flip"].count("error") + outcomes["overwrite"].count("error") >= 3, outcomes
