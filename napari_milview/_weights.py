"""Read weight files safely: no code from the file ever runs (used by ``features/`` and ``mil/``).

This module knows files, containers and key prefixes; it knows no model. Architecture key
remaps live in each architecture's module (``mil/clam.py`` ...); model loading, hyper-parameter
inference and the model card live in ``mil/checkpoint.py``.

Loading rules (``DESIGN.md`` section 4, ``style.md`` B.3)
--------------------------------------------------------
* ``.safetensors`` files are read with :func:`safetensors.torch.load_file`; the header's
  ``__metadata__`` strings are returned (JSON values under ``milview`` and ``config`` are
  decoded).
* ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` / ``.tar`` files are read **only** with
  ``torch.load(path, map_location="cpu", weights_only=True)`` inside
  :class:`torch.serialization.safe_globals` with an allowlist of inert stand-ins
  (:data:`napari_milview._inert.SAFE_GLOBALS`) registered as ``(stand-in, "module.name")``:
  torch's restricted unpickler matches globals by that string and never imports them. The
  stand-ins rebuild the training-config objects that scripts save next to the weights
  (``addict.Dict``, ``easydict.EasyDict``, ``argparse.Namespace``, ACMIL's
  ``utils.utils.Struct``, omegaconf containers, ``pathlib`` paths ...) as plain data (dict,
  list, str, numbers); what is rebuilt as what, and the limits: :mod:`napari_milview._inert`
  (the list also in :func:`torch_load`). Nothing named in a file is ever called.
  ``collections.OrderedDict`` is already allowed by torch.
* When the restricted unpickler refuses a file, :class:`WeightsError` names the file and the
  globals it would have imported (:func:`unsafe_globals`, a static :mod:`pickletools` scan):
  "refused: loading it would run code from ...; no unsafe fallback". There is **no**
  fallback to ``weights_only=False``.

Containers understood (:func:`read_state_dict`): a bare state_dict; ACMIL
``{'model', 'optimizer', 'epoch', 'config'}``; PyTorch Lightning
``{'state_dict', 'hyper_parameters', ...}``; ``{'model_state_dict': ...}``; ``{'net': ...}``;
a dict of several module state_dicts (DTFD-MIL's ``{'classifier': ..., 'dim_reduction': ...,
'attention': ..., 'att_classifier': ...}``), joined into one state_dict as
``<module>.<key>``.

Generic key handling: :func:`strip_prefixes` removes a prefix shared by **all** keys
(Lightning ``model.``, DataParallel ``module.``, ``torch.compile``'s ``_orig_mod.``);
:func:`rename_prefix` renames a key prefix and refuses collisions; :func:`key_report` lists
missing / unexpected keys and shape mismatches for a strict load.

torch and safetensors are imported inside the functions that need them.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import io
import json
import os
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zlib import error as zlib_error

from ._inert import SAFE_GLOBALS, ConfigStruct, load_plain, stand_in_problem
from ._io import file_problem

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

__all__ = [
    "TORCH_SUFFIXES",
    "WeightsError",
    "check_finite",
    "key_report",
    "read_json_object",
    "read_safetensors",
    "read_sidecar",
    "read_state_dict",
    "rename_prefix",
    "sidecar_path",
    "strip_prefix",
    "strip_prefixes",
    "to_plain",
    "torch_load",
    "unsafe_globals",
]

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")
_SAFETENSORS_HEADER_MAX = 100_000_000  # the safetensors spec's header cap


class WeightsError(ValueError):
    """A weights file that cannot be read, is refused, or does not fit the network."""


# ----------------------------------------------------------------------------------------
# static scan of pickle globals (for the refusal message; never executes anything)
# ----------------------------------------------------------------------------------------

_STRING_OPS = {
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
    "SHORT_BINSTRING", "BINSTRING", "STRING",
}


def _fix_name(module: str, name: str = "") -> str:
    """Python-2 pickle names (``__builtin__.getattr``) as Python 3 sees them."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}" if name else module


def _globals_in_pickle_stream(data: bytes, max_pickles: int = 8) -> list[str]:
    """Return ``module.name`` of every global a pickle stream would import.

    Parameters
    ----------
    data : bytes
        One or more concatenated pickles, possibly followed by raw data (the legacy
        ``torch.save`` format); the scan stops at the first byte that does not parse.
    max_pickles : int
        Upper bound on the number of consecutive pickles scanned.

    Returns
    -------
    list of str
        Globals in order of first appearance (``GLOBAL``, ``INST`` and ``STACK_GLOBAL``
        with the two strings it pops, followed through the memo).
    """
    found: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(max_pickles):
        start = stream.tell()
        if start >= len(data):
            break
        memo: dict[int, Any] = {}
        recent: list[Any] = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    found.append(_fix_name(*str(arg).split(" ", 1)))
                    recent.append(None)
                elif name == "STACK_GLOBAL":
                    if len(recent) >= 2 and all(isinstance(s, str) for s in recent[-2:]):
                        found.append(_fix_name(recent[-2], recent[-1]))
                    else:
                        found.append("<STACK_GLOBAL with computed name>")
                    recent.append(None)
                elif name in _STRING_OPS:
                    recent.append(arg if isinstance(arg, str) else None)
                elif name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = recent[-1] if recent else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    recent.append(memo.get(int(arg)))
                else:
                    recent.append(None)
                del recent[:-4]
        except (ValueError, EOFError, UnicodeDecodeError, KeyError, IndexError):
            break
        if stream.tell() == start:
            break
    return list(dict.fromkeys(found))


def _allowed_global_names() -> set[str]:
    """Names the restricted unpickler accepts with ``_inert.SAFE_GLOBALS`` in force."""
    names: set[str] = set()
    for g in SAFE_GLOBALS:
        if isinstance(g, tuple):
            names.add(g[1])
        else:
            names.add(f"{g.__module__}.{g.__qualname__}")
    try:  # private, but the only complete list; fall back to a conservative subset
        from torch import _weights_only_unpickler as wou

        names.update(wou._get_allowed_globals().keys())
    except (ImportError, AttributeError):  # pragma: no cover - torch internals moved
        names.update({"collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                      "torch._utils._rebuild_parameter"})
    return names


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """List the globals in a pickle-based weights file that the allowlist refuses.

    The file is disassembled statically (:mod:`pickletools`); nothing is imported or
    called. Works for zip ``torch.save`` files (their ``data.pkl``), the legacy (pre-1.6)
    format and plain pickles.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    list of str
        ``module.name`` strings, e.g. ``["posix.system"]``; empty when the file holds no
        refused global (or cannot be parsed as a pickle at all).
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                pkls = [n for n in zf.namelist() if n.endswith(".pkl")]
                data = b"".join(zf.read(n) for n in pkls[:4])
        else:
            with open(path, "rb") as fh:
                data = fh.read(64 * 2**20)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return []
    allowed = _allowed_global_names()
    return [g for g in _globals_in_pickle_stream(data) if g not in allowed]


# ----------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------


def _sniff(path: Path) -> str:
    """Return ``"safetensors"``, ``"torch"`` or ``"unknown"`` from the first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= _SAFETENSORS_HEADER_MAX and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    return "unknown"


def _short(exc: BaseException) -> str:
    """First useful line of a torch.load error, without torch's 'weights_only=False' advice."""
    msg = str(exc)
    if "WeightsUnpickler error:" in msg:
        msg = msg.split("WeightsUnpickler error:", 1)[1]
    msg = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    for cut in (" Please use `torch.serialization", " Check the documentation", ". "):
        msg = msg.split(cut, 1)[0]
    return msg[:200].strip() or type(exc).__name__


_TORCH_LOAD_ERRORS = (
    pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, IndexError,
    TypeError, AttributeError, OverflowError, UnicodeDecodeError, zipfile.BadZipFile,
    ImportError, NotImplementedError, AssertionError, MemoryError,
)


def _check_zip(path: Path) -> None:
    """Refuse a zip ``torch.save`` file that is not a sound zip archive, before torch reads it.

    torch checks no CRC of its tensor storages: a flipped byte in the data would load as a
    different weight. ``zipfile`` reads every member once and compares its CRC-32 (the
    file's size in reads; a legacy, non-zip file is left to torch).

    Raises
    ------
    WeightsError
        ``"{path}: damaged torch zip archive: member 'archive/data/0' fails its CRC check"``,
        or ``"... not a readable zip archive (...)"`` for a zip header followed by garbage.
    """
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                return
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except zipfile.BadZipFile as exc:
        raise WeightsError(f"{path}: not a readable zip archive, though it starts like one "
                           f"(torch.save format; {exc}); the file is damaged or truncated"
                           ) from None
    except (OSError, EOFError, ValueError, NotImplementedError, RuntimeError,
            zlib_error) as exc:
        raise WeightsError(f"{path}: damaged torch zip archive ({type(exc).__name__}: "
                           f"{exc})") from None
    if bad is not None:
        raise WeightsError(f"{path}: damaged torch zip archive: member {bad!r} fails its CRC "
                           "check (the bytes changed after it was written)")


def torch_load(path: str | os.PathLike, rebuilt: list[str] | None = None) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with ``_inert.SAFE_GLOBALS``.

    Configuration objects that training scripts pickle next to the weights are rebuilt as
    plain data by inert stand-ins registered **by name** (:mod:`napari_milview._inert`;
    torch's restricted unpickler matches ``"module.name"`` strings and never imports them;
    no code of the named modules runs, and a stand-in only checks and stores the data it
    is handed):

    * ``addict.addict.Dict`` (``addict.Dict``) and ``easydict.EasyDict`` -> dict;
    * ``argparse.Namespace`` and ACMIL's ``utils.utils.Struct`` -> dict of the attributes;
    * ``omegaconf.dictconfig.DictConfig`` -> dict, ``omegaconf.listconfig.ListConfig`` ->
      list, their ``omegaconf.nodes`` value nodes (``AnyNode``, ``StringNode``,
      ``IntegerNode``, ``FloatNode``, ``BooleanNode``, ``BytesNode``, ``PathNode``,
      ``NoneNode``, ``InterpolationResultNode``) -> their values; the helpers their pickles
      name (``omegaconf.base.Metadata`` / ``ContainerMetadata``, ``collections.defaultdict``,
      ``typing.Any`` and the ``builtins`` types ``dict list int float str bool bytes object
      tuple`` as data) are accepted and dropped or kept as their names;
    * ``pathlib`` ``PosixPath``, ``WindowsPath``, ``PurePosixPath``, ``PureWindowsPath``,
      ``Path``, ``PurePath`` (and ``pathlib._local.*``, Python 3.13) -> str;
    * a stand-in class stored as data (Lightning's ``hparams_type``) -> its name.

    Anything else is refused as before; a stand-in handed anything but data of the
    expected shape (``(key, value)`` pairs with plain keys, a dict of str-named
    attributes, str path parts, no constructor arguments) is refused too.

    Parameters
    ----------
    path : str or os.PathLike
        A zip or legacy ``torch.save`` file, or a plain pickle.
    rebuilt : list of str, optional
        Extended with the names of the configuration objects that were rebuilt (e.g.
        ``["addict.addict.Dict", "pathlib.PosixPath"]``).

    Returns
    -------
    object
        What the file holds: tensors on the CPU, containers, and plain dict / list / str /
        number data where the file held allowlisted config objects.

    Raises
    ------
    WeightsError
        Refused (the message names the globals it would import: ``"refused: loading it
        would run code from posix.system; no unsafe fallback ..."``, or what a stand-in
        would not accept: ``"refused: addict.addict.Dict: expected (key, value) pairs, got
        int; nothing was run ..."``) or unreadable. There is no retry with
        ``weights_only=False``.
    """
    import torch

    path = Path(path)
    _check_zip(path)

    def load() -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)

    try:
        obj, names = load_plain(load)
    except RecursionError:
        raise WeightsError(f"{path}: refused: its config objects nest deeper than Python's "
                           "recursion limit; nothing was run") from None
    except _TORCH_LOAD_ERRORS as exc:
        bad = unsafe_globals(path)
        if bad:
            raise WeightsError(
                f"{path}: refused: loading it would run code from {', '.join(bad)}; "
                "no unsafe fallback. If you trust this file, convert it once in the "
                "environment that wrote it (save its state_dict with safetensors) and "
                "load that instead."
            ) from None
        detail = stand_in_problem(exc)
        if detail:
            raise WeightsError(f"{path}: refused: {detail}; nothing was run, and there is "
                               "no unsafe fallback") from None
        raise WeightsError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {_short(exc)})"
        ) from None
    if rebuilt is not None:
        rebuilt.extend(n for n in names if n not in rebuilt)
    return obj


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a ``.safetensors`` file and its header metadata.

    Returns
    -------
    state_dict : dict of str to Tensor
        On the CPU.
    metadata : dict
        ``format = "safetensors"``; ``safetensors_metadata`` (the raw header strings, when
        any); ``card`` and ``config`` (the JSON objects stored under ``milview`` and
        ``config``, when present).

    Raises
    ------
    WeightsError
        Unreadable, no tensors, or a ``milview`` / ``config`` entry that is not a JSON object.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw_meta = dict(fh.metadata() or {})
        sd = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    meta: dict[str, Any] = {"format": "safetensors"}
    if raw_meta:
        meta["safetensors_metadata"] = raw_meta
    for key, target in (("milview", "card"), ("config", "config")):
        if key in raw_meta:
            try:
                val = json.loads(raw_meta[key])
            except json.JSONDecodeError as exc:
                raise WeightsError(f"{path}: metadata '{key}' is not valid JSON ({exc})") from None
            if not isinstance(val, dict):
                raise WeightsError(f"{path}: metadata '{key}' is not a JSON object")
            meta[target] = val
    if not sd:
        raise WeightsError(f"{path}: holds no tensors")
    check_finite(sd, str(path))
    return sd, meta


def to_plain(obj: Any, depth: int = 0) -> Any:
    """Turn a loaded config object into JSON-friendly Python values.

    Attribute bags (:class:`ConfigStruct` stand-ins, ``argparse.Namespace``) and mappings
    become dicts, sequences lists, one-element tensors numbers, other tensors a
    ``"<tensor (shape) dtype>"`` string, anything else its ``repr``.
    """
    import torch

    if depth > 8:
        return repr(obj)
    if isinstance(obj, (ConfigStruct, argparse.Namespace)):
        obj = dict(vars(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_plain(v, depth + 1) for v in obj]
    if isinstance(obj, torch.Tensor):
        if obj.numel() == 1:
            return obj.item()
        return f"<tensor {tuple(obj.shape)} {obj.dtype}>"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _check_state_dict(sd: Mapping, name: str, where: str) -> dict[str, Tensor]:
    """Ensure ``sd`` maps str -> Tensor; name the leftovers otherwise."""
    import torch

    bad = [f"{k!s} ({type(v).__name__})" for k, v in sd.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        more = f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""
        raise WeightsError(
            f"{name}: {where} is not a state_dict of tensors; non-tensor entries: "
            f"{', '.join(bad[:10])}{more}"
        )
    if not sd:
        raise WeightsError(f"{name}: {where} is empty")
    return dict(sd)


# (key, format name) in order of preference
_CONTAINERS = (
    ("state_dict", "lightning"),
    ("model_state_dict", "model_state_dict"),
    ("model", "model"),
    ("net", "net"),
)
_CONFIG_KEYS = ("config", "hyper_parameters", "hparams", "args", "cfg")


def _unwrap(obj: Any, name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Find the state_dict (and any training config) inside a loaded container."""
    import torch

    if isinstance(obj, torch.nn.Module):  # cannot happen with weights_only, be explicit
        raise WeightsError(f"{name}: holds a pickled module, not a state_dict")
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"{name}: holds a {type(obj).__name__}, not a state_dict or a dict containing one"
        )
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _check_state_dict(obj, name, "the file"), {"format": "state_dict"}
    meta: dict[str, Any] = {}
    for key, fmt in _CONTAINERS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            if key == "model" and "config" in obj:
                fmt = "acmil"
            sd = _check_state_dict(inner, name, f"its '{key}' entry")
            meta["format"] = fmt
            meta["state_dict_key"] = key
            break
    else:
        modules = _module_dicts(obj)
        if modules is None:
            # a bare state_dict with non-tensor leftovers, or an unknown container
            _check_state_dict(obj, name, "the file")
            raise AssertionError("unreachable")  # pragma: no cover
        sd = {f"{m}.{k}": v for m in modules for k, v in obj[m].items()}
        meta["format"] = "modules"
        meta["state_dict_key"] = ", ".join(modules)
        meta["modules"] = modules
    meta.update(_container_extras(obj))
    used = {meta["state_dict_key"], meta.get("config_key"), "epoch", *meta.get("modules", ())}
    meta["ignored_keys"] = sorted(str(k) for k in obj if k not in used)
    return sd, meta


def _module_dicts(obj: Mapping) -> list[str] | None:
    """The keys of a dict of several module state_dicts (DTFD-MIL saves
    ``{'classifier': sd, 'dim_reduction': sd, 'attention': sd, 'att_classifier': sd}``):
    every mapping value but a training config maps str to tensors, and there are at least
    two. None otherwise."""
    import torch

    names = [k for k, v in obj.items() if isinstance(v, Mapping) and k not in _CONFIG_KEYS]
    if len(names) < 2 or not all(isinstance(k, str) and "." not in k for k in names):
        return None
    for k in names:
        inner = obj[k]
        if not inner or not all(isinstance(kk, str) and isinstance(v, torch.Tensor)
                                for kk, v in inner.items()):
            return None
    return names


def _container_extras(obj: Mapping) -> dict[str, Any]:
    """The training config (as plain values, with the key it was under) and the epoch."""
    out: dict[str, Any] = {}
    for ck in _CONFIG_KEYS:
        if obj.get(ck) is not None:
            cfg = to_plain(obj[ck])
            if isinstance(cfg, dict):
                out["config"] = cfg
                out["config_key"] = ck
                break
    if isinstance(obj.get("epoch"), int):
        out["epoch"] = obj["epoch"]
    return out


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read the tensors and whatever metadata a weights container holds.

    Parameters
    ----------
    path : str or os.PathLike
        ``.safetensors``, or ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` / ``.tar`` (read with
        :func:`torch_load` only). Other suffixes are recognised from their first bytes.

    Returns
    -------
    state_dict : dict of str to Tensor
        The raw state_dict (keys as stored, prefixes not stripped), on the CPU.
    metadata : dict
        ``format`` (``"safetensors"``, ``"state_dict"``, ``"acmil"``, ``"lightning"``,
        ``"model_state_dict"``, ``"model"``, ``"net"`` or ``"modules"``: a dict of module
        state_dicts, whose names are listed under ``modules``); optionally ``card`` (our own
        model card), ``config`` (ACMIL config / Lightning ``hyper_parameters`` / ``args``
        as plain values, with ``config_key``), ``state_dict_key``, ``epoch``,
        ``ignored_keys`` (e.g. ``optimizer``), ``safetensors_metadata`` and ``rebuilt``
        (the config objects :func:`torch_load` rebuilt as plain data, e.g.
        ``["addict.addict.Dict", "pathlib.PosixPath"]``).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    WeightsError
        Empty, unreadable, refused (it would import code), or no state_dict of tensors found.
    """
    path = Path(path)
    problem = file_problem(path)
    if problem == "no such file or folder":
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if problem is not None:
        raise WeightsError(f"{path}: checkpoint {problem}")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: is empty")
    suffix = path.suffix.lower()
    kind = "safetensors" if suffix == ".safetensors" else (
        "torch" if suffix in TORCH_SUFFIXES else _sniff(path))
    if kind == "safetensors":
        return read_safetensors(path)
    if kind != "torch":
        raise WeightsError(
            f"{path}: unknown checkpoint type (expected .safetensors or one of "
            f"{', '.join(TORCH_SUFFIXES)})"
        )
    rebuilt: list[str] = []
    sd, meta = _unwrap(torch_load(path, rebuilt), str(path))
    if rebuilt:
        meta["rebuilt"] = rebuilt
    check_finite(sd, str(path))
    return sd, meta


def check_finite(sd: Mapping[str, Tensor], name: str) -> None:
    """Refuse weights holding NaN or Inf: a model built from them predicts nothing.

    Raises
    ------
    WeightsError
        ``"{name}: tensor 'head.weight' holds 3 non-finite values (NaN/Inf) of 512 (first:
        nan); the weights are damaged"``, naming the first such tensor and how many others.
    """
    import torch

    bad = []
    for k, t in sd.items():
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                bad.append((k, t, int((~finite).sum())))
    if bad:
        k, t, n = bad[0]
        first = t.reshape(-1)[~torch.isfinite(t.reshape(-1))][0].item()
        more = f"; {len(bad) - 1} more tensor(s) likewise" if len(bad) > 1 else ""
        raise WeightsError(f"{name}: tensor {k!r} holds {n} non-finite value(s) (NaN/Inf) of "
                           f"{t.numel()} (first: {first}){more}; the weights are damaged")


# ----------------------------------------------------------------------------------------
# keys
# ----------------------------------------------------------------------------------------

#: prefixes that wrappers put in front of every key, and the note saying one was stripped
_SHARED_PREFIXES = (
    ("model.", "stripped the PyTorch Lightning 'model.' prefix"),
    ("module.", "stripped the DataParallel 'module.' prefix"),
    ("_orig_mod.", "stripped the torch.compile '_orig_mod.' prefix"),
)


def strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` from every key, when **every** key (longer than it) carries it.

    Parameters
    ----------
    sd : mapping of str to Tensor
    prefix : str
        E.g. ``"module."``.

    Returns
    -------
    dict of str to Tensor
        A new dict (tensors are not copied); ``sd``'s items unchanged when one key lacks the
        prefix, so a model with a real sub-module named like the prefix is left alone.
    """
    if sd and all(k.startswith(prefix) and len(k) > len(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def strip_prefixes(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Strip the wrapper prefixes ``model.``, ``module.``, ``_orig_mod.`` shared by all keys.

    Repeated while one applies (``model.module.x`` -> ``x``).

    Returns
    -------
    state_dict : dict of str to Tensor
        Renamed (tensors are not copied).
    notes : list of str
        One line per prefix stripped (e.g. ``"stripped the DataParallel 'module.' prefix"``).
    """
    out = dict(sd)
    notes: list[str] = []
    changed = True
    while changed and out:
        changed = False
        for prefix, note in _SHARED_PREFIXES:
            stripped = strip_prefix(out, prefix)
            if stripped.keys() != out.keys():
                out = stripped
                notes.append(note)
                changed = True
    return out, notes


def rename_prefix(sd: Mapping[str, Tensor], old: str, new: str) -> dict[str, Tensor]:
    """Rename the key prefix ``old`` to ``new`` (other keys unchanged).

    Raises
    ------
    WeightsError
        Two keys would collide (``"renaming 'a.' -> 'b.' collides on key 'b.x'"``).
    """
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        nk = new + k[len(old):] if k.startswith(old) else k
        if nk in out:
            raise WeightsError(f"renaming {old!r} -> {new!r} collides on key {nk!r}")
        out[nk] = v
    return out


def key_report(expected: Mapping[str, Tensor], sd: Mapping[str, Tensor], limit: int = 10) -> str:
    """What stops ``load_state_dict(sd, strict=True)`` into a network with ``expected``.

    Parameters
    ----------
    expected : mapping of str to Tensor
        The network's own ``state_dict()``.
    sd : mapping of str to Tensor
        The weights read from a file.
    limit : int
        How many keys of each kind are named.

    Returns
    -------
    str
        ``"3 missing: a, b, c; 1 unexpected: d; 1 shape mismatches: e: file (2, 3) vs model
        (3, 3)"``, the kinds that occur joined by ``"; "``; empty when the weights fit.
    """
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------
# JSON sidecars
# ----------------------------------------------------------------------------------------


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a weights file: ``<stem>.json`` next to it."""
    path = Path(path)
    return path.with_name(path.stem + ".json")


def _read_json(path: Path) -> Any:
    """Any JSON value from ``path``; WeightsError ``"not a readable JSON sidecar"``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: not a readable JSON sidecar ({exc})") from None


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON sidecar that must hold an object.

    Raises
    ------
    WeightsError
        ``"{path}: not a readable JSON sidecar (...)"`` or ``"{path}: a sidecar must be a
        JSON object"``.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: a sidecar must be a JSON object")
    return data


def read_sidecar(sidecar: str | os.PathLike | Mapping[str, Any] | None,
                 weights: str | os.PathLike, allow_list: bool = False,
                 ) -> tuple[dict[str, Any] | list[Any], str | None]:
    """The sidecar of a weights file: given as a mapping, a path, or ``<stem>.json``.

    Parameters
    ----------
    sidecar : path, mapping or None
        A mapping is used as it is; a path must exist; ``None`` looks for
        :func:`sidecar_path` of ``weights`` and returns ``({}, None)`` when there is none.
    weights : str or os.PathLike
        The weights file the sidecar belongs to.
    allow_list : bool
        Return a JSON list as it is (DSMIL's training script writes its per-class thresholds
        as a list beside the weights; the caller decides whether the architecture takes one).

    Returns
    -------
    data : dict, or list when ``allow_list`` and the file holds a list
    source : str or None
        ``"sidecar argument"``, the sidecar's path, or None when there is no sidecar.

    Raises
    ------
    FileNotFoundError
        A sidecar path that was named explicitly does not exist.
    WeightsError
        The sidecar is not a regular file (a folder, a named pipe, a broken link: refused
        unopened), or not a readable JSON object.
    """
    if isinstance(sidecar, Mapping):
        return dict(sidecar), "sidecar argument"
    if sidecar is None:
        cand = sidecar_path(weights)
        if not os.path.lexists(cand):
            return {}, None
        sidecar = cand
    sidecar = Path(sidecar)
    problem = file_problem(sidecar)
    if problem == "no such file or folder":
        raise FileNotFoundError(f"sidecar not found: {sidecar}")
    if problem:  # a folder, a FIFO, a broken link ...: refused by type, never opened
        raise WeightsError(f"{sidecar}: the sidecar {problem}")
    if allow_list:
        data = _read_json(sidecar)
        if isinstance(data, (list, dict)):
            return data, str(sidecar)
    return read_json_object(sidecar), str(sidecar)
