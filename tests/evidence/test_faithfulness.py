"""Deletion / insertion curves and what-if runs on cached features."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_milview.evidence.annotations import Annotations, Region, write_geojson
from napari_milview.evidence.faithfulness import (
    deletion_insertion,
    descending,
    subset_probabilities,
    what_if,
    what_if_regions,
)
from napari_milview.mil import build_model
from napari_milview.mil.base import MILModel, MILOutput
from napari_milview.pipeline import Cancelled


class _Constant(MILModel):
    """Logits that ignore the bag: no ranking can change the prediction."""

    arch = "test_constant"

    def __init__(self, in_dim=8, n_classes=2):
        super().__init__()
        self._set_hparams(in_dim=in_dim, n_classes=n_classes)
        self.bias = torch.nn.Parameter(torch.tensor([0.3, -0.2]))

    def _forward(self, x, with_sources):
        return MILOutput(logits=self.bias * 1.0, sources={}, default_source="attention")


class _MeanPool(MILModel):
    """Logits from the mean feature: every patch weighs the same, whatever a map says."""

    arch = "test_meanpool"

    def __init__(self, in_dim=8, n_classes=2):
        super().__init__()
        self._set_hparams(in_dim=in_dim, n_classes=n_classes)
        self.fc = torch.nn.Linear(in_dim, n_classes)

    def _forward(self, x, with_sources):
        return MILOutput(logits=self.fc(x.mean(0)), sources={}, default_source="attention")


@pytest.mark.parametrize("arch,hp", [("abmil", {}), ("abmil", {"gated": False}),
                                     ("acmil_ga", {}), ("clam_sb", {}),
                                     ("clam_mb", {"n_classes": 3})])
def test_pooled_path_equals_forward(arch, hp):
    torch.manual_seed(1)
    model = build_model(arch, **{"in_dim": 16, "n_classes": 2, **hp})
    x = torch.randn(97, 16) * 2
    order = descending(np.random.default_rng(0).random(97))
    a = deletion_insertion(model, x, order, steps=7, random_orders=2, k=5, path="pooled")
    b = deletion_insertion(model, x, order, steps=7, random_orders=2, k=5, path="forward")
    assert a["path"] == "pooled" and b["path"] == "forward"
    for key in ("deletion", "insertion", "random_deletion", "random_insertion"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-5)
    assert a["topk_probability"] == pytest.approx(b["topk_probability"], abs=1e-5)
    with torch.inference_mode():  # the curve's ends are the full bag and the top patch
        full = torch.softmax(model(x), -1)[a["target"]].item()
        one = torch.softmax(model(x[order[:1]]), -1)[a["target"]].item()
    assert a["deletion"][0] == pytest.approx(full, abs=1e-5) == a["insertion"][-1]
    assert a["insertion"][0] == pytest.approx(one, abs=1e-5)
    p, s, path = subset_probabilities(model, x, order, [3, 97], [0, 50])
    with torch.inference_mode():
        want = torch.softmax(model(x[order[50:]]), -1).double().numpy()
    np.testing.assert_allclose(s[1], want, atol=1e-5)
    assert path == "pooled"


def test_a_model_that_ignores_the_map_gives_deletion_equal_random():
    x = torch.randn(60, 8)
    order = descending(np.arange(60.0))
    r = deletion_insertion(_Constant(), x, order, steps=10)
    assert r["path"] == "forward"
    assert r["deletion_auc"] == pytest.approx(r["random_deletion_auc"], abs=1e-12)
    assert r["insertion_auc"] == pytest.approx(r["random_insertion_auc"], abs=1e-12)


def test_meanpool_with_an_unrelated_ranking_is_near_random():
    torch.manual_seed(0)
    model = _MeanPool()
    x = torch.randn(400, 8)
    order = descending(np.random.default_rng(3).random(400))  # unrelated to the model
    r = deletion_insertion(model, x, order, steps=20, random_orders=8)
    assert abs(r["deletion_auc"] - r["random_deletion_auc"]) < 0.03
    assert abs(r["insertion_auc"] - r["random_insertion_auc"]) < 0.03


def test_meanpool_ranked_by_its_own_evidence_beats_random():
    torch.manual_seed(0)
    model = _MeanPool()
    x = torch.randn(300, 8)
    with torch.no_grad():
        contrib = (x @ (model.fc.weight[1] - model.fc.weight[0])).numpy()  # pushes class 1
    r = deletion_insertion(model, x, descending(contrib), target=1, steps=20)
    assert r["deletion_auc"] < r["random_deletion_auc"] - 0.1
    assert r["insertion_auc"] > r["random_insertion_auc"] + 0.1


def test_curve_shape_small_bags_and_seeds():
    model = build_model("abmil", in_dim=8, n_classes=2)
    x = torch.randn(3, 8)
    r = deletion_insertion(model, x, [2, 0, 1], steps=10, random_orders=5, seed=4)
    assert r["fractions"].shape == r["deletion"].shape == (11,)
    assert r["fractions"][0] == 0 and r["fractions"][-1] == 1
    assert np.all(np.diff(r["fractions"]) >= 0) and r["k"] == 3
    again = deletion_insertion(model, x, [2, 0, 1], steps=10, random_orders=5, seed=4)
    np.testing.assert_array_equal(r["random_deletion"], again["random_deletion"])
    for bad in ({"steps": 0}, {"random_orders": -1}, {"target": 5}):
        with pytest.raises(ValueError):
            deletion_insertion(model, x, [2, 0, 1], **bad)
    with pytest.raises(ValueError, match="permutation"):
        deletion_insertion(model, x, [0, 0, 1])
    with pytest.raises(ValueError, match="pooled"):
        deletion_insertion(_MeanPool(), torch.randn(5, 8), range(5), path="pooled")


def test_what_if_without_and_alone():
    torch.manual_seed(0)
    model = build_model("abmil", in_dim=8, n_classes=2)
    x = torch.randn(20, 8)
    inside = np.zeros(20, bool)
    inside[:5] = True
    with torch.inference_mode():
        full = torch.softmax(model(x), -1).double().numpy()
        rest = torch.softmax(model(x[5:]), -1).double().numpy()
        alone = torch.softmax(model(x[:5]), -1).double().numpy()
    w = what_if(model, x, inside, "without")
    np.testing.assert_allclose(w["probabilities"], rest, atol=1e-6)
    np.testing.assert_allclose(w["baseline"], full, atol=1e-6)
    np.testing.assert_allclose(w["change"], rest - full, atol=1e-6)
    assert w["n_kept"] == 15
    np.testing.assert_allclose(what_if(model, x, inside, "alone")["probabilities"], alone,
                               atol=1e-6)
    with pytest.raises(ValueError, match="no patch left"):
        what_if(model, x, np.ones(20, bool), "without")
    with pytest.raises(ValueError, match="mode"):
        what_if(model, x, inside, "both")


@pytest.mark.parametrize("path", ["pooled", "forward"])
def test_progress_and_cancel_between_sub_bags(path):
    """progress(done, total) counts every sub-bag up to total; a cancel (an Event or a
    callable) stops the run between two evaluations with Cancelled; the numbers are those of
    a run without either."""
    torch.manual_seed(0)
    model = build_model("abmil", in_dim=8, n_classes=2)
    x = torch.randn(30, 8)
    order = descending(np.random.default_rng(1).random(30))
    seen = []
    r = deletion_insertion(model, x, order, steps=6, random_orders=3, path=path,
                           progress=lambda d, t: seen.append((d, t)))
    total = 4 * 2 * 7 + 1
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted({d for d, _ in seen})  # strictly increasing
    assert len(seen) == (4 if path == "pooled" else total)  # one per ordering / per call
    plain = deletion_insertion(model, x, order, steps=6, random_orders=3, path=path)
    for key in ("deletion", "insertion", "random_deletion", "random_insertion"):
        np.testing.assert_array_equal(r[key], plain[key])

    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        deletion_insertion(model, x, order, steps=6, path=path, cancel=stop)
    calls = []

    def stop_after_two(d, t):
        calls.append(d)

    with pytest.raises(Cancelled, match="cancelled"):
        deletion_insertion(model, x, order, steps=6, random_orders=3, path=path,
                           progress=stop_after_two, cancel=lambda: len(calls) >= 2)
    assert len(calls) == 2  # stopped at the next check, nothing evaluated after
    with pytest.raises(TypeError, match="cancel"):
        deletion_insertion(model, x, order, cancel=object())


def _box(x0, y0, x1, y1, **kw):
    return Region(exterior=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float), **kw)


def test_what_if_regions_by_hand(tmp_path):
    torch.manual_seed(0)
    model = build_model("abmil", in_dim=8, n_classes=2)
    x = torch.randn(6, 8)
    coords = np.stack([np.arange(6) * 100, np.zeros(6)], 1)  # one row of 100 px patches
    ann = Annotations(regions=[
        _box(0, 0, 300, 100, label="tumor", name="A"),  # patches 0-2
        _box(400, 0, 460, 100, label="tumor"),  # 60 % of patch 4: in at 0.5, out at 0.7
        _box(200, 0, 300, 100, exclude=True, label="_2"),  # cuts patch 2 out of A
        _box(5000, 0, 5100, 100, label="other"),  # no patch
    ])

    def probs(idx):
        with torch.inference_mode():
            return torch.softmax(model(x[idx]), -1).double().numpy()

    base = probs(np.arange(6))
    got = what_if_regions(model, x, coords, 100, ann, fraction=0.5)
    assert [e["region"] for e in got] == ["all", "A", "tumor 2", "other 1"]
    assert [e["n_patches"] for e in got] == [3, 2, 1, 0]
    for e, inside in zip(got[:3], ([0, 1, 4], [0, 1], [4]), strict=True):
        out = np.setdiff1d(np.arange(6), inside)
        np.testing.assert_allclose(e["without"], probs(out), atol=1e-6)
        np.testing.assert_allclose(e["alone"], probs(np.array(inside)), atol=1e-6)
        np.testing.assert_allclose(e["change_without"], probs(out) - base, atol=1e-6)
        np.testing.assert_allclose(e["baseline"], base, atol=1e-6)
    empty = got[3]  # nothing inside: nothing changes without it, nothing to run alone
    np.testing.assert_allclose(empty["without"], base)
    assert empty["alone"] is None and empty["note"] == "no patch inside"
    strict = what_if_regions(model, x, coords, 100, ann, fraction=0.7)
    assert [e["n_patches"] for e in strict] == [2, 2, 0, 0]
    # from a file, and a region over every patch
    path = write_geojson(Annotations(regions=[_box(-10, -10, 700, 200, label="t")]),
                         tmp_path / "all.geojson")
    whole = what_if_regions(model, x.numpy(), coords, 100, path)
    assert whole[0]["n_patches"] == 6 and whole[0]["without"] is None
    np.testing.assert_allclose(whole[0]["alone"], base, atol=1e-6)
    with pytest.raises(ValueError, match="no region to leave out"):
        what_if_regions(model, x, coords, 100, Annotations(regions=[ann.regions[2]]))
    with pytest.raises(ValueError, match="coordinates for 6"):
        what_if_regions(model, x, coords[:5], 100, ann)
