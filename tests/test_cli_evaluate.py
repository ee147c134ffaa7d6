"""`milview evaluate` on a `milview run`-style folder: CSV, summary, plots, JSON lines, errors."""

from __future__ import annotations

import csv
import json

import pytest

from napari_milview.cli import main

from .evidence.demo_run import demo_run


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_run(tmp_path_factory, 4242)


def _lines(capsys):
    out = capsys.readouterr().out
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def test_evaluate_a_results_folder(demo, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["evaluate", str(demo.folder), "--annotations", str(demo.xml.parent),
               "--out", str(out), "--steps", "20"])
    assert rc == 0
    lines = _lines(capsys)
    row, summary = lines[0], lines[-1]
    assert len(lines) == 2
    for key in ("slide", "auroc", "average_precision", "topk_precision", "deletion_auc",
                "random_deletion_auc", "entropy", "effective_n"):
        assert key in row
    assert row["slide"] == demo.slide_id and row["auroc"] > 0.95
    assert row["deletion_auc"] < row["random_deletion_auc"]
    assert summary["slides"] == 1
    with open(out / f"{demo.slide_id}.evidence.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["source"] == "branch/mean" and len(rows) == 11  # 5 + mean + 5 raw
    for name in (f"{demo.slide_id}.roc_pr.png", f"{demo.slide_id}.curves.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    summ = json.loads((out / "summary.json").read_text())
    assert summ["metrics"]["auroc"]["mean"] == pytest.approx(row["auroc"], abs=1e-5)
    assert "median" in (out / "summary.csv").read_text().splitlines()[0]


def test_evaluate_one_result_with_geojson_no_faithfulness(demo, tmp_path, capsys):
    rc = main(["evaluate", str(demo.result_path), "--annotations", str(demo.geojson),
               "--out", str(tmp_path / "o"), "--no-faithfulness", "--sources", "branch/0"])
    assert rc == 0
    row = _lines(capsys)[0]
    assert row["source"] == "branch/0" and row["deletion_auc"] is None and row["auroc"] > 0.9


def test_missing_annotation_policies(demo, tmp_path, capsys):
    empty = tmp_path / "none"
    empty.mkdir()
    assert main(["evaluate", str(demo.folder), "--annotations", str(empty), "--out",
                 str(tmp_path / "a"), "--no-faithfulness"]) == 2
    assert "no result had an annotation" in capsys.readouterr().err
    assert main(["evaluate", str(demo.folder), "--annotations", str(empty), "--out",
                 str(tmp_path / "b"), "--no-faithfulness", "--missing", "negative"]) == 0
    row = _lines(capsys)[0]
    assert row["auroc"] is None and row["n_positive"] == 0


def test_errors_are_one_line_exit_2(demo, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "nope.h5"), "--annotations", str(demo.xml)], "no such result"),
        ([str(demo.result_path), "--annotations", str(demo.xml), "--dice-rule", "mean"],
         "--dice-rule"),
        ([str(demo.result_path), "--annotations", str(demo.xml), "--model",
          str(tmp_path / "gone.pt")], "gone.pt"),
    ]
    for argv, needle in cases:
        rc = main(["evaluate", *argv, "--out", str(tmp_path / "e")])
        err = capsys.readouterr().err
        assert rc == 2, argv
        assert needle in err and err.count("\n") == 1 and err.startswith("milview evaluate:")


def _regions(demo, tmp_path):
    """A box around the planted lesion, as GeoJSON named like the slide."""
    from napari_milview.evidence import from_polygons, write_geojson

    from .evidence.demo_run import lesion_box

    folder = tmp_path / "regions"
    folder.mkdir()
    return write_geojson(from_polygons([lesion_box(demo)], label="drawn"),
                         folder / f"{demo.slide_id}.geojson")


def test_evaluate_with_folds_and_what_if(demo, tmp_path, capsys):
    from napari_milview.overlay.export import read_sidecar
    from napari_milview.result import load_result

    from .evidence.demo_run import perturbed_copies

    folds = perturbed_copies(tmp_path / "folds", [1, 2], 0.3)
    regions = _regions(demo, tmp_path)
    out = tmp_path / "ev"
    rc = main(["evaluate", str(demo.folder), "--annotations", str(demo.xml.parent),
               "--out", str(out), "--steps", "10", "--random-orders", "1",
               "--folds", *map(str, folds), "--what-if", str(regions.parent)])
    assert rc == 0
    row, summary = _lines(capsys)
    assert row["folds"] == 3 and [m["name"] for m in row["fold_members"]] == [
        "demo (result)", folds[0].name, folds[1].name]
    assert row["prediction_mean"] > 0.99 and 0 < row["prediction_std"] < 0.01
    assert 2 < row["rank_spread_mean"] < 30 and 0.7 < row["spearman_mean"] < 0.99
    assert len(row["fold_prediction_mean"]) == 2 and row["deletion_auc"] is not None
    # what-if: without the box around the lesion the slide is called normal
    whole, box = row["what_if"]
    assert whole["region"] == "all" and box["region"] == "drawn 1"
    assert box["n_patches"] >= 20 and box["without"][1] < 0.1 and box["alone"][1] > 0.99
    assert row["what_if_change"] < -0.9 and row["what_if_regions"] == 1
    sid = demo.slide_id
    with open(out / f"{sid}.disagreement.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    result = load_result(demo.result_path)
    assert len(rows) == result.n and rows[0]["source"] == "branch/mean"
    spread = [float(r["rank_spread"]) for r in rows]
    assert sum(spread) / len(spread) == pytest.approx(row["rank_spread_mean"], rel=1e-4)
    dis = load_result(out / f"{sid}.disagreement.h5")
    assert dis.default_source == "disagreement/rank_spread" and dis.n == result.n
    assert read_sidecar(out / f"{sid}.disagreement.milview.json")["attention_source"] == \
        "disagreement/rank_spread"
    with open(out / f"{sid}.what_if.csv", encoding="utf-8") as fh:
        wi = list(csv.DictReader(fh))
    assert [r["region"] for r in wi] == ["all", "all", "drawn 1", "drawn 1"]
    summ = json.loads((out / "summary.json").read_text())["metrics"]
    assert summ["rank_spread_mean"]["n"] == 1 and summ["what_if_change"]["mean"] < -0.9
    # the folder read again: the disagreement h5 is not taken for a slide's result
    assert main(["evaluate", str(out), "--annotations", str(demo.xml.parent), "--out",
                 str(tmp_path / "again"), "--no-faithfulness"]) == 2
    assert "no *.result.h5" in capsys.readouterr().err


def test_folds_only_without_faithfulness_needs_no_model(demo, tmp_path, capsys):
    from .evidence.demo_run import perturbed_copies

    folds = perturbed_copies(tmp_path / "folds", [1, 2], 0.3)
    rc = main(["evaluate", str(demo.result_path), "--annotations", str(demo.xml),
               "--out", str(tmp_path / "o"), "--no-faithfulness", "--folds-only",
               "--folds", *map(str, folds), "--folds-sources", "branch/0,branch/1"])
    assert rc == 0
    row = _lines(capsys)[0]
    assert row["folds"] == 2 and row["deletion_auc"] is None and "what_if" not in row
    with open(tmp_path / "o" / f"{demo.slide_id}.disagreement.csv", encoding="utf-8") as fh:
        assert {r["source"] for r in csv.DictReader(fh)} == {"branch/0", "branch/1"}


def test_fold_and_what_if_errors_are_one_line(demo, tmp_path, capsys):
    import torch

    from napari_milview.mil import build_model
    from napari_milview.mil.base import ModelCard
    from napari_milview.mil.checkpoint import save_model

    torch.manual_seed(0)
    other = save_model(build_model("abmil", in_dim=32, n_classes=2),
                       ModelCard(arch="abmil", classes=["a", "b"], feature_dim=32),
                       tmp_path / "other.safetensors")
    base = [str(demo.result_path), "--annotations", str(demo.xml), "--no-faithfulness"]
    cases = [
        (["--folds", str(other)], "other.safetensors: the model expects 32-d features"),
        (["--folds", str(tmp_path / "gone.pt")], "--folds " + str(tmp_path / "gone.pt")),
        (["--folds-only", "--folds", "demo"], "--folds-only needs at least 2"),
        (["--what-if", str(tmp_path / "nowhere.geojson")], "--what-if"),
        (["--folds", "demo"], "at least 2 members"),  # the result's model is "demo" itself
    ]
    for extra, needle in cases:
        rc = main(["evaluate", *base, *extra, "--out", str(tmp_path / "e")])
        err = capsys.readouterr().err
        assert rc == 2, extra
        assert needle in err and err.count("\n") == 1 and err.startswith("milview evaluate:")
