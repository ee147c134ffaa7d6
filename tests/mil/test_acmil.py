"""ACMIL-GA, ACMIL-MHA, the ACMIL/AEM single-query MHA, and STKIM."""

from __future__ import annotations

import math

import pytest
import torch

from napari_milview.mil import (
    ACMIL_GA,
    ACMIL_MHA,
    MHA,
    build_from_state_dict,
    build_model,
    detect_arch,
)
from napari_milview.mil.layers import MASK_VALUE, stkim_mask

#: reference/algorithms.md 1.5: ACMIL_GA, D_feat 1024, D_inner 512, 2 classes, 5 tokens
GA_TABLE = {
    "dimreduction.fc1.weight": (512, 1024),
    "attention.attention_V.0.weight": (128, 512),
    "attention.attention_V.0.bias": (128,),
    "attention.attention_U.0.weight": (128, 512),
    "attention.attention_U.0.bias": (128,),
    "attention.attention_weights.weight": (5, 128),
    "attention.attention_weights.bias": (5,),
    **{f"classifier.{k}.fc.{p}": (2, 512) if p == "weight" else (2,)
       for k in range(5) for p in ("weight", "bias")},
    "Slide_classifier.fc.weight": (2, 512),
    "Slide_classifier.fc.bias": (2,),
}


def _mha_table(feat=384, d=128, k=2, c=3):
    """ACMIL_MHA key list of reference 1.5 (medical_ssl preset: 384 -> 128)."""
    t = {"dimreduction.fc1.weight": (d, feat), "q": (1, k, d)}
    for i in range(k):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"sub_attention.{i}.{p}.weight"] = (d, d)
            t[f"sub_attention.{i}.{p}.bias"] = (d,)
        t[f"sub_attention.{i}.layer_norm.weight"] = (d,)
        t[f"sub_attention.{i}.layer_norm.bias"] = (d,)
    for p in ("v_proj", "out_proj"):
        t[f"bag_attention.{p}.weight"] = (d, d)
        t[f"bag_attention.{p}.bias"] = (d,)
    t["bag_attention.layer_norm.weight"] = (d,)
    t["bag_attention.layer_norm.bias"] = (d,)
    for i in range(k):
        t[f"classifier.{i}.fc.weight"] = (c, d)
        t[f"classifier.{i}.fc.bias"] = (c,)
    t["Slide_classifier.fc.weight"] = (c, d)
    t["Slide_classifier.fc.bias"] = (c,)
    return t


def _aem_mha_table(feat=512, d=256, c=2):
    """ACMIL/AEM ``MHA`` class (AEM --arch mha)."""
    t = {"dimreduction.fc1.weight": (d, feat), "q": (1, 1, d)}
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        t[f"attention.{p}.weight"] = (d, d)
        t[f"attention.{p}.bias"] = (d,)
    t["attention.layer_norm.weight"] = (d,)
    t["attention.layer_norm.bias"] = (d,)
    t["classifier.fc.weight"] = (c, d)
    t["classifier.fc.bias"] = (c,)
    return t


def _random_sd(table, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.05 for k, shape in table.items()}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------
def test_ga_keys_shapes_round_trip():
    assert _shapes(ACMIL_GA(in_dim=1024, n_classes=2, inner_dim=512, n_token=5)) == GA_TABLE
    sd = _random_sd(GA_TABLE)
    assert detect_arch(sd) == "acmil_ga"
    hp = ACMIL_GA.hparams_from_state_dict(sd)
    assert hp == {"in_dim": 1024, "n_classes": 2, "inner_dim": 512, "n_token": 5, "attn_dim": 128}
    build_model("acmil_ga", **hp).load_state_dict(sd, strict=True)


def test_mha_keys_shapes_round_trip():
    table = _mha_table()
    assert _shapes(ACMIL_MHA(in_dim=384, n_classes=3, inner_dim=128, n_token=2)) == table
    sd = _random_sd(table)
    assert detect_arch(sd) == "acmil_mha"
    hp = ACMIL_MHA.hparams_from_state_dict(sd)
    assert hp == {"in_dim": 384, "n_classes": 3, "inner_dim": 128, "n_token": 2}
    build_model("acmil_mha", **hp).load_state_dict(sd, strict=True)


def test_aem_mha_keys_shapes_round_trip():
    table = _aem_mha_table()
    assert _shapes(MHA(in_dim=512, n_classes=2, inner_dim=256)) == table
    sd = _random_sd(table)
    assert detect_arch(sd) == "mha"
    assert MHA.hparams_from_state_dict(sd) == {"in_dim": 512, "n_classes": 2, "inner_dim": 256}
    m = build_from_state_dict(sd, arch="aem_mha")
    assert isinstance(m, MHA)


def test_ga_with_one_token_is_not_abmil():
    m = build_model("acmil_ga", in_dim=16, inner_dim=8, n_token=1, attn_dim=4)
    assert detect_arch(m.state_dict()) == "acmil_ga"


# ------------------------------------------------------------------------------------------
# eval-mode behaviour
# ------------------------------------------------------------------------------------------
def test_ga_eval_matches_reference_formula():
    torch.manual_seed(0)
    m = build_model("acmil_ga", in_dim=20, n_classes=3, inner_dim=12, n_token=4, attn_dim=6,
                    n_masked_patch=10, mask_drop=0.6, dropout=0.3)
    x = torch.randn(30, 20)
    out = m.forward_attention(x)
    h = torch.relu(x @ m.dimreduction.fc1.weight.T)
    att = m.attention
    raw = (torch.tanh(att.attention_V[0](h)) * torch.sigmoid(att.attention_U[0](h))) \
        @ att.attention_weights.weight.T + att.attention_weights.bias  # [N, K]
    a = torch.softmax(raw.T, dim=1)  # [K, N]
    torch.testing.assert_close(out.logits, m.Slide_classifier.fc(a.mean(0) @ h))
    for k in range(4):
        torch.testing.assert_close(out.sources[f"raw/branch/{k}"], raw[:, k])  # no masking
        torch.testing.assert_close(out.sources[f"branch/{k}"], a[k])
        torch.testing.assert_close(out.aux["branch_logits"][k], m.classifier[k].fc(a[k] @ h))
    assert out.default_source == "branch/mean"
    torch.testing.assert_close(out.sources["branch/mean"], a.mean(0))
    again = m.forward_attention(x)
    torch.testing.assert_close(again.logits, out.logits)


def _split(t, heads):
    return t.reshape(t.shape[0], heads, -1).transpose(0, 1)  # [H, T, d]


def test_mha_eval_matches_reference_formula():
    torch.manual_seed(1)
    m = build_model("acmil_mha", in_dim=20, n_classes=2, inner_dim=16, n_token=3)
    with torch.no_grad():
        m.q.normal_()  # the official init (std 1e-6) makes the attention nearly uniform
    x = torch.randn(25, 20)
    out = m.forward_attention(x)
    h = torch.relu(x @ m.dimreduction.fc1.weight.T)  # [N, d]
    logits = torch.empty(8, 3, 25)
    for i, sa in enumerate(m.sub_attention):
        q = _split(sa.q_proj(m.q[0, i:i + 1]), 8)  # [H, 1, 2]
        k = _split(sa.k_proj(h), 8)  # [H, N, 2]
        logits[:, i] = (q @ k.transpose(1, 2))[:, 0] / math.sqrt(2)
    bag = torch.softmax(logits, dim=-1).mean(1)  # [H, N]
    v = _split(m.bag_attention.v_proj(h), 8)  # [H, N, 2]
    pooled = (bag.unsqueeze(1) @ v)[:, 0].reshape(-1)  # heads concatenated
    ba = m.bag_attention
    z = ba.layer_norm(ba.out_proj(pooled))
    torch.testing.assert_close(out.logits, m.Slide_classifier.fc(z))
    sm = torch.softmax(logits, dim=-1)
    for k in range(3):
        torch.testing.assert_close(out.sources[f"branch/{k}"], sm[:, k].mean(0))
        for hh in range(8):
            torch.testing.assert_close(out.sources[f"raw/branch/{k}/head/{hh}"], logits[hh, k])
            torch.testing.assert_close(out.sources[f"branch/{k}/head/{hh}"], sm[hh, k])
    for hh in range(8):
        torch.testing.assert_close(out.sources[f"head/{hh}"], bag[hh])
    torch.testing.assert_close(out.sources["branch/mean"], bag.mean(0))
    torch.testing.assert_close(out.sources["head/mean"], bag.mean(0))
    assert out.default_source == "branch/mean"
    assert out.aux["branch_logits"].shape == (3, 2)


def test_aem_mha_eval_matches_reference_formula():
    torch.manual_seed(2)
    m = build_model("aem_mha", in_dim=20, n_classes=2, inner_dim=16)
    with torch.no_grad():
        m.q.normal_()
    x = torch.randn(9, 20)
    out = m.forward_attention(x)
    h = torch.relu(x @ m.dimreduction.fc1.weight.T)
    at = m.attention
    q, k, v = _split(at.q_proj(m.q[0]), 8), _split(at.k_proj(h), 8), _split(at.v_proj(h), 8)
    lg = (q @ k.transpose(1, 2))[:, 0] / math.sqrt(2)  # [H, N]
    a = torch.softmax(lg, dim=-1)
    z = at.layer_norm(at.out_proj((a.unsqueeze(1) @ v)[:, 0].reshape(-1)))
    torch.testing.assert_close(out.logits, m.classifier.fc(z))
    for hh in range(8):
        torch.testing.assert_close(out.sources[f"head/{hh}"], a[hh])
        torch.testing.assert_close(out.sources[f"raw/head/{hh}"], lg[hh])
    torch.testing.assert_close(out.sources["head/mean"], a.mean(0))
    assert out.default_source == "head/mean"


# ------------------------------------------------------------------------------------------
# STKIM
# ------------------------------------------------------------------------------------------
def _check_masked(train_row, eval_row, n_masked_patch, mask_drop):
    k = min(n_masked_patch, eval_row.numel())
    n_drop = int(k * mask_drop)
    masked = train_row == MASK_VALUE
    assert int(masked.sum()) == n_drop
    top = set(torch.topk(eval_row, k).indices.tolist())
    assert set(torch.nonzero(masked).flatten().tolist()) <= top
    torch.testing.assert_close(train_row[~masked], eval_row[~masked])
    return frozenset(torch.nonzero(masked).flatten().tolist())


@pytest.mark.parametrize("n,n_masked_patch,mask_drop", [(40, 10, 0.6), (7, 10, 0.6),
                                                        (40, 10, 0.0), (40, 5, 1.0)])
def test_ga_stkim(n, n_masked_patch, mask_drop):
    torch.manual_seed(0)
    m = build_model("acmil_ga", in_dim=16, inner_dim=8, n_token=3, attn_dim=4,
                    n_masked_patch=n_masked_patch, mask_drop=mask_drop)
    x = torch.randn(n, 16)
    ref = m.forward_attention(x)  # eval: nothing masked
    for k in range(3):
        assert not (ref.sources[f"raw/branch/{k}"] == MASK_VALUE).any()
    m.train()
    chosen = set()
    for seed in range(4):
        torch.manual_seed(seed)
        out = m.forward_attention(x)
        for k in range(3):
            row = out.sources[f"raw/branch/{k}"].detach()
            chosen.add(_check_masked(row, ref.sources[f"raw/branch/{k}"], n_masked_patch,
                                     mask_drop))
            masked = row == MASK_VALUE
            assert (out.sources[f"branch/{k}"][masked] == 0).all()
    if 0 < int(min(n_masked_patch, n) * mask_drop) < min(n_masked_patch, n):
        assert len(chosen) > 1  # random subsets
    m.eval()
    torch.testing.assert_close(m.forward_attention(x).logits, ref.logits)


def test_mha_stkim_per_head_and_query():
    torch.manual_seed(0)
    m = build_model("acmil_mha", in_dim=16, inner_dim=16, n_token=2, n_masked_patch=10,
                    mask_drop=0.6)
    with torch.no_grad():
        m.q.normal_()
    x = torch.randn(30, 16)
    ref = m.forward_attention(x)
    m.train()
    torch.manual_seed(5)
    out = m.forward_attention(x)
    for k in range(2):
        for hh in range(8):
            name = f"raw/branch/{k}/head/{hh}"
            assert not (ref.sources[name] == MASK_VALUE).any()
            _check_masked(out.sources[name].detach(), ref.sources[name], 10, 0.6)


def test_aem_mha_never_masks():
    m = build_model("aem_mha", in_dim=16, inner_dim=16).train()
    out = m.forward_attention(torch.randn(30, 16))
    assert not any((v == MASK_VALUE).any() for k, v in out.sources.items())


def test_stkim_mask_function():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 50)
    out = stkim_mask(logits, 10, 0.6)
    assert out.shape == logits.shape and not (logits == MASK_VALUE).any()
    for row_o, row_i in zip(out.reshape(-1, 50), logits.reshape(-1, 50), strict=True):
        _check_masked(row_o, row_i, 10, 0.6)
    assert stkim_mask(logits, 0, 0.6) is logits
    assert stkim_mask(logits, 10, 0.05) is logits  # int(10 * 0.05) == 0
