"""Several checkpoints of one model on one cached bag: maps, disagreement, files, errors.

The folds are copies of the shipped demo model (ACMIL-GA) with seeded noise on every weight
(``demo_run.perturbed_copies``), run on the bag of an unseen synthetic slide (seed 4242).
Measured there: with noise 0.3 x each tensor's std, mean rank spread 10 points over the slide
but 0.1 on the lesion patches, Spearman 0.91-0.93; every copy still predicts the lesion.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from napari_milview.evidence import disagreement
from napari_milview.evidence.folds import (
    DISAGREEMENT_COLUMNS,
    disagreement_result,
    fold_maps,
    fold_sources,
    write_disagreement,
)
from napari_milview.evidence.report import bag_for, evaluate
from napari_milview.mil import build_model
from napari_milview.mil.base import ModelCard
from napari_milview.mil.checkpoint import save_model
from napari_milview.overlay.export import layers_from_sidecar
from napari_milview.result import load_result

from .demo_run import demo_run, perturbed_copies


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_run(tmp_path_factory, 4242)


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / "evidence-folds"
    return {s: perturbed_copies(base, [1, 2, 3], s) for s in (0.1, 0.3, 1.0)}


def test_fold_maps_of_the_result_model_reproduce_the_result(demo):
    result = load_result(demo.result_path)
    bag = bag_for(result, demo.result_path)
    maps, probs, names = fold_maps(bag, ["demo", "demo"])
    assert maps.shape == (2, result.n) and probs.shape == (2, 2)
    assert names == ["demo#0", "demo#1"]  # the same name twice: told apart
    np.testing.assert_allclose(maps[0], result.sources[result.default_source], atol=1e-6)
    np.testing.assert_allclose(probs[0], result.probabilities, atol=1e-6)
    d = disagreement(list(maps), list(probs))
    np.testing.assert_allclose(d["rank_spread"], 0)
    branch, _, _ = fold_maps(bag.features, ["demo"], "branch/3")  # a bare array, a source
    np.testing.assert_allclose(branch[0], result.sources["branch/3"], atol=1e-6)


def test_perturbed_folds_agree_on_the_lesion_and_disagree_more_with_more_noise(demo, folds):
    result = load_result(demo.result_path)
    bag = bag_for(result, demo.result_path)
    rep = evaluate(result, demo.xml, bag=bag, folds=folds[0.3])
    d = rep.disagreement[result.default_source]
    assert rep.members[0] == "demo (result)" and len(rep.members) == 4 and d["m"] == 4
    pos = rep.positive
    # the lesion stays at the top of every fold's ranking; the background shuffles
    assert d["rank_spread"][pos].mean() < 2 < 5 < d["rank_spread"][~pos].mean()
    assert 0.7 < d["spearman_mean"] < 0.99
    assert all(p[1] > 0.99 for p in rep.member_probabilities)  # every fold: lesion
    row = rep.to_row()
    assert row["folds"] == 4 and row["prediction_mean"] > 0.99
    assert row["prediction_std"] == pytest.approx(float(d["prediction_std"][1]))
    assert row["rank_spread_mean"] == pytest.approx(d["rank_spread_mean"])
    spreads = []
    for scale in (0.1, 0.3, 1.0):
        maps, probs, names = fold_maps(bag, folds[scale])
        assert names == [p.name for p in folds[scale]]
        spreads.append(disagreement(list(maps))["rank_spread_mean"])
    assert spreads[0] < spreads[1] < spreads[2]
    # the folds only (no result): three members
    only = evaluate(result, demo.xml, bag=bag, folds=folds[0.3],
                    folds_include_result=False)
    assert only.members == [p.name for p in folds[0.3]] and only.to_row()["folds"] == 3


def test_several_sources_in_one_pass(demo, folds):
    result = load_result(demo.result_path)
    bag = bag_for(result, demo.result_path)
    maps, probs, _ = fold_sources(bag, folds[0.3][:2], ["branch/mean", "branch/0"])
    assert set(maps) == {"branch/mean", "branch/0"} and maps["branch/0"].shape == (2, result.n)
    one, _, _ = fold_maps(bag, folds[0.3][:2], "branch/0")
    np.testing.assert_array_equal(maps["branch/0"], one)


def test_files_open_as_heatmap_layers(demo, folds, tmp_path):
    result = load_result(demo.result_path)
    rep = evaluate(result, demo.xml, bag=bag_for(result, demo.result_path), folds=folds[0.3],
                   folds_sources=["branch/mean", "branch/1"])
    paths = write_disagreement(tmp_path, "s", result, rep.disagreement, rep.members)
    with open(paths["csv"], encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(DISAGREEMENT_COLUMNS) and len(rows) == 2 * result.n
    d = rep.disagreement["branch/mean"]
    got = np.array([float(r["rank_spread"]) for r in rows if r["source"] == "branch/mean"])
    np.testing.assert_allclose(got, d["rank_spread"])
    assert [int(rows[5]["x"]), int(rows[5]["y"])] == result.coords[5].tolist()
    back = load_result(paths["h5"])
    assert list(back.sources) == ["disagreement/mean", "disagreement/std",
                                  "disagreement/rank_spread", "disagreement/branch/1/mean",
                                  "disagreement/branch/1/std",
                                  "disagreement/branch/1/rank_spread"]
    np.testing.assert_allclose(back.sources["disagreement/std"], d["std"], rtol=1e-6)
    np.testing.assert_allclose(back.probabilities, d["prediction_mean"], rtol=1e-6)
    assert back.meta["disagreement"]["members"] == rep.members
    layers = layers_from_sidecar(paths["sidecar"])
    kinds = [md["metadata"].get("milview") for _, md, _ in layers]
    assert "heatmap" in kinds  # napari opens the sidecar as slide + heatmap + top-K
    assert disagreement_result(result, rep.disagreement, rep.members).default_source == \
        "disagreement/rank_spread"


def _save(tmp_path, name, in_dim, n_classes):
    torch.manual_seed(0)
    model = build_model("abmil", in_dim=in_dim, n_classes=n_classes)
    card = ModelCard(arch="abmil", classes=[f"c{i}" for i in range(n_classes)],
                     feature_dim=in_dim)
    return save_model(model, card, tmp_path / name)


def test_errors_name_the_checkpoint(demo, folds, tmp_path):
    result = load_result(demo.result_path)
    bag = bag_for(result, demo.result_path)
    other_dim = _save(tmp_path, "dim32.safetensors", 32, 2)
    with pytest.raises(ValueError, match=r"dim32\.safetensors: the model expects 32-d "
                                         r"features, the bag .* holds 64-d"):
        fold_maps(bag, [folds[0.3][0], other_dim])
    three = _save(tmp_path, "three.safetensors", 64, 3)
    with pytest.raises(ValueError, match=r"three\.safetensors: 3 classes, fold1_0\.3"):
        fold_maps(bag, [folds[0.3][0], three])
    with pytest.raises(ValueError, match="gone.pt: no such checkpoint"):
        fold_maps(bag, [tmp_path / "gone.pt"])
    with pytest.raises(ValueError, match="no attention source 'nope'"):
        fold_maps(bag, folds[0.3][:1], "nope")
    with pytest.raises(ValueError, match="at least 2 members"):
        evaluate(result, demo.xml, bag=bag, folds=folds[0.3][:1], folds_include_result=False)
    with pytest.raises(ValueError, match="needs the bag"):
        evaluate(result, demo.xml, folds=folds[0.3])
