"""``milview robustness``: one JSON line per condition, a summary line, CSV + JSON files.

Real parts: a synthetic SVS with a planted lesion, the shipped demo encoder and model.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from napari_milview.cli import main
from napari_milview.stain.robustness import DEFAULT_CONDITIONS, clear_cache


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from napari_milview.synthetic import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("clirob") / "clirob.svs", width=3072,
                                 height=2304, mpp=0.5, tile=256, levels=3, seed=1502,
                                 lesion=True).path


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def _lines(capsys) -> tuple[list[dict], str]:
    cap = capsys.readouterr()
    return [json.loads(ln) for ln in cap.out.splitlines() if ln.strip()], cap.err


def test_prints_conditions_then_summary_and_writes_files(slide, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["robustness", str(slide), "--model", "demo", "--encoder", "demo", "--out",
            str(out), "--device", "cpu"]
    assert main(args) == 0
    lines, err = _lines(capsys)
    rows, summary = lines[:-1], lines[-1]
    assert [r["condition"] for r in rows] == list(DEFAULT_CONDITIONS)
    for r in rows:
        p = np.asarray(r["probabilities"])
        assert p.shape == (2,) and np.isfinite(p).all() and p.sum() == pytest.approx(1, 1e-5)
        assert r["classes"] == ["normal", "lesion"] and r["predicted"] == int(np.argmax(p))
        assert r["features"] == "extracted" and 0 <= r["jaccard"] <= 1
    assert rows[0]["predicted_class"] == "lesion" and rows[0]["jaccard"] == 1.0
    probs = np.array([r["probabilities"] for r in rows])
    for i, c in enumerate(["normal", "lesion"]):
        assert summary["range"][c] == pytest.approx(probs[:, i].max() - probs[:, i].min(),
                                                    abs=1e-6)
        assert summary["range"][c] >= 0
    assert set(summary["jaccard"]) == set(DEFAULT_CONDITIONS)
    assert 0 <= summary["stability"]["mean"] <= summary["stability"]["max"] < 1
    assert "robustness" in err  # the progress bar went to stderr
    # files
    stem = slide.name.split(".")[0]
    assert summary["csv"] == str(out / f"{stem}.robustness.csv")
    table = list(csv.DictReader(Path(summary["csv"]).read_text().splitlines()))
    assert [t["condition"] for t in table] == [*DEFAULT_CONDITIONS, "min-max range"]
    doc = json.loads(Path(summary["json"]).read_text())
    assert doc["summary"]["range"] == summary["range"]
    assert len(list((out / "cache").glob("*.h5"))) == len(DEFAULT_CONDITIONS)
    # the second run re-uses the bag files: same numbers
    clear_cache()
    assert main(args) == 0
    again, _ = _lines(capsys)
    assert {r["features"] for r in again[:-1]} == {"disk"}
    np.testing.assert_allclose([r["probabilities"] for r in again[:-1]], probs, rtol=1e-6)


def test_chosen_conditions_without_cache(slide, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["robustness", str(slide), "--model", "demo", "--encoder", "demo", "--out",
                 str(out), "--device", "cpu", "--conditions", "hed-light,reinhard",
                 "--no-cache", "--top-k", "5"]) == 0
    lines, _ = _lines(capsys)
    assert [r["condition"] for r in lines[:-1]] == ["reference", "hed-light", "reinhard"]
    assert lines[-1]["top_k"] == 5 and not (out / "cache").exists()


@pytest.mark.parametrize("extra, match", [
    (["--model", "MISSING.safetensors", "--encoder", "demo"], "MISSING"),
    (["--model", "BAD", "--encoder", "demo"], "BAD"),
    (["--model", "demo", "--encoder", "demo", "--conditions", "sepia"], "sepia"),
    (["--model", "demo", "--encoder", "resnet50_trunc"], "resnet50_trunc"),
])
def test_errors_are_one_line_exit_2(slide, tmp_path, capsys, extra, match):
    if "BAD" in extra:  # a file that is not a checkpoint
        bad = tmp_path / "BAD.safetensors"
        bad.write_bytes(b"not a checkpoint at all")
        extra = [str(bad) if a == "BAD" else a for a in extra]
    rc = main(["robustness", str(slide), "--out", str(tmp_path / "o"), "--device", "cpu",
               *extra])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == "" and not (tmp_path / "o").exists()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("milview robustness: error: ")
    assert match in lines[0]


def test_out_folder_parent_must_exist(slide, tmp_path, capsys):
    rc = main(["robustness", str(slide), "--model", "demo", "--encoder", "demo", "--out",
               str(tmp_path / "no" / "such")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
