"""The prediction panel: softmax classes as a distribution (argmax), independent per-class
scores (DSMIL's sigmoids) with their thresholds and the decision."""

from __future__ import annotations

import json

import numpy as np
import torch
from qtpy.QtGui import QTextDocumentFragment

from napari_milview._qt.prediction import INDEPENDENT_NOTE, PredictionPanel
from napari_milview.features.bag import Bag
from napari_milview.mil import build_model
from napari_milview.mil.checkpoint import load_model
from napari_milview.pipeline import attend
from napari_milview.result import Result


def _plain(html_text: str) -> str:
    return QTextDocumentFragment.fromHtml(html_text).toPlainText()


def _bag(dim=16, n=20, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    return Bag.from_arrays(rng.standard_normal((n, dim)).astype(np.float32),
                           np.stack([idx % 5 * 256, idx // 5 * 256], 1), patch_size_level0=256)


def _dsmil(tmp_path, bag, n_classes, thresholds, seed=0, name="fold_0_1"):
    """The real DSMIL saved as train_tcga.py leaves it (the .pth and, unless ``thresholds``
    is None, its JSON list of thresholds, here a callable of the probabilities), loaded and
    run: (result, probabilities)."""
    torch.manual_seed(seed)
    model = build_model("dsmil", in_dim=bag.dim, n_classes=n_classes)
    with torch.inference_mode():
        probs = model.forward_attention(torch.from_numpy(bag.features)).probs.numpy()
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    if thresholds is not None:
        path.with_suffix(".json").write_text(json.dumps([float(t) for t in thresholds(probs)]))
    loaded, card = load_model(path)
    return attend(bag, loaded, card, device="cpu"), probs


def _panel(qtbot):
    panel = PredictionPanel()
    qtbot.addWidget(panel)
    panel.show()
    return panel


def test_one_class_dsmil_shows_the_threshold_decision(qtbot, tmp_path):
    bag = _bag()
    r, p = _dsmil(tmp_path, bag, 1, lambda p: [float(p[0]) - 0.02])
    r.classes = ["tumor"]
    panel = _panel(qtbot)
    panel.set_result(r)
    t = float(p[0]) - 0.02
    head = _plain(panel.headline.text())
    assert head == f"Decision: positive for tumor (p = {p[0]:.2f} >= threshold {t:.2f})"
    assert panel.scale.isVisible() and panel.scale.text() == INDEPENDENT_NOTE
    assert panel.values[0].text() == f"{p[0]:.3f} \u2265 {t:.2f}"
    assert panel.names[0].font().bold() and panel.bars[0].value() == round(1000 * p[0])
    assert "threshold" in panel.bars[0].toolTip()
    # the same model with a threshold above its score: negative, nothing bold
    r, p = _dsmil(tmp_path, bag, 1, lambda p: [float(p[0]) + 0.02], name="neg")
    r.classes = ["tumor"]
    panel.set_result(r)
    t = float(p[0]) + 0.02
    assert _plain(panel.headline.text()) == (
        f"Decision: negative for tumor (p = {p[0]:.2f} < threshold {t:.2f})")
    assert panel.values[0].text() == f"{p[0]:.3f} < {t:.2f}"
    assert not panel.names[0].font().bold()
    # partial results say the decision so far
    r.meta["n_done"] = 7
    panel.set_result(r, partial=True)
    assert "not tumor" in _plain(panel.headline.text())


def test_one_class_dsmil_without_thresholds_says_half_is_assumed(qtbot, tmp_path):
    bag = _bag(seed=1)
    r, p = _dsmil(tmp_path, bag, 1, None)
    panel = _panel(qtbot)
    panel.set_result(r)
    word, op = ("positive", ">=") if p[0] >= 0.5 else ("negative", "<")
    lines = _plain(panel.headline.text()).splitlines()
    assert lines == [f"Decision: {word} for class_0 (p = {p[0]:.2f} {op} threshold 0.50)",
                     "threshold 0.5 assumed: the model came without thresholds"]
    assert panel.values[0].text().endswith(" 0.50") and "(assumed)" in panel.bars[0].toolTip()


def test_multi_label_dsmil_lists_positive_classes(qtbot, tmp_path):
    bag = _bag(seed=2)
    r, p = _dsmil(tmp_path, bag, 3, lambda p: [p[0] + 0.01, p[1] - 0.01, p[2] - 0.01], seed=4)
    r.classes = ["LUAD", "LUSC", "normal"]
    assert not np.isclose(p.sum(), 1.0, atol=1e-3)  # three sigmoids, not a distribution
    panel = _panel(qtbot)
    panel.set_result(r)
    pos = sorted([1, 2], key=lambda i: -p[i])
    head = _plain(panel.headline.text())
    assert head.startswith(f"Decision: positive for {r.classes[pos[0]]} (p = ")
    assert f"{r.classes[pos[1]]} (p = " in head and "LUAD" not in head
    assert [n.font().bold() for n in panel.names] == [False, True, True]
    assert panel.values[0].text().startswith(f"{p[0]:.3f} < ")
    assert panel.scale.isVisible()


def test_softmax_results_stay_a_distribution(qtbot):
    n = 6
    r = Result(coords=np.stack([np.arange(n) * 256, np.zeros(n)], 1), patch_size_level0=256,
               sources={"attention": np.full(n, 1 / n)}, default_source="attention",
               classes=["normal", "lesion"], logits=[0.1, 1.2],
               probabilities=[0.25, 0.75], arch="abmil")
    panel = _panel(qtbot)
    panel.set_result(r)
    assert _plain(panel.headline.text()) == "Predicted: lesion (75.0%)"
    assert [v.text() for v in panel.values] == ["0.250", "0.750"]
    assert [n.font().bold() for n in panel.names] == [False, True]
    assert panel.scale.isHidden() and panel.scale.text() == ""
    # after an independent result the caption goes again
    r2 = Result(coords=r.coords, patch_size_level0=256, sources=r.sources,
                default_source="attention", classes=["a", "b"], logits=[0.0, 0.0],
                probabilities=[0.8, 0.9], arch="dsmil", thresholds=[0.5, 0.95])
    panel.set_result(r2)
    assert panel.scale.isVisible()
    assert _plain(panel.headline.text()) == "Decision: positive for a (p = 0.80 >= threshold 0.50)"
    panel.set_result(r)
    assert panel.scale.isHidden()
    panel.clear()
    assert panel.scale.isHidden() and panel.headline.text() == "No prediction yet."
