"""The shared contract: registry, detection, model card, input handling, all models."""

from __future__ import annotations

import pytest
import torch

from napari_milview import mil
from napari_milview.mil import (
    ALIASES,
    MODELS,
    MILModel,
    MILOutput,
    ModelCard,
    available_models,
    build_from_state_dict,
    build_model,
    detect_arch,
)

D = 24
#: small configurations of every registered name (aliases included)
SMALL = {
    "abmil": {"in_dim": D, "n_classes": 3, "inner_dim": 16, "attn_dim": 8},
    "clam_sb": {"in_dim": D, "n_classes": 2, "hidden_dim": 16, "attn_dim": 8},
    "clam_mb": {"in_dim": D, "n_classes": 3, "hidden_dim": 16, "attn_dim": 8},
    "acmil_ga": {"in_dim": D, "n_classes": 2, "inner_dim": 16, "n_token": 3, "attn_dim": 8},
    "acmil_mha": {"in_dim": D, "n_classes": 2, "inner_dim": 16, "n_token": 2},
    "mha": {"in_dim": D, "n_classes": 2, "inner_dim": 16},
    "transmil": {"in_dim": D, "n_classes": 2, "dim": 32},
    "dtfd": {"in_dim": D, "n_classes": 2, "m_dim": 16, "attn_dim": 8},
    "dsmil": {"in_dim": D, "n_classes": 2, "q_hidden": 16, "q_dim": 8},
    "ins": {"in_dim": D, "n_classes": 2, "encoder": "mlp", "width": 16},
    "packmil": {"in_dim": D, "n_classes": 3, "inner_dim": 16, "mil_norm": "ln"},
    "mambamil": {"in_dim": D, "n_classes": 2, "d_model": 16},
    "aem": {"in_dim": D, "n_classes": 2, "inner_dim": 16, "attn_dim": 8},
    "aem_mha": {"in_dim": D, "n_classes": 2, "inner_dim": 16},
    "mhim": {"in_dim": D, "n_classes": 2, "dim": 16, "backbone": "attn", "merge": True},
    "mhim_abmil": {"in_dim": D, "n_classes": 3, "dim": 16},
    "mhim_transmil": {"in_dim": D, "n_classes": 2, "dim": 32},
    "mhim_dsmil": {"in_dim": D, "n_classes": 3, "dim": 16},
}
CANONICAL = ["abmil", "clam_sb", "clam_mb", "acmil_ga", "acmil_mha", "mha", "transmil", "dtfd",
             "mhim", "dsmil", "ins", "packmil", "mambamil"]

def _is_softmax_source(arch: str, name: str) -> bool:
    """Sources that are a softmax over the bag (sum to 1; DTFD's ``tier1/`` sums to 1 over
    each pseudo-bag)."""
    return not (name.startswith(("raw/", "instance/", "tier1/")) or name == "pseudo_score"
                or arch in ("transmil", "mhim_transmil")
                or (arch == "mhim_dsmil" and name == "attention"))  # max over classes


def _model(arch: str, seed: int = 0) -> MILModel:
    torch.manual_seed(seed)
    return build_model(arch, **SMALL[arch])


def test_registry_names():
    assert set(available_models(include_aliases=False)) == set(CANONICAL)
    assert set(available_models()) == set(SMALL)
    assert ALIASES["aem"] == ("abmil", {"gated": True})
    assert ALIASES["aem_mha"] == ("mha", {})
    for name, cls in MODELS.items():
        assert issubclass(cls, MILModel)
        if name not in ALIASES:
            assert cls.arch == name


def test_build_model_errors_and_mode():
    with pytest.raises(ValueError, match="known: .*acmil_ga.*transmil"):
        build_model("no_such_mil")
    with pytest.raises(ValueError, match="gated"):
        build_model("aem", gated=False)
    m = build_model("ACMIL-GA", in_dim=8, inner_dim=4, attn_dim=4)
    assert not m.training and isinstance(m, mil.ACMIL_GA)
    assert build_model("aem", in_dim=8, inner_dim=4).attention.gated


def test_register_model_rejects_duplicates():
    class Other(MILModel):
        arch = "abmil"

    with pytest.raises(ValueError, match="already registered"):
        mil.register_model(Other)


def test_detect_arch_unknown_lists_known():
    sd = {"encoder.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError) as err:
        detect_arch(sd)
    for name in CANONICAL:
        assert name in str(err.value)


@pytest.mark.parametrize("arch", list(SMALL))
def test_detect_and_hparams_round_trip(arch):
    m = _model(arch)
    sd = m.state_dict()
    canon = ALIASES.get(arch, (arch, {}))[0]
    assert detect_arch(sd) == canon
    hp = MODELS[canon].hparams_from_state_dict(sd)
    m2 = build_model(canon, **hp)
    assert {k: tuple(v.shape) for k, v in m2.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in sd.items()}
    m2.load_state_dict(sd, strict=True)
    x = torch.randn(9, D)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x))
    m3 = build_from_state_dict(sd)
    assert type(m3) is type(m) and not m3.training


@pytest.mark.parametrize("arch", list(SMALL))
def test_contract_eval(arch):
    m = _model(arch)
    assert m.required_dim == D
    for n in (1, 2, 11):
        x = torch.randn(n, D)
        with torch.inference_mode():
            out = m.forward_attention(x)
            again = m.forward_attention(x)
            logits = m(x)
            batched = m(x.unsqueeze(0))
        assert isinstance(out, MILOutput)
        assert out.logits.shape == (m.n_classes,)
        torch.testing.assert_close(out.logits, logits)
        torch.testing.assert_close(batched, logits)
        torch.testing.assert_close(again.logits, out.logits)  # deterministic: dropout off
        assert out.default_source in out.sources
        for name, s in out.sources.items():
            assert s.shape == (n,), name
            assert s.is_floating_point() and not s.requires_grad
            torch.testing.assert_close(again.sources[name], s)
            if _is_softmax_source(arch, name):
                torch.testing.assert_close(s.sum(), torch.tensor(1.0), msg=name)
                assert (s >= 0).all()
        assert out.source() is out.sources[out.default_source]
        assert out.probs.shape == (m.n_classes,)
        if out.probabilities is None:  # softmax; a model scoring otherwise sets them (DSMIL)
            assert out.probs.sum().item() == pytest.approx(1.0)
        assert ((out.probs >= 0) & (out.probs <= 1)).all()
        assert out.prediction == int(out.logits.argmax())


@pytest.mark.parametrize("arch", CANONICAL)
def test_train_mode_keeps_graph(arch):
    m = _model(arch).train()
    out = m.forward_attention(torch.randn(12, D))
    (out.logits.sum() + out.source().sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("arch", ["abmil", "transmil"])
def test_input_validation_and_dtypes(arch):
    m = _model(arch)
    with pytest.raises(ValueError, match="dimension"):
        m(torch.randn(5, D + 1))
    with pytest.raises(ValueError, match="one bag"):
        m(torch.randn(2, 5, D))
    with pytest.raises(ValueError, match="empty"):
        m(torch.randn(0, D))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        m(torch.randn(D))
    x = torch.randn(6, D)
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(m(x.half()), ref, atol=5e-3, rtol=5e-3)  # fp16 h5 features
        torch.testing.assert_close(m(x.double()), ref)
        m64 = m.double()
        assert m64(x).dtype == torch.float64


def test_milout_source_errors():
    out = MILOutput(torch.zeros(2), {"attention": torch.ones(3) / 3}, "attention")
    with pytest.raises(KeyError, match="available"):
        out.source("branch/0")
    assert out.aux == {}


def test_model_card():
    card = ModelCard(arch="acmil_ga", hparams={"in_dim": 8, "inner_dim": 4, "n_classes": 2,
                                                   "n_token": 2, "attn_dim": 4},
                     classes=["normal", "tumor"], feature_dim=8, encoder="resnet50_trunc",
                     patch_size_um=128.0, notes="synthetic")
    assert card.check() == []
    again = ModelCard.from_dict({**card.to_dict(), "extra": 1})
    assert again == card
    m = card.build()
    assert isinstance(m, mil.ACMIL_GA) and m.required_dim == 8 and not m.training
    bad = ModelCard(arch="abmil", hparams={"in_dim": 8, "n_classes": 3}, classes=["a", "b"],
                    feature_dim=16)
    assert len(bad.check()) == 2
    assert ModelCard(arch="abmil").classes == [] and ModelCard(arch="abmil").encoder is None
