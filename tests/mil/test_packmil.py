"""PackMIL (napari_milview.mil.packmil): the eval path of the authors' PackMIL with its ABMIL
aggregator (ADS downsampler, norms, gating) and the layouts read from the weights. Parity with
the authors' code: tests/data/parity/packmil_* (tests/mil/test_parity.py)."""

from __future__ import annotations

import pytest
import torch

from napari_milview.mil import PackMIL, build_model, detect_arch
from napari_milview.mil.base import build_from_state_dict
from napari_milview.mil.checkpoint import load_model


def _model(**kw) -> PackMIL:
    torch.manual_seed(0)
    hp = {"in_dim": 40, "n_classes": 3, "inner_dim": 24} | kw
    m = build_model("packmil", **hp)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_forward_written_out_by_hand():
    m = _model(mil_norm="ln")
    x = torch.randn(17, 40)
    with torch.inference_mode():
        out = m.forward_attention(x)
        ds = m.downsampler
        s = torch.softmax(ds.attention(x)[:, 0], dim=0)
        y = ds.downsample(torch.nn.functional.gelu(ds.embed[0](x + x * s[:, None])))
        h = torch.nn.functional.gelu(m.mil.embed[0](m.mil.norm(y)))
        e = m.mil.aggregate.attention(h)[:, 0]
        a = torch.softmax(e, dim=0)
        z = m.mil.aggregate.norm1(a @ h)  # cls_norm follows mil_norm (the authors' default)
        want = m.predictor(z)
    torch.testing.assert_close(out.source("downsampler/attention"), s)
    torch.testing.assert_close(out.source("raw/attention"), e)
    torch.testing.assert_close(out.source("attention"), a)
    assert out.default_source == "attention"
    torch.testing.assert_close(out.logits, want)


def test_without_the_downsampler_the_features_go_straight_to_the_aggregator():
    m = _model(ads=False, act="relu")
    assert m.downsampler is None
    x = torch.randn(9, 40)
    with torch.inference_mode():
        out = m.forward_attention(x)
        h = torch.relu(m.mil.embed[0](x))
        a = torch.softmax(m.mil.aggregate.attention(h)[:, 0], dim=0)
        want = m.predictor(a @ h)
    assert "downsampler/attention" not in out.sources
    torch.testing.assert_close(out.logits, want)


@pytest.mark.parametrize("kw", [
    {},
    {"gated": True, "mil_norm": "ln"},
    {"mil_norm": "bn", "cls_norm": "bn", "mil_bias": False},
    {"mil_norm": "ln", "embed_norm_pos": 1, "ads": False},
])
def test_the_layout_is_read_back_from_the_weights(kw):
    m = _model(**kw)
    sd = m.state_dict()
    assert detect_arch(sd) == "packmil"
    hp = PackMIL.hparams_from_state_dict(sd)
    for k, v in kw.items():
        assert hp[k] == v, k
    back = build_from_state_dict(sd)
    x = torch.randn(12, 40)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), m(x))


def test_the_authors_best_model_file_loads_and_drops_the_residual_classifier(tmp_path):
    m = _model(gated=True)
    sd = m.state_dict() | {"predictor_res.weight": torch.randn(3, 24),
                           "predictor_res.bias": torch.randn(3)}
    f = tmp_path / "fold_0_model_best.pt"
    torch.save({"model": sd, "teacher": None, "epoch": 4}, f)
    model, card = load_model(f)
    assert card.arch == "packmil" and model.hparams["gated"]
    assert "predictor_res" in card.notes
    x = torch.randn(7, 40)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), m(x))


def test_activation_is_a_setting_and_changes_the_output():
    m = _model()
    relu = build_model("packmil", **(m.hparams | {"act": "relu"}))
    relu.load_state_dict(m.state_dict())
    x = torch.randn(10, 40)
    with torch.inference_mode():
        assert not torch.allclose(relu.eval()(x), m(x))


def test_bad_settings_and_shapes_are_refused():
    with pytest.raises(ValueError, match="norms"):
        PackMIL(mil_norm="group")
    with pytest.raises(ValueError, match="act"):
        PackMIL(act="tanh")
    sd = _model().state_dict()
    sd["predictor.weight"] = torch.randn(3, 8)
    with pytest.raises(ValueError, match="predictor input 8"):
        PackMIL.hparams_from_state_dict(sd)
