"""Encoder registry and builders (``features/encoders``): real torch, weights written in-test."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_milview.features.encoders import (
    EncoderError,
    EncoderSpec,
    available_encoders,
    build_encoder,
    encoder_spec,
    normalise_batch,
    preprocess,
)
from napari_milview.features.encoders.resnet import ResNet50Trunc

HAS_TIMM = importlib.util.find_spec("timm") is not None
#: torch >= 2.10 deprecates torch.jit.script / save (the test writes TorchScript files)
JIT_OK = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*deprecated:DeprecationWarning")
VITS = ("uni_v1", "uni2_h", "virchow2", "virchow2_cls", "hoptimus0", "hoptimus1", "h0_mini",
        "h0_mini_cls_mean")


# ------------------------------------------------------------------------------ registry
def test_registry_lists_every_family():
    names = available_encoders()
    for n in ("demo", "resnet50_trunc", "torchscript", *VITS):
        assert n in names
    assert names == sorted(names)


@pytest.mark.parametrize(("name", "dim", "mean"), [
    ("resnet50_trunc", 1024, (0.485, 0.456, 0.406)),
    ("uni_v1", 1024, (0.485, 0.456, 0.406)),
    ("uni2_h", 1536, (0.485, 0.456, 0.406)),
    ("virchow2", 2560, (0.485, 0.456, 0.406)),
    ("virchow2_cls", 1280, (0.485, 0.456, 0.406)),
    ("hoptimus0", 1536, (0.707223, 0.578729, 0.703617)),
    ("hoptimus1", 1536, (0.707223, 0.578729, 0.703617)),
    ("h0_mini", 768, (0.707223, 0.578729, 0.703617)),
    ("h0_mini_cls_mean", 1536, (0.707223, 0.578729, 0.703617)),
    ("demo", 64, (0.5, 0.5, 0.5)),
])
def test_spec_metadata(name, dim, mean):
    s = encoder_spec(name)
    assert isinstance(s, EncoderSpec)
    assert (s.name, s.dim, s.mean) == (name, dim, mean)
    assert len(s.std) == 3 and all(v > 0 for v in s.std)
    if name != "demo":
        assert s.input_size == 224 and s.mpp == 0.5
    assert s.patch_um() == pytest.approx(s.patch_px * s.mpp)


def test_virchow2_spec_documents_its_post_processing():
    s = encoder_spec("virchow2")
    assert "mean" in s.output and s.interpolation == "bicubic"
    assert encoder_spec("hoptimus0").std == (0.211883, 0.230117, 0.177517)


def test_aliases_and_unknown_names():
    assert encoder_spec("UNI").name == "uni_v1"
    assert encoder_spec("H-optimus-1").name == "hoptimus1"
    assert encoder_spec("H0-mini").name == "h0_mini"
    assert encoder_spec("h0mini").name == "h0_mini"
    with pytest.raises(EncoderError, match="unknown encoder 'nope'.*resnet50_trunc"):
        encoder_spec("nope")
    with pytest.raises(EncoderError, match="unknown encoder"):
        build_encoder("nope")
    with pytest.raises(EncoderError, match="pass weights"):
        encoder_spec("torchscript")


# ---------------------------------------------------------------------------- preprocess
def test_preprocess_normalises_and_resizes():
    spec = encoder_spec("resnet50_trunc")
    batch = np.zeros((2, 256, 256, 3), np.uint8)
    batch[1] = 255
    x = preprocess(batch, spec)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    m = torch.tensor(spec.mean).view(3, 1, 1)
    s = torch.tensor(spec.std).view(3, 1, 1)
    torch.testing.assert_close(x[0], (-m / s).expand(3, 224, 224))
    torch.testing.assert_close(x[1], ((1 - m) / s).expand(3, 224, 224))
    # no resize when the size already fits; channel order is RGB
    rgb = np.zeros((1, 64, 64, 3), np.uint8)
    rgb[..., 0] = 255
    y = preprocess(rgb, encoder_spec("demo"))
    assert y.shape == (1, 3, 64, 64)
    assert y[0, 0].min() > 1.9 and y[0, 1].max() < -1.9
    with pytest.raises(ValueError, match="uint8"):
        preprocess(batch.astype(np.float32), spec)


@pytest.mark.parametrize("name, size", [("demo", 64), ("resnet50_trunc", 256)])
def test_preprocess_is_the_reference_recipe_in_channels_last(name, size):
    """``(x / 255 - mean) / std`` after an antialiased resize, as torchvision's transforms
    compute it, in NCHW shape with NHWC (channels_last) memory; ``normalise_batch`` on a
    uint8 tensor (what the pipeline runs on the device) gives the same."""
    import torch.nn.functional as F

    spec = encoder_spec(name)
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (3, size, size, 3), np.uint8)
    ref = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    s = spec.input_size
    if size != s:
        ref = F.interpolate(ref, size=(s, s), mode=spec.interpolation, antialias=True,
                            align_corners=False).clamp(0, 1)
    ref = (ref - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(
        1, 3, 1, 1)
    x = preprocess(batch, spec)
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(normalise_batch(torch.from_numpy(batch), spec), x)


# ------------------------------------------------------------------------ resnet50_trunc
def _torchvision_layout(net: ResNet50Trunc) -> dict[str, torch.Tensor]:
    """Our trunk's state dict plus the layer4 / fc keys a full torchvision ResNet-50 has."""
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        sd[f"layer4.{i}.conv1.weight"] = torch.randn(512, 2048 if i else 1024, 1, 1,
                                                     generator=g)
        sd[f"layer4.{i}.bn1.running_mean"] = torch.zeros(512)
    sd["layer4.0.downsample.0.weight"] = torch.randn(2048, 1024, 1, 1, generator=g)
    sd["fc.weight"] = torch.randn(1000, 2048, generator=g)
    sd["fc.bias"] = torch.zeros(1000)
    return sd


@pytest.fixture(scope="module")
def trunk():
    torch.manual_seed(1)
    net = ResNet50Trunc()
    # non-trivial BN statistics, so a wrong mapping would change the output
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_resnet_key_names_are_torchvisions(trunk):
    keys = trunk.state_dict().keys()
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.weight", "layer2.3.conv3.weight", "layer3.5.bn3.bias",
              "layer3.0.conv2.weight"):
        assert k in keys
    assert not any(k.startswith(("layer4", "fc")) for k in keys)
    assert trunk.state_dict()["layer3.0.conv2.weight"].shape == (256, 256, 3, 3)
    assert trunk.layer3[0].conv2.stride == (2, 2)  # v1.5: stride in the 3x3 conv


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet50_trunc_loads_torchvision_state_dict(tmp_path, trunk, suffix):
    sd = _torchvision_layout(trunk)
    path = tmp_path / f"resnet50{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    enc = build_encoder("resnet50_trunc", weights=path)
    assert not enc.training and enc.spec.dim == 1024
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = enc(x)
        ref = trunk(x)
    assert out.shape == (2, 1024) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_resnet50_trunc_old_file_without_num_batches_tracked(tmp_path, trunk):
    sd = {k: v for k, v in _torchvision_layout(trunk).items()
          if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    enc = build_encoder("resnet50_trunc", weights=tmp_path / "old.pth")
    assert enc(torch.zeros(1, 3, 64, 64)).shape == (1, 1024)


def test_resnet50_trunc_wrong_keys_are_named(tmp_path, trunk):
    sd = _torchvision_layout(trunk)
    del sd["layer2.1.conv2.weight"]
    sd["layer3.6.conv1.weight"] = torch.zeros(256, 1024, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(EncoderError) as ei:
        build_encoder("resnet50_trunc", weights=tmp_path / "bad.pth")
    msg = str(ei.value)
    assert "bad.pth" in msg
    assert "1 missing: layer2.1.conv2.weight" in msg
    assert "1 unexpected: layer3.6.conv1.weight" in msg
    assert "layer4" not in msg and "fc." not in msg


def test_resnet50_trunc_needs_a_local_file(tmp_path):
    with pytest.raises(EncoderError, match="nothing is downloaded"):
        build_encoder("resnet50_trunc")
    with pytest.raises(EncoderError, match="not found: .*missing.pth"):
        build_encoder("resnet50_trunc", weights=tmp_path / "missing.pth")


def test_resnet50_trunc_refuses_pickled_code(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"conv1.weight": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(EncoderError, match="refused.*no unsafe fallback"):
        build_encoder("resnet50_trunc", weights=tmp_path / "evil.pth")


# ---------------------------------------------------------------------------- torchscript
class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, 12)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@JIT_OK
def test_torchscript_round_trip_probes_dim(tmp_path):
    torch.manual_seed(0)
    tiny = _Tiny().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(tiny), str(path))
    enc = build_encoder("torchscript", weights=path, input_size=32, mpp=0.5)
    assert enc.spec.dim == 12 and enc.spec.input_size == 32 and enc.spec.patch_px == 32
    assert enc.spec.family == "torchscript" and enc.spec.mean == (0.485, 0.456, 0.406)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), tiny(x))
    # a path given as the name is a TorchScript file too
    assert build_encoder(str(path), input_size=32).spec.dim == 12


@JIT_OK
def test_torchscript_spec_from_sidecar(tmp_path):
    path = tmp_path / "enc.pt"
    torch.jit.save(torch.jit.script(_Tiny().eval()), str(path))
    (tmp_path / "enc.pt.json").write_text(json.dumps(
        {"name": "mine", "dim": 12, "input_size": 48, "mean": [0.5, 0.5, 0.5],
         "std": [0.2, 0.2, 0.2], "mpp": 1.0, "patch_px": 96}))
    spec = encoder_spec("torchscript", weights=path)
    assert (spec.name, spec.dim, spec.input_size, spec.patch_px, spec.mpp) == (
        "mine", 12, 48, 96, 1.0)
    assert spec.mean == (0.5, 0.5, 0.5)
    patches = np.full((2, 96, 96, 3), 128, np.uint8)
    enc = build_encoder("torchscript", weights=path)
    with torch.inference_mode():
        assert enc(preprocess(patches, enc.spec)).shape == (2, 12)
    # a wrong dim in the sidecar is caught at the first forward
    (tmp_path / "enc.pt.json").write_text(json.dumps({"dim": 7, "input_size": 48}))
    enc = build_encoder("torchscript", weights=path)
    with pytest.raises(EncoderError, match="12 features but the spec says dim=7"):
        enc(torch.zeros(1, 3, 48, 48))


@JIT_OK
def test_torchscript_errors_name_the_file(tmp_path):
    path = tmp_path / "enc.pt"
    torch.jit.save(torch.jit.script(_Tiny().eval()), str(path))
    with pytest.raises(EncoderError, match="enc.pt: input_size unknown"):
        build_encoder("torchscript", weights=path)
    (tmp_path / "enc.pt.json").write_text(json.dumps({"input_size": 32, "colour": "red"}))
    with pytest.raises(EncoderError, match="enc.pt.json: unknown field"):
        build_encoder("torchscript", weights=path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torchscript archive")
    with pytest.raises(EncoderError, match="junk.pt: not a loadable TorchScript"):
        build_encoder("torchscript", weights=junk, input_size=32)
    with pytest.raises(EncoderError, match="file not found"):
        build_encoder("torchscript", weights=tmp_path / "nope.pt", input_size=32)


@JIT_OK
def test_torchscript_refuses_non_feature_output(tmp_path):
    class Map(torch.nn.Module):
        def forward(self, x):
            return x[:, :2]

    path = tmp_path / "map.pt"
    torch.jit.save(torch.jit.script(Map()), str(path))
    with pytest.raises(EncoderError, match=r"shape \[1, 2, 16, 16\], expected \[B, D\]"):
        build_encoder("torchscript", weights=path, input_size=16)


def test_only_torchscript_takes_spec_options():
    with pytest.raises(EncoderError, match="unexpected options"):
        build_encoder("demo", input_size=32)


# ----------------------------------------------------------------------------- timm ViTs
@pytest.mark.parametrize("name", VITS)
def test_vit_needs_local_weights(tmp_path, name):
    with pytest.raises(EncoderError, match="needs local weights.*nothing is downloaded"):
        build_encoder(name)
    with pytest.raises(EncoderError, match=f"{name}: weights not found: .*absent.safetensors"):
        build_encoder(name, weights=tmp_path / "absent.safetensors")
    empty = tmp_path / "snapshot"
    empty.mkdir(exist_ok=True)
    with pytest.raises(EncoderError, match="no weights in folder .*pytorch_model.bin"):
        build_encoder(name, weights=empty)


def test_h0_mini_specs_and_where_its_weights_come_from():
    cls, both = encoder_spec("h0_mini"), encoder_spec("h0_mini_cls_mean")
    assert (cls.input_size, cls.patch_px, cls.mpp) == (224, 224, 0.5)
    assert cls.std == both.std == (0.211883, 0.230117, 0.177517)
    assert both.dim == 2 * cls.dim and "mean" in both.output and "mean" not in cls.output
    for name in ("h0_mini", "h0_mini_cls_mean"):
        with pytest.raises(EncoderError, match=r"bioptimus/H0-mini.*model\.safetensors"):
            build_encoder(name)


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed")
def test_vit_without_timm_says_what_to_install(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(f))
    with pytest.raises(EncoderError, match=r"pip install napari-milview\[timm\]"):
        build_encoder("uni_v1", weights=tmp_path)  # a snapshot folder


def test_find_weights_in_hf_cache_layout(tmp_path):
    from napari_milview.features.encoders.timm_vit import find_weights

    snap = tmp_path / "models--org--name" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "pytorch_model.bin").write_bytes(b"x")
    assert find_weights(tmp_path / "models--org--name", "uni_v1") == snap / "pytorch_model.bin"
    (snap / "model.safetensors").write_bytes(b"x")
    assert find_weights(snap, "uni_v1") == snap / "model.safetensors"


# ---------------------------------------------------------------------------------- demo
def test_demo_encoder_ships_and_is_deterministic():
    from napari_milview.assets import demo_encoder_path

    assert demo_encoder_path().is_file() and demo_encoder_path().stat().st_size < 400_000
    enc = build_encoder("demo")
    assert not enc.training and enc.spec == encoder_spec("demo")
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8)
    with torch.inference_mode():
        a = enc(preprocess(patches, enc.spec))
        b = build_encoder("demo")(preprocess(patches, enc.spec))
        single = enc(preprocess(patches[2:3], enc.spec))
    assert a.shape == (4, 64) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[2:3], single, rtol=1e-5, atol=1e-5)  # no batch statistics
    assert float(a.std(dim=0).mean()) > 0  # different patches, different features


def test_demo_sidecar_is_checked(tmp_path):
    from napari_milview.features.encoders.demo import DemoEncoder, save

    path = save(DemoEncoder(), tmp_path / "enc.safetensors", training={"epochs": 0})
    assert build_encoder("demo", weights=path).spec.dim == 64
    side = tmp_path / "enc.json"
    data = json.loads(side.read_text())
    data["spec"]["mpp"] = 0.25
    side.write_text(json.dumps(data))
    with pytest.raises(EncoderError, match=r"enc.json: spec mpp=0.25, expected 1.0"):
        build_encoder("demo", weights=path)
    side.unlink()
    with pytest.raises(EncoderError, match="sidecar .*enc.json missing"):
        build_encoder("demo", weights=path)
