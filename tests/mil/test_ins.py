"""INS (napari_milview.mil.ins): the instance classifier and its bag pooling, the authors'
four encoder layouts, and the training-only parts of an INS checkpoint dropped on loading.
Parity with the authors' code: tests/data/parity/ins_linear (tests/mil/test_parity.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_milview.mil import INS, build_model, detect_arch
from napari_milview.mil.base import build_from_state_dict
from napari_milview.mil.checkpoint import load_model

ENCODERS = ("resnet18", "resnet18_tv", "linear", "mlp")


def _model(encoder: str, in_dim: int = 64, n_classes: int = 2, **kw) -> INS:
    torch.manual_seed(0)
    m = build_model("ins", in_dim=in_dim, n_classes=n_classes, encoder=encoder, **kw)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.mark.parametrize("encoder", ENCODERS)
def test_bag_probabilities_are_the_mean_of_the_instance_probabilities(encoder):
    m = _model(encoder)
    x = torch.randn(13, 64)
    with torch.inference_mode():
        out = m.forward_attention(x)
        p = m.instance_probabilities(x)
    assert tuple(p.shape) == (13, 2)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(13))
    assert set(out.sources) == {"instance/0", "instance/1"}
    assert out.default_source == "instance/1"
    torch.testing.assert_close(out.source("instance/1"), p[:, 1])
    torch.testing.assert_close(out.probs, p.mean(dim=0))
    torch.testing.assert_close(torch.softmax(out.logits, dim=0), out.probs)
    # each instance is scored on its own: a bag of one gives that instance's probabilities
    with torch.inference_mode():
        one = m.forward_attention(x[4:5])
    torch.testing.assert_close(one.probs, p[4], atol=1e-5, rtol=0)


def test_resnet_encoders_see_each_feature_as_a_32_row_image():
    """The authors' input: x.view(N, 32, D / 32) repeated over 3 channels."""
    m = _model("resnet18")
    x = torch.randn(5, 64)
    img = torch.repeat_interleave(x.view(5, 32, -1).unsqueeze(1), repeats=3, dim=1)
    with torch.inference_mode():
        want = torch.softmax(m.encoder_q.fc(m.encoder_q.encoder(img)), dim=1)
        got = m.instance_probabilities(x)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="multiple of 32"):
        INS(in_dim=100, encoder="resnet18")


def test_max_pooling_scores_the_most_positive_instance():
    m = _model("linear", pooling="max")
    x = torch.randn(9, 64)
    with torch.inference_mode():
        out = m.forward_attention(x)
    top = out.source("instance/1").max()
    torch.testing.assert_close(out.probs, torch.stack([1 - top, top]))
    with pytest.raises(ValueError, match="binary"):
        INS(in_dim=64, n_classes=3, encoder="linear", pooling="max")
    with pytest.raises(ValueError, match="encoder must be one of"):
        INS(encoder="vit")


def test_multiclass_default_source_follows_the_prediction():
    m = _model("mlp", n_classes=3)
    with torch.inference_mode():
        out = m.forward_attention(torch.randn(8, 64))
    assert set(out.sources) == {"instance/0", "instance/1", "instance/2"}
    assert out.default_source == f"instance/{int(out.probs.argmax())}"


def test_state_dict_layouts_use_the_authors_names():
    sd = _model("resnet18").state_dict()
    assert tuple(sd["encoder_q.encoder.conv1.weight"].shape) == (64, 3, 3, 3)
    assert "encoder_q.encoder.layer2.0.shortcut.0.weight" in sd
    assert "encoder_q.encoder.layer1.0.shortcut.0.weight" not in sd  # identity shortcut
    tv = _model("resnet18_tv").state_dict()
    assert tuple(tv["encoder_q.encoder.conv1.weight"].shape) == (64, 3, 7, 7)
    assert "encoder_q.encoder.layer4.0.downsample.1.running_var" in tv
    # torchvision's resnet18 keys (fc replaced by an identity), under encoder_q.encoder.
    assert sum(k.startswith("encoder_q.encoder.") for k in tv) == 120
    assert set(_model("linear").state_dict()) == {"encoder_q.encoder.weight",
                                                  "encoder_q.encoder.bias",
                                                  "encoder_q.fc.weight", "encoder_q.fc.bias"}
    assert "encoder_q.encoder.2.weight" in _model("mlp").state_dict()


@pytest.mark.parametrize("encoder", ENCODERS)
def test_round_trip_through_the_state_dict(encoder):
    m = _model(encoder, in_dim=96 if encoder.startswith("resnet") else 48)
    sd = m.state_dict()
    assert detect_arch(sd) == "ins"
    hp = INS.hparams_from_state_dict(sd)
    assert hp["encoder"] == encoder and hp["n_classes"] == 2
    over = {"in_dim": 96} if encoder.startswith("resnet") else {}  # no trace in a ResNet
    back = build_from_state_dict(sd, **over)
    x = torch.randn(6, back.in_dim)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), m(x))


def _training_dict(m: INS, queue: int = 16, low_dim: int = 8) -> dict[str, torch.Tensor]:
    """An INS module's state_dict as the authors' DDP training holds it."""
    sd = {f"encoder_q.{k}": v for k, v in m.encoder_q.state_dict().items()}
    sd |= {k.replace("encoder_q.", "encoder_k.", 1): v.clone() for k, v in sd.items()}
    for enc in ("encoder_q", "encoder_k"):
        sd[f"{enc}.head.0.weight"] = torch.randn(512, 512)
        sd[f"{enc}.head.2.weight"] = torch.randn(low_dim, 512)
        sd[f"{enc}.prototypes"] = torch.zeros(2, low_dim)
    sd |= {"queue": torch.randn(queue, low_dim), "queue_pseudo": torch.randn(queue, 2),
           "queue_partial": torch.randn(queue, 2), "queue_ptr": torch.zeros(1, dtype=torch.long),
           "prototypes": torch.zeros(2, low_dim), "bag_classifier.weight": torch.randn(2, 512),
           "model_teacherHead.top_layer.weight": torch.randn(2, 1024),
           "mlp.weight": torch.randn(512, 512)}
    return {f"module.{k}": v for k, v in sd.items()}


def test_an_ins_training_checkpoint_loads_without_its_training_parts(tmp_path):
    m = _model("mlp")
    f = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": _training_dict(m),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]}},
               f)
    model, card = load_model(f)
    assert card.arch == "ins" and model.hparams["encoder"] == "mlp"
    assert "dropped" in card.notes and "encoder_k" in card.notes and "queue" in card.notes
    x = torch.randn(11, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model.forward_attention(x).probs, m.forward_attention(x).probs)


def test_a_resnet_checkpoint_needs_its_feature_dim_and_checks_it(tmp_path):
    m = _model("resnet18_tv", in_dim=64)
    f = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": _training_dict(m)}, f)
    model, _ = load_model(f, hparams={"in_dim": 64})
    assert model.hparams["encoder"] == "resnet18_tv"
    with pytest.raises(ValueError, match="dimension 64, got 512"):
        model(torch.randn(3, 512))


def test_inconsistent_shapes_are_refused():
    sd = _model("linear").state_dict()
    sd["encoder_q.fc.weight"] = torch.randn(2, 256)
    with pytest.raises(ValueError, match="encoder output 512, classifier input 256"):
        INS.hparams_from_state_dict(sd)
    tv = _model("resnet18_tv").state_dict()
    tv["encoder_q.encoder.conv1.weight"] = torch.randn(64, 3, 3, 3)
    with pytest.raises(ValueError, match="conv1 kernel 3 with downsample"):
        INS.hparams_from_state_dict(tv)
