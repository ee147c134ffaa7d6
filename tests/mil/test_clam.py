"""CLAM-SB / CLAM-MB: official layout, legacy layouts, pooling, MB branch choice, and the
``softmax_one`` attention of ACMIL's CLAM-MB copy (value, effect, detection from the container)."""

from __future__ import annotations

import contextlib
import json
import sys
import types

import pytest
import torch

from napari_milview.mil import CLAM_MB, CLAM_SB, build_from_state_dict, build_model, detect_arch
from napari_milview.mil.base import ModelCard
from napari_milview.mil.checkpoint import load_model, save_model
from napari_milview.mil.clam import remap_clam_keys, softmax_one


def _sb_table(embed=1024, hid=512, att=256, n_classes=2):
    """reference/algorithms.md 2.2 (current key names)."""
    t = {
        "attention_net.0.weight": (hid, embed),
        "attention_net.0.bias": (hid,),
        "attention_net.3.attention_a.0.weight": (att, hid),
        "attention_net.3.attention_a.0.bias": (att,),
        "attention_net.3.attention_b.0.weight": (att, hid),
        "attention_net.3.attention_b.0.bias": (att,),
        "attention_net.3.attention_c.weight": (1, att),
        "attention_net.3.attention_c.bias": (1,),
        "classifiers.weight": (n_classes, hid),
        "classifiers.bias": (n_classes,),
    }
    for c in range(n_classes):
        t[f"instance_classifiers.{c}.weight"] = (2, hid)
        t[f"instance_classifiers.{c}.bias"] = (2,)
    return t


def _mb_table(embed=1024, hid=512, att=256, n_classes=3):
    t = _sb_table(embed, hid, att, n_classes)
    t["attention_net.3.attention_c.weight"] = (n_classes, att)
    t["attention_net.3.attention_c.bias"] = (n_classes,)
    del t["classifiers.weight"], t["classifiers.bias"]
    for c in range(n_classes):
        t[f"classifiers.{c}.weight"] = (1, hid)
        t[f"classifiers.{c}.bias"] = (1,)
    return t


def _random_sd(table, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.05 for k, shape in table.items()}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("size,att", [("small", 256), ("big", 384)])
def test_sb_keys_shapes_round_trip(size, att):
    table = _sb_table(att=att)
    assert _shapes(CLAM_SB(in_dim=1024, n_classes=2, size_arg=size)) == table
    sd = _random_sd(table)
    assert detect_arch(sd) == "clam_sb"
    hp = CLAM_SB.hparams_from_state_dict(sd)
    assert hp == {"in_dim": 1024, "size_arg": size, "n_classes": 2}
    build_model("clam_sb", **hp).load_state_dict(sd, strict=True)


def test_mb_keys_shapes_round_trip():
    table = _mb_table(n_classes=3)
    assert _shapes(CLAM_MB(in_dim=1024, n_classes=3)) == table
    sd = _random_sd(table)
    assert detect_arch(sd) == "clam_mb"
    hp = CLAM_MB.hparams_from_state_dict(sd)
    assert hp == {"in_dim": 1024, "size_arg": "small", "n_classes": 3}
    build_model("clam_mb", **hp).load_state_dict(sd, strict=True)


def test_nonstandard_sizes_round_trip():
    """ACMIL's CLAM copy: size small = [D_feat, D_inner, 128]."""
    table = _sb_table(embed=384, hid=128, att=128, n_classes=2)
    sd = _random_sd(table)
    hp = CLAM_SB.hparams_from_state_dict(sd)
    assert hp == {"in_dim": 384, "size_arg": "small", "hidden_dim": 128, "attn_dim": 128,
                  "n_classes": 2}
    build_model("clam_sb", **hp).load_state_dict(sd, strict=True)


def test_demo_checkpoint_layout_is_remapped():
    """Old multi-GPU CLAM_SB checkpoint: '.module' infix and an instance_loss_fn buffer."""
    sd = _random_sd(_sb_table())
    demo = {}
    for k, v in sd.items():
        demo[k.replace("attention_net.", "attention_net.module.")] = v
    demo["instance_loss_fn.labels"] = torch.arange(2)
    assert "attention_net.module.3.attention_a.0.weight" in demo
    remapped = CLAM_SB.remap_state_dict(demo)
    assert remapped.keys() == sd.keys()
    model = build_from_state_dict(demo)  # detects through the remap
    assert isinstance(model, CLAM_SB)
    torch.testing.assert_close(model.attention_net[0].weight, sd["attention_net.0.weight"])


def test_legacy_index_2_is_remapped():
    sd = _random_sd(_mb_table(n_classes=2))
    legacy = {k.replace("attention_net.3.", "attention_net.2."): v for k, v in sd.items()}
    assert CLAM_MB.remap_state_dict(legacy).keys() == sd.keys()
    assert isinstance(build_from_state_dict(legacy), CLAM_MB)


def test_one_remap_rule_with_notes():
    """The class remap and ``remap_clam_keys`` are one rule: a DataParallel-wrapped model,
    the multi-GPU ``attention_net.module`` infix, the legacy index and the loss buffer."""
    sd = _random_sd(_sb_table())
    legacy = {f"module.{k.replace('attention_net.3.', 'attention_net.module.2.')}": v
              for k, v in sd.items()}
    legacy["module.instance_loss_fn.labels"] = torch.arange(2)
    out, notes = remap_clam_keys(legacy)
    assert out.keys() == sd.keys() == CLAM_SB.remap_state_dict(legacy).keys()
    assert CLAM_SB.remap_keys(legacy)[1] == notes
    text = " | ".join(notes)
    for part in ("loss buffer", "DataParallel 'module.' prefix", "attention_net.module",
                 "attention_net.2"):
        assert part in text
    assert remap_clam_keys(sd) == (sd, [])


def test_only_the_multi_gpu_infix_is_removed():
    """``attention_net.module.`` is old CLAM's DataParallel infix; the ``module`` of CLAM's
    non-gated ``Attn_Net`` (``attention_net.3.module.*``) is a real name and is kept (CLAM's
    own loader's blanket ``replace('.module', '')`` would break it)."""
    nongated = {"attention_net.0.weight": torch.zeros(4, 8),
                "attention_net.3.module.0.weight": torch.zeros(2, 4),
                "attention_net.3.module.2.weight": torch.zeros(1, 2)}
    assert CLAM_SB.remap_state_dict(nongated).keys() == nongated.keys()
    wrapped = {k.replace("attention_net.", "attention_net.module.", 1): v
               for k, v in nongated.items()}
    assert CLAM_SB.remap_state_dict(wrapped).keys() == nongated.keys()


def test_acmil_copy_is_noted():
    sd = _random_sd(_mb_table(embed=32, hid=16, att=128, n_classes=2))
    _, notes = CLAM_MB.remap_keys(sd)
    assert len(notes) == 1 and "ACMIL's copy of CLAM" in notes[0] and "softmax_one" in notes[0]


def test_sb_pooling_and_sources():
    torch.manual_seed(0)
    m = CLAM_SB(in_dim=10, n_classes=3, hidden_dim=8, attn_dim=4, dropout=0.25).eval()
    x = torch.randn(6, 10)
    out = m.forward_attention(x)
    h = torch.relu(m.attention_net[0](x))
    g = m.attention_net[3]
    raw = g.attention_c(torch.tanh(g.attention_a[0](h)) * torch.sigmoid(g.attention_b[0](h)))
    a = torch.softmax(raw[:, 0], dim=0)
    torch.testing.assert_close(out.sources["raw/attention"], raw[:, 0])
    torch.testing.assert_close(out.sources["attention"], a)
    torch.testing.assert_close(out.logits, m.classifiers(a @ h))
    assert out.default_source == "attention"
    for c in range(3):
        p = torch.softmax(m.instance_classifiers[c](h), dim=-1)[:, 1]
        torch.testing.assert_close(out.sources[f"instance/{c}"], p)
    torch.testing.assert_close(m(x), out.logits)  # dropout is off in eval


@pytest.mark.parametrize("winner", [0, 1, 2])
def test_mb_default_is_predicted_class_branch(winner):
    torch.manual_seed(winner)
    m = CLAM_MB(in_dim=10, n_classes=3, hidden_dim=8, attn_dim=4).eval()
    with torch.no_grad():
        for c, clf in enumerate(m.classifiers):
            clf.weight.zero_()
            clf.bias.fill_(5.0 if c == winner else float(c) * 0.1)
    out = m.forward_attention(torch.randn(7, 10))
    assert out.prediction == winner
    assert out.default_source == f"class/{winner}"
    assert set(out.sources) == {f"{p}/{c}" for p in ("class", "raw/class", "instance")
                                for c in range(3)}
    for c in range(3):
        torch.testing.assert_close(out.sources[f"class/{c}"],
                                   torch.softmax(out.sources[f"raw/class/{c}"], dim=0))


def test_mb_logits_use_own_branch():
    torch.manual_seed(3)
    m = CLAM_MB(in_dim=10, n_classes=3, hidden_dim=8, attn_dim=4).eval()
    x = torch.randn(5, 10)
    out = m.forward_attention(x)
    h = torch.relu(m.attention_net[0](x))
    for c in range(3):
        mc = out.sources[f"class/{c}"] @ h
        torch.testing.assert_close(out.logits[c], m.classifiers[c](mc)[0])


def test_sb_rejects_multi_token_variant():
    table = _sb_table(embed=16, hid=8, att=4)
    table["attention_net.3.attention_c.weight"] = (5, 4)
    table["attention_net.3.attention_c.bias"] = (5,)
    with pytest.raises(ValueError, match="attention branches"):
        CLAM_SB.hparams_from_state_dict(_random_sd(table))


# ----------------------------------------------------------------------------------------
# attention_norm: "softmax" (CLAM) | "softmax_one" (ACMIL's CLAM-MB copy)
# ----------------------------------------------------------------------------------------


def _acmil_mb(norm="softmax", seed=0):
    torch.manual_seed(seed)
    m = CLAM_MB(in_dim=12, n_classes=3, hidden_dim=16, attn_dim=8, dropout=0.25,
                attention_norm=norm).eval()
    with torch.no_grad():  # logits of a few units, as trained weights give
        m.attention_net[3].attention_c.weight.mul_(8.0)
    return m


def test_softmax_one_value():
    x = torch.randn(3, 11, dtype=torch.float64)
    plain = torch.exp(x) / (1 + torch.exp(x).sum(dim=1, keepdim=True))  # the definition
    torch.testing.assert_close(softmax_one(x, dim=1), plain)
    assert bool((softmax_one(x, dim=1).sum(dim=1) < 1).all())
    big = torch.tensor([[200.0, 0.0, -5.0]])  # exp(200) overflows float32
    assert torch.isinf(torch.exp(big)).any()
    out = softmax_one(big, dim=1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.softmax(big, dim=1))  # 1 is negligible there
    torch.testing.assert_close(softmax_one(torch.full((1, 4), -30.0), dim=1),
                               torch.full((1, 4), torch.exp(torch.tensor(-30.0)).item()))


def test_attention_norm_default_is_unchanged():
    m = CLAM_MB(in_dim=12, n_classes=3, hidden_dim=16, attn_dim=8)
    assert m.attention_norm == "softmax" and "attention_norm" not in m.hparams
    assert "attention_norm" not in CLAM_SB(in_dim=12, n_classes=2).hparams
    a, b = _acmil_mb("softmax"), _acmil_mb()
    x = torch.randn(9, 12)
    oa, ob = a.forward_attention(x), b.forward_attention(x)
    torch.testing.assert_close(oa.logits, ob.logits)
    for c in range(3):
        torch.testing.assert_close(oa.sources[f"class/{c}"],
                                   torch.softmax(oa.sources[f"raw/class/{c}"], dim=0))
    with pytest.raises(ValueError, match="attention_norm"):
        CLAM_MB(attention_norm="sparsemax")


@pytest.mark.parametrize("n", [1, 7, 300])
def test_softmax_one_differs_by_the_expected_factor(n):
    soft, one = _acmil_mb("softmax"), _acmil_mb("softmax_one")
    one.load_state_dict(soft.state_dict())
    assert one.hparams["attention_norm"] == "softmax_one"
    x = torch.randn(n, 12)
    os_, oo = soft.forward_attention(x), one.forward_attention(x)
    bias = torch.cat([c.bias for c in soft.classifiers])
    for c in range(3):
        raw = os_.sources[f"raw/class/{c}"]
        # unaffected: the raw score and the instance classifiers
        torch.testing.assert_close(oo.sources[f"raw/class/{c}"], raw)
        torch.testing.assert_close(oo.sources[f"instance/{c}"], os_.sources[f"instance/{c}"])
        # the weights shrink by S / (1 + S), S = sum_N exp(A_raw)
        s = torch.exp(raw.double()).sum()
        r = (s / (1 + s)).float()
        torch.testing.assert_close(oo.sources[f"class/{c}"], os_.sources[f"class/{c}"] * r)
        torch.testing.assert_close(oo.sources[f"class/{c}"].sum(), r)
        # and so does the pooled embedding, hence logit - bias
        torch.testing.assert_close(oo.logits[c] - bias[c], (os_.logits[c] - bias[c]) * r)
        assert abs(float(r) - 1) > 1e-6  # a difference a 1e-4 parity check sees for small N
    assert (oo.logits - os_.logits).abs().max() > (1e-3 if n <= 7 else 0)


def test_sb_takes_softmax_one_too():
    torch.manual_seed(0)
    m = CLAM_SB(in_dim=10, n_classes=2, hidden_dim=8, attn_dim=4,
                attention_norm="softmax_one").eval()
    out = m.forward_attention(torch.randn(5, 10))
    torch.testing.assert_close(out.sources["attention"],
                               softmax_one(out.sources["raw/attention"][None], dim=1)[0])


@contextlib.contextmanager
def _acmil_struct():
    """ACMIL's ``utils.utils.Struct`` (an attribute bag), importable only inside the block."""

    class Struct:
        def __init__(self, **entries):
            self.__dict__.update(entries)

    Struct.__module__, Struct.__qualname__ = "utils.utils", "Struct"
    utils, uu = types.ModuleType("utils"), types.ModuleType("utils.utils")
    utils.utils, uu.Struct = uu, Struct
    saved = {k: sys.modules.get(k) for k in ("utils", "utils.utils")}
    sys.modules.update({"utils": utils, "utils.utils": uu})
    try:
        yield Struct
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:  # pragma: no cover
                sys.modules[k] = v


def _save_acmil_container(path, net, arch, **conf_over):
    """As ACMIL's ``utils.utils.save_model`` (Step3_WSI_classification.py --arch <arch>)."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    with _acmil_struct() as Struct:
        fields = dict(D_feat=12, D_inner=16, n_class=3, arch=arch, pretrain="medical_ssl",
                      dataset="bracs")
        fields.update(conf_over)
        conf = Struct(**{k: v for k, v in fields.items() if v is not None})
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                    "config": conf}, path)


def _same_outputs(a, b, x):
    oa, ob = a.forward_attention(x), b.forward_attention(x)
    torch.testing.assert_close(oa.logits, ob.logits)
    for k in oa.sources:
        torch.testing.assert_close(oa.sources[k], ob.sources[k])


def test_acmil_container_selects_softmax_one(tmp_path):
    ref = _acmil_mb("softmax_one")
    _save_acmil_container(tmp_path / "checkpoint-best.pth", ref, "clam_mb")
    model, card = load_model(tmp_path / "checkpoint-best.pth")
    assert card.arch == "clam_mb" and card.hparams["attention_norm"] == "softmax_one"
    assert "attention_norm='softmax_one'" in card.notes and "ACMIL" in card.notes
    _same_outputs(ref, model, torch.randn(7, 12))
    # an explicit choice wins over the container, and says so
    model, card = load_model(tmp_path / "checkpoint-best.pth",
                             hparams={"attention_norm": "softmax"})
    assert model.attention_norm == "softmax" and "attention_norm" not in card.hparams
    assert "as given, although the container suggests 'softmax_one'" in card.notes
    _same_outputs(_acmil_mb("softmax"), model, torch.randn(7, 12))


def test_acmil_mhim_container_stays_softmax(tmp_path):
    """Step3_WSI_classification_MHIM.py --model clam_mb: same container, config without
    ``arch``, ACMIL's other CLAM copy (modules/clam.py) with plain softmax."""
    ref = _acmil_mb("softmax")
    _save_acmil_container(tmp_path / "mhim.pth", ref, None, model="clam_mb")
    model, card = load_model(tmp_path / "mhim.pth")
    assert card.arch == "clam_mb" and model.attention_norm == "softmax"
    assert "attention_norm='softmax_one'" not in card.notes
    _same_outputs(ref, model, torch.randn(7, 12))


def test_acmil_container_leaves_clam_sb_alone(tmp_path):
    torch.manual_seed(0)
    ref = CLAM_SB(in_dim=12, n_classes=3, hidden_dim=16, attn_dim=8).eval()
    _save_acmil_container(tmp_path / "sb.pth", ref, "clam_sb")
    model, card = load_model(tmp_path / "sb.pth")
    assert card.arch == "clam_sb" and model.attention_norm == "softmax"
    _same_outputs(ref, model, torch.randn(7, 12))


def test_bare_state_dict_stays_softmax_unless_told(tmp_path):
    ref = _acmil_mb("softmax_one")
    torch.save(ref.state_dict(), tmp_path / "s_0_checkpoint.pt")  # CLAM's own way of saving
    model, card = load_model(tmp_path / "s_0_checkpoint.pt")
    assert model.attention_norm == "softmax"
    assert "hparams={'attention_norm': 'softmax_one'}" in card.notes  # the shape hint
    (tmp_path / "s_0_checkpoint.json").write_text(
        json.dumps({"hparams": {"attention_norm": "softmax_one"}}))
    model, card = load_model(tmp_path / "s_0_checkpoint.pt")
    assert card.hparams["attention_norm"] == "softmax_one"
    _same_outputs(ref, model, torch.randn(7, 12))
    # our own safetensors + card keep the choice
    out = save_model(model, card, tmp_path / "mb.safetensors")
    again, card2 = load_model(out)
    assert card2.hparams["attention_norm"] == "softmax_one"
    _same_outputs(ref, again, torch.randn(7, 12))
    assert ModelCard.from_dict(card2.to_dict()).build().attention_norm == "softmax_one"
