"""MambaMIL: official keys, the pure-PyTorch selective scan, SR-Mamba reordering, loading.

Parity with the authors' code is in tests/data/parity/mambamil_* (tests/mil/test_parity.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from napari_milview.mil import MambaMIL, ModelCard, build_from_state_dict, build_model, detect_arch
from napari_milview.mil.checkpoint import CheckpointError, load_model, save_model
from napari_milview.mil.mambamil import (
    MambaMixer,
    _mamba_ssm_scan,
    _scan,
    causal_conv1d,
    reorder,
    selective_scan,
    selective_scan_sequential,
    unreorder,
)


def _mixer_table(prefix, two_branches, d=512, e=1024, s=16, r=32, w=4):
    t = {f"{prefix}in_proj.weight": (2 * e, d)}
    for sfx in ("", "_b") if two_branches else ("",):
        t |= {f"{prefix}conv1d{sfx}.weight": (e, 1, w), f"{prefix}conv1d{sfx}.bias": (e,),
              f"{prefix}x_proj{sfx}.weight": (r + 2 * s, e),
              f"{prefix}dt_proj{sfx}.weight": (e, r), f"{prefix}dt_proj{sfx}.bias": (e,)}
    t[f"{prefix}A_log"] = (e, s)
    if two_branches:
        t[f"{prefix}A_b_log"] = (e, s)
    t[f"{prefix}D"] = (e,)
    if two_branches:
        t[f"{prefix}D_b"] = (e,)
    t[f"{prefix}out_proj.weight"] = (d, e)
    return t


def _table(two_branches, in_dim=1024, n_classes=2, layers=2):
    """The authors' MambaMIL(in_dim=1024, n_classes=2, layer=2) state_dict, d_model 512."""
    t = {"_fc1.0.weight": (512, in_dim), "_fc1.0.bias": (512,),
         "norm.weight": (512,), "norm.bias": (512,)}
    for i in range(layers):
        t |= {f"layers.{i}.0.weight": (512,), f"layers.{i}.0.bias": (512,)}
        t |= _mixer_table(f"layers.{i}.1.", two_branches)
    t |= {"classifier.weight": (n_classes, 512), "classifier.bias": (n_classes,),
          "attention.0.weight": (128, 512), "attention.0.bias": (128,),
          "attention.2.weight": (1, 128), "attention.2.bias": (1,)}
    return t


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _scan_inputs(L, E=6, S=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(u=torch.randn(L, E, generator=g), delta=torch.randn(L, E, generator=g),
                A=-torch.exp(torch.randn(E, S, generator=g)), B=torch.randn(L, S, generator=g),
                C=torch.randn(L, S, generator=g), D=torch.randn(E, generator=g),
                z=torch.randn(L, E, generator=g), delta_bias=torch.randn(E, generator=g))


# ------------------------------------------------------------------------------------------
# keys and shapes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,two", [("SRMamba", True), ("BiMamba", True), ("Mamba", False)])
def test_official_keys_and_shapes(kind, two):
    m = MambaMIL(in_dim=1024, n_classes=2, type=kind)
    assert _shapes(m) == _table(two)
    # the parameters the authors keep in fp32 start as in their constructor
    torch.testing.assert_close(m.layers[0][1].A_log[3],
                               torch.log(torch.arange(1, 17, dtype=torch.float32)))
    assert torch.equal(m.layers[1][1].D, torch.ones(1024))


def test_hparams_from_state_dict_and_detection():
    sd = MambaMIL(in_dim=96, n_classes=3, d_model=64, layer=3, d_state=8, expand=3).state_dict()
    assert detect_arch(sd) == "mambamil"
    hp = MambaMIL.hparams_from_state_dict(sd)
    assert hp == {"in_dim": 96, "n_classes": 3, "d_model": 64, "layer": 3, "d_state": 8,
                  "d_conv": 4, "expand": 3, "dt_rank": 4, "attn_dim": 128}
    plain = MambaMIL(in_dim=96, n_classes=3, d_model=64, type="Mamba").state_dict()
    assert MambaMIL.hparams_from_state_dict(plain)["type"] == "Mamba"
    m = build_from_state_dict(plain)
    assert m.hparams["type"] == "Mamba" and not hasattr(m.layers[0][1], "A_b_log")
    with pytest.raises(ValueError, match="missing key"):
        MambaMIL.hparams_from_state_dict({k: v for k, v in sd.items()
                                          if k != "layers.0.1.A_log"})


def test_transmil_and_abmil_layouts_are_not_mambamil():
    for arch in ("transmil", "abmil", "clam_sb"):
        sd = build_model(arch, in_dim=64, n_classes=2).state_dict()
        assert not MambaMIL.matches_state_dict(sd)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown MambaMIL type"):
        MambaMIL(type="S4")
    with pytest.raises(ValueError, match="act"):
        MambaMIL(act="tanh")
    with pytest.raises(ValueError, match="rate"):
        MambaMixer(16, rate=0)


# ------------------------------------------------------------------------------------------
# the selective scan
# ------------------------------------------------------------------------------------------
def test_sequential_scan_by_hand():
    """E = S = 1, constant delta: s_t = a s_{t-1} + d u_t B_t with a = exp(d A)."""
    d = math.log1p(math.e)  # softplus(1) = log(1 + e)
    A, a = -0.5, math.exp(-0.5 * math.log1p(math.e))
    u, B, C = [1.0, 2.0, -1.0], [1.0, 0.5, 2.0], [2.0, 1.0, 3.0]
    s, want = 0.0, []
    for t in range(3):
        s = a * s + d * u[t] * B[t]
        want.append(C[t] * s + 0.25 * u[t])
    got = selective_scan_sequential(torch.tensor(u)[:, None], torch.ones(3, 1),
                                    torch.tensor([[A]]), torch.tensor(B)[:, None],
                                    torch.tensor(C)[:, None], D=torch.tensor([0.25]))
    torch.testing.assert_close(got[:, 0], torch.tensor(want))
    gated = selective_scan_sequential(torch.tensor(u)[:, None], torch.ones(3, 1),
                                      torch.tensor([[A]]), torch.tensor(B)[:, None],
                                      torch.tensor(C)[:, None], D=torch.tensor([0.25]),
                                      z=torch.full((3, 1), 2.0))
    torch.testing.assert_close(gated[:, 0], torch.tensor(want) * 2 * torch.sigmoid(
        torch.tensor(2.0)))


@pytest.mark.parametrize("L,block", [(1, 32), (31, 32), (32, 32), (301, 32), (301, 7),
                                     (301, 1), (50, 1000)])
def test_blocked_scan_equals_sequential(L, block):
    kw = _scan_inputs(L)
    ref = selective_scan_sequential(**kw)
    with torch.no_grad():
        got = selective_scan(**kw, block=block)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_blocked_scan_with_autograd():
    kw = _scan_inputs(40)
    ref = selective_scan_sequential(**kw)
    kw["u"] = kw["u"].clone().requires_grad_(True)
    got = selective_scan(**kw, block=16)
    torch.testing.assert_close(got.detach(), ref, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    kw2 = {k: v.detach().clone() for k, v in kw.items()}
    kw2["u"].requires_grad_(True)
    selective_scan_sequential(**kw2).sum().backward()
    torch.testing.assert_close(kw["u"].grad, kw2["u"].grad, atol=1e-4, rtol=1e-4)


def test_scan_restores_the_thread_setting():
    before = torch.get_num_threads()
    kw = _scan_inputs(10)
    with torch.no_grad():
        selective_scan(**kw)
        assert torch.get_num_threads() == before
        selective_scan(**kw, threads=None)
        assert torch.get_num_threads() == before


@pytest.mark.skipif(_mamba_ssm_scan() is None or not torch.cuda.is_available(),
                    reason="needs mamba_ssm's CUDA selective scan")
def test_mamba_ssm_kernel_equals_our_scan():  # pragma: no cover - needs CUDA + mamba_ssm
    kw = _scan_inputs(257, E=32, S=16)
    with torch.no_grad():
        ours = selective_scan(**kw)
        cuda = _scan(**{k: v.cuda() for k, v in kw.items()}).cpu()
    torch.testing.assert_close(cuda, ours, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# sequence reordering and the mixers
# ------------------------------------------------------------------------------------------
def test_reorder_takes_every_rate_th_instance_first():
    x = torch.arange(1.0, 24.0)[:, None]  # 1..23 (0 marks the padding)
    r = reorder(x, 10)[:, 0].tolist()
    assert r == [1, 11, 21, 2, 12, 22, 3, 13, 23, 4, 14, 0, 5, 15, 0, 6, 16, 0, 7, 17, 0,
                 8, 18, 0, 9, 19, 0, 10, 20, 0]
    assert torch.equal(unreorder(reorder(x, 10), 10, 23), x)
    assert torch.equal(reorder(x[:4], 10)[:4], x[:4])  # fewer instances than the rate
    assert torch.equal(unreorder(reorder(x, 1), 1, 23), x)


def test_plain_mamba_is_causal_srmamba_is_not():
    torch.manual_seed(0)
    h = torch.randn(30, 16)
    late = h.clone()
    late[20:] += 1.0
    with torch.no_grad():
        plain = MambaMixer(16, type="Mamba")
        torch.testing.assert_close(plain(late)[:20], plain(h)[:20])
        assert not torch.allclose(plain(late)[20:], plain(h)[20:])
        for kind in ("SRMamba", "BiMamba"):
            mixer = MambaMixer(16, type=kind, rate=10)
            assert not torch.allclose(mixer(late)[:20], mixer(h)[:20])


def test_second_branch_orders():
    """With the *_b weights equal to the forward branch's: rate 1 makes SR-Mamba two
    identical scans; BiMamba on a reversed bag gives the reversed output."""
    torch.manual_seed(1)
    h = torch.randn(23, 16)
    with torch.no_grad():
        sr = MambaMixer(16, type="SRMamba", rate=1)
        for name in ("conv1d", "x_proj", "dt_proj"):
            getattr(sr, f"{name}_b").load_state_dict(getattr(sr, name).state_dict())
        sr.A_b_log.copy_(sr.A_log)
        sr.D_b.copy_(sr.D)
        xz = sr.in_proj(h)
        torch.testing.assert_close(sr(h), sr.out_proj(2 * sr._branch(xz, "")))
        bi = MambaMixer(16, type="BiMamba")
        bi.load_state_dict(sr.state_dict())
        torch.testing.assert_close(bi(h.flip(0)), bi(h).flip(0), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["SRMamba", "BiMamba", "Mamba"])
def test_forward_attention(kind):
    torch.manual_seed(0)
    m = build_model("mambamil", in_dim=24, n_classes=3, d_model=16, type=kind, rate=4)
    x = torch.randn(37, 24)
    out = m.forward_attention(x)
    assert out.logits.shape == (3,) and out.default_source == "attention"
    a = out.sources["attention"]
    assert a.shape == (37,) and torch.all(a > 0)
    torch.testing.assert_close(a.sum(), torch.tensor(1.0))
    torch.testing.assert_close(a, torch.softmax(out.sources["raw/attention"], 0))
    torch.testing.assert_close(m(x[None]), out.logits)
    one = m.forward_attention(x[:1])
    torch.testing.assert_close(one.sources["attention"], torch.ones(1))


def test_survival_head():
    torch.manual_seed(0)
    m = build_model("mambamil", in_dim=8, n_classes=4, d_model=16, survival=True)
    out = m.forward_attention(torch.randn(9, 8))
    h = torch.sigmoid(out.logits)
    torch.testing.assert_close(out.probs, h)
    torch.testing.assert_close(out.aux["survival"], torch.cumprod(1 - h, 0))


def test_load_model_mixer_type(tmp_path):
    torch.manual_seed(0)
    sd = MambaMIL(in_dim=12, n_classes=2, d_model=16).state_dict()
    path = tmp_path / "s_0_checkpoint.pt"
    torch.save(sd, path)
    m, card = load_model(path)
    assert card.arch == "mambamil" and m.hparams["type"] == "SRMamba"
    m, _ = load_model(path, hparams={"type": "BiMamba", "rate": 5})
    assert m.hparams["type"] == "BiMamba" and m.layers[0][1].type == "BiMamba"
    with pytest.raises(CheckpointError):
        load_model(path, hparams={"type": "Mamba"})  # no place for the *_b weights
    # our own format keeps the type and rate
    save_model(m, ModelCard(arch="mambamil", classes=["a", "b"]), tmp_path / "bi.safetensors")
    again, _ = load_model(tmp_path / "bi.safetensors")
    assert again.hparams["type"] == "BiMamba" and again.hparams["rate"] == 5


@pytest.mark.parametrize("L", [1, 3, 50])
def test_causal_conv1d_equals_torch_conv(L):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(L, 6)
    with torch.no_grad():
        want = conv(x.t()[None])[0, :, :L].t()
        torch.testing.assert_close(causal_conv1d(x, conv.weight, conv.bias), want)
