"""evaluate() on the demo model's planted lesion, rows, summaries and plots.

Measured on seeds 4242 and 2026 (never used to train the demo model): AUROC 1.000 of every
source at overlap >= 0.5; deletion area 0.09-0.13 against 0.98 for random orders.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from napari_milview.evidence import read_annotations
from napari_milview.evidence.plots import class_name, curves_png, roc_pr_png
from napari_milview.evidence.report import (
    ROW_COLUMNS,
    WHAT_IF_COLUMNS,
    EvidenceReport,
    bag_for,
    concentration_input,
    evaluate,
    model_for,
    slide_stem,
    summarise,
)
from napari_milview.result import Result, load_result

from .demo_run import demo_run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", params=[4242, 2026])
def demo(request, tmp_path_factory):
    return demo_run(tmp_path_factory, request.param)


def test_demo_model_localises_and_is_faithful_on_unseen_slides(demo):
    result = load_result(demo.result_path)
    model, _ = model_for(result)
    bag = bag_for(result, demo.result_path)
    rep = evaluate(result, demo.xml, model=model, bag=bag)
    row = rep.to_row()
    assert row["slide"] == demo.slide_id and row["source"] == "branch/mean"
    assert row["n_positive"] >= 20
    assert row["auroc"] > 0.95 and row["average_precision"] > 0.9
    assert row["topk_precision"] > 0.8 and row["mass_inside"] > 0.8
    assert row["deletion_auc"] < row["random_deletion_auc"] - 0.5
    assert row["insertion_auc"] >= row["random_insertion_auc"] - 0.01
    # ACMIL's per-branch view: a row per branch, each localising
    branches = [r for r in rep.rows() if r["source"].startswith("branch/")
                and r["source"] != "branch/mean"]
    assert len(branches) == 5 and all(r["auroc"] > 0.9 for r in branches)
    assert all(1 < r["effective_n"] < row["n"] for r in branches)
    raw = rep.to_row("raw/branch/0")  # same ranking as branch/0: same curves, softmax mass
    assert raw["deletion_auc"] == rep.to_row("branch/0")["deletion_auc"]
    assert raw["effective_n"] == pytest.approx(rep.to_row("branch/0")["effective_n"], rel=1e-4)


def test_geojson_and_xml_give_the_same_labels(demo):
    result = load_result(demo.result_path)
    a = evaluate(result, demo.xml)
    b = evaluate(result, read_annotations(demo.geojson))
    np.testing.assert_allclose(a.overlap, b.overlap, atol=1e-9)
    assert "faithfulness not measured" in a.to_row()["note"]
    assert math.isnan(a.to_row()["deletion_auc"])


def _toy(n=40, seed=0):
    rng = np.random.default_rng(seed)
    coords = np.stack([np.arange(n) * 256, np.zeros(n)], 1)
    att = rng.random(n)
    att[:8] += 2
    att /= att.sum()
    res = Result(coords=coords, patch_size_level0=256, sources={"attention": att,
                 "raw/attention": np.log(att)}, default_source="attention",
                 classes=["a", "b"], logits=[0, 1], probabilities=[0.27, 0.73], arch="abmil",
                 slide="/x/toy-1.svs")
    overlap = np.zeros(n)
    overlap[:8] = 1.0
    overlap[8] = 0.4  # below the default fraction 0.5: negative, but counted by fraction=0
    return res, overlap


def test_rows_csv_summary_and_fraction(tmp_path):
    res, overlap = _toy()
    rep = evaluate(res, overlap)  # no model: faithfulness is NaN
    assert isinstance(rep, EvidenceReport) and rep.slide == "toy-1" == slide_stem(res)
    row = rep.to_row()
    assert list(row) == list(ROW_COLUMNS) and row["n_positive"] == 8
    assert evaluate(res, overlap, fraction=0).to_row()["n_positive"] == 9
    assert [r["source"] for r in rep.rows()] == ["attention", "raw/attention"]
    text = rep.to_csv(tmp_path / "toy.csv").read_text()
    assert text.splitlines()[0].split(",")[:3] == ["slide", "source", "n"]
    assert rep.json_row()["deletion_auc"] is None
    neg = evaluate(res, np.zeros(res.n))  # a slide without lesion: NaN, not an error
    s = summarise([rep, neg])
    assert s["slides"] == 2 and s["metrics"]["auroc"]["n"] == 1
    assert s["metrics"]["auroc"]["mean"] == pytest.approx(row["auroc"])
    with pytest.raises(ValueError, match="no attention source"):
        evaluate(res, overlap, sources=["nope"])
    with pytest.raises(ValueError, match="overlap values"):
        evaluate(res, overlap[:5])


def test_plots_are_png():
    from napari_milview.evidence.faithfulness import deletion_insertion, descending
    from napari_milview.mil import build_model

    res, overlap = _toy()
    rep = evaluate(res, overlap)
    png = roc_pr_png(rep.sources["attention"]["localisation"], "toy")
    assert png.startswith(PNG) and len(png) > 5000
    model = build_model("abmil", in_dim=4, n_classes=2)
    fa = deletion_insertion(model, torch.randn(40, 4), descending(res.attention()), steps=5)
    assert curves_png(fa, "toy").startswith(PNG)
    named = curves_png(fa, "toy", classes=["normal", "lesion"])
    assert named.startswith(PNG) and named != curves_png(fa, "toy")  # the y axis reads p(...)
    assert class_name(1, ["normal", "lesion"]) == "lesion"
    assert class_name(1) == class_name(1, ["a", ""]) == "class 1"
    assert class_name(2, ["normal", "lesion"]) == "class 2"


def test_concentration_input_softmaxes_raw_logits_only():
    scores = np.array([2.0, -1.0, 0.5])
    s, note = concentration_input("raw/attention", scores)
    np.testing.assert_allclose(s, np.exp(scores) / np.exp(scores).sum())
    assert "softmax" in note
    s, note = concentration_input("attention", scores)
    assert s is scores and note == ""


def test_what_if_a_region_around_the_lesion_removes_the_prediction(demo, tmp_path):
    from napari_milview.evidence import from_polygons, write_geojson

    from .demo_run import lesion_box

    result = load_result(demo.result_path)
    model, _ = model_for(result)
    bag = bag_for(result, demo.result_path)
    box = lesion_box(demo)
    x0, x1 = (0, box[0, 0] - 300) if box[0, 0] > 4096 - box[1, 0] else (box[1, 0] + 300, 4096)
    far = np.array([[x0, 0], [x1, 0], [x1, 3072], [x0, 3072]], float)  # the wider side
    regions = write_geojson(from_polygons([box, far], label="drawn"), tmp_path / "r.geojson")
    rep = evaluate(result, demo.xml, model=model, bag=bag, steps=10, random_orders=1,
                   what_if=regions)
    whole, lesion, background = rep.what_if
    assert [e["region"] for e in rep.what_if] == ["all", "drawn 1", "drawn 2"]
    assert result.probabilities[1] > 0.99 and rep.predicted == 1
    # without the lesion's box the slide is called normal; the box alone keeps "lesion"
    assert lesion["without"][1] < 0.1 and lesion["alone"][1] > 0.99
    assert lesion["change_without"][1] < -0.9
    # a region as large, away from the lesion, changes nothing; alone it is normal tissue
    assert background["n_patches"] > 20 and abs(background["change_without"][1]) < 0.01
    assert background["alone"][1] < 0.1
    row = rep.to_row()
    assert row["what_if_regions"] == 2 and row["what_if_change"] == pytest.approx(
        whole["change_without"][1]) and row["what_if_without"] < 0.1
    details = rep.json_details()
    assert "fold_members" not in details and details["what_if"][1]["region"] == "drawn 1"
    assert details["what_if"][1]["without"][1] == pytest.approx(lesion["without"][1], rel=1e-5)
    rows = list(csv.DictReader(rep.what_if_csv(tmp_path / "w.csv").open(encoding="utf-8")))
    assert list(rows[0]) == list(WHAT_IF_COLUMNS) and len(rows) == 3 * 2
    assert rows[3]["region"] == "drawn 1" and rows[3]["class"] == "lesion"
    assert float(rows[3]["without"]) == pytest.approx(lesion["without"][1])
    s = summarise([rep])
    assert s["metrics"]["what_if_change"]["mean"] == pytest.approx(row["what_if_change"])
    assert s["metrics"]["rank_spread_mean"]["n"] == 0  # no folds given
    with pytest.raises(ValueError, match="needs the model"):
        evaluate(result, demo.xml, bag=bag, what_if=regions)
