"""MHIM-MIL student: key layouts (v1 / v2, both backbones, merge), the container with its
teacher, the pooling and source formulas, the authors' internal PPEG padding, merge_test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_milview.mil import MHIM, build_from_state_dict, build_model, detect_arch
from napari_milview.mil.checkpoint import CheckpointError, load_model
from napari_milview.mil.mhim import MHIMPPEG

PARITY = Path(__file__).resolve().parents[1] / "data" / "parity"


def _table(backbone="attn", in_dim=32, dim=64, n_classes=2, heads=8, merge_k=0,
           proj="feature", da_act=True, passing_v=True):
    """The authors' key names and shapes (read from their state_dict())."""
    t = {f"{proj}.0.weight": (dim, in_dim), f"{proj}.0.bias": (dim,),
         "predictor.weight": (n_classes, dim), "predictor.bias": (n_classes,)}
    if backbone == "attn":
        t["online_encoder.attention.attention.0.weight"] = (128, dim)
        t[f"online_encoder.attention.attention.{2 if da_act else 1}.weight"] = (1, 128)
    elif backbone == "dsmil":
        p = "online_encoder."
        t.update({p + "i_classifier.0.weight": (n_classes, dim),
                  p + "i_classifier.0.bias": (n_classes,),
                  p + "b_classifier.q.0.weight": (128, dim), p + "b_classifier.q.0.bias": (128,),
                  p + "b_classifier.q.2.weight": (128, 128), p + "b_classifier.q.2.bias": (128,),
                  p + "b_classifier.fcc.weight": (n_classes, n_classes, dim),
                  p + "b_classifier.fcc.bias": (n_classes,)})
        if passing_v:
            t.update({p + "b_classifier.v.1.weight": (dim, dim),
                      p + "b_classifier.v.1.bias": (dim,)})
    else:
        t.update({"online_encoder.cls_token": (1, 1, dim), "online_encoder.norm.weight": (dim,),
                  "online_encoder.norm.bias": (dim,)})
        for layer in (1, 2):
            p = f"online_encoder.layer{layer}."
            t.update({p + "norm.weight": (dim,), p + "norm.bias": (dim,),
                      p + "attn.to_qkv.weight": (3 * heads * (dim // 8), dim),
                      p + "attn.to_out.0.weight": (dim, heads * (dim // 8)),
                      p + "attn.to_out.0.bias": (dim,),
                      p + "attn.res_conv.weight": (heads, 1, 33, 1)})
        for name, k in (("proj", 7), ("proj1", 5), ("proj2", 3)):
            t[f"online_encoder.pos_embedding.{name}.weight"] = (dim, 1, k, k)
            t[f"online_encoder.pos_embedding.{name}.bias"] = (dim,)
    if merge_k:
        t.update({"merge.norm.weight": (dim,), "merge.norm.bias": (dim,),
                  "merge.attn.to_kv.weight": (1024, dim), "merge.attn.to_q.weight": (512, dim),
                  "merge.attn.to_out.0.weight": (dim, 512), "merge.attn.to_out.0.bias": (dim,),
                  "merge.global_q_mm": (1, merge_k, dim)})
    return t


def _random_sd(table, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.2 for k, shape in table.items()}


@pytest.mark.parametrize("kw, expect", [
    ({"backbone": "attn"}, {"backbone": "attn", "v1_layout": False, "act": "gelu"}),
    ({"backbone": "attn", "proj": "patch_to_emb"}, {"v1_layout": True, "act": "relu"}),
    ({"backbone": "attn", "da_act": False}, {"da_act": "none"}),
    ({"backbone": "selfattn", "n_classes": 3}, {"backbone": "selfattn", "heads": 8,
                                                "dim_head": 8, "n_classes": 3}),
    ({"backbone": "selfattn", "heads": 4}, {"heads": 4, "dim_head": 8}),
    ({"backbone": "selfattn", "merge_k": 5}, {"merge": True, "merge_k": 5,
                                              "merge_dim_head": 64}),
    ({"backbone": "dsmil", "n_classes": 3}, {"backbone": "dsmil", "passing_v": True}),
    ({"backbone": "dsmil", "passing_v": False, "merge_k": 2}, {"passing_v": False,
                                                               "merge": True}),
])
def test_layouts_detect_infer_and_load_strictly(kw, expect):
    sd = _random_sd(_table(**kw))
    assert detect_arch(sd) == "mhim"
    hp = MHIM.hparams_from_state_dict(sd)
    for k, v in expect.items():
        assert hp[k] == v if k in hp else MHIM(**hp).hparams[k] == v
    model = build_from_state_dict(sd)  # strict
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {k: tuple(v) for k, v in _table(**kw).items()}
    out = model.forward_attention(torch.randn(20, 32))
    assert out.logits.shape == (hp["n_classes"],)
    assert all(v.shape == (20,) for v in out.sources.values())


def test_dsmil_backbone_inconsistent_or_unknown_keys_are_refused():
    sd = _random_sd(_table("dsmil"))
    sd["online_encoder.b_classifier.fcc.weight"] = torch.zeros(2, 2, 32)
    with pytest.raises(ValueError, match="DSMIL"):
        MHIM.hparams_from_state_dict(sd)
    sd = _random_sd(_table("dsmil"))
    del sd["online_encoder.i_classifier.0.weight"]
    with pytest.raises(ValueError, match="unknown MHIM backbone"):
        MHIM.hparams_from_state_dict(sd)


def test_dsmil_scores_by_hand():
    """Stream 1: instance logits, max over instances; stream 2: attention to each class's
    critical instance (top instance logit), value projection, Conv1d; the slide logits are
    the authors' evaluation 0.5 bag + 0.5 max instance (softmax on top)."""
    sd = _random_sd(_table("dsmil", n_classes=3), seed=8)
    model = build_from_state_dict(sd).double()
    s = {k: v.double() for k, v in sd.items()}
    p = "online_encoder."
    x = torch.randn(13, 32, dtype=torch.float64)
    h = F.gelu(x @ s["feature.0.weight"].T + s["feature.0.bias"])
    ins = h @ s[p + "i_classifier.0.weight"].T + s[p + "i_classifier.0.bias"]  # [N, 3]

    def q(z):
        z = torch.relu(z @ s[p + "b_classifier.q.0.weight"].T + s[p + "b_classifier.q.0.bias"])
        return torch.tanh(z @ s[p + "b_classifier.q.2.weight"].T
                          + s[p + "b_classifier.q.2.bias"])

    crit = ins.argmax(dim=0)
    raw = q(h) @ q(h[crit]).T / np.sqrt(128)  # [N, 3]
    a = torch.softmax(raw, dim=0)
    v = torch.relu(h @ s[p + "b_classifier.v.1.weight"].T + s[p + "b_classifier.v.1.bias"])
    bag = torch.einsum("cd,kcd->k", a.T @ v, s[p + "b_classifier.fcc.weight"]) \
        + s[p + "b_classifier.fcc.bias"]
    logits = 0.5 * bag + 0.5 * ins.max(dim=0).values
    out = model.forward_attention(x)
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.probs, torch.softmax(logits, dim=0))
    torch.testing.assert_close(out.aux["bag_logits"], bag)
    assert torch.equal(out.aux["critical_instance"], crit)
    for c in range(3):
        torch.testing.assert_close(out.sources[f"class/{c}"], a[:, c])
        torch.testing.assert_close(out.sources[f"raw/class/{c}"], raw[:, c])
        torch.testing.assert_close(out.sources[f"instance/{c}"],
                                   torch.softmax(ins, dim=1)[:, c])
        torch.testing.assert_close(out.sources[f"raw/instance/{c}"], ins[:, c])
    torch.testing.assert_close(out.sources["attention"], a.max(dim=1).values)
    torch.testing.assert_close(out.sources["pseudo_score"], ins.max(dim=1).values)
    assert out.default_source == f"class/{int(logits.argmax())}"


def test_dsmil_merge_test_scores_the_merged_bag_and_reports_n_instances():
    sd = _random_sd(_table("dsmil", merge_k=3), seed=9)
    plain = build_from_state_dict(sd).double()
    merged = build_from_state_dict(sd, merge_test=True).double()
    x = torch.randn(15, 32, dtype=torch.float64)
    out = merged.forward_attention(x)
    assert not torch.allclose(out.logits, plain(x))
    assert all(v.shape == (15,) for v in out.sources.values())
    assert float(out.sources["class/0"].sum()) < 1.0  # the merged tokens take a share


def test_aliases_fix_the_backbone():
    assert build_model("mhim_abmil", in_dim=8, dim=16).hparams["backbone"] == "attn"
    assert build_model("mhim_transmil", in_dim=8, dim=16).hparams["backbone"] == "selfattn"
    assert build_model("mhim_dsmil", in_dim=8, dim=16).hparams["backbone"] == "dsmil"
    with pytest.raises(ValueError, match="backbone"):
        build_model("mhim_abmil", backbone="selfattn")


def test_attn_pooling_and_instance_scores_by_hand():
    sd = _random_sd(_table("attn", proj="patch_to_emb"), seed=3)  # v1: ReLU projection
    model = build_from_state_dict(sd).double()
    x = torch.randn(11, 32, dtype=torch.float64)
    sdd = {k: v.double() for k, v in sd.items()}
    h = F.relu(x @ sdd["patch_to_emb.0.weight"].T + sdd["patch_to_emb.0.bias"])
    e = F.relu(h @ sdd["online_encoder.attention.attention.0.weight"].T) \
        @ sdd["online_encoder.attention.attention.2.weight"].T
    a = torch.softmax(e[:, 0], dim=0)
    logits = (a @ h) @ sdd["predictor.weight"].T + sdd["predictor.bias"]
    out = model.forward_attention(x)
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.sources["attention"], a)
    torch.testing.assert_close(out.sources["raw/attention"], e[:, 0])
    assert out.default_source == "attention"
    inst = torch.softmax((a[:, None] * h) @ sdd["predictor.weight"].T, dim=1)  # [N, C]
    for c in range(2):
        torch.testing.assert_close(out.sources[f"instance/{c}"], inst[:, c])
    torch.testing.assert_close(out.sources["pseudo_score"], inst.max(dim=1).values)


def test_projection_activation_is_a_setting():
    sd = _random_sd(_table("attn"), seed=4)
    x = torch.randn(9, 32)
    gelu = build_from_state_dict(sd)(x)
    relu = build_from_state_dict(sd, act="relu")(x)
    assert not torch.allclose(gelu, relu)
    sdr = {k.replace("feature.", "patch_to_emb."): v for k, v in sd.items()}
    torch.testing.assert_close(build_from_state_dict(sdr)(x), relu)  # v1 default: ReLU


@pytest.mark.parametrize("n, side", [(1, 7), (10, 7), (48, 7), (50, 8), (64, 8), (70, 9)])
def test_ppeg_pads_inside_and_returns_n_tokens(n, side):
    torch.manual_seed(n)
    ppeg = MHIMPPEG(6).double()
    x = torch.randn(1, n, 6, dtype=torch.float64)
    s = int(np.ceil(np.sqrt(n)))
    full = torch.cat([x, x[:, :s * s - n]], dim=1)
    full = torch.cat([full, torch.zeros(1, side * side - full.shape[1], 6,
                                        dtype=torch.float64)], dim=1)
    img = full.transpose(1, 2).reshape(1, 6, side, side)
    ref = (img + ppeg.proj(img) + ppeg.proj1(img) + ppeg.proj2(img)).flatten(2).transpose(1, 2)
    out = ppeg(x)
    assert out.shape == (1, n, 6)
    torch.testing.assert_close(out, ref[:, :n])


def test_selfattn_cls_rows_equal_the_materialised_matrix():
    sd = _random_sd(_table("selfattn", n_classes=3), seed=5)
    model = build_from_state_dict(sd).double()
    enc = model.online_encoder
    x = torch.randn(40, 32, dtype=torch.float64)  # 41 tokens, 32 landmarks: 23 pad rows
    out = model.forward_attention(x)
    h = F.gelu(F.linear(x, model.feature[0].weight, model.feature[0].bias))  # v2: GELU
    t = torch.cat([enc.cls_token[0], h]).unsqueeze(0)
    _, f = enc.layer1.attn(enc.layer1.norm(t), return_factors=True)
    mat = f.full()[0]  # [H, L, L]
    row = mat[:, f.pad, f.pad + 1:]
    assert f.pad > 0 and row.shape == (8, 40)
    for hh in range(8):
        torch.testing.assert_close(out.sources[f"layer1/head/{hh}"], row[hh])
    torch.testing.assert_close(out.sources["layer1/mean"], row.mean(0))
    assert out.default_source == "layer1/mean"
    assert {"layer2/mean", "instance/2", "pseudo_score"} <= set(out.sources)
    torch.testing.assert_close(sum(out.sources[f"instance/{c}"] for c in range(3)),
                               torch.ones(40, dtype=torch.float64))


@pytest.mark.parametrize("backbone", ["attn", "selfattn", "dsmil"])
def test_single_instance(backbone):
    model = build_from_state_dict(_random_sd(_table(backbone), seed=6))
    out = model.forward_attention(torch.randn(1, 32))
    assert torch.isfinite(out.logits).all()
    assert all(v.shape == (1,) for v in out.sources.values())


def test_merge_test_appends_merged_tokens():
    sd = _random_sd(_table("attn", merge_k=3), seed=7)
    plain = build_from_state_dict(sd).double()
    merged = build_from_state_dict(sd, merge_test=True).double()
    x = torch.randn(15, 32, dtype=torch.float64)
    a = merged.forward_attention(x)
    assert not torch.allclose(a.logits, plain(x))
    assert a.sources["attention"].shape == (15,)
    assert float(a.sources["attention"].sum()) < 1.0  # the 3 merged tokens take a share
    sd_no_q = {k: v for k, v in sd.items() if k != "merge.global_q_mm"}
    assert MHIM.hparams_from_state_dict(sd_no_q)["merge_global_q"] is False
    with pytest.raises(ValueError, match="merge_test"):
        build_from_state_dict(sd_no_q, merge_test=True)


def test_duplicate_global_q_is_dropped_only_when_identical():
    sd = _random_sd(_table("attn", merge_k=2))
    sd["merge.global_q"] = sd["merge.global_q_mm"].clone()
    out, notes = MHIM.remap_keys({"module." + k: v for k, v in sd.items()})
    assert "merge.global_q" not in out and any("global_q" in n for n in notes)
    sd["merge.global_q"] = sd["merge.global_q_mm"] + 1
    assert "merge.global_q" in MHIM.remap_keys(sd)[0]


def test_container_loads_the_student_and_notes_the_teacher(tmp_path):
    folder = PARITY / "mhim_transmil"
    case = json.loads((folder / "case.json").read_text())
    ck = torch.load(folder / case["checkpoint"], weights_only=True)
    assert set(ck) == {"model", "teacher", "epoch"}
    model, card = load_model(folder / case["checkpoint"])
    assert card.arch == "mhim" and "not loaded: teacher" in card.notes
    with np.load(folder / "reference.npz") as z:
        x, probs = torch.from_numpy(z["bag1__features"]), z["bag1__probs"]
    np.testing.assert_allclose(model.forward_attention(x).probs.detach().numpy(), probs,
                               atol=1e-5)
    torch.save(ck["teacher"], tmp_path / "teacher.pt")  # the teacher is another network
    teacher, _ = load_model(tmp_path / "teacher.pt")
    assert not np.allclose(teacher.forward_attention(x).probs.detach().numpy(), probs,
                           atol=1e-3)
    with pytest.raises(CheckpointError):
        load_model(folder / case["checkpoint"], arch="mhim_abmil")
