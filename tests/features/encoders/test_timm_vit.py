"""The timm ViT encoders (optional extra): each builds with ``pretrained=False`` from the
reference kwargs, a state dict in its official layout loads strictly through our loader, and
the output has the registry's dimension. Skipped where timm is not installed (it needs
torchvision, which the CPU wheel of this project's torch cannot import)."""

from __future__ import annotations

import gc

import pytest

timm = pytest.importorskip("timm")
torch = pytest.importorskip("torch")

from napari_milview.features.encoders import build_encoder, timm_vit  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(timm_vit.SPECS))
def test_timm_encoder_builds_loads_strictly_and_has_the_registry_dim(name, tmp_path):
    from safetensors.torch import save_file

    arch, kwargs = timm_vit._archs()[name]
    model = timm.create_model(arch, pretrained=False, **kwargs)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    probe = next(iter(state))
    expected = state[probe].clone()
    del model, state
    gc.collect()
    enc = build_encoder(name, weights=tmp_path / "w.safetensors")
    got = dict(enc.named_parameters()) | dict(enc.named_buffers())
    assert any(torch.equal(v, expected) for k, v in got.items() if k.endswith(probe))
    with torch.inference_mode():
        out = enc(torch.zeros(2, 3, 224, 224))
    assert tuple(out.shape) == (2, enc.spec.dim) and torch.isfinite(out).all()
    # the same file without one tensor is refused, naming the missing key
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "w.safetensors"))
    sd.pop(probe)
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(Exception, match="missing"):
        build_encoder(name, weights=tmp_path / "cut.safetensors")


@pytest.mark.parametrize("name", ["h0_mini", "h0_mini_cls_mean"])
def test_h0_mini_has_the_model_card_layout_and_token_outputs(name, tmp_path):
    """ViT-B/14, 4 registers, packed SwiGLU (fc1 768 -> 4096, fc2 2048 -> 768): the keys and
    shapes of bioptimus/H0-mini; the output is the class token (768) or the class token and
    the mean of the 256 patch tokens (1536), registers left out."""
    from safetensors.torch import save_file

    arch, kwargs = timm_vit._archs()[name]
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    sd = model.state_dict()
    assert tuple(sd["reg_token"].shape) == (1, 4, 768)
    assert tuple(sd["pos_embed"].shape) == (1, 256, 768)  # no_embed_class: patches only
    assert tuple(sd["blocks.0.mlp.fc1.weight"].shape) == (4096, 768)
    assert tuple(sd["blocks.0.mlp.fc2.weight"].shape) == (768, 2048)
    assert sum(k.endswith("attn.qkv.weight") for k in sd) == 12
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    enc = build_encoder(name, weights=tmp_path)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        tokens = model.forward_features(x)  # [2, 1 + 4 + 256, 768], normed
        out = enc(x)
    assert tuple(tokens.shape) == (2, 261, 768)
    want = tokens[:, 0]
    if name == "h0_mini_cls_mean":
        want = torch.cat([want, tokens[:, 5:].mean(dim=1)], dim=-1)
    torch.testing.assert_close(out, want)
