"""The staining-robustness run (``stain/robustness.py``) on a real synthetic slide.

Real parts: a synthetic SVS with a planted lesion read by OpenSlide, the shipped demo encoder
and demo ACMIL-GA (trained to find the lesion), real torch forwards, real h5 cache files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_milview.assets import demo_model_path
from napari_milview.features.bag import BagError
from napari_milview.features.encoders import build_encoder, preprocess
from napari_milview.mil.checkpoint import load_model
from napari_milview.pipeline import THREAD_PREFIX, Cancelled, attend, collect, extract_bag
from napari_milview.slide import open_slide
from napari_milview.stain import estimate_slide, make_condition
from napari_milview.stain.robustness import (
    DEFAULT_CONDITIONS,
    RobustnessReport,
    build_condition,
    clear_cache,
    robustness,
)
from napari_milview.tissue import patch_grid, read_patches


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(slide, grid, encoder, model, card, lesion slide record): 3072 x 2304 px at 0.5 um/px,
    64-um patches (~220), the demo encoder and model."""
    from napari_milview.synthetic import write_synthetic_slide

    rec = write_synthetic_slide(tmp_path_factory.mktemp("rob") / "rob.svs", width=3072,
                                height=2304, mpp=0.5, tile=256, levels=3, seed=1500,
                                lesion=True)
    encoder = build_encoder("demo")
    model, card = load_model(demo_model_path())
    with open_slide(rec.path) as slide:
        grid = patch_grid(slide, patch_px=64, patch_um=64.0)
        yield slide, grid, encoder, model, card, rec


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


class Forwards:
    """Counts the encoder's forward calls (a real forward hook)."""

    def __init__(self, encoder):
        self.n = 0
        self.handle = encoder.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


def _run(case, **kw) -> RobustnessReport:
    slide, grid, encoder, model, card, _ = case
    kw.setdefault("device", "cpu")
    return collect(robustness(slide, grid, encoder, model, card, **kw))


def test_report_is_finite_and_the_reference_is_a_plain_run(case, tmp_path):
    slide, grid, encoder, model, card, _ = case
    steps = []
    rep = collect(robustness(slide, grid, encoder, model, card, device="cpu", batch_size=32),
                  steps.append)
    n, k = len(grid), len(DEFAULT_CONDITIONS)
    assert rep.conditions == list(DEFAULT_CONDITIONS)
    assert rep.probabilities.shape == (k, 2) and np.isfinite(rep.probabilities).all()
    np.testing.assert_allclose(rep.probabilities.sum(1), 1.0, rtol=1e-5)
    # the reference condition is exactly a plain pipeline run
    bag = collect(extract_bag(slide, grid, encoder, device="cpu", batch_size=32))
    plain = attend(bag, model, card, device="cpu")
    np.testing.assert_array_equal(rep.probabilities[0], plain.probabilities)
    np.testing.assert_array_equal(rep.reference.attention(), plain.attention())
    assert rep.reference.predicted_class == "lesion"
    # range per class = max - min across conditions, >= 0
    assert (rep.prob_range >= 0).all()
    np.testing.assert_allclose(rep.prob_range, rep.probabilities.max(0) -
                               rep.probabilities.min(0))
    assert rep.range_dict()["lesion"]["range"] == pytest.approx(float(rep.prob_range[1]))
    # top-K overlap: the reference with itself is 1; the others are Jaccard indices
    assert rep.jaccard["reference"] == 1.0 and rep.top_k == 20
    assert all(0.0 <= v <= 1.0 for v in rep.jaccard.values())
    # stability: [N] spread of rank percentiles in [0, 1); the conditions did change things
    assert rep.stability.shape == (n,) and np.isfinite(rep.stability).all()
    assert (rep.stability >= 0).all() and (rep.stability < 1).all()
    assert rep.stability.max() > 0
    for name in DEFAULT_CONDITIONS[1:]:
        assert not np.array_equal(rep.results[name].attention(), plain.attention()), name
    # progress: patches counted over all conditions, one attend step per condition
    assert steps[0].stage == "stain"
    attends = [s for s in steps if s.stage == "attend"]
    assert [s.condition for s in attends] == list(DEFAULT_CONDITIONS)
    assert attends[-1].done == attends[-1].total == k * n
    done = [s.done for s in steps]
    assert done == sorted(done)
    assert all(s.result is not None for s in attends)


def test_the_condition_is_applied_to_the_patches_before_encoding(case):
    """``extract_bag(transform=...)``: the features are those of the perturbed patches."""
    slide, grid, encoder, *_ = case
    sub = dataclasses.replace(grid, coords=grid.coords[:12],
                              tissue_fraction=grid.tissue_fraction[:12])
    pert = make_condition("low-intensity", estimate_slide(slide))
    bag = collect(extract_bag(slide, sub, encoder, device="cpu", batch_size=5, transform=pert))
    patches = read_patches(slide, sub, np.arange(12))
    with torch.inference_mode():
        want = encoder(preprocess(pert(patches), encoder.spec)).numpy()
        plain = encoder(preprocess(patches, encoder.spec)).numpy()
    np.testing.assert_allclose(bag.features, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(bag.features, plain, atol=1e-3)

    def shrink(x):
        return x[:, ::2]

    with pytest.raises(BagError, match="transform"):
        collect(extract_bag(slide, sub, encoder, device="cpu", transform=shrink))
    assert not any(t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())


def test_second_run_is_served_from_the_caches(case, tmp_path):
    slide, grid, encoder, *_ = case
    cache = tmp_path / "cache"
    with Forwards(encoder) as fw:
        first = _run(case, cache_dir=cache)
    assert fw.n > 0 and set(first.cache.values()) == {"extracted"}
    files = sorted(cache.glob("*.h5"))
    assert len(files) == len(DEFAULT_CONDITIONS)
    assert {f.name.split(".")[1] for f in files} == set(DEFAULT_CONDITIONS)
    # memory: no encoder forward at all, the same numbers
    with Forwards(encoder) as fw:
        again = _run(case, cache_dir=cache)
    assert fw.n == 0 and set(again.cache.values()) == {"memory"}
    np.testing.assert_array_equal(again.probabilities, first.probabilities)
    np.testing.assert_array_equal(again.stability, first.stability)
    # disk (a fresh process would see only the files)
    clear_cache()
    with Forwards(encoder) as fw:
        disk = _run(case, cache_dir=cache)
    assert fw.n == 0 and set(disk.cache.values()) == {"disk"}
    np.testing.assert_allclose(disk.probabilities, first.probabilities, rtol=1e-6)
    # another condition parameter is another cache entry
    other = build_condition("low-intensity", estimate_slide(slide), ratio=0.3)
    assert other.token != make_condition("low-intensity", estimate_slide(slide)).token
    with Forwards(encoder) as fw:
        rep = _run(case, conditions=["reference", other], cache_dir=cache)
    assert rep.cache == {"reference": "memory", "low-intensity": "extracted"} and fw.n > 0
    assert rep.params["low-intensity"]["ratio"] == [0.3, 0.3]
    # a truncated cache file is not trusted: extracted again
    clear_cache()
    files[0].write_bytes(files[0].read_bytes()[:100])
    rep = _run(case, cache_dir=cache)
    assert sorted(rep.cache.values()).count("extracted") == 1


def test_cancel_stops_the_run_and_its_threads(case):
    slide, grid, encoder, model, card, _ = case
    cancel = threading.Event()
    gen = robustness(slide, grid, encoder, model, card, device="cpu", batch_size=8,
                     cancel=cancel)
    seen = []
    with pytest.raises(Cancelled):
        for p in gen:
            seen.append(p)
            if p.stage == "extract" and p.index == 1 and p.done > len(grid) + 8:
                cancel.set()
    last = seen[-1]
    assert last.index == 1 and last.done < 2 * len(grid)  # stopped within condition 2
    assert not any(t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())
    # cancelled before the first step: nothing runs
    cancel = threading.Event()
    cancel.set()
    with Forwards(encoder) as fw, pytest.raises(Cancelled):
        collect(robustness(slide, grid, encoder, model, card, ["reference"], device="cpu",
                           cancel=cancel))
    assert fw.n == 0


def test_exports_csv_and_json(case, tmp_path):
    _, grid, *_ = case
    rep = _run(case, conditions=["reference", "hed-strong"], top_k=7)
    assert rep.conditions == ["reference", "hed-strong"] and rep.top_k == 7
    csv_path = rep.to_csv(tmp_path / "r.csv")
    rows = list(csv.DictReader(Path(csv_path).read_text().splitlines()))
    assert [r["condition"] for r in rows] == ["reference", "hed-strong", "min-max range"]
    assert list(rows[0]) == ["condition", "predicted", "p_normal", "p_lesion",
                             "jaccard_top7", "features"]
    assert float(rows[1]["p_lesion"]) == pytest.approx(float(rep.probabilities[1, 1]),
                                                       abs=1e-6)
    assert float(rows[2]["p_lesion"]) == pytest.approx(float(rep.prob_range[1]), abs=1e-6)
    assert float(rows[0]["jaccard_top7"]) == 1.0
    d = json.loads((rep.to_json(tmp_path / "r.json")).read_text())
    assert d["format"] == "napari-milview-robustness" and d["classes"] == ["normal", "lesion"]
    assert [c["condition"] for c in d["conditions"]] == rep.conditions
    assert d["conditions"][1]["params"]["alpha"] and len(d["stability"]) == len(grid)
    assert d["coords"] == grid.coords.tolist() and d["stain"]["matrix"]
    assert d["range"]["lesion"]["range"] == pytest.approx(float(rep.prob_range[1]))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave nothing behind
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rep.to_csv(tmp_path / "missing" / "r.csv")


def test_reference_alone_and_stability_heatmap(case):
    from napari_milview.overlay.heatmap import heatmap_layer

    _, grid, *_ = case
    rep = _run(case, conditions=["reference"])
    assert rep.conditions == ["reference"] and rep.jaccard == {"reference": 1.0}
    assert (rep.prob_range == 0).all() and (rep.stability == 0).all()
    assert rep.summary()["predicted_changes"] is False
    # conditions without the reference get it first
    rep = _run(case, conditions=["high-intensity"])
    assert rep.conditions == ["reference", "high-intensity"]
    data, kw, kind = heatmap_layer(rep.stability_result(), "stability", mpp=0.5)
    assert kind == "image" and np.nanmax(data) == pytest.approx(float(rep.stability.max()))
    assert kw["scale"] == (64.0, 64.0)  # one cell per 128-px (64 um) patch


@pytest.mark.parametrize("conditions, match", [
    ([], "no conditions"),
    (["reference", "sepia"], "unknown condition"),
    (["low-intensity", "low-intensity"], "given twice"),
])
def test_bad_conditions_are_refused(case, conditions, match):
    with pytest.raises(ValueError, match=match):
        _run(case, conditions=conditions)


def test_bad_top_k_is_refused(case):
    with pytest.raises(ValueError, match="top_k"):
        _run(case, top_k=0)


def test_one_class_threshold_decisions_are_the_rows_predictions():
    """A one-class DSMIL decided against its threshold: a condition that crosses it changes
    the prediction (the argmax over one class never would)."""
    from napari_milview.result import Result

    n = 8
    coords = np.stack([np.arange(n) * 256, np.zeros(n)], 1)

    def res(p):
        return Result(coords=coords, patch_size_level0=256,
                      sources={"class/0": np.linspace(0, 1, n)}, default_source="class/0",
                      classes=["tumor"], logits=[0.0], probabilities=[p], arch="dsmil",
                      thresholds=[0.41])

    rep = RobustnessReport.from_results({"reference": res(0.83), "hed-strong": res(0.3)})
    rows = rep.rows()
    assert [r["predicted_class"] for r in rows] == ["tumor", "not tumor"]
    assert [r["predicted"] for r in rows] == [0, None]
    assert rep.summary()["predicted_changes"] is True
    same = RobustnessReport.from_results({"reference": res(0.83), "hed-strong": res(0.5)})
    assert same.summary()["predicted_changes"] is False
