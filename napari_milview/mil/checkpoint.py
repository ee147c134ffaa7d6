"""Read, normalise and write MIL model checkpoints without running code from the file.

Loading rules (``DESIGN.md`` section 4, ``style.md`` B.3)
--------------------------------------------------------
* ``.safetensors`` files are read with :func:`safetensors.torch.load_file`; the
  header's ``__metadata__`` strings are returned (JSON values under ``milview`` and
  ``config`` are decoded).
* ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` files are read **only** with
  ``torch.load(path, map_location="cpu", weights_only=True)`` inside
  :class:`torch.serialization.safe_globals` with a minimal allowlist:
  ``argparse.Namespace`` (``args`` saved by many training scripts) and
  :class:`ACMILStruct`, an inert attribute bag registered under the name
  ``utils.utils.Struct`` so ACMIL's ``{'model', 'optimizer', 'epoch', 'config'}``
  container loads without importing ACMIL's code (see :class:`ACMILStruct`).
  ``collections.OrderedDict`` is already allowed by torch.
* When the restricted unpickler refuses a file, :class:`CheckpointError` names the
  file and the globals it would have imported ("refused: loading it would run code
  from ...; no unsafe fallback"). There is **no** fallback to ``weights_only=False``.

Layouts understood
------------------
Containers (:func:`read_state_dict`): a bare state_dict; ACMIL
``{'model', 'optimizer', 'epoch', 'config'}``; PyTorch Lightning
``{'state_dict', 'hyper_parameters', ...}``; ``{'model_state_dict': ...}``;
``{'net': ...}``.

Key normalisation (:func:`normalise_keys`), each step recorded in the notes:

1. drop CLAM's ``instance_loss_fn.*`` buffers (``SmoothTop1SVM.labels``);
2. strip a prefix shared by **all** keys: Lightning ``model.``, DataParallel
   ``module.``, ``torch.compile``'s ``_orig_mod.`` (repeated while one applies);
3. CLAM's multi-GPU infix: ``attention_net.module.*`` -> ``attention_net.*``
   (only that one; the ``.module`` of CLAM's non-gated ``Attn_Net`` is a real
   sub-module name and is kept, unlike CLAM's own blanket ``replace('.module', '')``);
4. CLAM's pre-2024 index layout: without ``--drop_out`` the gated attention net sat
   at ``attention_net.2.*``; it is moved to ``attention_net.3.*``;
5. ACMIL's copy of CLAM is recognised from the shapes (attention hidden size 128 and
   ``L = D_inner`` for its ``small`` size, or a CLAM-SB with more than one attention
   row, i.e. ``n_token > 1``) and reported in the notes: its keys are CLAM's, but its
   CLAM_MB normalises attention with ``softmax_one`` (``exp / (1 + sum exp)``), which
   the shapes cannot reveal.

:func:`load_model` then picks the architecture (argument, stored metadata/config,
else :func:`napari_milview.mil.base.detect_arch`), infers the hyper-parameters from
the tensor shapes, cross-checks them with any stored config and loads with
``strict=True``. :func:`save_model` writes safetensors plus a ``<stem>.json`` sidecar.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import io
import json
import math
import os
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._io import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from napari_milview.mil.base import MILModel, ModelCard

__all__ = [
    "ACMILStruct",
    "CheckpointError",
    "SAFE_GLOBALS",
    "TORCH_SUFFIXES",
    "load_model",
    "normalise_keys",
    "read_state_dict",
    "save_model",
    "sidecar_path",
    "unsafe_globals",
]

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")
_SAFETENSORS_HEADER_MAX = 100_000_000  # the safetensors spec's header cap


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is refused, or does not fit the model."""


class ACMILStruct:
    """Inert stand-in for ACMIL's ``utils.utils.Struct`` configuration object.

    ACMIL saves its training configuration as an instance of
    ``utils.utils.Struct`` (``class Struct: __init__(self, **entries):
    self.__dict__.update(entries)``). ``torch.load(weights_only=True)`` refuses that
    global. Registering this class with the tuple form
    ``(ACMILStruct, "utils.utils.Struct")`` of :class:`torch.serialization.safe_globals`
    makes the restricted unpickler resolve the *name* ``utils.utils.Struct`` to this
    class: it matches globals by the string ``"{module}.{name}"`` and never imports
    the module, so no ACMIL code runs (verified with torch 2.13; the string matching
    also works for a class whose ``__module__``/``__qualname__`` are set to that name,
    but the tuple form is the documented API and needs no spoofed names). The
    unpickler creates the instance with ``__new__`` and hands the saved
    ``__dict__`` to :meth:`__setstate__`, which accepts only a dict with string keys.
    """

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError(
                "utils.utils.Struct: expected a dict of attributes, got "
                f"{type(state).__name__}"
            )
        self.__dict__.update(state)

    def to_dict(self) -> dict[str, Any]:
        """Return the attributes as a plain dict."""
        return dict(self.__dict__)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"ACMILStruct({inner})"


#: the allowlist handed to :class:`torch.serialization.safe_globals`
SAFE_GLOBALS: list[Any] = [argparse.Namespace, (ACMILStruct, "utils.utils.Struct")]


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
        Globals in order of first appearance (``GLOBAL``, ``INST`` and
        ``STACK_GLOBAL`` with the two strings it pops, followed through the memo).
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
    seen: dict[str, None] = {}
    for g in found:
        seen.setdefault(g, None)
    return list(seen)


def _allowed_global_names() -> set[str]:
    """Names the restricted unpickler accepts with :data:`SAFE_GLOBALS` in force."""
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
    """List the globals in a pickle-based checkpoint that the allowlist refuses.

    The file is disassembled statically (:mod:`pickletools`); nothing is imported or
    called. Works for zip ``torch.save`` files (their ``data.pkl``), the legacy
    (pre-1.6) format and plain pickles.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint.

    Returns
    -------
    list of str
        ``module.name`` strings, e.g. ``["posix.system"]``; empty when the file holds
        no refused global (or cannot be parsed as a pickle at all).
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                pkls = [n for n in zf.namelist()
                        if n.endswith(".pkl")]
                data = b"".join(zf.read(n) for n in pkls[:4])
        else:
            with open(path, "rb") as fh:
                data = fh.read(64 * 2**20)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return []
    allowed = _allowed_global_names()
    return [g for g in _globals_in_pickle_stream(data) if g not in allowed]


# ----------------------------------------------------------------------------------------
# reading
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


def _to_plain(obj: Any, depth: int = 0) -> Any:
    """Turn a loaded config object into JSON-friendly Python values."""
    if depth > 8:
        return repr(obj)
    if isinstance(obj, (ACMILStruct, argparse.Namespace)):
        obj = dict(vars(obj))
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_to_plain(v, depth + 1) for v in obj]
    if isinstance(obj, torch.Tensor):
        if obj.numel() == 1:
            return obj.item()
        return f"<tensor {tuple(obj.shape)} {obj.dtype}>"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _is_tensor_mapping(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _check_state_dict(sd: Mapping, name: str, where: str) -> dict[str, torch.Tensor]:
    """Ensure ``sd`` maps str -> Tensor; name the leftovers otherwise."""
    bad = [f"{k!s} ({type(v).__name__})" for k, v in sd.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        more = f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""
        raise CheckpointError(
            f"{name}: {where} is not a state_dict of tensors; non-tensor entries: "
            f"{', '.join(bad[:10])}{more}"
        )
    if not sd:
        raise CheckpointError(f"{name}: {where} is empty")
    return dict(sd)


# (key, format name) in order of preference
_CONTAINERS = (
    ("state_dict", "lightning"),
    ("model_state_dict", "model_state_dict"),
    ("model", "model"),
    ("net", "net"),
)
_CONFIG_KEYS = ("config", "hyper_parameters", "hparams", "args", "cfg")


def _unwrap(obj: Any, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the state_dict inside a loaded container."""
    if isinstance(obj, torch.nn.Module):  # cannot happen with weights_only, be explicit
        raise CheckpointError(f"{name}: holds a pickled module, not a state_dict")
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{name}: holds a {type(obj).__name__}, not a state_dict or a dict containing one"
        )
    if _is_tensor_mapping(obj):
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
        # a bare state_dict with non-tensor leftovers, or an unknown container
        _check_state_dict(obj, name, "the file")
        raise AssertionError("unreachable")  # pragma: no cover
    for ck in _CONFIG_KEYS:
        if ck in obj and obj[ck] is not None:
            cfg = _to_plain(obj[ck])
            if isinstance(cfg, dict):
                meta["config"] = cfg
                meta["config_key"] = ck
                break
    epoch = obj.get("epoch")
    if isinstance(epoch, int):
        meta["epoch"] = epoch
    used = {meta["state_dict_key"], meta.get("config_key"), "epoch"}
    meta["ignored_keys"] = sorted(str(k) for k in obj if k not in used)
    return sd, meta


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


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with the allowlist; refusals -> CheckpointError."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)
    except _TORCH_LOAD_ERRORS as exc:
        bad = unsafe_globals(path)
        if bad:
            raise CheckpointError(
                f"{path}: refused: loading it would run code from {', '.join(bad)}; "
                "no unsafe fallback. If you trust this file, convert it once in the "
                "environment that wrote it (save its state_dict with safetensors) and "
                "load that instead."
            ) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {_short(exc)})"
        ) from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw_meta = dict(fh.metadata() or {})
        sd = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    meta: dict[str, Any] = {"format": "safetensors"}
    if raw_meta:
        meta["safetensors_metadata"] = raw_meta
    for key, target in (("milview", "card"), ("config", "config")):
        if key in raw_meta:
            try:
                val = json.loads(raw_meta[key])
            except json.JSONDecodeError as exc:
                raise CheckpointError(
                    f"{path}: metadata '{key}' is not valid JSON ({exc})"
                ) from None
            if not isinstance(val, dict):
                raise CheckpointError(f"{path}: metadata '{key}' is not a JSON object")
            meta[target] = val
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors")
    return sd, meta


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the tensors and whatever metadata a checkpoint container holds.

    Parameters
    ----------
    path : str or os.PathLike
        ``.safetensors``, or ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` (read with
        ``torch.load(weights_only=True)`` and the :data:`SAFE_GLOBALS` allowlist only).
        Other suffixes are recognised from their first bytes.

    Returns
    -------
    state_dict : dict of str to torch.Tensor
        The raw (not yet normalised) state_dict, on the CPU.
    metadata : dict
        ``format`` (``"safetensors"``, ``"state_dict"``, ``"acmil"``, ``"lightning"``,
        ``"model_state_dict"``, ``"model"`` or ``"net"``); optionally ``card`` (our own
        model card), ``config`` (ACMIL config / Lightning ``hyper_parameters`` /
        ``args`` as plain values), ``epoch``, ``ignored_keys`` (e.g. ``optimizer``)
        and ``safetensors_metadata`` (the raw header strings).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    CheckpointError
        Unreadable, refused (it would import code), or no state_dict of tensors found.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: is empty")
    suffix = path.suffix.lower()
    kind = "safetensors" if suffix == ".safetensors" else (
        "torch" if suffix in TORCH_SUFFIXES else _sniff(path))
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind != "torch":
        raise CheckpointError(
            f"{path}: unknown checkpoint type (expected .safetensors or one of "
            f"{', '.join(TORCH_SUFFIXES)})"
        )
    obj = _torch_load(path)
    sd, meta = _unwrap(obj, str(path))
    return sd, meta


# ----------------------------------------------------------------------------------------
# key normalisation
# ----------------------------------------------------------------------------------------

_SHARED_PREFIXES = (
    ("model.", "stripped the PyTorch Lightning 'model.' prefix"),
    ("module.", "stripped the DataParallel 'module.' prefix"),
    ("_orig_mod.", "stripped the torch.compile '_orig_mod.' prefix"),
)


def _rename(sd: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        nk = new + k[len(old):] if k.startswith(old) else k
        if nk in out:
            raise CheckpointError(f"renaming {old!r} -> {new!r} collides on key {nk!r}")
        out[nk] = v
    return out


def normalise_keys(
    sd: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map official/legacy key layouts onto the names our model classes use.

    Parameters
    ----------
    sd : mapping of str to torch.Tensor
        A raw state_dict (from :func:`read_state_dict`).

    Returns
    -------
    state_dict : dict of str to torch.Tensor
        The renamed state_dict (tensors are not copied).
    notes : list of str
        One human-readable line per change (empty when nothing changed).

    Raises
    ------
    CheckpointError
        A rename would make two keys collide.

    Notes
    -----
    The steps are listed in the module docstring. Prefixes are stripped only when
    *every* key carries them, so a model with a real sub-module named ``model`` is
    left alone.
    """
    out = dict(sd)
    notes: list[str] = []

    dropped = [k for k in out if "instance_loss_fn" in k.split(".")]
    if dropped:
        for k in dropped:
            del out[k]
        notes.append(f"dropped {len(dropped)} CLAM training-loss buffer(s) "
                     f"({', '.join(dropped[:3])})")

    changed = True
    while changed and out:
        changed = False
        for prefix, note in _SHARED_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                notes.append(note)
                changed = True

    if any(k.startswith("attention_net.module.") for k in out):
        out = _rename(out, "attention_net.module.", "attention_net.")
        notes.append("CLAM multi-GPU layout: 'attention_net.module.*' -> 'attention_net.*'")

    has2 = any(k.startswith("attention_net.2.") for k in out)
    has3 = any(k.startswith("attention_net.3.") for k in out)
    if has2 and not has3:
        out = _rename(out, "attention_net.2.", "attention_net.3.")
        notes.append("legacy CLAM layout (no dropout layer): 'attention_net.2.*' -> "
                     "'attention_net.3.*'")

    a_w = out.get("attention_net.3.attention_a.0.weight")
    c_w = out.get("attention_net.3.attention_c.weight")
    if a_w is not None and a_w.ndim == 2:
        d_attn, l_dim = int(a_w.shape[0]), int(a_w.shape[1])
        sb_multi = ("classifiers.weight" in out and c_w is not None and c_w.shape[0] > 1)
        if d_attn not in (256, 384) or l_dim != 512 or sb_multi:
            why = []
            if d_attn not in (256, 384):
                why.append(f"attention hidden size {d_attn} (official CLAM: 256/384)")
            if l_dim != 512:
                why.append(f"embedding size {l_dim} (official CLAM: 512)")
            if sb_multi:
                why.append(f"CLAM-SB with {int(c_w.shape[0])} attention rows (n_token > 1)")
            notes.append(
                "looks like ACMIL's copy of CLAM (" + "; ".join(why) + "); same keys as "
                "CLAM, but ACMIL's CLAM_MB uses softmax_one instead of softmax, which the "
                "shapes cannot show"
            )
    return out, notes


# ----------------------------------------------------------------------------------------
# model cards, sidecars, config cross-checks
# ----------------------------------------------------------------------------------------

#: stored-config field -> hyper-parameter names it may correspond to (the first one the
#: weights determine is cross-checked; a contradiction raises)
_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "D_feat": ("in_dim",),
    "in_dim": ("in_dim",),
    "input_dim": ("in_dim",),
    "embed_dim": ("in_dim",),
    "D_inner": ("inner_dim", "hidden_dim", "dim"),
    "inner_dim": ("inner_dim",),
    "n_class": ("n_classes",),
    "n_classes": ("n_classes",),
    "num_classes": ("n_classes",),
    "n_token": ("n_token",),
    "model_size": ("size_arg",),
    "size_arg": ("size_arg",),
}

#: stored-config fields the weights cannot show (ACMIL's STKIM settings): kept and passed
#: to the constructor when the architecture takes them
_TRAINING_ONLY_FIELDS = ("n_masked_patch", "mask_drop")

#: ACMIL's ``--arch`` values
_CONFIG_ARCH = {"ga": "acmil_ga", "mha": "acmil_mha"}


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a weights file: ``<stem>.json`` next to it."""
    path = Path(path)
    return path.with_name(path.stem + ".json")


def _read_sidecar(sidecar: Any, weights: Path) -> tuple[dict[str, Any], str | None]:
    """Return (sidecar dict, where it came from)."""
    if isinstance(sidecar, Mapping):
        return dict(sidecar), "sidecar argument"
    if sidecar is None:
        cand = sidecar_path(weights)
        if not cand.is_file():
            return {}, None
        sidecar = cand
    sidecar = Path(sidecar)
    if not sidecar.is_file():
        raise FileNotFoundError(f"sidecar not found: {sidecar}")
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{sidecar}: not a readable JSON sidecar ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{sidecar}: a sidecar must be a JSON object")
    return data, str(sidecar)


def _config_views(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The config itself and, for Lightning-style configs, its ``model`` section."""
    views: list[Mapping[str, Any]] = [config]
    for key in ("model", "Model", "model_args"):
        sub = config.get(key)
        if isinstance(sub, Mapping):
            views.append(sub)
    return views


def _arch_from_config(config: Mapping[str, Any]) -> str | None:
    """An architecture name stored in a training config, if it names a known model."""
    from napari_milview.mil import base

    for view in _config_views(config):
        for key in ("arch", "model_name", "name", "model_type"):
            val = view.get(key)
            if not isinstance(val, str) or not val.strip():
                continue
            cand = _CONFIG_ARCH.get(val.strip().lower(), val)
            try:
                base.resolve_arch(cand)
            except ValueError:
                continue
            return cand
    return None


def _constructor_params(cls: type) -> set[str]:
    import inspect

    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):  # pragma: no cover
        return set()
    return {p for p in sig.parameters if p != "self"}


def _cross_check(hp: Mapping[str, Any], config: Mapping[str, Any], accepted: set[str],
                 name: str, what: str) -> tuple[dict[str, Any], list[str]]:
    """Check ``config`` against the inferred ``hp``; return the training-only fields to keep.

    Returns
    -------
    extra : dict
        :data:`_TRAINING_ONLY_FIELDS` present in the config and taken by the constructor.
    used : list of str
        The config fields that were cross-checked or kept.
    """
    extra: dict[str, Any] = {}
    used: list[str] = []
    for view in _config_views(config):
        for field, hnames in _CONFIG_FIELDS.items():
            if field not in view:
                continue
            hname = next((h for h in hnames if h in hp), None)
            if hname is None:
                continue
            if not _same(view[field], hp[hname]):
                raise CheckpointError(
                    f"{name}: {what} says {field}={view[field]!r} but the weights give "
                    f"{hname}={hp[hname]!r}"
                )
            used.append(field)
        for field in _TRAINING_ONLY_FIELDS:
            if field in view and field in accepted and field not in extra:
                extra[field] = view[field]
                used.append(field)
    return extra, list(dict.fromkeys(used))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b) and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    return a == b


def _key_report(expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor],
                limit: int = 10) -> str:
    """Missing / unexpected keys and shape mismatches, the first ``limit`` of each."""
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


def _closest_arch(sd: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """The registered architecture whose default key set overlaps ``sd`` most."""
    from napari_milview.mil import base

    best: tuple[float, str, str] | None = None
    for name, cls in base.MODELS.items():
        if name in base.ALIASES:
            continue
        try:
            ref = cls().state_dict()
        except (TypeError, ValueError, RuntimeError):  # pragma: no cover
            continue
        overlap = len(set(ref) & set(sd)) / max(len(set(ref) | set(sd)), 1)
        if best is None or overlap > best[0]:
            best = (overlap, name, _key_report(ref, {k: sd[k] for k in sd}))
    if best is None:
        return None
    return best[1], best[2]


def _default_classes(n: int) -> list[str]:
    return [f"class_{i}" for i in range(n)]


# ----------------------------------------------------------------------------------------
# loading and saving models
# ----------------------------------------------------------------------------------------


def load_model(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    hparams: Mapping[str, Any] | None = None,
    sidecar: str | os.PathLike | Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[MILModel, ModelCard]:
    """Load a MIL model from a checkpoint file, safely, with ``strict=True``.

    Parameters
    ----------
    path : str or os.PathLike
        Weights: ``.safetensors`` or a ``.pt``/``.pth``/``.ckpt``/``.bin`` file in any
        layout :func:`read_state_dict` and :func:`normalise_keys` understand.
    arch : str, optional
        Architecture name or alias. Default: the sidecar's / stored card's ``arch``,
        else an architecture named in a stored training config, else
        :func:`napari_milview.mil.base.detect_arch` on the key names and shapes.
    hparams : mapping, optional
        Constructor hyper-parameters. Those the weights determine are cross-checked
        (a contradiction raises); the others (``legacy_nystrom_slice``, dropout ...)
        are passed on.
    sidecar : path or mapping, optional
        Model-card JSON ``{"classes": [...], "feature_dim", "patch_size_um", "encoder",
        "arch"}``. Default: ``<stem>.json`` next to the weights, when present.
    device : str or torch.device
        Where the model is moved.

    Returns
    -------
    model : MILModel
        In eval mode on ``device``.
    card : ModelCard
        ``arch``, the full ``hparams``, ``classes`` (default ``class_0 .. class_{C-1}``),
        ``feature_dim`` (= ``in_dim``), ``encoder``, ``patch_size_um`` and ``notes``
        (every remap and the provenance of each field).

    Raises
    ------
    FileNotFoundError
        The weights (or an explicitly named sidecar) do not exist.
    CheckpointError
        The file is unreadable or refused; the layout is unknown (the message lists the
        missing and unexpected keys against the closest architecture); a stored config,
        sidecar or ``hparams`` contradicts the tensor shapes; or the strict load fails.
    """
    from napari_milview.mil import base

    path = Path(path)
    name = path.name
    raw, meta = read_state_dict(path)
    sd, notes = normalise_keys(raw)
    side, side_src = _read_sidecar(sidecar, path)
    card_meta: dict[str, Any] = dict(meta.get("card") or {})
    config: dict[str, Any] = dict(meta.get("config") or {})
    if meta.get("format") not in (None, "safetensors", "state_dict"):
        notes.insert(0, f"container: {meta['format']} (state_dict under "
                        f"'{meta.get('state_dict_key')}'"
                        + (f", epoch {meta['epoch']}" if "epoch" in meta else "") + ")")

    # -- architecture ------------------------------------------------------------------
    arch_src = "argument"
    if arch is None:
        for src, val in (("sidecar", side.get("arch")), ("stored card", card_meta.get("arch"))):
            if isinstance(val, str) and val:
                arch, arch_src = val, src
                break
    if arch is None and config:
        # a training config's model name is a hint only: used when the layout agrees
        cand = _arch_from_config(config)
        if cand is not None:
            cls_c = base.MODELS[base.resolve_arch(cand)[0]]
            if cls_c.matches_state_dict(cls_c.remap_state_dict(sd)):
                arch, arch_src = cand, "stored config"
            else:
                notes.append(f"stored config names {cand!r} but the weights do not have "
                             "that layout; detecting from the weights")
    if arch is None:
        try:
            arch = base.detect_arch(sd)
            arch_src = "detected from the weights"
        except ValueError as exc:
            arch = _detect_after_model_remaps(sd)
            if arch is None:
                close = _closest_arch(sd)
                hint = (f"; closest architecture {close[0]!r}: {close[1]}" if close else "")
                raise CheckpointError(f"{name}: unknown layout ({exc}){hint}") from None
            arch_src = "detected from the weights"
    try:
        canon, _fixed = base.resolve_arch(arch)
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    cls = base.MODELS[canon]
    key = arch.strip().lower().replace("-", "_")
    arch = key if key in base.ALIASES else canon

    remapped = cls.remap_state_dict(sd)
    if set(remapped) != set(sd):
        notes.append(f"{cls.__name__}.remap_state_dict renamed "
                     f"{len(set(sd) - set(remapped))} key(s)")
    sd = remapped

    # -- hyper-parameters ---------------------------------------------------------------
    accepted = _constructor_params(cls)
    try:
        inferred = cls.hparams_from_state_dict(sd)
    except (ValueError, KeyError) as exc:
        try:
            ref = base.build_model(arch, **dict(hparams or {})).state_dict()
            report = "; " + _key_report(ref, sd)
        except (TypeError, ValueError, RuntimeError):
            report = ""
        raise CheckpointError(f"{name}: not a {arch} checkpoint ({exc}){report}") from None
    hp = dict(inferred)
    for src, values in (("stored card", card_meta.get("hparams")),
                        ("sidecar", side.get("hparams")),
                        ("hparams argument", hparams)):
        if not isinstance(values, Mapping):
            continue
        for k, v in values.items():
            if k in inferred and not _same(v, inferred[k]):
                raise CheckpointError(
                    f"{name}: {src} says {k}={v!r} but the weights give {k}={inferred[k]!r}")
            if k not in inferred:
                if k not in accepted:
                    raise CheckpointError(f"{name}: {src} has {k}={v!r}, which {cls.__name__} "
                                          f"does not accept")
                hp[k] = v
    if config:
        extra, used = _cross_check(inferred, config, accepted, name,
                                   f"the stored {meta.get('config_key', 'config')}")
        for k, v in extra.items():
            hp.setdefault(k, v)
        if used:
            notes.append(f"stored config cross-checked ({', '.join(used)})")

    # -- build and load ------------------------------------------------------------------
    try:
        model = base.build_model(arch, **hp)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{name}: cannot build {arch} with {hp}: {exc}") from None
    report = _key_report(model.state_dict(), sd)
    if report:
        raise CheckpointError(f"{name}: the weights do not fit {arch} "
                              f"(strict load): {report}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # pragma: no cover - the report above catches these
        raise CheckpointError(f"{name}: strict load failed: {exc}") from None
    model = model.to(device).eval()

    # -- model card ---------------------------------------------------------------------
    n_classes = int(model.n_classes)

    def pick(field: str) -> tuple[Any, str | None]:
        for src, d in (("sidecar", side), ("stored card", card_meta)):
            if d.get(field) is not None:
                return d[field], src
        return None, None

    classes, src = pick("classes")
    if classes is None:
        for view in _config_views(config):
            for key in ("classes", "class_names", "label_names"):
                if isinstance(view.get(key), (list, tuple)):
                    classes, src = view[key], "stored config"
                    break
            if classes is not None:
                break
    if classes is None:
        classes = _default_classes(n_classes)
    elif (not isinstance(classes, (list, tuple)) or len(classes) != n_classes):
        raise CheckpointError(
            f"{name}: {src} lists {len(classes) if isinstance(classes, (list, tuple)) else 0}"
            f" class name(s) but the weights have n_classes={n_classes}")
    feature_dim, src = pick("feature_dim")
    if feature_dim is not None and int(feature_dim) != int(model.in_dim):
        raise CheckpointError(f"{name}: {src} says feature_dim={feature_dim} but the weights "
                              f"take in_dim={model.in_dim}")
    encoder, _ = pick("encoder")
    if encoder is None and isinstance(config.get("pretrain"), str):
        encoder = config["pretrain"]  # ACMIL's --pretrain preset name
    patch_um, _ = pick("patch_size_um")
    stored_notes, _ = pick("notes")
    stored = [p for p in str(stored_notes or "").split("; ") if p]
    if not stored:  # provenance only for cards we built here (a stored card keeps its own)
        if arch_src != "argument":
            notes.append(f"arch {arch!r} {'from the ' if 'detected' not in arch_src else ''}"
                         f"{arch_src}")
        if side_src:
            notes.append(f"card fields from {side_src}")
    card = base.ModelCard(
        arch=arch,
        hparams=dict(model.hparams),
        classes=[str(c) for c in classes],
        feature_dim=int(model.in_dim),
        encoder=None if encoder is None else str(encoder),
        patch_size_um=None if patch_um is None else float(patch_um),
        notes="; ".join(stored + [n for n in notes if n not in stored]),
    )
    return model, card


def _detect_after_model_remaps(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Like ``detect_arch``, after each class's own ``remap_state_dict``."""
    from napari_milview.mil import base

    hits = []
    for name, cls in base.MODELS.items():
        if name in base.ALIASES:
            continue
        try:
            if cls.matches_state_dict(cls.remap_state_dict(sd)):
                hits.append(name)
        except (ValueError, KeyError):
            continue
    return hits[0] if len(hits) == 1 else None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_model(model: MILModel, card: ModelCard, path: str | os.PathLike) -> Path:
    """Write a model as safetensors with its card, plus a ``<stem>.json`` sidecar.

    Parameters
    ----------
    model : MILModel
        The model; its ``state_dict`` is written (CPU, contiguous copies).
    card : ModelCard
        Stored as JSON under the safetensors metadata key ``milview`` and in the sidecar.
        Empty ``hparams`` are filled from ``model.hparams``; empty ``classes`` and a
        missing ``feature_dim`` are left as they are.
    path : str or os.PathLike
        Target; should end in ``.safetensors``. Both files are written atomically
        (temporary name in the same folder, then ``os.replace``).

    Returns
    -------
    pathlib.Path
        The weights path.

    Raises
    ------
    CheckpointError
        The card is inconsistent (``ModelCard.check``) or does not match the model, or it
        is not JSON serialisable.
    """
    from safetensors.torch import save_file

    path = Path(path)
    d = card.to_dict() if hasattr(card, "to_dict") else (
        asdict(card) if is_dataclass(card) else dict(card))
    if not d.get("hparams"):
        d["hparams"] = dict(getattr(model, "hparams", {}))
    for k in ("in_dim", "n_classes"):
        mv = getattr(model, k, None)
        if mv is not None and k in d["hparams"] and int(d["hparams"][k]) != int(mv):
            raise CheckpointError(f"card hparams {k}={d['hparams'][k]} but the model has {mv}")
    problems = type(card).from_dict(d).check() if hasattr(card, "check") else []
    if problems:
        raise CheckpointError("inconsistent model card: " + "; ".join(problems))
    try:
        text = json.dumps(d, default=_json_default, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"model card is not JSON serialisable: {exc}") from None
    tensors = {k: v.detach().to("cpu").contiguous().clone()
               for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "milview": text}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write(sidecar_path(path),
                  lambda tmp: tmp.write_text(json.dumps(d, default=_json_default, indent=2,
                                                        sort_keys=True) + "\n",
                                             encoding="utf-8"))
    return path
