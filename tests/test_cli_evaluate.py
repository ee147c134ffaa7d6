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
