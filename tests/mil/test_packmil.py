"""PackMIL (napari_milview.mil.packmil): the eval path of the authors' PackMIL with its ABMIL
aggregator (ADS downsampler, norms, gating) and its TransMIL aggregator (Nystrom layers, PPEG),
and the layouts read from the weights. Parity with the authors' code:
tests/data/parity/packmil_* (tests/mil/test_parity.py)."""

from __future__ import annotations

import pytest
import torch

from napari_milview.mil import PackMIL, build_model, detect_arch
from napari_milview.mil.base import build_from_state_dict
from napari_milview.mil.checkpoint import load_model
from napari_milview.mil.nystrom import nystrom_padding


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


def _trans(**kw) -> PackMIL:
    m = _model(aggregator="transmil", inner_dim=32, **kw)
    with torch.no_grad():
        m.mil.aggregate.cls_token.normal_()
    return m


def _nystrom_by_hand(attn, t):
    """The Nystrom layer written out: (output [1, n, dim], full attention [H, L, L], pad)."""
    n, m, heads = t.shape[1], attn.num_landmarks, attn.heads
    pad = nystrom_padding(n, m)
    tp = torch.nn.functional.pad(t, (0, 0, pad, 0))
    q, k, v = (z.reshape(1, -1, heads, z.shape[-1] // heads).transpose(1, 2)
               for z in attn.to_qkv(tp).chunk(3, dim=-1))
    q = q * attn.scale
    ql = q.reshape(1, heads, m, -1, q.shape[-1]).sum(3) / (tp.shape[1] // m)
    kl = k.reshape(1, heads, m, -1, k.shape[-1]).sum(3) / (tp.shape[1] // m)
    a1, a2, a3 = (torch.softmax(z, dim=-1) for z in (q @ kl.mT, ql @ kl.mT, ql @ k.mT))
    z = a2.mT / (a2.abs().sum(-1).max() * a2.abs().sum(-2).max())
    eye = torch.eye(m)
    for _ in range(6):
        xz = a2 @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    full = a1 @ z @ a3  # [1, H, L, L]
    out = full @ v + attn.res_conv(v)
    out = attn.to_out(out.transpose(1, 2).reshape(1, tp.shape[1], -1))[:, -n:]
    return out, full[0], pad


def _ppeg_by_hand(ppeg, x):
    """x [1, N, dim]: wrap to the next square, zero-fill to 7 x 7, convolve, trim."""
    n, c = x.shape[1:]
    s = int(torch.tensor(n).sqrt().ceil())
    grid = torch.cat([x, x[:, :s * s - n]], dim=1)
    if s < 7:
        grid = torch.cat([grid, torch.zeros(1, 49 - s * s, c)], dim=1)
        s = 7
    img = grid.transpose(1, 2).reshape(1, c, s, s)
    img = img + ppeg.proj(img) + ppeg.proj1(img) + ppeg.proj2(img)
    return img.flatten(2).transpose(1, 2)[:, :n]


@pytest.mark.parametrize("n", [5, 23, 64])
def test_transmil_aggregator_written_out_by_hand(n):
    m = _trans(ads=False, n_layers=3)
    agg = m.mil.aggregate
    x = torch.randn(n, 40)
    with torch.inference_mode():
        out = m.forward_attention(x)
        h = torch.nn.functional.gelu(m.mil.embed[0](x))
        t = torch.cat([agg.cls_token[0], h])[None]
        rows = []
        for i, layer in enumerate([agg.layer1, *agg.layers]):
            z, full, pad = _nystrom_by_hand(layer.attn, layer.norm(t))
            rows.append(full[:, pad, pad + 1:])  # class token's row, instance columns [H, N]
            t = t + z
            if i == 0:
                t = torch.cat([t[:, :1], _ppeg_by_hand(agg.pos_embedding, t[:, 1:])], dim=1)
        want = m.predictor(agg.fc_norm(t[0, 0]))
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-4)
    assert out.default_source == "layer3/mean"
    for i, r in enumerate(rows, start=1):
        torch.testing.assert_close(out.source(f"layer{i}/mean"), r.mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.source(f"layer{i}/head/7"), r[7], atol=1e-5, rtol=1e-4)
    assert "attention" not in out.sources and "layer4/mean" not in out.sources


def test_transmil_sources_cover_every_instance_once_without_the_bag_being_squared():
    m = _trans()
    x = torch.randn(11, 40)  # not a square: the PPEG wraps internally, the attention does not
    with torch.inference_mode():
        out = m.forward_attention(x)
        a = out.source("layer2/mean")
        assert a.shape == (11,)
        # the class token's row sums to about 1 over [cls] + instances, so below 1 here
        assert 0.0 < float(a.sum()) < 1.05
        assert out.source("downsampler/attention").shape == (11,)
        # the instances interact: changing one changes the others' attention
        y = x.clone()
        y[3] += 5.0
        b = m.forward_attention(y).source("layer2/mean")
    assert not torch.allclose(a[:3], b[:3])


@pytest.mark.parametrize("kw", [
    {},
    {"n_layers": 1, "mil_norm": "ln", "act": "relu"},
    {"fc_norm": False, "mil_bias": False, "ads": False},
    {"vit_norm": False, "n_layers": 3},
])
def test_transmil_layout_is_read_back_from_the_weights(kw):
    m = _trans(**kw)
    sd = m.state_dict()
    assert detect_arch(sd) == "packmil"
    hp = PackMIL.hparams_from_state_dict(sd)
    assert hp["aggregator"] == "transmil"
    assert "gated" not in hp
    for k, v in kw.items():
        if k != "act":
            assert hp[k] == v, k
    back = build_from_state_dict(sd, act=m.hparams["act"])
    x = torch.randn(30, 40)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), m(x))


def test_transmil_checkpoint_loads_from_the_authors_file(tmp_path):
    m = _trans()
    f = tmp_path / "fold_0_model_best.pt"
    torch.save({"model": m.state_dict() | {"predictor_res.weight": torch.randn(3, 32)},
                "teacher": None, "epoch": 2}, f)
    model, card = load_model(f)
    assert card.arch == "packmil" and "predictor_res" in card.notes
    assert model.hparams["aggregator"] == "transmil" and model.hparams["n_layers"] == 2
    x = torch.randn(9, 40)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), m(x))


def test_transmil_bad_settings_and_shapes_are_refused():
    with pytest.raises(ValueError, match="aggregator"):
        PackMIL(aggregator="dsmil")
    with pytest.raises(ValueError, match="multiple of 8"):
        PackMIL(aggregator="transmil", inner_dim=36)
    sd = _trans().state_dict()
    sd["mil.aggregate.layer1.attn.to_qkv.weight"] = torch.randn(48, 32)
    with pytest.raises(ValueError, match="to_qkv 48x32"):
        PackMIL.hparams_from_state_dict(sd)
