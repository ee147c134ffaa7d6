"""Training-config objects inside checkpoints (``napari_milview/_weights.py`` stand-ins).

Hostile pickles are written opcode by opcode (protocol 2, what ``torch.save`` writes and
torch's restricted unpickler reads) and put in a real ``torch.save`` zip in place of its
``data.pkl``. Each would create a marker file if anything in it ran; each must be refused
with the globals it names (:func:`unsafe_globals`) or the stand-in's complaint, and the
marker must not exist. The real files under ``tests/data/containers/`` were written with
the real ``addict`` / ``omegaconf`` / ``easydict`` / PyTorch Lightning 1.x by
``make_containers.py`` there; none of those packages is needed (or imported) to read them.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from napari_milview._weights import (
    SAFE_GLOBALS,
    AddictDict,
    WeightsError,
    read_state_dict,
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


def test_every_allowlisted_name_is_inert():
    """The allowlist holds stand-ins only: no real class or function of the named modules."""
    for obj, name in SAFE_GLOBALS:
        assert isinstance(name, str)
        owner = obj if isinstance(obj, type) else type(obj)
        assert owner.__module__ == "napari_milview._weights", name


def test_stand_in_classes_are_plain_python():
    """A stand-in made outside a load is still inert: pairs in, a Counter-backed dict out."""
    made = AddictDict(("a", 1))
    assert dict(made) == {"a": 1}
    with pytest.raises(Exception, match="expected a dict of attributes"):
        made.__setstate__([("a", 2)])
