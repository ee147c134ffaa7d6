"""Training-config objects inside checkpoints: the stand-ins of ``napari_milview/_inert.py``,
read through ``_weights.torch_load`` / ``read_state_dict``.

Hostile pickles are written opcode by opcode (protocol 2, what ``torch.save`` writes and
torch's restricted unpickler reads) and put in a real ``torch.save`` zip in place of its
``data.pkl``. Each would create a marker file if anything in it ran; each must be refused
with the globals it names (:func:`unsafe_globals`) or the stand-in's complaint, and the
marker must not exist. The real files under ``tests/data/containers/`` were written with
the real ``addict`` / ``omegaconf`` / ``easydict`` / PyTorch Lightning 1.x by
``make_containers.py`` there; none of those packages is needed (or imported) to read them.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path, PosixPath

import pytest
import torch

from napari_milview._inert import SAFE_GLOBALS, AddictDict
from napari_milview._weights import (
    WeightsError,
    read_state_dict,
    to_plain,
    torch_load,
    unsafe_globals,
)

DATA = Path(__file__).parent / "data" / "containers"


# ------------------------------------------------------------------ a tiny pickle assembler
def G(module: str, name: str) -> bytes:
    """GLOBAL: push ``module.name`` (the unpickler looks it up by that string)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def S(text: str) -> bytes:
    """BINUNICODE: push a str."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def I(n: int) -> bytes:  # noqa: E743 - an opcode name
    """BININT1: push a small int."""
    return b"K" + bytes([n])


MARK, TUPLE, TUPLE1, TUPLE2 = b"(", b"t", b"\x85", b"\x86"
EMPTY_TUPLE, EMPTY_DICT, EMPTY_LIST = b")", b"}", b"]"
NEWOBJ, REDUCE, BUILD, SETITEM, SETITEMS, NONE = b"\x81", b"R", b"b", b"s", b"u", b"N"


def P(*ops: bytes) -> bytes:
    """A whole protocol-2 pickle: ``PROTO 2``, the ops, ``STOP``."""
    return b"\x80\x02" + b"".join(ops) + b"."


def shell(marker: Path) -> bytes:
    """``os.system('touch <marker>')``: creates the marker if it ever runs."""
    return G("os", "system") + S(f"touch '{marker}'") + TUPLE1 + REDUCE


def subprocess_call(marker: Path) -> bytes:
    """``subprocess.call(['touch', marker])`` (a module torch does not block by itself)."""
    return (G("subprocess", "call") + EMPTY_LIST + MARK + S("touch") + S(str(marker))
            + b"e" + TUPLE1 + REDUCE)


def checkpoint(tmp_path: Path, config: bytes, name: str = "evil.ckpt") -> Path:
    """A real ``torch.save`` zip whose ``data.pkl`` is ``{'state_dict': {}, 'cfg': config}``."""
    src = tmp_path / "src.pt"
    torch.save({}, src)
    out = tmp_path / name
    pkl = P(EMPTY_DICT, S("state_dict"), EMPTY_DICT, SETITEM, S("cfg"), config, SETITEM)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = pkl if info.filename.endswith("/data.pkl") else zin.read(info)
            zout.writestr(info, data)
    return out


def test_the_assembler_writes_what_torch_reads(tmp_path):
    """The harness itself: a benign assembled config loads (so the refusals below are real).

    ``addict`` pickles as NEWOBJ with ``(key, value)`` pairs, SETITEM(S) of the same
    entries, then BUILD with the object itself (memo 5 here) as its state."""
    cfg = (G("addict.addict", "Dict") + S("n_classes") + I(2) + TUPLE2 + TUPLE1 + NEWOBJ
           + b"q\x05" + S("name") + S("TransMIL") + SETITEM + b"h\x05" + BUILD)
    path = checkpoint(tmp_path, cfg, "ok.ckpt")
    assert torch_load(path) == {"state_dict": {}, "cfg": {"n_classes": 2, "name": "TransMIL"}}


# --------------------------------------------------------------------------------- hostile
def _refused(path: Path, *expected: str) -> str:
    """Both readers refuse ``path``; the message names it, says 'refused' and ``expected``."""
    msgs = []
    for call in (torch_load, read_state_dict):
        with pytest.raises(WeightsError) as err:
            call(path)
        msg = str(err.value)
        assert path.name in msg and "refused" in msg, msg
        assert "weights_only=False" not in msg
        for e in expected:
            assert e in msg, msg
        msgs.append(msg)
    return msgs[0]


def _smuggled(marker: Path) -> dict[str, tuple[bytes, list[str]]]:
    """Config-shaped pickles that would run code; the globals each must be refused for."""
    return {
        # an allowlisted name reduced with a callable's result among its arguments
        "PosixPath(os.system(...))": (
            G("pathlib", "PosixPath") + MARK + S("/") + shell(marker) + TUPLE + REDUCE,
            ["os.system"]),
        "PosixPath(subprocess.call(...))": (
            G("pathlib", "PosixPath") + MARK + S("/") + subprocess_call(marker) + TUPLE
            + REDUCE, ["subprocess.call"]),
        # nested non-allowlisted globals inside addict / easydict / omegaconf state
        "addict value os.system": (
            G("addict.addict", "Dict") + S("log") + shell(marker) + TUPLE2 + TUPLE1 + NEWOBJ,
            ["os.system"]),
        "addict SETITEM subprocess": (
            G("addict.addict", "Dict") + EMPTY_TUPLE + NEWOBJ + S("x")
            + subprocess_call(marker) + SETITEM, ["subprocess.call"]),
        "easydict BUILD state with eval": (
            G("easydict", "EasyDict") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT + S("x")
            + G("builtins", "eval") + S(f"open('{marker}', 'w')") + TUPLE1 + REDUCE
            + SETITEM + BUILD, ["builtins.eval"]),
        "omegaconf node _val exec": (
            G("omegaconf.dictconfig", "DictConfig") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT
            + S("_content") + EMPTY_DICT + S("lr")
            + G("omegaconf.nodes", "AnyNode") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT + S("_val")
            + G("builtins", "exec") + S(f"open('{marker}', 'w')") + TUPLE1 + REDUCE
            + SETITEM + BUILD + SETITEM + SETITEM + BUILD, ["builtins.exec"]),
        "omegaconf metadata getattr": (
            G("omegaconf.base", "ContainerMetadata") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT
            + S("ref_type") + G("builtins", "getattr") + G("os", "path") + S("join")
            + TUPLE2 + REDUCE + SETITEM + BUILD, ["builtins.getattr", "os.path"]),
        # __setstate__ / BUILD payloads: a global, an object whose reduce is os.system
        "Struct BUILD os.system": (
            G("utils.utils", "Struct") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT + S("D_feat")
            + shell(marker) + SETITEM + BUILD, ["os.system"]),
        "Namespace BUILD state is a global": (
            G("argparse", "Namespace") + EMPTY_TUPLE + NEWOBJ + G("builtins", "eval") + BUILD,
            ["builtins.eval"]),
        "Namespace BUILD slot state": (
            G("argparse", "Namespace") + EMPTY_TUPLE + NEWOBJ + NONE + EMPTY_DICT
            + S("__class__") + G("subprocess", "Popen") + SETITEM + TUPLE2 + BUILD,
            ["subprocess.Popen"]),
        # eval / exec / getattr under names that look like config
        "utils.utils.eval": (
            G("utils.utils", "eval") + S(f"open('{marker}', 'w')") + TUPLE1 + REDUCE,
            ["utils.utils.eval"]),
        "addict.addict.Dict.__init__": (
            G("addict.addict", "Dict.__init__") + EMPTY_TUPLE + REDUCE,
            ["addict.addict.Dict.__init__"]),
        "omegaconf.OmegaConf.create": (
            G("omegaconf", "OmegaConf.create") + S("x") + TUPLE1 + REDUCE,
            ["omegaconf.OmegaConf.create"]),
        "pathlib.Path.write_text": (
            G("pathlib", "Path.write_text") + G("pathlib", "PosixPath") + S(str(marker))
            + TUPLE1 + REDUCE + S("pwned") + TUPLE2 + REDUCE,
            ["pathlib.Path.write_text"]),
        "__builtin__.getattr (Python 2 name)": (
            G("__builtin__", "getattr") + G("easydict", "EasyDict") + S("__init__") + TUPLE2
            + REDUCE, ["builtins.getattr"]),
    }


def test_the_payloads_are_live(tmp_path):
    """Control: the unrestricted pickle *does* run the payloads (so a missing marker below
    means the loader ran nothing, not that the payload was harmless)."""
    for n, payload in enumerate((shell, subprocess_call)):
        marker = tmp_path / f"MARKER{n}"
        pickle.loads(P(payload(marker)))  # noqa: S301 - the point of the control
        assert marker.exists()


@pytest.mark.parametrize("case", list(_smuggled(Path("m"))))
def test_smuggled_globals_are_refused_and_run_nothing(tmp_path, case):
    marker = tmp_path / "MARKER"
    cfg, names = _smuggled(marker)[case]
    path = checkpoint(tmp_path, cfg)
    found = unsafe_globals(path)
    for n in names:
        assert n in found, found
    msg = _refused(path, *names, "would run code from")
    assert "no unsafe fallback" in msg
    assert not marker.exists()


def _malformed() -> dict[str, tuple[bytes, str]]:
    """Allowlisted names handed something other than the data they stand for."""
    tensor_fn = G("torch._utils", "_rebuild_tensor_v2")
    return {
        "PosixPath part is a callable": (
            G("pathlib", "PosixPath") + MARK + S("/") + tensor_fn + TUPLE + REDUCE,
            "pathlib.PosixPath: path parts must be str, got function"),
        "PosixPath part is an int": (
            G("pathlib", "WindowsPath") + I(3) + TUPLE1 + REDUCE,
            "pathlib.WindowsPath: path parts must be str, got int"),
        "addict state is a list": (
            G("addict.addict", "Dict") + EMPTY_TUPLE + NEWOBJ + b"]" + MARK + S("a") + I(1)
            + TUPLE2 + b"e" + BUILD,
            "addict.addict.Dict: expected a dict of attributes, got list"),
        "addict state is an int": (
            G("addict.addict", "Dict") + EMPTY_TUPLE + NEWOBJ + I(7) + BUILD,
            "addict.addict.Dict: expected a dict of attributes, got int"),
        "addict args are not pairs": (
            G("addict.addict", "Dict") + I(5) + TUPLE1 + NEWOBJ,
            "addict.addict.Dict: expected (key, value) pairs, got int"),
        "addict key is a tuple": (
            G("addict", "Dict") + S("a") + S("b") + TUPLE2 + I(1) + TUPLE2 + TUPLE1 + NEWOBJ,
            "addict.addict.Dict: keys must be plain values, got tuple"),
        "addict key set later is a stand-in": (
            G("addict.addict", "Dict") + EMPTY_TUPLE + NEWOBJ + G("typing", "Any") + I(1)
            + SETITEM, "addict.addict.Dict: keys must be plain values, got _TypeName"),
        "Struct with constructor args": (
            G("utils.utils", "Struct") + S("rm -rf") + TUPLE1 + REDUCE,
            "utils.utils.Struct: takes no constructor arguments, got str"),
        "Namespace NEWOBJ args": (
            G("argparse", "Namespace") + tensor_fn + TUPLE1 + NEWOBJ,
            "argparse.Namespace: takes no constructor arguments, got function"),
        "Namespace state keys not str": (
            G("argparse", "Namespace") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT + I(1) + I(2)
            + SETITEM + BUILD, "argparse.Namespace: attribute names must be str, got int"),
        "a type name called": (
            G("__builtin__", "dict") + EMPTY_TUPLE + REDUCE,
            "builtins.dict: a type name, allowed as data only, not called"),
        "typing.Any as a class": (
            G("typing", "Any") + EMPTY_TUPLE + NEWOBJ, "typing.Any: not a class"),
        "PosixPath as a class": (
            G("pathlib", "PosixPath") + EMPTY_TUPLE + NEWOBJ, "pathlib.PosixPath: not a class"),
        "defaultdict with a stand-in factory": (
            G("collections", "defaultdict") + G("addict.addict", "Dict") + TUPLE1 + REDUCE,
            "collections.defaultdict: expected one type name as its factory, got type"),
        "DictConfig content is a tensor function": (
            G("omegaconf.dictconfig", "DictConfig") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT
            + S("_content") + tensor_fn + SETITEM + BUILD,
            "omegaconf.dictconfig.DictConfig: unexpected content function"),
    }


@pytest.mark.parametrize("case", list(_malformed()))
def test_stand_ins_accept_data_only(tmp_path, case):
    cfg, problem = _malformed()[case]
    path = checkpoint(tmp_path, cfg)
    assert unsafe_globals(path) == []  # every name is allowlisted: the stand-in says no
    msg = _refused(path, problem)
    assert "nothing was run" in msg


def test_an_empty_addict_and_a_shared_one(tmp_path):
    """BUILD with the object itself (addict's own state), and one object referenced twice."""
    cfg = (EMPTY_DICT + S("a") + G("addict.addict", "Dict") + S("k") + I(1) + TUPLE2 + TUPLE1
           + NEWOBJ + b"q\x01" + b"h\x01" + BUILD + SETITEM + S("b") + b"h\x01" + SETITEM
           + S("p") + G("pathlib._local", "PureWindowsPath") + S("C:\\") + S("x") + TUPLE2
           + REDUCE + SETITEM)
    rebuilt: list[str] = []
    obj = torch_load(checkpoint(tmp_path, cfg), rebuilt)
    assert obj["cfg"] == {"a": {"k": 1}, "b": {"k": 1}, "p": "C:\\x"}
    assert obj["cfg"]["a"] is obj["cfg"]["b"] and type(obj["cfg"]["a"]) is dict
    assert rebuilt == ["addict.addict.Dict", "pathlib._local.PureWindowsPath"]


@pytest.mark.parametrize(("module", "cls", "parts", "expected"), [
    ("pathlib", "PosixPath", ("/", "runs", "x", "fold0"), "/runs/x/fold0"),  # <= 3.12
    ("pathlib._local", "PosixPath", ("/runs/x/fold0",), "/runs/x/fold0"),  # 3.13
    ("pathlib", "PurePosixPath", ("logs", "Camelyon"), "logs/Camelyon"),
    ("pathlib", "Path", (), "."),
    ("pathlib", "PureWindowsPath", ("C:\\", "data", "x"), "C:\\data\\x"),
    ("pathlib._local", "WindowsPath", ("C:/data/x",), "C:\\data\\x"),
])
def test_paths_as_each_python_pickles_them(tmp_path, module, cls, parts, expected):
    cfg = G(module, cls) + MARK + b"".join(S(p) for p in parts) + TUPLE + REDUCE
    rebuilt: list[str] = []
    assert torch_load(checkpoint(tmp_path, cfg), rebuilt)["cfg"] == expected
    assert rebuilt == [f"{module}.{cls}"]


def test_deep_nesting_is_refused_not_a_crash(tmp_path):
    """Config objects nested past the recursion limit: a WeightsError, nothing else."""
    def nested(depth: int) -> bytes:  # {'a': {'a': ... {}}} as addict pickles it
        return ((G("addict.addict", "Dict") + S("a")) * depth + G("addict.addict", "Dict")
                + EMPTY_TUPLE + NEWOBJ + (TUPLE2 + TUPLE1 + NEWOBJ) * depth)

    cfg = torch_load(checkpoint(tmp_path, nested(200), "ok.ckpt"))["cfg"]
    for _ in range(200):
        cfg = cfg["a"]
    assert cfg == {}
    with pytest.raises(WeightsError, match="evil.ckpt: refused: its config objects nest "
                                           "deeper than Python's recursion limit"):
        torch_load(checkpoint(tmp_path, nested(sys.getrecursionlimit() + 100)))


def test_names_stored_as_data_come_back_as_names(tmp_path):
    """A type name or a stand-in class stored as a value (no instance made) is its name."""
    cfg = (EMPTY_DICT + S("ref_type") + G("typing", "Any") + SETITEM + S("hparams_type")
           + G("addict.addict", "Dict") + SETITEM + S("cls") + G("pathlib", "PosixPath")
           + SETITEM + S("elem") + G("__builtin__", "long") + SETITEM)
    assert torch_load(checkpoint(tmp_path, cfg))["cfg"] == {
        "ref_type": "typing.Any", "hparams_type": "addict.addict.Dict",
        "cls": "pathlib.PosixPath", "elem": "builtins.int"}


def test_every_allowlisted_name_is_inert():
    """The allowlist holds stand-ins only: no real class or function of the named modules."""
    for obj, name in SAFE_GLOBALS:
        assert isinstance(name, str)
        owner = obj if isinstance(obj, type) else type(obj)
        assert owner.__module__ == "napari_milview._inert", name


def test_stand_in_classes_are_plain_python():
    """A stand-in made outside a load is still inert: pairs in, a Counter-backed dict out."""
    made = AddictDict(("a", 1))
    assert dict(made) == {"a": 1}
    with pytest.raises(Exception, match="expected a dict of attributes"):
        made.__setstate__([("a", 2)])


# ------------------------------------------------------------------------------- real files
def _load(name: str) -> tuple[dict, dict]:
    path = DATA / name
    sd, meta = read_state_dict(path)
    return sd, meta


def test_transmil_lightning_checkpoint():
    """PyTorch Lightning 1.x layout with addict sections and a PosixPath (TransMIL's
    train.py): loads, the config is plain data, the state_dict keeps its ``model.`` keys."""
    obj = torch_load(DATA / "transmil_lightning_like.ckpt")
    assert set(obj) == {"epoch", "global_step", "pytorch-lightning_version", "state_dict",
                        "loops", "hparams_name", "hyper_parameters"}
    assert obj["pytorch-lightning_version"].startswith("1.")
    sd, meta = _load("transmil_lightning_like.ckpt")
    assert meta["format"] == "lightning" and meta["config_key"] == "hyper_parameters"
    assert all(k.startswith("model.") for k in sd)
    cfg = meta["config"]
    assert cfg["model"] == {"name": "TransMIL", "n_classes": 2}
    assert cfg["log"] == "logs/Camelyon/TransMIL"
    assert cfg["data"]["train_dataloader"]["batch_size"] == 1
    assert cfg["optimizer"]["opt_eps"] is None and cfg["loss"]["base_loss"] == "CrossEntropyLoss"
    assert meta["rebuilt"] == ["addict.addict.Dict", "pathlib.PosixPath"]
    _assert_plain(cfg)


def test_lightning_full_state_checkpoint():
    """``Trainer.save_checkpoint``: optimizer, scheduler and callback states load too (plain
    data and tensors) and are left aside by the reader."""
    obj = torch_load(DATA / "lightning_full_state.ckpt")
    assert {"optimizer_states", "lr_schedulers", "callbacks", "loops"} <= set(obj)
    assert isinstance(obj["optimizer_states"][0]["state"][0]["exp_avg"], torch.Tensor)
    assert any(k.startswith("EarlyStopping") for k in obj["callbacks"])
    sd, meta = _load("lightning_full_state.ckpt")
    assert {"optimizer_states", "lr_schedulers", "callbacks"} <= set(meta["ignored_keys"])
    assert meta["config"]["model"] == {"name": "TransMIL", "n_classes": 2}


def test_omegaconf_checkpoint():
    sd, meta = _load("omegaconf_hparams.ckpt")
    cfg = meta["config"]
    assert cfg["model"]["name"] == "TransMIL" and cfg["model"]["n_classes"] == 2
    assert cfg["model"]["dims"] == [64, 32] and cfg["optimizer"]["lr"] == 0.0002
    assert cfg["log"] == "logs/run1"  # a PathNode holding a PosixPath
    assert cfg["model"]["tag"] == "${model.name}"  # interpolations stay unresolved strings
    assert meta["rebuilt"] == ["omegaconf.dictconfig.DictConfig",
                               "omegaconf.listconfig.ListConfig", "pathlib.PosixPath"]
    # Lightning stores the DictConfig class itself: it comes back as its name
    assert torch_load(DATA / "omegaconf_hparams.ckpt")["hparams_type"] == \
        "omegaconf.dictconfig.DictConfig"
    _assert_plain(cfg)


@pytest.mark.parametrize("version", ["2.0.6", "2.1.2"])
def test_older_omegaconf_checkpoints(version):
    """DictConfig pickles of omegaconf 2.0 / 2.1 (Hydra 1.0 / 1.1 era) rebuild alike."""
    sd, meta = _load(f"omegaconf_{version}.ckpt")
    assert meta["config"] == {
        "model": {"name": "TransMIL", "n_classes": 2, "dims": [64, 32],
                  "tag": "${model.name}", "dropout": 0.25, "bias": True, "ckpt": None},
        "data": {"fold": 0, "missing": "???"},
    }
    assert meta["rebuilt"] == ["omegaconf.dictconfig.DictConfig",
                               "omegaconf.listconfig.ListConfig"]
    _assert_plain(meta["config"])


def test_namespace_checkpoint():
    sd, meta = _load("namespace_args.pth")
    assert meta["config_key"] == "args" and meta["config"]["n_classes"] == 2
    assert meta["config"]["feats_dir"] == "/data/feats"
    assert meta["config"]["log_dir"] == "/runs/mil/fold0" and meta["epoch"] == 3
    assert meta["rebuilt"] == ["argparse.Namespace", "pathlib.PosixPath"]
    _assert_plain(meta["config"])


def test_easydict_checkpoint():
    sd, meta = _load("easydict_config.pth")
    assert meta["config"]["model"] == {"n_classes": 2, "in_dim": 16}
    assert meta["rebuilt"] == ["easydict.EasyDict"]
    _assert_plain(meta["config"])


def _assert_plain(obj) -> None:
    if isinstance(obj, dict):
        assert type(obj) is dict
        for k, v in obj.items():
            assert isinstance(k, (str, int, float, bool)) or k is None
            _assert_plain(v)
    elif isinstance(obj, list):
        for v in obj:
            _assert_plain(v)
    else:
        assert obj is None or isinstance(obj, (str, int, float, bool)), type(obj)
    assert to_plain(obj) == obj


def test_reading_imports_none_of_the_named_modules():
    """Loading every real file imports no addict / omegaconf / easydict / lightning / utils."""
    names = sorted(p.name for p in DATA.glob("*") if p.suffix in (".ckpt", ".pth"))
    code = (
        "import sys, json\n"
        "from napari_milview._weights import read_state_dict\n"
        f"for n in {names!r}:\n"
        f"    read_state_dict({str(DATA)!r} + '/' + n)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('addict', 'omegaconf', 'easydict', 'pytorch_lightning', 'lightning', 'utils')]\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert len(names) >= 4
    assert json.loads(out.splitlines()[-1]) == []


# ------------------------------------------------------------------------- through load_model
@contextlib.contextmanager
def _fake_addict():
    """A stand-in *writer* for ``addict.Dict``: pickles exactly as addict does (NEWOBJ with
    the ``(key, value)`` pairs, SETITEMS, BUILD with itself), under the name
    ``addict.addict.Dict``; removed from ``sys.modules`` before anything is read."""

    class Dict(dict):
        def __getnewargs__(self):
            return tuple(self.items())

        def __getstate__(self):
            return self

        def __setstate__(self, state):  # pragma: no cover - never read back with it
            self.update(state)

    Dict.__module__, Dict.__qualname__ = "addict.addict", "Dict"
    mod, parent = types.ModuleType("addict.addict"), types.ModuleType("addict")
    mod.Dict, parent.addict = Dict, mod
    sys.modules.update({"addict": parent, "addict.addict": mod})
    try:
        yield Dict
    finally:
        sys.modules.pop("addict.addict")
        sys.modules.pop("addict")


def _abmil_lightning(path: Path, n_classes_in_config: int) -> torch.nn.Module:
    from napari_milview.mil import base

    model = base.build_model("abmil", in_dim=12, n_classes=2, inner_dim=8, attn_dim=4)
    sd = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    with _fake_addict() as Dict:
        hp = {"model": Dict(name="ABMIL", n_classes=n_classes_in_config),
              "optimizer": Dict(lr=2e-4), "log": PosixPath("logs/Camelyon/ABMIL")}
        torch.save({"epoch": 9, "global_step": 90, "pytorch-lightning_version": "1.5.10",
                    "state_dict": sd, "hyper_parameters": hp}, path)
    assert "addict" not in sys.modules
    return model


def test_lightning_addict_config_reaches_load_model(tmp_path):
    from napari_milview.mil.checkpoint import load_model

    path = tmp_path / "epoch=09.ckpt"
    model = _abmil_lightning(path, n_classes_in_config=2)
    assert unsafe_globals(path) == []
    loaded, card = load_model(path, arch="abmil")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    assert "config objects rebuilt as plain data: addict.addict.Dict, pathlib.PosixPath" \
        in card.notes
    assert "stored config cross-checked (n_classes)" in card.notes
    assert "addict" not in sys.modules


def test_lightning_addict_config_contradicting_the_weights(tmp_path):
    from napari_milview.mil.checkpoint import CheckpointError, load_model

    path = tmp_path / "bad.ckpt"
    _abmil_lightning(path, n_classes_in_config=3)
    with pytest.raises(CheckpointError, match=r"says n_classes=3 but the weights give "
                                              r"n_classes=2"):
        load_model(path, arch="abmil")
