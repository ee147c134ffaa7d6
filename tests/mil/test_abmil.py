"""ABMIL (gated = ACMIL/AEM baseline, plain tanh) and the AEM alias."""

from __future__ import annotations

import math

import pytest
import torch

from napari_milview.mil import ABMIL, build_from_state_dict, build_model, detect_arch

#: reference/algorithms.md 1.5, ABMIL baseline with D_feat 1024, D_inner 512, 2 classes
GATED_TABLE = {
    "dimreduction.fc1.weight": (512, 1024),
    "attention.attention_V.0.weight": (128, 512),
    "attention.attention_V.0.bias": (128,),
    "attention.attention_U.0.weight": (128, 512),
    "attention.attention_U.0.bias": (128,),
    "attention.attention_weights.weight": (1, 128),
    "attention.attention_weights.bias": (1,),
    "classifier.fc.weight": (2, 512),
    "classifier.fc.bias": (2,),
}
PLAIN_TABLE = {k: v for k, v in GATED_TABLE.items() if "attention_U" not in k}


def _random_sd(table, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.05 for k, shape in table.items()}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("gated,table", [(True, GATED_TABLE), (False, PLAIN_TABLE)])
def test_keys_shapes_and_strict_load(gated, table):
    m = ABMIL(in_dim=1024, n_classes=2, inner_dim=512, attn_dim=128, gated=gated)
    assert _shapes(m) == table
    sd = _random_sd(table)
    assert detect_arch(sd) == "abmil"
    hp = ABMIL.hparams_from_state_dict(sd)
    assert hp == {"in_dim": 1024, "n_classes": 2, "inner_dim": 512, "attn_dim": 128, "gated": gated}
    m2 = build_model("abmil", **hp)
    m2.load_state_dict(sd, strict=True)
    loaded = build_from_state_dict(sd)
    torch.testing.assert_close(loaded.attention.attention_V[0].weight,
                               sd["attention.attention_V.0.weight"])


def test_aem_alias_loads_the_baseline_checkpoint():
    sd = _random_sd(GATED_TABLE)
    m = build_from_state_dict(sd, arch="aem")
    assert isinstance(m, ABMIL) and m.attention.gated
    with pytest.raises(ValueError):
        build_from_state_dict(_random_sd(PLAIN_TABLE), arch="aem")


def test_pooling_math_by_hand():
    """Plain ABMIL, every weight chosen so the result is known in closed form."""
    m = ABMIL(in_dim=2, n_classes=2, inner_dim=2, attn_dim=1, gated=False).eval()
    with torch.no_grad():
        m.dimreduction.fc1.weight.copy_(torch.eye(2))  # h = relu(x) = x for x >= 0
        m.attention.attention_V[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
        m.attention.attention_V[0].bias.zero_()
        m.attention.attention_weights.weight.fill_(1.0)  # e_n = tanh(x_n0)
        m.attention.attention_weights.bias.zero_()
        m.classifier.fc.weight.copy_(torch.eye(2))  # logits = z
        m.classifier.fc.bias.zero_()
    t = math.atanh(math.log(2.0))  # e = [0, ln 2]  ->  a = [1/3, 2/3]
    x = torch.tensor([[0.0, 1.0], [t, 3.0]])
    out = m.forward_attention(x)
    torch.testing.assert_close(out.sources["raw/attention"], torch.tensor([0.0, math.log(2)]))
    torch.testing.assert_close(out.sources["attention"], torch.tensor([1 / 3, 2 / 3]))
    torch.testing.assert_close(out.logits, torch.tensor([2 * t / 3, 7 / 3]))


def test_gated_pooling_matches_formula():
    torch.manual_seed(1)
    m = ABMIL(in_dim=12, n_classes=3, inner_dim=8, attn_dim=4).eval()
    x = torch.randn(7, 12)
    out = m.forward_attention(x)
    h = torch.relu(x @ m.dimreduction.fc1.weight.T)
    v, u = m.attention.attention_V[0], m.attention.attention_U[0]
    w = m.attention.attention_weights
    e = (torch.tanh(v(h)) * torch.sigmoid(u(h))) @ w.weight[0] + w.bias[0]
    a = torch.softmax(e, dim=0)
    torch.testing.assert_close(out.sources["raw/attention"], e)
    torch.testing.assert_close(out.sources["attention"], a)
    torch.testing.assert_close(out.logits, m.classifier.fc(a @ h))
    assert out.default_source == "attention"
    assert out.sources["attention"].sum().item() == pytest.approx(1.0)


def test_single_instance_gets_all_attention():
    m = build_model("abmil", in_dim=6, inner_dim=4, attn_dim=4)
    out = m.forward_attention(torch.randn(1, 1, 6))
    assert out.sources["attention"].tolist() == [1.0]
    assert out.logits.shape == (2,)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = ABMIL(in_dim=6, inner_dim=32, attn_dim=4, dropout=0.5).eval()
    x = torch.randn(5, 6)
    torch.testing.assert_close(m(x), m(x))
    m.train()
    outs = {tuple(m(x).tolist()) for _ in range(5)}
    assert len(outs) > 1
