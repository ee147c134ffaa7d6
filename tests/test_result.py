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


# --------------------------------------------------------------------- the decision
# DSMIL scores each class with its own sigmoid and decides it against the training script's
# threshold (a JSON list beside the .pth): the real model, saved and loaded as the authors'
# train_tcga.py leaves it, on a hand-made bag.
def _dsmil_result(tmp_path, n_classes, thresholds=None, seed=0, name="fold_0_1"):
    """(Result of ``attend``, probabilities of the model) for a DSMIL with ``thresholds``
    (a callable of the probabilities, a list, or None: no JSON list beside the .pth)."""
    import json

    import torch

    from napari_milview.features.bag import Bag
    from napari_milview.mil import build_model
    from napari_milview.mil.checkpoint import load_model
    from napari_milview.pipeline import attend

    torch.manual_seed(seed)
    model = build_model("dsmil", in_dim=16, n_classes=n_classes)
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((20, 16)).astype(np.float32)
    with torch.inference_mode():
        probs = model.forward_attention(torch.from_numpy(feats)).probs.numpy()
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    if callable(thresholds):
        thresholds = thresholds(probs)
    if thresholds is not None:
        path.with_suffix(".json").write_text(json.dumps([float(t) for t in thresholds]))
    loaded, card = load_model(path)
    assert card.hparams.get("thresholds") == (None if thresholds is None
                                              else [float(t) for t in thresholds])
    idx = np.arange(20)
    bag = Bag.from_arrays(feats, np.stack([idx % 5 * 256, idx // 5 * 256], 1),
                          patch_size_level0=256)
    return attend(bag, loaded, card, device="cpu"), probs


def test_one_class_dsmil_positive_and_negative(tmp_path):
    r, p = _dsmil_result(tmp_path, 1, lambda p: [float(p[0]) - 0.01])
    t = float(p[0]) - 0.01
    assert r.classes == ["class_0"] and r.independent and not r.assumed_thresholds
    np.testing.assert_allclose(r.thresholds, [t], rtol=1e-6)
    assert r.positive == [0] and r.predicted == 0 and r.predicted_class == "class_0"
    assert r.decision == f"positive for class_0 (p = {p[0]:.2f} >= threshold {t:.2f})"
    s = r.summary()
    assert s["scores"] == "independent" and s["positive"] == ["class_0"]
    assert s["thresholds"] == [pytest.approx(t, rel=1e-6)] and s["thresholds_assumed"] is False
    assert s["decision"] == r.decision and s["predicted"] == 0
    # above its probability: negative, and nothing is "predicted" (argmax would say class_0)
    r, p = _dsmil_result(tmp_path, 1, lambda p: [float(p[0]) + 0.01], name="neg")
    t = float(p[0]) + 0.01
    assert r.positive == [] and r.predicted is None and r.predicted_class == "not class_0"
    assert r.decision == f"negative for class_0 (p = {p[0]:.2f} < threshold {t:.2f})"
    assert r.summary()["predicted"] is None and r.summary()["positive"] == []
    # the camelyon16 class name in the sentence
    r.classes = ["tumor"]
    assert r.decision.startswith("negative for tumor (p = ")


def test_one_class_dsmil_without_thresholds_uses_half_and_says_so(tmp_path):
    r, p = _dsmil_result(tmp_path, 1, None, seed=3)
    assert r.independent and r.assumed_thresholds and r.thresholds_assumed
    np.testing.assert_array_equal(r.decision_thresholds, [0.5])
    word = "positive" if p[0] >= 0.5 else "negative"
    op = ">=" if p[0] >= 0.5 else "<"
    assert r.decision == (f"{word} for class_0 (p = {p[0]:.2f} {op} threshold 0.50); "
                          "threshold 0.5 assumed: the model came without thresholds")
    assert r.summary()["thresholds_assumed"] is True
    # a hand-made one-class result without thresholds: the same rule
    bare = _result(classes=["tumor"], logits=[2.0], probabilities=[0.3], meta={})
    assert bare.thresholds is None and bare.independent and bare.assumed_thresholds
    assert bare.decision.startswith("negative for tumor (p = 0.30 < threshold 0.50); "
                                    "threshold 0.5 assumed")


def test_multi_label_dsmil_lists_the_positive_classes(tmp_path):
    def thr(p):  # classes 0 and 2 positive, class 1 not, whatever their order
        return [float(p[0]) - 0.01, float(p[1]) + 0.01, float(p[2]) - 0.01]

    r, p = _dsmil_result(tmp_path, 3, thr, seed=1)
    r.classes = ["LUAD", "LUSC", "normal"]
    want = sorted([0, 2], key=lambda i: -p[i])
    assert r.positive == want and r.predicted == want[0]
    names = [r.classes[i] for i in want]
    assert r.predicted_class == ", ".join(names)
    assert r.decision.startswith(f"positive for {names[0]} (p = ")
    assert "LUSC" not in r.decision and "assumed" not in r.decision
    assert r.summary()["positive"] == names
    # none positive
    r.thresholds = np.array([1.1, 1.1, 1.1], np.float32)
    assert r.positive == [] and r.predicted is None and r.predicted_class == "none positive"
    assert r.decision.startswith("no class positive (")
    assert r.decision.count("< threshold 1.10") == 3


def test_independent_decision_round_trips_through_the_h5(tmp_path):
    r, _ = _dsmil_result(tmp_path, 2, [0.25, 0.75], seed=2)
    q = load_result(save_result(r, tmp_path / "RESULT.h5"))
    np.testing.assert_array_equal(q.thresholds, np.float32([0.25, 0.75]))
    assert q.thresholds_assumed is False and q.summary() == r.summary()
    assert q.decision == r.decision and q.positive == r.positive
    with h5py.File(tmp_path / "RESULT.h5", "r") as f:
        np.testing.assert_array_equal(f["thresholds"][()], np.float32([0.25, 0.75]))
        assert not f.attrs["thresholds_assumed"]
    r, _ = _dsmil_result(tmp_path, 2, None, seed=2, name="plain")
    q = load_result(save_result(r, tmp_path / "plain.h5"))
    assert q.thresholds_assumed and q.assumed_thresholds and "assumed" in q.decision
    # a softmax result writes no thresholds and reads back exclusive
    q = load_result(save_result(_result(), tmp_path / "softmax.h5"))
    assert q.thresholds is None and not q.independent
    with h5py.File(tmp_path / "softmax.h5", "r") as f:
        assert "thresholds" not in f and "thresholds_assumed" not in f.attrs


def test_files_written_before_the_thresholds_dataset(tmp_path):
    """Older results kept DSMIL's thresholds only in meta: they are the decision's."""
    r = _result(classes=["tumor"], logits=[0.5], probabilities=[0.62],
                meta={"thresholds": [0.7], "positive": []})
    p = save_result(r, tmp_path / "old.h5")
    q = load_result(p)
    np.testing.assert_allclose(q.thresholds, [0.7])
    assert q.decision == "negative for tumor (p = 0.62 < threshold 0.70)"
    # AEM's softmax scoring (exclusive classes) with meta thresholds stays argmax
    q = load_result(save_result(_result(meta={"thresholds": [0.5, 0.5]}), tmp_path / "a.h5"))
    assert q.thresholds is None and not q.independent and q.predicted == 1


def test_scores_not_summing_to_one_are_independent():
    r = _result(probabilities=[0.7, 0.6])  # two sigmoids, no thresholds
    assert r.independent and r.assumed_thresholds and r.positive == [0, 1]
    assert r.predicted_class == "normal, tumour"
    assert r.summary()["scores"] == "independent"
    r = _result(probabilities=[0.2, 0.3])
    assert r.positive == [] and r.predicted is None and r.predicted_class == "none positive"
    # a softmax: argmax, as before, and no decision keys in the summary
    r = _result()
    assert not r.independent and r.decision_thresholds is None and r.positive == [1]
    assert r.decision == "tumour (p = 0.75)" and "decision" not in r.summary()


def test_bad_thresholds_are_refused():
    with pytest.raises(ResultError, match="1 threshold.*2 class"):
        _result(thresholds=[0.5])
    with pytest.raises(ResultError, match="finite"):
        _result(thresholds=[0.5, float("nan")])
