"""Checkpoint reading, key normalisation, safe loading and saving (``mil/checkpoint.py``).

Every foreign layout is written here, from a freshly built model's state_dict, in the
shape the original training code writes it; it is then loaded with ``strict=True`` and
the outputs are compared with the original model on the same random features.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
import types

import pytest
import torch

from napari_milview.mil import build_model
from napari_milview.mil.checkpoint import (
    CheckpointError,
    load_model,
    normalise_keys,
    read_state_dict,
    save_model,
    unsafe_globals,
)

from ..hostile import RunsShell, WritesMarker

IN_DIM = 32

#: small but complete configurations of every architecture
ARCHS = {
    "abmil": dict(in_dim=IN_DIM, n_classes=3, inner_dim=16, attn_dim=8),
    "clam_sb": dict(in_dim=IN_DIM, n_classes=2),
    "clam_mb": dict(in_dim=IN_DIM, n_classes=3),
    "acmil_ga": dict(in_dim=IN_DIM, n_classes=2, inner_dim=16, n_token=3, attn_dim=8),
    "acmil_mha": dict(in_dim=IN_DIM, n_classes=2, inner_dim=16, n_token=3),
    "mha": dict(in_dim=IN_DIM, n_classes=2, inner_dim=16),
    "transmil": dict(in_dim=IN_DIM, n_classes=2, dim=64),
    "mambamil": dict(in_dim=IN_DIM, n_classes=2, d_model=16),
}


def _model(arch: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    return build_model(arch, **{**ARCHS.get(arch, {}), **over})


def _features(n: int = 37, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN_DIM, generator=g)


def _assert_same(ref, loaded) -> None:
    """Same logits and the same attention sources on the same bag."""
    assert not loaded.training
    x = _features()
    with torch.no_grad():
        a, b = ref.forward_attention(x), loaded.forward_attention(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    assert a.sources.keys() == b.sources.keys()
    for k in a.sources:
        torch.testing.assert_close(a.sources[k], b.sources[k], rtol=0, atol=1e-6)


def _clone_sd(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------
# safetensors round trip
# ----------------------------------------------------------------------------------------


def test_saved_without_class_names_loads_with_default_names(tmp_path):
    """A card without names ([]) is saved and read back as class_0 .. class_{C-1}, not
    refused as a list of the wrong length."""
    from napari_milview.mil import ModelCard

    model = _model("abmil")
    path = save_model(model, ModelCard(arch="abmil", feature_dim=IN_DIM),
                      tmp_path / "w.safetensors")
    loaded, card = load_model(path)
    assert card.classes == [f"class_{i}" for i in range(model.n_classes)]
    _assert_same(model, loaded)


def test_safetensors_round_trip_with_card(tmp_path):
    from napari_milview.mil import ModelCard

    model = _model("acmil_ga")
    card = ModelCard(arch="acmil_ga", classes=["normal", "tumour"], feature_dim=IN_DIM,
                     encoder="resnet50_trunc", patch_size_um=128.0, notes="unit test")
    path = save_model(model, card, tmp_path / "w.safetensors")
    assert path.is_file() and (tmp_path / "w.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left

    sd, meta = read_state_dict(path)
    assert meta["format"] == "safetensors" and meta["card"]["classes"] == ["normal", "tumour"]
    assert set(sd) == set(model.state_dict())

    (tmp_path / "w.json").unlink()  # the embedded metadata alone is enough
    loaded, card2 = load_model(path)
    _assert_same(model, loaded)
    assert card2.arch == "acmil_ga"
    assert card2.classes == ["normal", "tumour"]
    assert card2.hparams == model.hparams  # incl. n_masked_patch / mask_drop
    assert (card2.feature_dim, card2.encoder, card2.patch_size_um) == (IN_DIM,
                                                                      "resnet50_trunc", 128.0)
    assert card2.notes.startswith("unit test")


def test_save_refuses_an_inconsistent_card(tmp_path):
    from napari_milview.mil import ModelCard

    model = _model("abmil")
    with pytest.raises(CheckpointError, match="class names"):
        save_model(model, ModelCard(arch="abmil", classes=["a", "b"]), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_sidecar_next_to_foreign_weights(tmp_path):
    model = _model("clam_sb")
    torch.save(_clone_sd(model), tmp_path / "s_0_checkpoint.pt")
    side = {"classes": ["benign", "malignant"], "feature_dim": IN_DIM,
            "patch_size_um": 256.0, "encoder": "uni"}
    (tmp_path / "s_0_checkpoint.json").write_text(json.dumps(side))
    loaded, card = load_model(tmp_path / "s_0_checkpoint.pt")
    _assert_same(model, loaded)
    assert card.classes == ["benign", "malignant"] and card.encoder == "uni"
    assert card.patch_size_um == 256.0

    (tmp_path / "s_0_checkpoint.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    with pytest.raises(CheckpointError, match="3 class name"):
        load_model(tmp_path / "s_0_checkpoint.pt")
    with pytest.raises(CheckpointError, match="feature_dim=64"):
        load_model(tmp_path / "s_0_checkpoint.pt", sidecar={"feature_dim": 64})


# ----------------------------------------------------------------------------------------
# ACMIL container with a utils.utils.Struct config
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _fake_module(dotted: str, **classes: type):
    """Make ``dotted`` (and its parents) importable, holding ``classes``, only inside the
    block; the classes get ``__module__ = dotted`` so pickle writes that global."""
    parts = dotted.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    saved = {n: sys.modules.get(n) for n in names}
    mods = [types.ModuleType(n) for n in names]
    for parent, child, short in zip(mods, mods[1:], parts[1:]):
        setattr(parent, short, child)
    for cname, cls in classes.items():
        cls.__module__, cls.__qualname__, cls.__name__ = dotted, cname, cname
        setattr(mods[-1], cname, cls)
    sys.modules.update(zip(names, mods))
    try:
        yield mods[-1]
    finally:
        for n, v in saved.items():
            if v is None:
                sys.modules.pop(n, None)
            else:  # pragma: no cover
                sys.modules[n] = v


@contextlib.contextmanager
def _fake_acmil_utils():
    """ACMIL's ``utils.utils.Struct``, importable only inside the block."""

    class Struct:
        def __init__(self, **entries):
            self.__dict__.update(entries)

    with _fake_module("utils.utils", Struct=Struct):
        yield Struct


def _acmil_config(**over):
    conf = dict(D_feat=IN_DIM, D_inner=16, n_class=2, n_token=3, n_masked_patch=7,
                mask_drop=0.3, pretrain="medical_ssl", dataset="camelyon16", arch="ga",
                lr=1e-4)
    conf.update(over)
    return conf


def _save_acmil(path, model, **conf_over):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    model(_features()).sum().backward()
    opt.step()
    model.eval()
    with _fake_acmil_utils() as Struct:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 37,
                    "config": Struct(**_acmil_config(**conf_over))}, path)
    assert "utils.utils" not in sys.modules


def test_acmil_container_loads_without_importing_acmil(tmp_path):
    model = _model("acmil_ga")
    path = tmp_path / "checkpoint-best.pth"
    _save_acmil(path, model)
    assert unsafe_globals(path) == []  # Struct and everything else are allowlisted

    sd, meta = read_state_dict(path)
    assert meta["format"] == "acmil" and meta["epoch"] == 37
    assert meta["config"]["D_inner"] == 16 and "optimizer" in meta["ignored_keys"]
    assert "utils.utils" not in sys.modules and "utils" not in sys.modules

    loaded, card = load_model(path)
    _assert_same(model, loaded)
    assert card.arch == "acmil_ga"  # from config 'arch': 'ga'
    # training-only fields of the config are kept
    assert card.hparams["n_masked_patch"] == 7 and card.hparams["mask_drop"] == 0.3
    assert card.encoder == "medical_ssl"
    assert "cross-checked" in card.notes and "epoch 37" in card.notes


@pytest.mark.parametrize(("field", "value"), [("D_inner", 24), ("n_token", 5), ("D_feat", 64),
                                              ("n_class", 4)])
def test_acmil_config_contradicting_the_shapes(tmp_path, field, value):
    model = _model("acmil_ga")
    path = tmp_path / "bad.pth"
    _save_acmil(path, model, **{field: value})
    with pytest.raises(CheckpointError, match=rf"{field}={value}.*weights give") as err:
        load_model(path)
    assert "bad.pth" in str(err.value)


def test_acmil_mha_container(tmp_path):
    model = _model("acmil_mha")
    path = tmp_path / "mha.pth"
    _save_acmil(path, model, arch="mha")
    loaded, card = load_model(path)
    _assert_same(model, loaded)
    assert card.arch == "acmil_mha" and card.hparams["n_masked_patch"] == 7


def test_config_arch_mha_may_be_the_single_query_mha(tmp_path):
    """``--arch mha`` of Step3_WSI_classification.py / AEM's main.py is ``MHA``, not
    ACMIL-MHA: the layout decides, without a contradiction note."""
    model = _model("mha")
    path = tmp_path / "mha.pth"
    _save_acmil(path, model, arch="mha", n_token=1)
    loaded, card = load_model(path)
    _assert_same(model, loaded)
    assert card.arch == "mha" and "from the stored config" in card.notes
    assert "do not have that layout" not in card.notes
    _save_acmil(path, _model("abmil"), arch="mha", n_class=3, n_token=1)
    _, card = load_model(path)
    assert card.arch == "abmil"
    assert "stored config names 'acmil_mha' or 'mha' but the weights do not" in card.notes


# ----------------------------------------------------------------------------------------
# CLAM layouts
# ----------------------------------------------------------------------------------------


def _clam_multi_gpu(sd):
    """Old multi-GPU CLAM: ``attention_net.module.*`` plus ``instance_loss_fn.labels``."""
    out = {k.replace("attention_net.", "attention_net.module.", 1): v for k, v in sd.items()}
    out["instance_loss_fn.labels"] = torch.tensor([0, 1])
    return out


def _clam_legacy_index2(sd):
    """CLAM before April 2024 without ``--drop_out``: gated net at ``attention_net.2``."""
    return {k.replace("attention_net.3.", "attention_net.2.", 1): v for k, v in sd.items()}


@pytest.mark.parametrize("size", ["small", "big"])
@pytest.mark.parametrize("arch", ["clam_sb", "clam_mb"])
@pytest.mark.parametrize("layout", ["multi_gpu", "legacy_index2", "both"])
def test_clam_layouts(tmp_path, arch, size, layout):
    model = _model(arch, size_arg=size)
    sd = _clone_sd(model)
    if layout in ("legacy_index2", "both"):
        sd = _clam_legacy_index2(sd)
    if layout in ("multi_gpu", "both"):
        sd = _clam_multi_gpu(sd)
    path = tmp_path / "s_0_checkpoint.pt"
    torch.save(sd, path)

    _, notes = normalise_keys(read_state_dict(path)[0])
    loaded, card = load_model(path)
    _assert_same(model, loaded)
    assert card.arch == arch and card.hparams["size_arg"] == size
    if layout != "legacy_index2":
        assert any("instance_loss_fn" in n or "loss buffer" in n for n in notes)
        assert any("attention_net.module" in n for n in notes)
    if layout != "multi_gpu":
        assert any("attention_net.2" in n for n in notes)


def test_clam_non_gated_module_name_is_kept():
    """Only ``attention_net.module.`` is CLAM's DataParallel infix; other ``.module``
    segments (CLAM's non-gated ``Attn_Net.module``) are real names."""
    sd = {"attention_net.3.module.0.weight": torch.zeros(1),
          "attention_net.0.weight": torch.zeros(1)}
    out, _ = normalise_keys(sd)
    assert set(out) == set(sd)


def test_normalise_keys_for_a_given_arch():
    model = _model("clam_mb")
    sd = {f"module.{k}": v for k, v in _clam_legacy_index2(_clone_sd(model)).items()}
    out, notes = normalise_keys(sd, arch="clam_mb")
    assert set(out) == set(model.state_dict())
    assert any("DataParallel" in n for n in notes) and any("attention_net.2" in n for n in notes)
    with pytest.raises(CheckpointError, match="unknown MIL architecture 'nope'"):
        normalise_keys(sd, arch="nope")


def test_acmil_clam_copy_is_recognised(tmp_path):
    """ACMIL's CLAM copy: size small = [D_feat, D_inner, 128]; keys are CLAM's."""
    model = _model("clam_mb", hidden_dim=16, attn_dim=128)
    torch.save(_clone_sd(model), tmp_path / "clam.pt")
    loaded, card = load_model(tmp_path / "clam.pt")
    _assert_same(model, loaded)
    assert "ACMIL's copy of CLAM" in card.notes
    assert card.hparams["hidden_dim"] == 16 and card.hparams["attn_dim"] == 128


# ----------------------------------------------------------------------------------------
# TransMIL Lightning checkpoint, DataParallel, bare state_dicts
# ----------------------------------------------------------------------------------------


def test_transmil_lightning_ckpt(tmp_path):
    # the official Lightning layout: nystrom 0.0.9 (the official repository's pin) by default
    model = _model("transmil", nystrom="0.0.9")
    ckpt = {
        "epoch": 12,
        "global_step": 3456,
        "pytorch-lightning_version": "1.3.3",
        "state_dict": {f"model.{k}": v for k, v in _clone_sd(model).items()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-4, "params": [0]}]}],
        "lr_schedulers": [],
        "hyper_parameters": {"model": {"name": "TransMIL", "n_classes": 2},
                             "optimizer": {"opt": "lookahead_radam", "lr": 2e-4}},
    }
    path = tmp_path / "epoch=12-val_loss=0.31.ckpt"
    torch.save(ckpt, path)
    sd, meta = read_state_dict(path)
    assert meta["format"] == "lightning" and all(k.startswith("model.") for k in sd)
    loaded, card = load_model(path)
    _assert_same(model, loaded)
    assert card.arch == "transmil"
    assert "Lightning 'model.' prefix" in card.notes and "n_classes" in card.notes
    assert card.nystrom == "0.0.9" and "official TransMIL PyTorch Lightning" in card.notes

    bad = dict(ckpt, hyper_parameters={"model": {"name": "TransMIL", "n_classes": 3}})
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match="n_classes=3"):
        load_model(path)


@pytest.mark.parametrize(("arch", "container"), [
    ("abmil", "bare"), ("acmil_mha", "bare"), ("transmil", "bare"),
    ("acmil_ga", "model_state_dict"), ("clam_mb", "net"), ("abmil", "legacy_format")])
def test_dataparallel_prefix_and_containers(tmp_path, arch, container):
    model = _model(arch)
    sd = {f"module.{k}": v for k, v in _clone_sd(model).items()}
    path = tmp_path / "w.pth"
    if container == "bare":
        torch.save(sd, path)
    elif container == "legacy_format":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        torch.save({container: sd, "epoch": 3}, path)
    loaded, card = load_model(path)
    _assert_same(model, loaded)
    assert "DataParallel" in card.notes


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_arch_inferred_from_shapes(tmp_path, arch):
    model = _model(arch)
    torch.save(_clone_sd(model), tmp_path / "w.pt")
    loaded, card = load_model(tmp_path / "w.pt")
    _assert_same(model, loaded)
    assert card.arch == arch
    assert card.classes == [f"class_{i}" for i in range(model.n_classes)]
    assert card.feature_dim == IN_DIM
    for k, v in model.hparams.items():  # everything the weights determine, plus defaults
        assert card.hparams[k] == v, k


def test_hparams_argument_is_cross_checked(tmp_path):
    model = _model("transmil")
    torch.save(_clone_sd(model), tmp_path / "w.pt")
    loaded, card = load_model(tmp_path / "w.pt", hparams={"legacy_nystrom_slice": True})
    assert card.hparams["nystrom"] == card.nystrom == "0.0.9" and loaded.legacy_nystrom_slice
    with pytest.raises(CheckpointError, match="dim=128"):
        load_model(tmp_path / "w.pt", hparams={"dim": 128})


# ----------------------------------------------------------------------------------------
# layouts that do not fit
# ----------------------------------------------------------------------------------------


def test_unknown_layout_lists_missing_and_unexpected(tmp_path):
    sd = {"encoder.fc.weight": torch.zeros(4, 8), "encoder.fc.bias": torch.zeros(4),
          "head.weight": torch.zeros(2, 4)}
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="unknown layout") as err:
        load_model(tmp_path / "odd.pt")
    msg = str(err.value)
    assert "odd.pt" in msg and "missing" in msg and "unexpected" in msg
    assert "head.weight" in msg


def test_wrong_arch_lists_missing_and_unexpected(tmp_path):
    torch.save(_clone_sd(_model("abmil")), tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "w.pt", arch="clam_sb")
    msg = str(err.value)
    assert "missing" in msg and "attention_net.0.weight" in msg
    assert "unexpected" in msg and "dimreduction.fc1.weight" in msg


def test_strict_load_names_extra_and_missing_keys(tmp_path):
    sd = _clone_sd(_model("acmil_ga"))
    sd["extra.buffer"] = torch.zeros(3)
    del sd["classifier.1.fc.bias"]
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="strict") as err:
        load_model(tmp_path / "w.pt")
    msg = str(err.value)
    assert "1 missing: classifier.1.fc.bias" in msg and "1 unexpected: extra.buffer" in msg


def test_non_tensor_leftovers_are_rejected(tmp_path):
    sd = _clone_sd(_model("abmil"))
    sd["n_iter"] = 1200
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"non-tensor entries: n_iter \(int\)"):
        read_state_dict(tmp_path / "w.pt")
    torch.save([1, 2, 3], tmp_path / "l.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        read_state_dict(tmp_path / "l.pt")


# ----------------------------------------------------------------------------------------
# hostile and broken files
# ----------------------------------------------------------------------------------------




def _write_hostile(path, kind, marker):
    payload = {"attention_net.0.weight": torch.zeros(2, 2)}
    if kind == "write_text_zip":
        payload["x"] = WritesMarker(marker)
        torch.save(payload, path, _use_new_zipfile_serialization=True)
        return "getattr"
    if kind == "system_legacy":
        payload["x"] = RunsShell(marker)
        torch.save(payload, path, _use_new_zipfile_serialization=False)
        return f"{os.system.__module__}.system"
    if kind == "system_zip":
        payload["x"] = RunsShell(marker)
        torch.save(payload, path)
        return f"{os.system.__module__}.system"
    if kind == "inside_acmil_config":  # an allowlisted container cannot smuggle code
        with _fake_acmil_utils() as Struct:
            torch.save({"model": payload, "epoch": 1,
                        "config": Struct(D_feat=2, hook=RunsShell(marker))}, path)
        return f"{os.system.__module__}.system"
    payload["x"] = WritesMarker(marker)  # a plain pickle, protocol 4 (STACK_GLOBAL)
    with open(path, "wb") as fh:
        pickle.dump(payload, fh, protocol=4)
    return "pathlib.Path.write_text"


@pytest.mark.parametrize("kind", ["write_text_zip", "system_zip", "system_legacy",
                                  "inside_acmil_config", "plain_pickle"])
def test_malicious_pickle_is_refused(tmp_path, kind):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    expected_global = _write_hostile(path, kind, marker)
    assert expected_global in " ".join(unsafe_globals(path))
    for call in (read_state_dict, load_model):
        with pytest.raises(CheckpointError) as err:
            call(path)
        msg = str(err.value)
        assert "evil.pt" in msg and "refused" in msg and "no unsafe fallback" in msg
        assert expected_global in msg
        assert "weights_only=False" not in msg
        assert not marker.exists()
    assert not marker.exists()


def test_unlisted_config_class_is_refused_not_imported(tmp_path):
    """A Lightning checkpoint whose hyper-parameters are a foreign class is refused (named),
    even though that class would be harmless: only the allowlist is ever loaded."""
    name = "pytorch_lightning.utilities.parsing"

    class AttributeDict(dict):
        pass

    with _fake_module(name, AttributeDict=AttributeDict):
        torch.save({"state_dict": _clone_sd(_model("abmil")),
                    "hyper_parameters": AttributeDict(lr=1e-4)}, tmp_path / "pl.ckpt")
    with pytest.raises(CheckpointError, match=f"refused.*{name}.AttributeDict"):
        load_model(tmp_path / "pl.ckpt")


@pytest.mark.parametrize(("content", "suffix"), [
    (b"\x00\x17garbage" * 300, ".pth"),
    (b"hello, this is not a checkpoint\n" * 20, ".pth"),
    (b"PK\x03\x04" + b"\x01" * 500, ".pt"),
    (b"", ".ckpt"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}       ", ".safetensors"),
])
def test_garbage_is_a_checkpoint_error_naming_the_file(tmp_path, content, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"broken\.") as err:
        load_model(path)
    assert "weights_only=False" not in str(err.value)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(_clone_sd(_model("abmil")), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="w.pt: not a readable"):
        read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.pt")


# ----------------------------------------------------------------------------------------
# TransMIL's nystrom-attention variant
# ----------------------------------------------------------------------------------------
def _variant_differs(a, b) -> bool:
    x = _features()
    with torch.no_grad():
        return not torch.allclose(a(x), b(x), atol=1e-5)


def test_nystrom_default_follows_the_container(tmp_path):
    model = _model("transmil")
    sd = _clone_sd(model)
    acmil = tmp_path / "checkpoint-best.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 1,
                "config": {"arch": "transmil", "D_feat": IN_DIM, "D_inner": 64}}, acmil)
    plain = tmp_path / "w.pt"
    torch.save(sd, plain)
    # a 'state_dict' container without Lightning's markers is not the official layout
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1}, other)
    for path, why in ((acmil, "ACMIL checkpoint container"),
                      (plain, "does not show the nystrom-attention release"),
                      (other, "does not show the nystrom-attention release")):
        loaded, card = load_model(path)
        assert card.nystrom == card.hparams["nystrom"] == "current", path.name
        assert why in card.notes and not loaded.legacy_nystrom_slice
        _assert_same(model, loaded)


def test_nystrom_choice_order_and_errors(tmp_path):
    model = _model("transmil", nystrom="0.0.9")
    path = tmp_path / "epoch=00-val_loss=0.5000.ckpt"
    torch.save({"epoch": 0, "global_step": 1, "pytorch-lightning_version": "1.2.3",
                "state_dict": {f"model.{k}": v for k, v in _clone_sd(model).items()},
                "hyper_parameters": {"model": {"name": "TransMIL", "n_classes": 2}}}, path)
    auto, card = load_model(path)
    assert card.nystrom == "0.0.9"
    _assert_same(model, auto)
    # the sidecar (top-level key, or the older hparams spelling) beats the container ...
    side = tmp_path / "side.json"
    side.write_text(json.dumps({"nystrom": "current"}))
    m_side, c_side = load_model(path, sidecar=side)
    assert c_side.nystrom == "current" and "nystrom current from the sidecar" in c_side.notes
    assert "nystrom='current' as given, although the container suggests '0.0.9'" in c_side.notes
    assert _variant_differs(auto, m_side)
    _, c_old = load_model(path, sidecar={"hparams": {"legacy_nystrom_slice": False}})
    assert c_old.nystrom == "current" and "legacy_nystrom_slice" not in c_old.hparams
    # ... and the explicit argument beats both
    m_arg, c_arg = load_model(path, sidecar=side, nystrom="0.0.9")
    assert c_arg.nystrom == "0.0.9" and "nystrom 0.0.9 chosen explicitly" in c_arg.notes
    _assert_same(model, m_arg)
    with pytest.raises(CheckpointError, match="unknown nystrom variant"):
        load_model(path, nystrom="0.0.8")
    with pytest.raises(CheckpointError, match="says nystrom='0.0.9' but its hparams"):
        load_model(path, sidecar={"nystrom": "0.0.9", "hparams": {"nystrom": "current"}})
    torch.save(_clone_sd(_model("abmil")), tmp_path / "abmil.pt")
    with pytest.raises(CheckpointError, match="TransMIL models only"):
        load_model(tmp_path / "abmil.pt", nystrom="current")
    assert load_model(tmp_path / "abmil.pt")[1].nystrom is None


def test_nystrom_survives_save_and_load(tmp_path):
    from napari_milview.mil import ModelCard

    model = _model("transmil", nystrom="0.0.9")
    card = ModelCard(arch="transmil", hparams=dict(model.hparams), classes=["a", "b"],
                     nystrom="0.0.9")
    save_model(model, card, tmp_path / "t.safetensors")
    assert json.loads((tmp_path / "t.json").read_text())["nystrom"] == "0.0.9"
    loaded, back = load_model(tmp_path / "t.safetensors")
    assert back.nystrom == "0.0.9" and loaded.legacy_nystrom_slice
    assert "nystrom 0.0.9 from the sidecar" in back.notes and "as given" not in back.notes
    _assert_same(model, loaded)
    bad = ModelCard(arch="transmil", hparams=dict(model.hparams), nystrom="current")
    assert bad.check() == ["nystrom 'current' != hparams nystrom '0.0.9'"]
    assert ModelCard(arch="transmil", hparams={"in_dim": IN_DIM, "n_classes": 2, "dim": 64},
                     nystrom="0.0.9").build().nystrom == "0.0.9"
