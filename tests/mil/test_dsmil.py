"""DSMIL (binli123/dsmil-wsi) and AEM's copy: layouts, scoring, thresholds, sources, loading."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from napari_milview.mil import (
    ALIASES,
    MODELS,
    build_from_state_dict,
    build_model,
    detect_arch,
)
from napari_milview.mil.checkpoint import CheckpointError, load_model, save_model
from napari_milview.mil.dsmil import DSMIL, SCORINGS

#: train_tcga.py's layout with feats_size 512, 2 classes, --non_linearity 1 (the authors'
#: example_aggregator_weights/tcga_aggregator.pth has exactly these keys and shapes)
TABLE = {
    "i_classifier.fc.0.weight": (2, 512),
    "i_classifier.fc.0.bias": (2,),
    "b_classifier.q.0.weight": (128, 512),
    "b_classifier.q.0.bias": (128,),
    "b_classifier.q.2.weight": (128, 128),
    "b_classifier.q.2.bias": (128,),
    "b_classifier.fcc.weight": (2, 2, 512),
    "b_classifier.fcc.bias": (2,),
}


def _random_sd(model_or_table, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = ({k: tuple(v.shape) for k, v in model_or_table.state_dict().items()}
             if isinstance(model_or_table, torch.nn.Module) else model_or_table)
    return {k: torch.randn(shape, generator=g) * 0.2 for k, shape in table.items()}


def _model(seed=0, **hp):
    m = DSMIL(**hp)
    m.load_state_dict(_random_sd(m, seed))
    return m.eval()


def test_keys_shapes_and_hparams_from_the_weights():
    m = DSMIL(in_dim=512, n_classes=2)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == TABLE
    sd = _random_sd(TABLE)
    assert detect_arch(sd) == "dsmil"
    hp = DSMIL.hparams_from_state_dict(sd)
    assert hp == {"in_dim": 512, "n_classes": 2, "nonlinear": True, "q_dim": 128,
                  "q_hidden": 128, "passing_v": False}
    loaded = build_from_state_dict(sd)
    torch.testing.assert_close(loaded.b_classifier.fcc.weight, sd["b_classifier.fcc.weight"])


@pytest.mark.parametrize("hp", [
    {"in_dim": 64, "n_classes": 1},
    {"in_dim": 64, "n_classes": 3, "nonlinear": False, "q_dim": 32},
    {"in_dim": 48, "n_classes": 2, "q_hidden": 16, "q_dim": 8, "passing_v": True},
])
def test_layout_variants_round_trip(hp):
    m = DSMIL(**hp)
    sd = _random_sd(m)
    assert DSMIL.matches_state_dict(sd) and detect_arch(sd) == "dsmil"
    inferred = DSMIL.hparams_from_state_dict(sd)
    for k, v in hp.items():
        assert inferred[k] == v
    build_model("dsmil", **inferred).load_state_dict(sd, strict=True)
    if hp.get("passing_v"):
        assert "b_classifier.v.1.weight" in sd
    if hp.get("nonlinear") is False:
        assert "b_classifier.q.weight" in sd


def test_inconsistent_shapes_are_refused():
    sd = _random_sd(TABLE)
    sd["b_classifier.fcc.weight"] = torch.zeros(2, 2, 256)
    with pytest.raises(ValueError, match="inconsistent DSMIL"):
        DSMIL.hparams_from_state_dict(sd)


def test_no_other_architecture_is_taken_for_dsmil_and_back():
    sd = _random_sd(TABLE)
    for name, cls in MODELS.items():
        if name in ALIASES or name == "dsmil":
            continue
        assert not cls.matches_state_dict(sd), name
        other = cls().state_dict()
        assert not DSMIL.matches_state_dict(other), name
        assert not DSMIL.matches_state_dict(DSMIL.remap_state_dict(other)), name
        assert detect_arch(other) == name


def test_forward_by_hand():
    """Each step of the dual stream written out with loops over classes."""
    m = _model(3, in_dim=6, n_classes=2, q_hidden=5, q_dim=4, passing_v=True)
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    out = m.forward_attention(x)
    sd = {k: v.double().numpy() for k, v in m.state_dict().items()}
    xn = x.double().numpy()
    ins = xn @ sd["i_classifier.fc.0.weight"].T + sd["i_classifier.fc.0.bias"]

    def q(v):
        h = np.maximum(v @ sd["b_classifier.q.0.weight"].T + sd["b_classifier.q.0.bias"], 0)
        return np.tanh(h @ sd["b_classifier.q.2.weight"].T + sd["b_classifier.q.2.bias"])

    vals = np.maximum(xn @ sd["b_classifier.v.1.weight"].T + sd["b_classifier.v.1.bias"], 0)
    bag = np.array(sd["b_classifier.fcc.bias"])
    for c in range(2):
        crit = int(np.argmax(ins[:, c]))
        s = q(xn) @ q(xn[crit]) / math.sqrt(4)
        a = np.exp(s - s.max())
        a /= a.sum()
        np.testing.assert_allclose(out.source(f"raw/class/{c}").numpy(), s, atol=1e-5)
        np.testing.assert_allclose(out.source(f"class/{c}").numpy(), a, atol=1e-6)
        emb = a @ vals  # [D]
        for c_out in range(2):
            bag[c_out] += sd["b_classifier.fcc.weight"][c_out, c] @ emb
        np.testing.assert_allclose(out.source(f"raw/instance/{c}").numpy(), ins[:, c],
                                   atol=1e-5)
        np.testing.assert_allclose(out.source(f"instance/{c}").numpy(),
                                   1 / (1 + np.exp(-ins[:, c])), atol=1e-6)
    np.testing.assert_allclose(out.logits.detach().numpy(), bag, atol=1e-5)
    np.testing.assert_allclose(out.probs.detach().numpy(), 1 / (1 + np.exp(-bag)), atol=1e-6)
    assert out.aux["critical_instance"].tolist() == np.argmax(ins, 0).tolist()


def test_one_class_and_one_instance():
    m = _model(in_dim=16, n_classes=1)
    out = m.forward_attention(torch.randn(1, 16))
    assert out.logits.shape == (1,) and out.probs.shape == (1,)
    assert set(out.sources) == {"class/0", "raw/class/0", "instance/0", "raw/instance/0"}
    assert out.source().tolist() == [1.0]
    out = m.forward_attention(torch.randn(1, 20, 16))
    assert out.default_source == "class/0"
    torch.testing.assert_close(out.source().sum(), torch.tensor(1.0))
    assert m(torch.randn(5, 16)).shape == (1,)


def test_scorings():
    x = torch.randn(30, 32)
    outs = {s: _model(2, in_dim=32, n_classes=3, scoring=s).forward_attention(x)
            for s in SCORINGS}
    bag, mx = outs["bag"].logits, outs["bag"].aux["max_instance_logits"]
    for o in outs.values():  # the logits stay the raw bag prediction
        torch.testing.assert_close(o.logits, bag)
    torch.testing.assert_close(outs["bag"].probs, torch.sigmoid(bag))
    torch.testing.assert_close(outs["mean_bag_max_instance"].probs,
                               0.5 * torch.sigmoid(bag) + 0.5 * torch.sigmoid(mx))
    p = outs["softmax_bag_max_instance"].probs
    torch.testing.assert_close(p, 0.5 * torch.softmax(mx, 0) + 0.5 * torch.softmax(bag, 0))
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    inst = outs["softmax_bag_max_instance"]
    torch.testing.assert_close(sum(inst.source(f"instance/{c}") for c in range(3)),
                               torch.ones(30))
    with pytest.raises(ValueError, match="scoring must be one of"):
        DSMIL(scoring="max")


def test_thresholds_decide_positive_classes_and_the_default_source():
    m = _model(4, in_dim=16, n_classes=3)
    x = torch.randn(12, 16)
    p = m.forward_attention(x).probs.detach()
    assert m.thresholds == [0.5, 0.5, 0.5]
    # only class 2 over its threshold, although another class has a higher probability
    order = torch.argsort(p)
    thr = [1.1, 1.1, 1.1]
    thr[int(order[0])] = float(p[order[0]]) - 1e-3
    m2 = _model(4, in_dim=16, n_classes=3, thresholds=thr)
    out = m2.forward_attention(x)
    assert out.aux["positive"].tolist() == [1.0 if i == int(order[0]) else 0.0
                                            for i in range(3)]
    assert out.default_source == f"class/{int(order[0])}"
    # none positive: the most probable class
    m3 = _model(4, in_dim=16, n_classes=3, thresholds=[1.1, 1.1, 1.1])
    out = m3.forward_attention(x)
    assert out.aux["positive"].sum() == 0 and out.default_source == f"class/{int(order[-1])}"
    with pytest.raises(ValueError, match="2 DSMIL threshold"):
        DSMIL(in_dim=16, n_classes=3, thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="finite"):
        DSMIL(in_dim=16, n_classes=1, thresholds=[float("nan")])


def test_trains_and_runs_in_train_mode():
    m = _model(in_dim=16, n_classes=2).train()
    out = m.forward_attention(torch.randn(10, 16))
    loss = out.logits.sum() + out.aux["max_instance_logits"].sum()
    loss.backward()
    assert m.b_classifier.q[0].weight.grad is not None
    assert m.i_classifier.fc[0].weight.grad is not None


# ------------------------------------------------------------------------------- loading
def _save_pth(tmp_path, model, name="fold_0_1.pth"):
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path


def test_thresholds_list_beside_the_checkpoint(tmp_path):
    m = _model(in_dim=32, n_classes=2)
    path = _save_pth(tmp_path, m)
    path.with_suffix(".json").write_text(json.dumps([0.25, 0.75]))
    loaded, card = load_model(path)
    assert card.arch == "dsmil" and card.hparams["thresholds"] == [0.25, 0.75]
    assert loaded.thresholds == [0.25, 0.75]
    assert "thresholds 0.25, 0.75" in card.notes and "fold_0_1.json" in card.notes
    x = torch.randn(8, 32)
    out = loaded.forward_attention(x)
    assert out.aux["positive"].tolist() == (out.probs >= torch.tensor([0.25, 0.75])).float(
    ).tolist()
    torch.testing.assert_close(out.logits, m(x))
    # given as the sidecar argument, or the wrong length / not numbers
    _, card = load_model(path, sidecar=[0.1, 0.2])
    assert card.hparams["thresholds"] == [0.1, 0.2]
    with pytest.raises(CheckpointError, match="threshold"):
        load_model(path, sidecar=[0.1, 0.2, 0.3])
    path.with_suffix(".json").write_text(json.dumps(["LUAD", "LUSC"]))
    with pytest.raises(CheckpointError, match="must hold numbers"):
        load_model(path)


def test_standalone_test_scheme_thresholds_file(tmp_path):
    """train_tcga.py's 5-fold-cv-standalone-test writes mil_threshold_fold_<k>.json."""
    path = _save_pth(tmp_path, _model(in_dim=32, n_classes=1), "mil_weights_fold_3.pth")
    (tmp_path / "mil_threshold_fold_3.json").write_text(json.dumps([0.61]))
    _, card = load_model(path)
    assert card.hparams["thresholds"] == [0.61]


def test_a_list_beside_another_architecture_is_an_error(tmp_path):
    path = tmp_path / "abmil.pth"
    torch.save(build_model("abmil", in_dim=32, n_classes=2, inner_dim=16).state_dict(), path)
    path.with_suffix(".json").write_text("[0.5, 0.5]")
    with pytest.raises(CheckpointError, match="a sidecar must be a JSON object.*only beside a "
                                              "DSMIL checkpoint.*abmil"):
        load_model(path)
    path.with_suffix(".json").write_text(json.dumps({"classes": ["a", "b"]}))
    assert load_model(path)[1].classes == ["a", "b"]


def test_iclassifier_names_are_renamed(tmp_path):
    """attention_map.py's MILNet(IClassifier, ...) names the instance layer fc.weight."""
    m = _model(in_dim=32, n_classes=2)
    sd = {("i_classifier.fc." + k.rsplit(".", 1)[1] if k.startswith("i_classifier.fc.0.")
           else k): v for k, v in m.state_dict().items()}
    assert "i_classifier.fc.weight" in sd
    path = tmp_path / "aggregator.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, path)
    loaded, card = load_model(path)
    assert "IClassifier names" in card.notes
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded(x), m(x))


def test_aem_config_selects_aem_scoring_unless_overridden(tmp_path):
    m = _model(in_dim=32, n_classes=2, nonlinear=False, q_dim=16)
    path = tmp_path / "checkpoint-best.pth"
    config = {"arch": "dsmil", "lamda": 0.1, "D_feat": 32, "D_inner": 16, "n_class": 2}
    torch.save({"model": m.state_dict(), "epoch": 3, "config": config}, path)
    loaded, card = load_model(path)
    assert card.hparams["scoring"] == "softmax_bag_max_instance"
    assert "AEM DSMIL" in card.notes and card.hparams["q_dim"] == 16
    out = loaded.forward_attention(torch.randn(4, 32))
    assert out.probs.sum().item() == pytest.approx(1)
    # exclusive classes: decided by argmax, so no per-class threshold decision ...
    assert "positive" not in out.aux and "thresholds" not in out.aux
    # ... unless thresholds are given
    aem_thr = build_model("dsmil", **{**card.hparams, "thresholds": [0.4, 0.6]})
    assert aem_thr.forward_attention(torch.randn(4, 32)).aux["thresholds"].tolist() == \
        pytest.approx([0.4, 0.6])
    _, card = load_model(path, hparams={"scoring": "bag"})
    assert card.hparams["scoring"] == "bag" and "AEM DSMIL" not in card.notes
    bad = dict(config, n_class=3)
    torch.save({"model": m.state_dict(), "epoch": 3, "config": bad}, path)
    with pytest.raises(CheckpointError, match="n_class=3"):
        load_model(path)


def test_save_model_round_trip_keeps_scoring_and_thresholds(tmp_path):
    m = _model(in_dim=32, n_classes=2, scoring="mean_bag_max_instance",
               thresholds=[0.3, 0.6])
    _, card = load_model(_save_pth(tmp_path, m), hparams=m.hparams)
    out = save_model(m, card, tmp_path / "dsmil.safetensors")
    loaded, card2 = load_model(out)
    assert card2.hparams == m.hparams
    x = torch.randn(6, 32)
    torch.testing.assert_close(loaded.forward_attention(x).probs, m.forward_attention(x).probs)
