"""Safe reading of weight files (``napari_milview/_weights.py``), with real torch files."""

from __future__ import annotations

import argparse
import ast
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import napari_milview
from napari_milview._inert import ACMILStruct
from napari_milview._weights import (
    WeightsError,
    key_report,
    read_json_object,
    read_sidecar,
    read_state_dict,
    rename_prefix,
    sidecar_path,
    strip_prefix,
    strip_prefixes,
    to_plain,
    torch_load,
    unsafe_globals,
)

from .hostile import RunsShell, WritesMarker


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"fc1.weight": torch.randn(4, 3, generator=g), "fc1.bias": torch.randn(4, generator=g),
            "head.weight": torch.randn(2, 4, generator=g)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# ----------------------------------------------------------------------------------- files
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin", ".weights"])
def test_torch_zip_file(tmp_path, suffix):
    """A zip ``torch.save`` file; an unknown suffix is recognised from its first bytes."""
    path = tmp_path / f"w{suffix}"
    torch.save(_sd(), path)
    sd, meta = read_state_dict(path)
    _same(sd, _sd())
    assert meta == {"format": "state_dict"}
    assert all(v.device.type == "cpu" for v in sd.values())


def test_torch_legacy_format_and_containers(tmp_path):
    path = tmp_path / "w.pth"
    args = argparse.Namespace(lr=1e-4, n_classes=2, path=None)
    torch.save({"model_state_dict": _sd(), "args": args, "epoch": 4, "optimizer": {}}, path,
               _use_new_zipfile_serialization=False)
    sd, meta = read_state_dict(path)
    _same(sd, _sd())
    assert meta["format"] == "model_state_dict" and meta["epoch"] == 4
    assert meta["config"] == {"lr": 1e-4, "n_classes": 2, "path": None}  # Namespace -> dict
    assert meta["config_key"] == "args" and meta["ignored_keys"] == ["optimizer"]


def test_a_dict_of_module_state_dicts(tmp_path):
    """DTFD-MIL saves ``{'classifier': sd, 'dim_reduction': sd, ...}``: joined as
    ``<module>.<key>``; a training config and the epoch beside them are kept as metadata."""
    path = tmp_path / "best_model.pth"
    parts = {"classifier": {"fc.weight": torch.ones(2, 4)}, "dim_reduction": _sd()}
    torch.save({**parts, "args": argparse.Namespace(mDim=4), "epoch": 7}, path)
    sd, meta = read_state_dict(path)
    _same(sd, {f"{m}.{k}": v for m, d in parts.items() for k, v in d.items()})
    assert meta["format"] == "modules" and meta["modules"] == ["classifier", "dim_reduction"]
    assert meta["state_dict_key"] == "classifier, dim_reduction"
    assert meta["config"] == {"mDim": 4} and meta["epoch"] == 7 and meta["ignored_keys"] == []
    # one module alone, or a module holding a non-tensor, is no such container
    for bad in ({"classifier": _sd(), "n_iter": 3}, {"a": _sd(), "b": {"step": 1}},
                {"a": _sd(), "b": {}}):
        torch.save(bad, path)
        with pytest.raises(WeightsError, match="not a state_dict of tensors"):
            read_state_dict(path)


def test_safetensors_file_and_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_sd(), str(path), metadata={"format": "pt", "milview": json.dumps({"arch": "x"}),
                                          "config": json.dumps({"D_feat": 3})})
    sd, meta = read_state_dict(path)
    _same(sd, _sd())
    assert meta["format"] == "safetensors" and meta["card"] == {"arch": "x"}
    assert meta["config"] == {"D_feat": 3} and meta["safetensors_metadata"]["format"] == "pt"

    sniffed = tmp_path / "w.data"  # no suffix to go by: the header says safetensors
    sniffed.write_bytes(path.read_bytes())
    _same(read_state_dict(sniffed)[0], _sd())

    bad = tmp_path / "b.safetensors"
    save_file(_sd(), str(bad), metadata={"milview": "[1, 2]"})
    with pytest.raises(WeightsError, match="b.safetensors: metadata 'milview' is not a JSON"):
        read_state_dict(bad)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"),
    (b"hello, not weights\n" * 10, "unknown checkpoint type"),
])
def test_unknown_and_empty_files(tmp_path, content, message):
    path = tmp_path / "w.data"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=f"w.data: {message}"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")


def test_only_weights_only_loading(monkeypatch, tmp_path):
    """Every torch.load goes through weights_only=True (nothing else is ever tried)."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    path = tmp_path / "w.pt"
    torch.save(_sd(), path)
    read_state_dict(path)
    path.write_bytes(path.read_bytes()[:100])  # broken: refused before torch, no unsafe try
    with pytest.raises(WeightsError, match="not a readable zip archive"):
        torch_load(path)
    legacy = tmp_path / "legacy.pt"
    torch.save(_sd(), legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:100])  # broken legacy file: torch tries once
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        torch_load(legacy)
    assert calls == [True, True]


def test_no_unsafe_torch_load_in_the_package():
    """No call in the package passes anything but the literal True as weights_only."""
    root = Path(napari_milview.__file__).parent
    bad = []
    for py in root.rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "weights_only" and not (
                        isinstance(kw.value, ast.Constant) and kw.value.value is True):
                    bad.append(f"{py.relative_to(root)}:{node.lineno}")
    assert not bad


def test_import_is_light():
    code = ("import napari_milview._weights, sys, json; "
            "print(json.dumps([m for m in ('torch', 'safetensors') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out.splitlines()[-1]) == []


# --------------------------------------------------------------------------- hostile pickles


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain_pickle"])
def test_hostile_pickle_is_refused_naming_the_callable(tmp_path, kind):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    payload: dict = {"fc1.weight": torch.zeros(2, 2)}
    if kind == "plain_pickle":
        payload["x"] = WritesMarker(marker)
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=4)
        callable_name = "pathlib.Path.write_text"
    else:
        payload["x"] = RunsShell(marker)
        torch.save(payload, path, _use_new_zipfile_serialization=kind == "zip")
        callable_name = f"{os.system.__module__}.system"
    assert callable_name in unsafe_globals(path)
    for call in (torch_load, read_state_dict):
        with pytest.raises(WeightsError) as err:
            call(path)
        msg = str(err.value)
        assert "evil.pt" in msg and "refused" in msg and callable_name in msg
        assert "no unsafe fallback" in msg and "weights_only=False" not in msg
    assert not marker.exists()


def test_acmil_struct_is_inert(tmp_path):
    """``utils.utils.Struct`` loads through :class:`ACMILStruct` as a plain dict, without
    importing ``utils``."""

    class Struct:
        def __init__(self, **entries):
            self.__dict__.update(entries)

    Struct.__module__, Struct.__qualname__ = "utils.utils", "Struct"
    mod = types.ModuleType("utils.utils")
    mod.Struct = Struct
    parent = types.ModuleType("utils")
    parent.utils = mod
    sys.modules.update({"utils": parent, "utils.utils": mod})
    try:
        torch.save({"model": _sd(), "config": Struct(D_feat=3, n_token=5)}, tmp_path / "a.pth")
    finally:
        sys.modules.pop("utils.utils")
        sys.modules.pop("utils")
    assert unsafe_globals(tmp_path / "a.pth") == []
    obj = torch_load(tmp_path / "a.pth")
    assert obj["config"] == {"D_feat": 3, "n_token": 5} and type(obj["config"]) is dict
    assert "utils" not in sys.modules
    _, meta = read_state_dict(tmp_path / "a.pth")
    assert meta["format"] == "acmil" and meta["config"] == {"D_feat": 3, "n_token": 5}
    with pytest.raises(pickle.UnpicklingError, match="expected a dict"):
        ACMILStruct().__setstate__(["not", "a", "dict"])


def test_to_plain():
    ns = argparse.Namespace(a=torch.tensor(2.5), b=torch.zeros(2, 3), c=(1, "x"), d=Path("p"))
    assert to_plain(ns) == {"a": 2.5, "b": "<tensor (2, 3) torch.float32>", "c": [1, "x"],
                            "d": repr(Path("p"))}


def test_non_tensor_leftovers_are_named(tmp_path):
    sd = {**_sd(), "n_iter": 1200}
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"non-tensor entries: n_iter \(int\)"):
        read_state_dict(tmp_path / "w.pt")
    torch.save([1, 2], tmp_path / "l.pt")
    with pytest.raises(WeightsError, match="holds a list"):
        read_state_dict(tmp_path / "l.pt")


# ------------------------------------------------------------------------------------ keys
def test_strip_prefix_only_when_every_key_has_it():
    sd = {f"module.{k}": v for k, v in _sd().items()}
    assert set(strip_prefix(sd, "module.")) == set(_sd())
    mixed = {**sd, "other.weight": torch.zeros(1)}
    assert set(strip_prefix(mixed, "module.")) == set(mixed)  # a real sub-module stays
    assert set(strip_prefix({"module.": torch.zeros(1)}, "module.")) == {"module."}
    assert strip_prefix({}, "module.") == {}


def test_strip_prefixes_repeats_and_notes():
    sd = {f"model.module._orig_mod.{k}": v for k, v in _sd().items()}
    out, notes = strip_prefixes(sd)
    _same(out, _sd())
    assert notes == ["stripped the PyTorch Lightning 'model.' prefix",
                     "stripped the DataParallel 'module.' prefix",
                     "stripped the torch.compile '_orig_mod.' prefix"]
    out, notes = strip_prefixes(_sd())
    _same(out, _sd())
    assert notes == []


def test_rename_prefix_refuses_collisions():
    sd = {"a.0.w": torch.zeros(1), "b.1.w": torch.ones(1)}
    assert set(rename_prefix(sd, "a.", "c.")) == {"c.0.w", "b.1.w"}
    with pytest.raises(WeightsError, match="collides on key 'b.1.w'"):
        rename_prefix({"a.1.w": torch.zeros(1), "b.1.w": torch.ones(1)}, "a.", "b.")


def test_key_report():
    net = torch.nn.Linear(3, 4)
    assert key_report(net.state_dict(), {"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}) \
        == ""
    report = key_report(net.state_dict(), {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)})
    assert report == ("1 missing: bias; 1 unexpected: extra; "
                      "1 shape mismatches: weight: file (2, 3) vs model (4, 3)")
    many = {f"k{i}": torch.zeros(1) for i in range(13)}
    assert key_report({}, many, limit=2) == "13 unexpected: k0, k1, ... (+11 more)"


# -------------------------------------------------------------------------------- sidecars
def test_sidecars(tmp_path):
    w = tmp_path / "s_0_checkpoint.pt"
    assert sidecar_path(w) == tmp_path / "s_0_checkpoint.json"
    assert read_sidecar(None, w) == ({}, None)
    assert read_sidecar({"classes": ["a"]}, w) == ({"classes": ["a"]}, "sidecar argument")
    sidecar_path(w).write_text(json.dumps({"encoder": "uni"}))
    assert read_sidecar(None, w) == ({"encoder": "uni"}, str(sidecar_path(w)))
    with pytest.raises(FileNotFoundError, match="sidecar not found"):
        read_sidecar(tmp_path / "other.json", w)
    sidecar_path(w).write_text("[1, 2]")
    with pytest.raises(WeightsError, match="a sidecar must be a JSON object"):
        read_json_object(sidecar_path(w))
    with pytest.raises(WeightsError, match="a sidecar must be a JSON object"):
        read_sidecar(None, w)
    # a list only when the caller asks (DSMIL's thresholds); anything else is still refused
    assert read_sidecar(None, w, allow_list=True) == ([1, 2], str(sidecar_path(w)))
    sidecar_path(w).write_text(json.dumps({"encoder": "uni"}))
    assert read_sidecar(None, w, allow_list=True) == ({"encoder": "uni"}, str(sidecar_path(w)))
    sidecar_path(w).write_text("0.5")
    with pytest.raises(WeightsError, match="a sidecar must be a JSON object"):
        read_sidecar(None, w, allow_list=True)
    sidecar_path(w).write_text("{broken")
    with pytest.raises(WeightsError, match="not a readable JSON sidecar"):
        read_sidecar(None, w)
