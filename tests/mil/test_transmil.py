"""TransMIL: layout, squaring, padding, cls-row attention vs the materialised matrix,
the nystrom-attention 0.0.9 slice switch, rollout."""

from __future__ import annotations

import math

import pytest
import torch

from napari_milview.mil import TransMIL, build_from_state_dict, build_model, detect_arch
from napari_milview.mil.nystrom import NystromAttention, moore_penrose_iter_pinv
from napari_milview.mil.transmil import fold_duplicates, square_side


def _table(in_dim=1024, dim=512, heads=8, n_classes=2):
    """reference/algorithms.md 3.2."""
    t = {
        "pos_layer.proj.weight": (dim, 1, 7, 7), "pos_layer.proj.bias": (dim,),
        "pos_layer.proj1.weight": (dim, 1, 5, 5), "pos_layer.proj1.bias": (dim,),
        "pos_layer.proj2.weight": (dim, 1, 3, 3), "pos_layer.proj2.bias": (dim,),
        "_fc1.0.weight": (dim, in_dim), "_fc1.0.bias": (dim,),
        "cls_token": (1, 1, dim),
    }
    for layer in (1, 2):
        t.update({
            f"layer{layer}.norm.weight": (dim,), f"layer{layer}.norm.bias": (dim,),
            f"layer{layer}.attn.to_qkv.weight": (3 * dim, dim),
            f"layer{layer}.attn.to_out.0.weight": (dim, dim),
            f"layer{layer}.attn.to_out.0.bias": (dim,),
            f"layer{layer}.attn.res_conv.weight": (heads, 1, 33, 1),
        })
    t.update({"norm.weight": (dim,), "norm.bias": (dim,), "_fc2.weight": (n_classes, dim),
              "_fc2.bias": (n_classes,)})
    return t


def _random_sd(table, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.05 for k, shape in table.items()}


@pytest.fixture(scope="module")
def official():
    """Official-size TransMIL (1024 -> 512, 8 heads, 256 landmarks), eval.

    Its cost is dominated by the 256 x 256 pseudo-inverses (independent of N), so it runs
    only where the official sizes matter."""
    torch.manual_seed(0)
    return build_model("transmil", in_dim=1024, n_classes=3)


@pytest.fixture(scope="module")
def small():
    """dim 64 (8 heads of 8, 32 landmarks), float64: N = 37 and 300 are padded too."""
    torch.manual_seed(1)
    return build_model("transmil", in_dim=48, n_classes=3, dim=64).double()


# ------------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------------
def test_keys_shapes_round_trip():
    table = _table(n_classes=4)
    m = TransMIL(in_dim=1024, n_classes=4)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == table
    sd = _random_sd(table)
    assert detect_arch(sd) == "transmil"
    hp = TransMIL.hparams_from_state_dict(sd)
    assert hp == {"in_dim": 1024, "n_classes": 4, "dim": 512, "heads": 8, "dim_head": 64}
    build_model("transmil", **hp).load_state_dict(sd, strict=True)
    assert m.num_landmarks == 256 and m.layer1.attn.pinv_iterations == 6
    assert m.layer1.attn.res_conv.kernel_size == (33, 1)


def test_lightning_prefix_and_acmil_dims():
    sd = _random_sd(_table(in_dim=384, dim=128, n_classes=2))  # ACMIL's copy, medical_ssl
    ckpt = {f"model.{k}": v for k, v in sd.items()}
    m = build_from_state_dict(ckpt, legacy_nystrom_slice=True)
    assert isinstance(m, TransMIL) and m.legacy_nystrom_slice
    assert m.hparams["dim"] == 128 and m.num_landmarks == 64 and m.hparams["dim_head"] == 16
    torch.testing.assert_close(m.cls_token, sd["cls_token"])


# ------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,side,added,pad", [(1, 1, 0, 254), (2, 2, 2, 251), (37, 7, 12, 206),
                                              (256, 16, 0, 255), (300, 18, 24, 187),
                                              (10_000, 100, 0, 239)])
def test_token_layout(official, n, side, added, pad):
    lay = official.token_layout(n)
    assert (lay["side"], lay["added"], lay["pad"]) == (side, added, pad)
    assert lay["tokens"] == 1 + side * side
    assert lay["cls_index"] == pad and lay["first_instance"] == pad + 1
    assert (lay["tokens"] + pad) % 256 == 0
    assert square_side(n) == math.ceil(math.sqrt(n))


def test_squaring_duplicates_first_instances():
    torch.manual_seed(0)
    m = build_model("transmil", in_dim=16, dim=32)
    seen = {}
    m.layer1.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    x = torch.randn(11, 16)  # S = 4: 5 instances appended again
    m(x)
    tokens = seen["x"][0]
    assert tokens.shape == (17, 32)
    torch.testing.assert_close(tokens[0], m.cls_token[0, 0])
    h = m._fc1(x)
    torch.testing.assert_close(tokens[1:12], h)
    torch.testing.assert_close(tokens[12:], h[:5])


def test_fold_duplicates_adds():
    cols = torch.arange(9.0)  # S^2 = 9 tokens for N = 7: tokens 7, 8 are instances 0, 1
    torch.testing.assert_close(fold_duplicates(cols, 7),
                               torch.tensor([0.0 + 7, 1 + 8, 2, 3, 4, 5, 6]))


def test_squares_never_fill_256_landmarks():
    assert all((s * s + 1) % 256 for s in range(1, 5000))


# ------------------------------------------------------------------------------------------
# attention: the O(n m) cls row against the fully materialised matrix
# ------------------------------------------------------------------------------------------
def _explicit_nystrom(attn: NystromAttention, x: torch.Tensor):
    """Independent full computation: (padded output [L, dim], matrix [H, L, L], pad)."""
    n, dim = x.shape[1], x.shape[2]
    m, heads = attn.num_landmarks, attn.heads
    pad = (m - n % m) % m
    xp = torch.cat([x.new_zeros(pad, dim), x[0]])
    q, k, v = (xp @ attn.to_qkv.weight.T).chunk(3, dim=-1)
    q, k, v = (t.reshape(len(xp), heads, -1).transpose(0, 1) for t in (q, k, v))  # [H, L, d]
    q = q * q.shape[-1] ** -0.5
    seg = math.ceil(n / m)
    q_l = torch.stack([q[:, j * seg:(j + 1) * seg].mean(1) for j in range(m)], dim=1)
    k_l = torch.stack([k[:, j * seg:(j + 1) * seg].mean(1) for j in range(m)], dim=1)
    a1 = torch.softmax(q @ k_l.transpose(1, 2), -1)
    a2 = torch.softmax(q_l @ k_l.transpose(1, 2), -1)
    a3 = torch.softmax(q_l @ k.transpose(1, 2), -1)
    z = a2.transpose(1, 2) / (a2.abs().sum(-1).max() * a2.abs().sum(-2).max())
    eye = torch.eye(m, dtype=x.dtype)
    for _ in range(attn.pinv_iterations):
        az = a2 @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    full = a1 @ z @ a3  # [H, L, L]
    out = full @ v + attn.res_conv(v.unsqueeze(0))[0]
    out = attn.to_out(out.transpose(0, 1).reshape(len(xp), -1))
    return out, full, pad


def _capture_attn_inputs(model):
    """Record the (normalised) input of each layer's attention; returns (dict, handles)."""
    seen = {}
    handles = [getattr(model, f"layer{layer}").attn.register_forward_pre_hook(
        lambda mod, args, layer=layer: seen.setdefault(layer, args[0])) for layer in (1, 2)]
    return seen, handles


@pytest.mark.parametrize("which,n,pad", [("small", 37, 14), ("small", 300, 27),
                                         ("official", 37, 206)])
def test_cls_row_equals_materialised_matrix(request, which, n, pad):
    model = request.getfixturevalue(which)
    dtype = next(model.parameters()).dtype
    tol = {"atol": 1e-9, "rtol": 1e-7} if dtype == torch.float64 else {"atol": 2e-6, "rtol": 2e-4}
    seen, handles = _capture_attn_inputs(model)
    x = torch.randn(n, model.in_dim, generator=torch.Generator().manual_seed(n), dtype=dtype)
    with torch.inference_mode():
        out = model.forward_attention(x)
        for handle in handles:
            handle.remove()
        lay = model.token_layout(n)
        assert lay["pad"] == pad
        s2 = lay["side"] ** 2
        fulls = {}
        for layer in (1, 2):
            attn = getattr(model, f"layer{layer}").attn
            padded_out, full, p = _explicit_nystrom(attn, seen[layer])
            assert p == pad and full.shape[-1] == lay["tokens"] + pad
            # the module's own output is the matrix applied to the values (last n rows)
            torch.testing.assert_close(attn(seen[layer])[0], padded_out[pad:], **tol)
            row = full[:, pad, pad + 1:pad + 1 + s2]  # cls row, instance columns [H, S^2]
            folded = row[:, :n].clone()
            folded[:, :s2 - n] += row[:, n:]  # duplicates added onto instances 0 ... add-1
            for hh in range(model.heads):
                torch.testing.assert_close(out.sources[f"layer{layer}/head/{hh}"], folded[hh],
                                           **tol)
            torch.testing.assert_close(out.sources[f"layer{layer}/mean"], folded.mean(0),
                                       **tol)
            fulls[layer] = full.mean(0)
        # rollout: cls row of (I + A2)/2 @ (I + A1)/2, head means
        eye = torch.eye(fulls[1].shape[0], dtype=dtype)
        roll = (0.5 * fulls[2] + 0.5 * eye) @ (0.5 * fulls[1] + 0.5 * eye)
        row = roll[pad, pad + 1:pad + 1 + s2]
        torch.testing.assert_close(out.sources["rollout"], fold_duplicates(row, n), **tol)
    assert out.default_source == "layer2/mean"
    # Nystrom rows are only approximately normalised (about 1)
    assert fulls[2][pad].sum().item() == pytest.approx(1.0, abs=0.1)


def test_head_mean_and_shapes(small):
    x = torch.randn(1, 50, 48, dtype=torch.float64)
    with torch.inference_mode():
        out = small.forward_attention(x)
    assert set(out.sources) == {f"layer{layer}/head/{h}" for layer in (1, 2)
                                for h in range(8)} | {"layer1/mean", "layer2/mean", "rollout"}
    for layer in (1, 2):
        heads = torch.stack([out.sources[f"layer{layer}/head/{h}"] for h in range(8)])
        torch.testing.assert_close(out.sources[f"layer{layer}/mean"], heads.mean(0))
    assert all(s.shape == (50,) for s in out.sources.values())
    small.with_rollout = False
    try:
        assert "rollout" not in small.forward_attention(x[0]).sources
    finally:
        small.with_rollout = True


def test_single_instance(small):
    with torch.inference_mode():
        out = small.forward_attention(torch.randn(1, 48, dtype=torch.float64))
        batched = small(torch.randn(1, 1, 48, dtype=torch.float64))
    assert out.logits.shape == (3,) and batched.shape == (3,)
    assert all(s.shape == (1,) for s in out.sources.values())


# ------------------------------------------------------------------------------------------
# nystrom-attention 0.0.9 vs >= 0.0.10
# ------------------------------------------------------------------------------------------
def test_nystrom_slice_rows():
    torch.manual_seed(0)
    attn = NystromAttention(dim=16, heads=2, dim_head=8, num_landmarks=8).double().eval()
    x = torch.randn(1, 13, 16, dtype=torch.float64)  # pad = 3
    padded, _, pad = _explicit_nystrom(attn, x)
    assert pad == 3
    torch.testing.assert_close(attn(x)[0], padded[-13:])
    attn.legacy_slice = True
    torch.testing.assert_close(attn(x)[0], padded[:13])  # keeps the pad rows


def test_legacy_switch_changes_output_when_padding(small):
    assert small.token_layout(37)["pad"] > 0
    x = torch.randn(37, 48, dtype=torch.float64)
    with torch.inference_mode():
        modern = small.forward_attention(x)
        small.legacy_nystrom_slice = True
        try:
            legacy = small.forward_attention(x)
        finally:
            small.legacy_nystrom_slice = False
    assert not torch.allclose(modern.logits, legacy.logits)
    assert not torch.allclose(modern.sources["layer2/mean"], legacy.sources["layer2/mean"])
    # layer 1 sees the same input either way: its cls row does not depend on the slice
    torch.testing.assert_close(modern.sources["layer1/mean"], legacy.sources["layer1/mean"])


def test_legacy_switch_is_identity_without_padding():
    """(S^2 + 1) % m == 0 needs m not divisible by 4: m = 10, N in 5..9 (S = 3)."""
    torch.manual_seed(0)
    modern = build_model("transmil", in_dim=16, dim=32, num_landmarks=10).double()
    legacy = build_model("transmil", in_dim=16, dim=32, num_landmarks=10,
                         legacy_nystrom_slice=True).double()
    legacy.load_state_dict(modern.state_dict())
    x9 = torch.randn(9, 16, dtype=torch.float64)
    assert modern.token_layout(9)["pad"] == 0
    with torch.inference_mode():
        torch.testing.assert_close(modern(x9), legacy(x9))
        x10 = torch.randn(10, 16, dtype=torch.float64)  # S = 4: 17 tokens, pad 3
        assert modern.token_layout(10)["pad"] == 3
        assert not torch.allclose(modern(x10), legacy(x10))


def test_pinv_converges_to_inverse():
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(2, 6, 6, dtype=torch.float64), dim=-1) + torch.eye(6)
    z = moore_penrose_iter_pinv(a, iters=40)
    torch.testing.assert_close(z, torch.linalg.inv(a))


def test_cls_token_follows_module_dtype_and_device():
    m = build_model("transmil", in_dim=8, dim=16).to(torch.float64)
    assert m.cls_token.dtype == torch.float64
    assert m(torch.randn(5, 8)).dtype == torch.float64


def test_nystrom_setting_names_and_older_spelling():
    from napari_milview.mil.transmil import nystrom_variant

    assert [nystrom_variant(v) for v in ("0.0.9", " Legacy", "current", "0.0.10", "0.0.12")] \
        == ["0.0.9", "0.0.9", "current", "current", "current"]
    for bad in ("0.0.8", "0.1.0", "new", ""):
        with pytest.raises(ValueError, match="unknown nystrom variant"):
            nystrom_variant(bad)
    m = TransMIL(in_dim=8, n_classes=2, dim=32, legacy_nystrom_slice=True)
    assert m.nystrom == m.hparams["nystrom"] == "0.0.9" and "legacy_nystrom_slice" not in m.hparams
    assert TransMIL(in_dim=8, n_classes=2, dim=32).nystrom == "current"
    with pytest.raises(ValueError, match="contradicts"):
        TransMIL(in_dim=8, n_classes=2, dim=32, nystrom="current", legacy_nystrom_slice=True)
    m.nystrom = "current"
    assert not m.layer1.attn.legacy_slice and not m.layer2.attn.legacy_slice
    assert m.hparams["nystrom"] == "current"
