"""``.pt`` bags: safe loading only (weights_only=True), no code ever runs."""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest

from napari_milview.features import BagError, load_bag, sniff_bag
from napari_milview.features.pt import load_pt_safe, read_pt

torch = pytest.importorskip("torch")


class _WritesMarker:
    """Unpickling this calls exec(), which writes a marker file: code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_dict_bag_with_coords_and_geometry(tmp_path, bag_arrays):
    feats, coords = bag_arrays(n=12, d=384)
    p = tmp_path / "bag.pt"
    torch.save({"feats": torch.from_numpy(feats).half(), "coords": torch.from_numpy(coords),
                "patch_size_level0": 512, "mpp": torch.tensor(0.5), "encoder": "phikon",
                "slide_id": "s3"}, p)
    assert sniff_bag(p) == "pt"
    bag = load_bag(p)
    assert bag.meta["format"] == "torch .pt bag" and "torch .pt bag" in bag.source
    assert bag.features.dtype == np.float32 and bag.features.shape == (12, 384)
    np.testing.assert_allclose(bag.features, feats, atol=1e-2)  # float16 round trip
    np.testing.assert_array_equal(bag.coords, coords)
    assert (bag.patch_size_level0, bag.mpp, bag.encoder, bag.slide_id) == \
        (512, 0.5, "phikon", "s3")


def test_bfloat16_bare_tensor_needs_coords(tmp_path, bag_arrays):
    feats, coords = bag_arrays(n=4)
    p = tmp_path / "x.pt"
    torch.save({"features": torch.from_numpy(feats).bfloat16(),
                "coords": torch.from_numpy(coords)}, p)
    bag = load_bag(p, patch_size_level0=256)
    assert bag.features.dtype == np.float32 and bag.slide_id == "x"


def test_dict_without_features_key(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"model": torch.zeros(2)}, p)
    with pytest.raises(BagError, match="no 'features', 'feats' or 'feat' entry; found keys: "
                                       "'model'"):
        load_bag(p, patch_size_level0=256)


def test_numpy_array_inside_is_refused(tmp_path):
    p = tmp_path / "np.pt"
    torch.save({"features": np.zeros((3, 4), np.float32)}, p)
    with pytest.raises(BagError, match=r"refused to unpickle: it contains code \(global "
                                       r"numpy\."):
        load_bag(p)


def test_malicious_torch_archive_refused_without_side_effects(tmp_path):
    marker = tmp_path / "marker.txt"
    p = tmp_path / "evil.pt"
    torch.save({"features": torch.zeros(3, 4), "x": _WritesMarker(marker)}, p)
    assert zipfile.is_zipfile(p)
    with pytest.raises(BagError) as e:
        load_bag(p, patch_size_level0=256)
    assert str(p) in str(e.value)
    assert "refused to unpickle: it contains code (global builtins.exec)" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_raw_pickle_refused_without_side_effects(tmp_path, protocol):
    marker = tmp_path / "marker.txt"
    payload = pickle.dumps(_WritesMarker(marker), protocol=protocol)
    p = tmp_path / "evil.h5"  # the suffix lies; the content decides
    p.write_bytes(payload)
    assert sniff_bag(p) == "pt"
    with pytest.raises(BagError, match=r"refused to unpickle: it contains code \(global "
                                       r"(builtins\.)?exec\)"):
        load_bag(p)
    with pytest.raises(BagError, match="refused to unpickle"):
        load_pt_safe(p)
    assert not marker.exists()
    # positive control: the payload is live - plain unpickling (our own bytes, in tmp_path)
    # does write the marker, so the refusal above is what kept it from running
    pickle.loads(payload)
    assert marker.read_text() == "pwned"


def test_corrupt_archive(tmp_path):
    p = tmp_path / "broken.pt"
    p.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(BagError, match="not a readable torch .pt file"):
        read_pt(p)


def test_loader_never_uses_unsafe_mode():
    """The module asks torch for weights_only=True and nothing else, with no fallback."""
    import inspect
    import re

    import napari_milview.features.pt as mod

    src = inspect.getsource(mod)
    calls = re.findall(r"torch\.load\(([^)]*)\)", src)
    assert calls and all("weights_only=True" in c for c in calls)
    assert "weights_only=False" not in src and "add_safe_globals(" not in src
