"""The model picker's Nystrom box: shown for TransMIL-family models only, set to what the
loader chose, and an explicit pick reloads the model with that variant."""

from __future__ import annotations

import numpy as np
import torch

from napari_milview._qt.parts import ModelPicker
from napari_milview.mil import build_model
from napari_milview.mil.base import ModelCard
from napari_milview.mil.checkpoint import save_model


def _save(tmp_path, arch, **hp):
    torch.manual_seed(0)
    model = build_model(arch, **hp)
    card = ModelCard(arch=arch, hparams=dict(model.hparams), classes=["a", "b"],
                     nystrom=model.hparams.get("nystrom"))
    return save_model(model, card, tmp_path / f"{arch}.safetensors")


def test_nystrom_box_follows_the_card_and_reloads(qtbot, tmp_path):
    picker = ModelPicker()
    qtbot.addWidget(picker)
    picker.show()
    tm = _save(tmp_path, "transmil", in_dim=16, n_classes=2, dim=32, nystrom="0.0.9")
    ab = _save(tmp_path, "abmil", in_dim=16, n_classes=2)

    assert picker.load(tm, "tm")
    assert picker.nystrom_row.isVisible()
    assert picker.nystrom_combo.currentData() == "0.0.9" == picker.model[1].nystrom
    assert "Nystr\u00f6m 0.0.9" in picker.info.text()
    assert "from the sidecar" in picker.nystrom_combo.toolTip()
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    before = picker.model[0].forward_attention(x).probs.detach().numpy()

    seen = []
    picker.changed.connect(seen.append)
    picker.nystrom_combo.setCurrentIndex(picker.nystrom_combo.findData("current"))
    picker._nystrom_picked()  # what the combo's `activated` calls
    model, card, name = picker.model
    assert name == "tm" and card.nystrom == "current" and seen and seen[-1][1] is card
    assert "nystrom current chosen explicitly" in card.notes
    after = model.forward_attention(x).probs.detach().numpy()
    assert not np.allclose(before, after, atol=1e-4)  # the variant changes the output

    assert picker.load(ab, "ab")
    assert not picker.nystrom_row.isVisible() and picker.model[1].nystrom is None
