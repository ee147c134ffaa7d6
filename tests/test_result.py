"""Result: the dataclass, and its h5 file round trip (exact, atomic, clear errors)."""

import h5py
import numpy as np
import pytest

from napari_milview.result import Result, ResultError, load_result, save_result


def _result(**kw):
    rng = np.random.default_rng(1)
    n = 40
    att = rng.random(n).astype(np.float32)
    args = dict(
        coords=np.stack([np.arange(n) % 8 * 256, np.arange(n) // 8 * 256], 1),
        patch_size_level0=256,
        sources={"attention": att / att.sum(), "raw/attention": np.log(att),
                 "branch/0/head/1": rng.random(n), "a.b%2Fc": rng.random(n),
                 "layer2/mean": np.full(n, np.nan)},
        default_source="branch/0/head/1", classes=["normal", "tumour"],
        logits=np.array([0.2, 1.3]), probabilities=np.array([0.25, 0.75]), arch="acmil_mha",
        mpp=0.25, slide="/data/s1.svs", slide_id="s1", encoder="resnet50_trunc",
        model="demo", device="cuda:0", timings={"extract": 1.5, "attend": 0.01},
        meta={"stain": {"method": "macenko"}, "n": np.int64(3)})
    args.update(kw)
    return Result(**args)


def test_properties():
    r = _result()
    assert r.n == 40 and r.predicted == 1 and r.predicted_class == "tumour"
    assert r.coords.dtype == np.int64
    assert all(v.dtype == np.float32 and v.shape == (40,) for v in r.sources.values())
    np.testing.assert_array_equal(r.attention(), r.sources["branch/0/head/1"])
    assert r.summary() == {"classes": ["normal", "tumour"], "probabilities": [0.25, 0.75],
                           "predicted": 1, "n_instances": 40, "arch": "acmil_mha"}
    with pytest.raises(KeyError, match="no attention source 'nope'"):
        r.attention("nope")


def test_round_trip_is_exact(tmp_path):
    r = _result()
    p = save_result(r, tmp_path / "RESULT.h5")
    assert [f.name for f in tmp_path.iterdir()] == ["RESULT.h5"]  # no temp file left
    q = load_result(p)
    assert list(q.sources) == list(r.sources)  # names with '/', '.', '%' and order kept
    for k in r.sources:
        np.testing.assert_array_equal(q.sources[k], r.sources[k])
    np.testing.assert_array_equal(q.coords, r.coords)
    np.testing.assert_array_equal(q.logits, r.logits)
    np.testing.assert_array_equal(q.probabilities, r.probabilities)
    for f in ("patch_size_level0", "default_source", "classes", "arch", "mpp", "slide",
              "slide_id", "encoder", "model", "device", "timings"):
        assert getattr(q, f) == getattr(r, f), f
    assert q.meta == {"stain": {"method": "macenko"}, "n": 3}
    with h5py.File(p, "r") as f:  # readable by anyone: coords + default attention at the root
        np.testing.assert_array_equal(f["attention"][()], r.attention())
        assert f["coords"].shape == (40, 2)


def test_round_trip_without_optionals(tmp_path):
    r = _result(mpp=None, slide=None, slide_id=None, encoder=None, model=None, timings={},
                meta={}, classes=[])
    q = load_result(save_result(r, tmp_path / "r.h5"))
    assert (q.mpp, q.slide, q.slide_id, q.encoder, q.model) == (None,) * 5
    assert q.classes == [] and q.predicted_class == "1"


def test_invalid_results_are_refused():
    with pytest.raises(ResultError, match="3 values for 40 patches"):
        _result(sources={"attention": np.ones(3)}, default_source="attention")
    with pytest.raises(ResultError, match="default source 'x'"):
        _result(default_source="x")
    with pytest.raises(ResultError, match=r"coords must be \[N, 2\]"):
        _result(coords=np.zeros((40, 3)))


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "none.h5"
    with pytest.raises(ResultError, match="none.h5: no such file"):
        load_result(missing)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(ResultError, match="junk.h5: not a readable HDF5 file"):
        load_result(junk)
    other = tmp_path / "bag.h5"
    with h5py.File(other, "w") as f:
        f["features"] = np.zeros((2, 3))
    with pytest.raises(ResultError, match="bag.h5: not a napari-milview result"):
        load_result(other)
    broken = tmp_path / "broken.h5"
    save_result(_result(), broken)
    with h5py.File(broken, "a") as f:
        del f["sources/branch%2F0%2Fhead%2F1"]
    with pytest.raises(ResultError, match="broken.h5: default source"):
        load_result(broken)
    with pytest.raises(ResultError, match="does not exist"):
        save_result(_result(), tmp_path / "no" / "r.h5")


def test_failed_write_keeps_the_old_file(tmp_path):
    p = save_result(_result(), tmp_path / "r.h5")
    before = p.read_bytes()
    bad = _result()
    bad.sources["attention"] = np.ones(41, np.float32)  # wrong length after construction
    with pytest.raises(ResultError, match=r"r.h5: not written: source 'attention' has 41"):
        save_result(bad, p)
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["r.h5"]
    odd = _result()
    odd.meta = {"path": tmp_path, "obj": object()}  # not JSON: stored as text, not an error
    assert load_result(save_result(odd, p)).meta["path"] == str(tmp_path)
